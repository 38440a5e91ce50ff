"""``HistoryFiles``: ``history.json`` / ``history.csv`` after every epoch and the ``history.png`` plot."""

from __future__ import annotations

import time
from pathlib import Path

from ... import checks
from .base import Callback


class HistoryFiles(Callback):
    """Writes the run's history into ``out_dir`` after every epoch (atomically).

    ``plot``: ``history.png`` after every epoch (True), never (False), or -- a number -- at most
    every ``plot`` seconds and once more at the end (a plot costs about a second of CPU).
    """

    files = ("history.json", "history.csv", "history.png")  # what it writes into out_dir

    def __init__(self, out_dir=None, plot: bool | float = True):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if isinstance(plot, bool) or plot is None:
            self.plot, self.plot_seconds = bool(plot), None
        else:
            self.plot, self.plot_seconds = True, checks.number(plot, "plot", allow_zero=True)
        self._last_plot, self._plotted_epochs = time.monotonic(), 0

    def on_fit_start(self, trainer):
        self._last_plot, self._plotted_epochs = time.monotonic(), 0

    def on_epoch_end(self, trainer, record):
        if self.out_dir is None:
            return
        trainer.history.write_json(self.out_dir / self.files[0])
        trainer.history.write_csv(self.out_dir / self.files[1])
        self._plot(trainer, final=False)

    def on_fit_end(self, trainer):
        self._plot(trainer, final=True)

    def _plot(self, trainer, final: bool) -> None:
        history = trainer.history
        if not self.plot or self.out_dir is None or not len(history):
            return
        now = time.monotonic()
        if self.plot_seconds is not None:
            due = now - self._last_plot >= self.plot_seconds
            if not (due or final) or (final and self._plotted_epochs == len(history)):
                return
        elif final:
            return  # plotted after every epoch already
        history.plot(self.out_dir / self.files[2], title=getattr(trainer.model, "name", ""))
        self._last_plot, self._plotted_epochs = now, len(history)
