"""``EarlyStopping``: the best epoch on a monitored value, patience, and the best weights at the end."""

from __future__ import annotations

import math

from ... import checks
from ...errors import UsageError
from ...nn import serialization as xio
from .base import Callback


class EarlyStopping(Callback):
    """Judges every epoch on ``monitor`` and stops after ``patience`` epochs without progress.

    ``monitor`` (default: the first metric, ``val_<name>``, mode "max"; else ``val_loss``, mode
    "min") also chooses ``best.npz``.  An epoch improves when it beats the best by more than
    ``min_delta``; a NaN never does.  ``tie_break`` (e.g. ``"val_loss"``): when ``monitor``
    equals the best exactly (an accuracy stuck at 100%), an epoch better on this value (lower
    for a loss, else higher) counts as an improvement.  ``restore_best``: the run ends with the
    weights of the best epoch.  The counters live in ``trainer.state`` and resume with it.
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, patience: int | None = None,
                 min_delta: float = 0.0, tie_break: str | None = None, restore_best: bool = True):
        if mode not in (None, "min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.monitor, self.mode, self.tie_break = monitor, mode, tie_break
        self.patience = checks.positive_int(patience, "patience", optional=True)
        self.min_delta = float(min_delta)
        self.restore_best = bool(restore_best)

    def resolve(self, has_val: bool, metrics: dict) -> tuple[str | None, str | None]:
        """(monitor, mode) for a run with or without validation data; usage errors before training."""
        monitor, mode = self.monitor, self.mode
        if monitor is None:
            if not has_val:
                monitor, mode = None, None
            else:
                monitor = f"val_{next(iter(metrics))}" if metrics else "val_loss"
        if monitor is not None and mode is None:
            mode = "min" if "loss" in monitor else "max"
        if monitor is not None and monitor != "val_loss" and monitor.startswith("val_") and monitor[4:] not in metrics:
            raise UsageError(f"monitor {monitor!r} names no metric: choose val_loss or val_<one of {list(metrics)}>.")
        if self.patience is not None and not has_val:
            raise UsageError("patience (early stopping) needs validation data: pass val=(x, y).")
        return monitor, mode

    def on_epoch_end(self, trainer, record):
        s = trainer.state
        s.stopped_early = False
        if s.monitor is None:
            return
        if s.monitor not in record:
            raise UsageError(f"monitor {s.monitor!r} is not among the recorded values {sorted(record)}.")
        value, best = record[s.monitor], s.best_value
        if value is None or math.isnan(value):
            better = False  # a NaN validation value never counts as an improvement
        else:
            better = best is None or (value > best + self.min_delta if s.mode == "max"
                                      else value < best - self.min_delta)
            if not better and self.tie_break is not None and value == best:
                better = self._tie_better(record.get(self.tie_break), s.best_tie)
        if better:
            s.best_value, s.best_epoch, s.bad_epochs = value, s.epoch, 0
            s.best_tie = record.get(self.tie_break) if self.tie_break is not None else None
            return
        s.bad_epochs += 1
        if self.patience is not None and s.bad_epochs >= self.patience:
            s.stopped_early = True
            best = (f"best {s.best_value:.4f} at epoch {s.best_epoch}" if s.best_value is not None
                    else "it was never a number")
            trainer.request_stop(f"early stop: {s.monitor} did not improve for {self.patience} epoch(s); {best}")

    def _tie_better(self, value, best) -> bool:
        """Whether ``value`` of the tie-breaker beats ``best`` (lower wins for a loss, else higher)."""
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        return value < best if "loss" in self.tie_break else value > best

    def on_fit_end(self, trainer):
        s, best = trainer.state, trainer.best_path
        if self.restore_best and best is not None and best.exists() and s.best_epoch is not None \
                and s.best_epoch != s.epoch:
            xio.load_weights(trainer.model, best)
            trainer.say(f"restored the best weights (epoch {s.best_epoch}, {s.monitor} {s.best_value:.4f})")
