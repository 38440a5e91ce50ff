"""What a person watching sees: ``ProgressBar`` (tqdm, on stderr) and ``ProgressLog`` (a line per epoch)."""

from __future__ import annotations

import sys
import time

from .base import Callback


def epoch_name(epoch: int, epochs: int, time_budget: float | None) -> str:
    # With a time budget and no real epoch limit, "epoch 3/1000000" would only confuse.
    return f"epoch {epoch}" if time_budget is not None and epochs >= 10 ** 6 else f"epoch {epoch}/{epochs}"


class ProgressBar(Callback):
    """A tqdm bar of steps with the loss, images/s, learning rate, ETA and the time left of a budget.

    While it is open, the trainer's messages are written through it (``trainer.console``).
    """

    def __init__(self, time_budget: float | None = None, max_steps: int | None = None):
        self.time_budget, self.max_steps = time_budget, max_steps
        self.bar = None
        self._window = (0.0, 0)  # (time, images of the epoch) when the loss was last read

    def on_fit_start(self, trainer):
        from tqdm.auto import tqdm

        s = trainer.state
        total = s.epochs_planned * s.steps_per_epoch
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        if self.time_budget is not None and total > 10 ** 6:
            total = None  # the budget ends the run: count steps, show the time left
        self.bar = tqdm(total=total, initial=s.step, unit="step", dynamic_ncols=True, file=sys.stderr, leave=True)
        trainer.console = self.bar.write

    def on_epoch_start(self, trainer):
        s = trainer.state
        self.bar.set_description(epoch_name(s.epoch + 1, s.epochs_planned, self.time_budget), refresh=False)
        self._window = (time.monotonic(), s.epoch_images)

    def on_losses(self, trainer, first_step, values):
        now, images = time.monotonic(), trainer.state.epoch_images
        seconds = now - self._window[0]
        ips = (images - self._window[1]) / seconds if seconds > 0 else float("nan")
        self._window = (now, images)
        left = ""
        if self.time_budget is not None:
            left = f"  {max(0.0, self.time_budget - trainer.elapsed()):.0f}s left"
        self.bar.set_postfix_str(f"loss {values.mean():.4g}  {ips:,.0f} img/s  lr {trainer.lr:.3g}{left}",
                                 refresh=False)

    def on_step_end(self, trainer):
        self.bar.update(1)

    def on_close(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            trainer.console = None


class ProgressLog(Callback):
    """One line per epoch through the trainer's ``log``: step, losses, validation values, images/s,
    the share of the time spent waiting for data, seconds (and the budget used); ``*`` marks a new
    best epoch."""

    def __init__(self, time_budget: float | None = None):
        self.time_budget = time_budget

    def on_epoch_end(self, trainer, record):
        trainer.say(self.line(record, trainer.state.epochs_planned, trainer.state.improved))

    def line(self, record: dict, epochs: int, improved: bool) -> str:
        parts = [epoch_name(record["epoch"], epochs, self.time_budget), f"step {record['step']}"]
        if record.get("train_loss") is not None:
            parts.append(f"train loss {record['train_loss']:.4f}")
        for k, v in record.items():
            if k.startswith("val_") and isinstance(v, float):
                parts.append(f"{k.replace('_', ' ')} {v:.4f}")
        if record.get("images_per_s"):
            parts.append(f"{record['images_per_s']:,.0f} img/s")
        if record.get("data_wait") is not None:
            parts.append(f"data wait {record['data_wait']:.0%}")
        parts.append(f"{record['seconds']:.1f}s")
        if self.time_budget is not None:
            parts.append(f"({record['elapsed']:.0f}/{self.time_budget:.0f}s of the budget)")
        return "  ".join(parts) + ("  *" if improved else "")
