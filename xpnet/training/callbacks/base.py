"""``Callback``: the points of ``Trainer.fit`` where the extras (checkpoints, early stopping, ...) act."""

from __future__ import annotations


class Callback:
    """A unit the Trainer calls at fixed points of ``fit``; every hook does nothing unless overridden.

    Per run: ``on_fit_start``; per epoch ``on_epoch_start``, per step ``on_step_end`` (with
    ``on_losses`` whenever the step losses are read back to the host: every ``log_every`` steps,
    before a checkpoint and at the end of an epoch), then ``on_epoch_end(record)``; after the last
    epoch ``on_fit_end``.  On Ctrl-C ``on_interrupt(saved)`` (``saved``: a checkpoint of this very
    state exists already), then ``KeyboardInterrupt``.  ``on_close`` runs always, errors included.
    The Trainer calls its callbacks in list order; it reads ``trainer.state`` (a ``TrainState``),
    and a callback ends a run with ``trainer.request_stop(message)``.
    """

    def on_fit_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer) -> None:
        pass

    def on_losses(self, trainer, first_step: int, values) -> None:
        """``values``: float64 losses of steps ``first_step``, ``first_step + 1``, ... (on the host)."""

    def on_step_end(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer, record: dict) -> None:
        """``record``: the epoch's history record (already appended to ``trainer.history``)."""

    def on_interrupt(self, trainer, saved: bool) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass

    def on_close(self, trainer) -> None:
        pass
