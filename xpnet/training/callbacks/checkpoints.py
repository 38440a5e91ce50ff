"""``Checkpointer``: atomic checkpoints, ``best.npz``, the final ``model.npz``, and resume."""

from __future__ import annotations

import time
from pathlib import Path

from ... import backend, checks
from ...errors import ModelFileError, UsageError
from ...nn import serialization as xio
from ..state import TrainState
from .base import Callback
from .nan_guard import NanGuard


class Checkpointer(Callback):
    """Writes ``out_dir/checkpoints/ckpt-<step>.npz`` and keeps the newest ``keep`` of them.

    A checkpoint (model, optimizer, ``trainer.checkpoint_state()``) is written at the end of
    every epoch, every ``every`` steps and every ``seconds`` seconds, and on Ctrl-C; each write is
    atomic, so a crash leaves the previous one whole.  ``best.npz`` is written when an epoch
    improves on the monitored value, ``model.npz`` (with the metadata) when the run ends.
    ``resume`` continues from the newest checkpoint: weights, optimizer slots, both generators,
    the position inside the epoch, history and early-stopping counters, so the result equals an
    uninterrupted run (same backend; on CuPy, Dropout draws from CuPy's generator, which is not
    saved).  Without ``resume`` a folder that already holds a run is refused rather than
    overwritten.  With ``out_dir=None`` nothing is written.
    """

    files = ("checkpoints", "best.npz", "model.npz")  # what it writes into out_dir

    def __init__(self, out_dir=None, every: int | None = None, seconds: float | None = 600.0, keep: int = 2):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.folder = self.out_dir / self.files[0] if self.out_dir is not None else None
        self.best_path = self.out_dir / self.files[1] if self.out_dir is not None else None
        self.every = checks.positive_int(every, "checkpoint_every", optional=True)
        self.seconds = checks.number(seconds, "checkpoint_seconds", allow_zero=True, optional=True)
        self.keep = checks.positive_int(keep, "keep_checkpoints")
        self.last: Path | None = None
        self._last_time = time.monotonic()

    # ------------------------------------------------------------- before training
    def prepare(self) -> None:
        """Prove the folders writable and remove half-written files of a killed run (before any step)."""
        if self.out_dir is None:
            return
        xio.check_writable(self.out_dir)
        xio.check_writable(self.folder, "checkpoint folder")
        for folder in (self.out_dir, self.folder):
            xio.remove_stale_temp_files(folder)

    def start(self, trainer, resume: bool, source) -> None:
        """Resume from the newest checkpoint (``resume``), or refuse a folder that holds a run."""
        self.last = None
        existing = xio.list_checkpoints(self.folder) if self.folder else []
        if resume:
            if self.out_dir is None:
                raise UsageError("resume=True needs out_dir (the folder of the run to continue).")
            path = xio.latest_checkpoint(self.folder)
            if path is None:
                trainer.say(f"no checkpoint in {self.folder}: starting a new run")
            else:
                self._restore(trainer, path, source)
        elif existing:
            raise UsageError(
                f"{self.folder} already holds checkpoints of a run: pass resume=True to continue it, "
                "or choose another out_dir."
            )

    def _restore(self, trainer, path, source) -> None:
        ts = xio.read_header(path).get("train_state") or {}
        plan = trainer.state
        if ts.get("batch_size") != plan.batch_size or ts.get("seed") != plan.seed:
            raise UsageError(
                f"checkpoint {path} was written with batch_size {ts.get('batch_size')} and seed {ts.get('seed')}, "
                f"this trainer has {plan.batch_size} and {plan.seed}: use the same settings to resume."
            )
        if ts.get("steps_per_epoch") != plan.steps_per_epoch:
            raise UsageError(
                f"checkpoint {path} was written with {ts.get('steps_per_epoch')} steps per epoch, this run has "
                f"{plan.steps_per_epoch}: resume with the same data and batch size."
            )
        # Every value is checked before anything is restored: a damaged state leaves nothing half-resumed.
        saved = TrainState.from_dict(ts, path)
        xio.load_checkpoint(path, model=trainer.model, optimizer=trainer.optimizer)
        trainer.state = s = saved.continued(plan)
        trainer.data_rng.bit_generator.state = s.data_rng_state
        backend.set_rng_state(s.xpnet_rng_state)
        self.last = Path(path)
        if s.batch_in_epoch and not source.resumable:
            trainer.say("resuming an iterator source: the batches continue from a fresh iterator "
                        "(exact when it draws from xpnet.backend.rng() lazily)")
        trainer.say(f"resumed from {path} (step {s.step}, epoch {s.epoch + (1 if s.batch_in_epoch else 0)})")

    # ------------------------------------------------------------- writing
    def save(self, trainer) -> Path | None:
        """Write ``ckpt-<step>.npz`` (after reading the pending losses) and prune old ones."""
        if self.folder is None:
            return None
        trainer.flush()
        path = self.folder / xio.checkpoint_name(trainer.state.step)
        self._write(trainer, path)
        self.last = path
        self._last_time = time.monotonic()
        for old in xio.list_checkpoints(self.folder)[self.keep:]:
            try:
                old.unlink()
            except OSError:
                pass
        return path

    def _write(self, trainer, path) -> None:
        try:
            xio.save_checkpoint(path, trainer.model, trainer.optimizer, trainer.checkpoint_state(), trainer.metadata)
        except ModelFileError as exc:
            name = getattr(exc, "array_name", None)
            if name is None:
                raise
            raise NanGuard.weights_error(trainer, name) from None

    def _due(self, trainer) -> bool:
        if self.folder is None:
            return False
        if self.every and trainer.state.step % self.every == 0:
            return True
        return self.seconds is not None and time.monotonic() - self._last_time >= self.seconds

    # ------------------------------------------------------------- hooks
    def on_fit_start(self, trainer):
        self._last_time = time.monotonic()

    def on_step_end(self, trainer):
        s = trainer.state
        # Not after the last batch of an epoch (its end writes one) nor when the run stops or is interrupted.
        if s.batch_in_epoch < s.steps_per_epoch and not (trainer.stopping or trainer.interrupted) \
                and self._due(trainer):
            self.save(trainer)

    def on_epoch_end(self, trainer, record):
        if self.out_dir is None:
            return
        if trainer.state.improved:
            self._write(trainer, self.best_path)
        self.save(trainer)

    def on_interrupt(self, trainer, saved):
        path = self.last if saved else self.save(trainer)
        if path is not None:
            trainer.say(f"interrupted at step {trainer.state.step}: checkpoint saved to {path}; "
                        "run again with resume=True to continue")
        else:
            trainer.say(f"interrupted at step {trainer.state.step} (no out_dir, nothing saved)")

    def on_fit_end(self, trainer):
        if self.out_dir is not None:
            xio.save(trainer.model, self.out_dir / self.files[2], trainer.metadata)
