"""``NanGuard``: a NaN or infinite loss or weight stops training at once, naming the step."""

from __future__ import annotations

import numpy

from ...errors import TrainingError
from .base import Callback


def _last_good(trainer) -> str:
    path = trainer.last_checkpoint
    return f"the last good checkpoint is {path}" if path else "no checkpoint had been written yet"


class NanGuard(Callback):
    """Raises ``TrainingError`` at the exact step whose loss is NaN or infinite.

    Losses are read back in windows of ``log_every`` steps; the guard names the first bad one.
    Checkpoints read the pending losses before writing, so none is written after a bad step and
    the message names the last good one.  Weights can turn non-finite while the loss is still
    finite (BatchNorm statistics overflowing): a checkpoint then refuses to save them and
    ``weights_error`` words that case the same way.
    """

    def on_losses(self, trainer, first_step, values):
        bad = numpy.flatnonzero(~numpy.isfinite(values))
        if bad.size:
            raise TrainingError(
                f"the training loss became {values[bad[0]]} at step {first_step + int(bad[0])} "
                f"(epoch {trainer.state.epoch + 1}); {_last_good(trainer)} "
                "-- lower the learning rate or look for NaN/inf values in the data."
            )

    @staticmethod
    def weights_error(trainer, array_name: str) -> TrainingError:
        """The error for weights found non-finite (first in ``array_name``) when a checkpoint was written."""
        return TrainingError(
            f"the weights became NaN or infinite by step {trainer.state.step} (first in '{array_name}'); "
            f"{_last_good(trainer)} -- lower the learning rate or clip gradients (clip_norm)."
        )
