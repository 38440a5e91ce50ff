"""``StuckWatch``: ends a run that learns nothing, early, with what to try.

The commonest failure of a reader trained on a small or hard folder is a flat loss: the
outputs settle at the class prior (or CTC at "all blank"), validation reads nothing, and the
run would spend its whole budget there.  After ``min_fraction`` of the planned work (and at
least ``min_steps`` steps), if the training loss of the latest steps is not below ``ratio``
times the loss half-way through the steps so far (the first steps only fall from the initial
weights to the prior, so they do not count) and the monitored validation value is still at
or below ``floor``, the run stops with one sentence: what it saw, and the advice given.
"""

from __future__ import annotations

import numpy

from .base import Callback


class StuckWatch(Callback):
    """Stop a run whose loss stays flat and whose validation ``monitor`` stays at ``floor`` or below.

    ``advice``: the end of the sentence (what the user can try).  After the stop ``stuck`` is True.
    """

    def __init__(self, monitor: str = "val_string_accuracy", floor: float = 0.0, ratio: float = 0.9,
                 min_fraction: float = 0.25, min_steps: int = 500, window: int = 50, advice: str = ""):
        self.monitor, self.floor, self.ratio = monitor, float(floor), float(ratio)
        self.min_fraction, self.min_steps, self.window = float(min_fraction), int(min_steps), int(window)
        self.advice = advice
        self.losses = []           # every step loss read back (a float each: small)
        self.stuck = False

    def on_fit_start(self, trainer):
        self.losses, self.stuck = [], False

    def on_losses(self, trainer, first_step, values):
        self.losses += [float(v) for v in values]

    def on_epoch_end(self, trainer, record):
        n = len(self.losses)
        if self.stuck or n < 2 * self.window or trainer.state.step < self.min_steps:
            return
        if trainer.fraction_done() < self.min_fraction:
            return
        best = max((r.get(self.monitor) for r in trainer.history.epochs if r.get(self.monitor) is not None),
                   default=None)
        half = max(self.window, n // 2)
        before = float(numpy.mean(self.losses[half - self.window:half]))
        now = float(numpy.mean(self.losses[-self.window:]))
        if best is None or best > self.floor or now < self.ratio * before:
            return
        self.stuck = True
        trainer.request_stop(
            f"stopping: nothing is being learned after {trainer.state.step} steps (training loss {now:.4g}, "
            f"{before:.4g} half-way; best {self.monitor.replace('_', ' ')} {best:.3g})"
            + (f"; {self.advice}" if self.advice else ""))
