"""``TrainState``: the counters of a run, what a checkpoint stores as ``train_state`` and ``resume`` restores.

A dataclass rather than a dict, so every piece of the trainer reads and writes named, typed
fields; ``to_dict`` / ``from_dict`` are the on-disk form (the checkpoint header's JSON), and
``from_dict`` refuses a damaged state with a ``ModelFileError`` before anything is restored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy

from ..errors import ModelFileError
from .history import History

# Keys every checkpoint written by the Trainer holds (others have defaults).
_REQUIRED = ("step", "epoch", "batch_in_epoch", "epoch_rng_state", "epoch_loss_sum", "epoch_loss_count",
             "epoch_images", "epoch_seconds", "best_value", "best_epoch", "bad_epochs", "stopped_early",
             "data_rng_state", "xpnet_rng_state")
_COUNTERS = ("step", "epoch", "batch_in_epoch", "epoch_loss_count", "epoch_images", "bad_epochs")


@dataclass
class TrainState:
    """Where a run stands.  Field order is the order of the keys in a checkpoint."""

    step: int = 0                          # optimizer steps done
    epoch: int = 0                         # epochs completed
    batch_in_epoch: int = 0                # batches of the epoch in progress already trained on
    epochs_planned: int = 0
    steps_per_epoch: int = 0
    epoch_rng_state: dict | None = None    # the data generator when the epoch in progress began
    data_rng_state: dict | None = None     # the data generator and xpnet's generator, taken when
    xpnet_rng_state: dict | None = None    # the state is saved (``Trainer.checkpoint_state``)
    epoch_loss_sum: float = 0.0            # the epoch in progress: losses read back so far,
    epoch_loss_count: int = 0
    epoch_images: int = 0                  # images trained on and seconds spent
    epoch_seconds: float = 0.0
    best_value: float | None = None        # early stopping: the best ``monitor`` value, its epoch,
    best_epoch: int | None = None
    bad_epochs: int = 0                    # epochs since, and the tie-breaker's value then
    best_tie: float | None = None
    monitor: str | None = None
    mode: str | None = None
    stopped_early: bool = False
    batch_size: int | None = None          # settings a resume must share
    seed: int | None = None
    history: History = field(default_factory=History)
    elapsed: float = 0.0                   # seconds of training in earlier sessions of ``fit``
    epoch_data_wait: float = 0.0           # seconds of the epoch in progress the loop waited for a batch

    @property
    def improved(self) -> bool:
        """Whether the epoch just ended is the best so far (right after early stopping judged it)."""
        return self.best_epoch is not None and self.best_epoch == self.epoch

    def to_dict(self, elapsed: float | None = None) -> dict:
        """The JSON-safe ``train_state`` of a checkpoint; ``elapsed`` replaces the field (seconds up to now)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["history"] = self.history.to_dict()
        d["elapsed"] = round(self.elapsed if elapsed is None else elapsed, 3)
        return d

    @classmethod
    def from_dict(cls, d: dict, path) -> TrainState:
        """The state saved in checkpoint ``path``; ModelFileError if a key is missing or a value damaged."""
        try:
            required = {key: d[key] for key in _REQUIRED}
        except KeyError as exc:
            raise ModelFileError(f"checkpoint {path} was not written by xpnet's Trainer (no {exc} in it).") from None
        history = _checked(path, required, d.get("history"))
        elapsed, best_tie = d.get("elapsed", 0.0), d.get("best_tie")
        for key, v in (("elapsed", elapsed), ("best_tie", best_tie)):
            if not (v is None and key == "best_tie") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise _damaged(path, f"{key} is {v!r}")
        others = {key: d.get(key) for key in ("epochs_planned", "steps_per_epoch", "monitor", "mode",
                                               "batch_size", "seed")}
        wait = d.get("epoch_data_wait", 0.0)  # absent in checkpoints written before it was kept
        if isinstance(wait, bool) or not isinstance(wait, (int, float)):
            raise _damaged(path, f"epoch_data_wait is {wait!r}")
        return cls(**required, **others, best_tie=best_tie, history=history, elapsed=float(elapsed),
                   epoch_data_wait=float(wait))

    def continued(self, plan: TrainState) -> TrainState:
        """This saved state, going on under ``plan``'s epochs and monitor (a new monitor forgets the best)."""
        out = dataclasses.replace(self, epochs_planned=plan.epochs_planned, monitor=plan.monitor, mode=plan.mode)
        if self.monitor != plan.monitor:
            out.best_value, out.best_epoch, out.bad_epochs = None, None, 0
        return out


def _damaged(path, what) -> ModelFileError:
    return ModelFileError(f"checkpoint {path} has a damaged training state ({what}): "
                          "resume from an earlier checkpoint or start a new run.")


def _checked(path, st: dict, history) -> History:
    """Check the counters, RNG states and history read from a checkpoint; returns the History."""
    for key in _COUNTERS:
        v = st[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _damaged(path, f"{key} is {v!r}")
    for key, optional in (("epoch_loss_sum", False), ("epoch_seconds", False), ("best_value", True)):
        v = st[key]
        if not (optional and v is None) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _damaged(path, f"{key} is {v!r}")
    if st["best_epoch"] is not None and (isinstance(st["best_epoch"], bool) or not isinstance(st["best_epoch"], int)):
        raise _damaged(path, f"best_epoch is {st['best_epoch']!r}")
    for name in ("data_rng_state", "xpnet_rng_state", "epoch_rng_state"):
        if name == "epoch_rng_state" and st[name] is None:
            continue
        try:  # on a throw-away generator: the same checks numpy makes when the state is restored
            numpy.random.default_rng().bit_generator.state = st[name]
        except (TypeError, ValueError, KeyError) as exc:
            raise _damaged(path, f"{name}: {exc}") from None
    history = history or {}
    epochs = history.get("epochs", []) if isinstance(history, dict) else None
    steps = history.get("steps", []) if isinstance(history, dict) else None
    if not (isinstance(epochs, list) and all(isinstance(r, dict) for r in epochs)
            and isinstance(steps, list) and all(isinstance(s, list) and len(s) == 2 for s in steps)):
        raise _damaged(path, "history is not a list of epoch records and step losses")
    return History(epochs, steps)
