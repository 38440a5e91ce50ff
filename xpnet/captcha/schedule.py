"""The CAPTCHA job's optimizer and its learning-rate schedule, which follows the time budget."""

from __future__ import annotations

from .. import checks
from ..errors import UsageError
from ..nn import optim


class ProgressOneCycle(optim.Schedule):
    """One-cycle learning rate over the *fraction of the run done* rather than a step count.

    ``progress()`` returns that fraction in [0, 1] (``Trainer.fraction_done``: the
    largest of steps / planned steps and time / time budget).  Rate: cosine
    rise from ``max_lr / div_factor`` to ``max_lr`` over the warm-up, then cosine
    fall to ``max_lr / div_factor / final_div_factor`` at 1.  With a time budget
    the rate is therefore annealed when the budget runs out, however fast the
    machine is.

    The warm-up lasts ``pct_start`` of the run **and at least ``warmup_steps``
    updates**: a short budget or a slow machine must not reach the peak rate in a
    few dozen steps, because then the network stays on the plateau where every
    output predicts the class prior.  As a fraction of the run the warm-up is
    ``w = max(pct_start, warmup_steps * fraction / step)`` (the step count's share
    of the projected total), so the schedule needs no state beyond the step and
    the fraction, and a resumed run continues it exactly.  The warm-up never
    takes more than half the run (``MAX_WARMUP``), so a short run still anneals.
    """

    MAX_WARMUP = 0.5

    def __init__(self, max_lr: float, pct_start: float = 0.25, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, progress=None, warmup_steps: int = 0):
        self.max_lr = checks.number(max_lr, "max_lr")
        self.pct_start = float(pct_start)
        if not 0.0 < self.pct_start < 1.0:
            raise UsageError(f"pct_start must be between 0 and 1 (exclusive), got {pct_start!r}.")
        self.div_factor = checks.number(div_factor, "div_factor")
        self.final_div_factor = checks.number(final_div_factor, "final_div_factor")
        self.warmup_steps = checks.integer(warmup_steps, "warmup_steps", minimum=0)
        self.progress = progress

    def __call__(self, step):
        f = min(1.0, max(0.0, float(self.progress()))) if self.progress is not None else 0.0
        step = max(0, int(step))
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor
        up = f / self.pct_start
        w = self.pct_start
        if self.warmup_steps:
            # the slower of the two measures, but never past half the run
            up = max(min(up, step / self.warmup_steps), f / self.MAX_WARMUP)
            if step > 0:
                w = min(self.MAX_WARMUP, max(w, self.warmup_steps * f / step))
        if up < 1.0:
            return optim.anneal(start, self.max_lr, up)
        return optim.anneal(self.max_lr, end, (f - w) / (1.0 - w))

    def _config(self):
        return {"max_lr": self.max_lr, "pct_start": self.pct_start, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "warmup_steps": self.warmup_steps}


def build_optimizer(settings, model):
    """The settings' optimizer for ``model`` with a ``ProgressOneCycle`` rate: ``(optimizer, schedule)``.

    The schedule's ``progress`` is left to the caller (the trainer's ``fraction_done``).
    """
    schedule = ProgressOneCycle(settings.lr, settings.pct_start, settings.div_factor, settings.final_div_factor,
                                warmup_steps=settings.warmup_steps)
    kind, wd, clip = settings.optimizer, settings.weight_decay, settings.clip_norm
    if kind == "adamw":
        opt = optim.AdamW(model, lr=schedule, weight_decay=wd, clip_norm=clip)
    elif kind == "adam":
        opt = optim.Adam(model, lr=schedule, weight_decay=wd, clip_norm=clip)
    else:
        opt = optim.SGD(model, lr=schedule, momentum=0.9, nesterov=True, weight_decay=wd, clip_norm=clip)
    return opt, schedule


__all__ = ["ProgressOneCycle", "build_optimizer"]
