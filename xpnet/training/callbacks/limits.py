"""``Limits``: a time budget and a step limit that end a run cleanly, and the fraction of the work done."""

from __future__ import annotations

from ... import checks
from .base import Callback


class Limits(Callback):
    """Stops after the step that reaches ``max_steps`` (optimizer steps in total) or ``time_budget``.

    ``time_budget`` counts seconds of wall-clock time inside ``fit``, evaluations included, summed
    over resumes.  The epoch in progress ends at that step (evaluated, checkpointed, recorded as a
    shorter epoch); then the run finishes as usual.
    """

    def __init__(self, time_budget: float | None = None, max_steps: int | None = None):
        self.time_budget = checks.number(time_budget, "time_budget", optional=True)
        self.max_steps = checks.positive_int(max_steps, "max_steps", optional=True)

    def reached(self, trainer) -> str | None:
        """Which limit the run has reached (a few words), or None."""
        if self.max_steps is not None and trainer.state.step >= self.max_steps:
            return f"reached max_steps ({self.max_steps})"
        if self.time_budget is not None and trainer.elapsed() >= self.time_budget:
            return f"reached the time budget ({self.time_budget:.0f} s)"
        return None

    def fraction_done(self, trainer) -> float:
        """In [0, 1]: the largest of step / planned steps, step / ``max_steps`` and elapsed / ``time_budget``."""
        s = trainer.state
        if s is None:
            return 0.0
        done = s.step / max(1, s.epochs_planned * s.steps_per_epoch)
        if self.max_steps is not None:
            done = max(done, s.step / self.max_steps)
        if self.time_budget is not None:
            done = max(done, trainer.elapsed() / self.time_budget)
        return min(1.0, done)

    def on_step_end(self, trainer):
        why = self.reached(trainer)
        if why:
            s = trainer.state
            trainer.request_stop(f"stopping: {why} at step {s.step} (epoch {s.epoch + 1} ends here)")
