"""``Trainer`` and ``fit``: the training loop (batches, loss, backward, optimizer step, evaluation).

Everything else a run does -- checkpoints and resume, early stopping, progress, history files
and plots, the NaN guard, time and step limits -- is a callback (``training.callbacks``) called
at fixed points of the loop; the run's counters are one ``TrainState``.  Each unit's docstring
says what it writes and does (files, NaN, Ctrl-C, resume, limits).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import numpy

from .. import backend, checks
from ..errors import ShapeError, UsageError
from ..memory import oom_guard
from ..ops.loss import sigmoid_bce_with_logits
from .callbacks import (Callback, Checkpointer, EarlyStopping, HistoryFiles, Limits, NanGuard, ProgressBar,
                        ProgressLog)
from .history import History
from .prefetch import Prefetcher
from .sources import eval_batches, make_source, to_backend
from .state import TrainState


class Trainer:
    """Trains ``model`` with ``optimizer`` on ``loss`` (default ``sigmoid_bce_with_logits``).

    Keyword arguments:
    * ``out_dir``: folder for checkpoints, history and plot (None: nothing written, no resume);
    * ``batch_size`` (array sources and evaluation), ``eval_batch_size`` (default ``2 * batch_size``);
    * ``metrics``: ``{name: f(logits, y) -> float}`` on the validation set (recorded as ``val_<name>``);
    * ``transform`` / ``eval_transform``: ``f(x, y) -> (x, y)`` on each batch, on the device (random
      draws from ``xpnet.backend.rng()``, whose state checkpoints keep, resume exactly);
    * ``seed``: the data-order generator; ``log_every``: steps between loss read-backs (device
      synchronisations); ``prefetch``: batches fetched ahead and moved to the device in a background
      thread (``training.prefetch``; 0: in the loop); ``log``: a ``print``-like function (None: silent); ``metadata``: a
      JSON-safe dict stored in every checkpoint and model file; ``device_data_bytes``: host arrays
      up to this size are moved to the device once;
    * settings of the default callbacks: ``monitor`` / ``mode`` / ``patience`` / ``min_delta`` / ``tie_break`` /
      ``restore_best`` (``EarlyStopping``), ``checkpoint_every`` / ``checkpoint_seconds`` /
      ``keep_checkpoints`` (``Checkpointer``), ``progress`` (``ProgressBar``), ``plot``
      (``HistoryFiles``), ``time_budget`` / ``max_steps`` (``Limits``);
    * ``callbacks``: more ``Callback`` objects, called after the default ones.

    Each step runs inside ``xpnet.memory.oom_guard`` (running out of memory names a batch size
    that fits); usage errors are raised before the first step.
    """

    def __init__(self, model, optimizer, loss=sigmoid_bce_with_logits, *, out_dir=None, batch_size: int = 128,
                 eval_batch_size: int | None = None, metrics: dict | None = None, monitor: str | None = None,
                 mode: str | None = None, patience: int | None = None, min_delta: float = 0.0,
                 transform=None, eval_transform=None, seed: int = 0, log_every: int = 20,
                 checkpoint_every: int | None = None, checkpoint_seconds: float | None = 600.0,
                 keep_checkpoints: int = 2, progress: bool = True, log=print, plot: bool | float = True,
                 restore_best: bool = True, metadata: dict | None = None,
                 device_data_bytes: int = 2 * 1024 ** 3, time_budget: float | None = None,
                 max_steps: int | None = None, tie_break: str | None = None, callbacks=(), prefetch: int = 2):
        if not callable(loss):
            raise UsageError("loss must be a function (logits, targets) -> (loss, dlogits).")
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.batch_size = checks.positive_int(batch_size, "batch_size")
        self.eval_batch_size = checks.positive_int(eval_batch_size or 2 * self.batch_size, "eval_batch_size")
        self.metrics = dict(metrics or {})
        for name, fn in self.metrics.items():
            if not callable(fn):
                raise UsageError(f"metric {name!r} must be a function (logits, y) -> float.")
        self.early_stopping = EarlyStopping(monitor, mode, patience, min_delta, tie_break, restore_best)
        self.transform, self.eval_transform = transform, eval_transform
        self.seed = checks.integer(seed, "seed", 0, what="a non-negative integer")
        self.log_every = checks.positive_int(log_every, "log_every")
        self.prefetch = checks.integer(prefetch, "prefetch", 0, what="0 (no prefetching) or a positive integer")
        self.checkpoints = Checkpointer(out_dir, checkpoint_every, checkpoint_seconds, keep_checkpoints)
        self.out_dir = self.checkpoints.out_dir
        self.log, self.metadata = log, dict(metadata or {})
        self.device_data_bytes = int(device_data_bytes)
        self.limits = Limits(time_budget, max_steps)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise UsageError(f"callbacks must be xpnet.training.callbacks.Callback objects, got {cb!r}.")
        bar = [ProgressBar(self.limits.time_budget, self.limits.max_steps)] if progress else []
        # In this order: the guard sees the losses first, Limits decides before a periodic checkpoint,
        # EarlyStopping judges an epoch before best.npz, the history files and the epoch line.
        self.callbacks = [NanGuard(), *bar, self.limits,
                          self.early_stopping, self.checkpoints, HistoryFiles(self.out_dir, plot),
                          ProgressLog(self.limits.time_budget), *callbacks]
        self.state: TrainState | None = None
        self.data_rng = numpy.random.default_rng(self.seed)
        self.lr = float("nan")
        self.console = None  # writes a message while a progress display is open (set by ProgressBar)
        self.stopping = self.interrupted = False
        self._pending, self._unsaid, self._session_start, self._epoch_clock = [], [], None, 0.0

    # ------------------------------------------------------------- what the run has done
    @property
    def history(self) -> History:
        """Per-epoch records and step losses (empty before ``fit``)."""
        return self.state.history if self.state is not None else History()

    @property
    def best_epoch(self) -> int | None:
        """The epoch (1-based) whose weights are the best so far by ``monitor`` (ties: ``tie_break``)."""
        return None if self.state is None else self.state.best_epoch

    @property
    def checkpoint_dir(self):
        return self.checkpoints.folder

    @property
    def output_files(self) -> list:
        """The paths the trainer's callbacks write into ``out_dir`` (files and folders; empty without one)."""
        if self.out_dir is None:
            return []
        return [self.out_dir / name for cb in self.callbacks for name in getattr(cb, "files", ())]

    @property
    def best_path(self):
        return self.checkpoints.best_path

    @property
    def last_checkpoint(self):
        return self.checkpoints.last

    def elapsed(self) -> float:
        """Seconds of training in ``fit`` so far, summed over resumed sessions (0 before ``fit``)."""
        if self.state is None:
            return 0.0
        running = 0.0 if self._session_start is None else time.monotonic() - self._session_start
        return float(self.state.elapsed) + running

    def fraction_done(self) -> float:
        """Fraction of the planned work done, in [0, 1] (``Limits.fraction_done``; 0 before ``fit``)."""
        return self.limits.fraction_done(self)

    def checkpoint_state(self) -> dict:
        """The ``train_state`` a checkpoint stores now: the state, with the RNG states of this moment."""
        self.state.data_rng_state = self.data_rng.bit_generator.state
        self.state.xpnet_rng_state = backend.get_rng_state()
        return self.state.to_dict(elapsed=self.elapsed())

    # ------------------------------------------------------------- for callbacks
    def say(self, msg: str) -> None:
        if self.log is not None:
            (self.console or self.log)(msg)

    def request_stop(self, message: str | None = None) -> None:
        """End the run: after the current step (the epoch in progress ends there: evaluated, checkpointed,
        recorded) or, from ``on_epoch_end``, after this epoch.  ``message`` is said once the losses are read."""
        self.stopping = True
        if message:
            self._unsaid.append(message)

    def flush(self) -> None:
        """Read the pending step losses to the host (one synchronisation) and hand them to ``on_losses``."""
        if not self._pending:
            return
        xp = backend.get_array_module(self._pending[0])
        values = backend.to_numpy(xp.stack(self._pending)).astype(numpy.float64)
        first_step = self.state.step - len(self._pending) + 1
        self._pending = []
        self._call("on_losses", first_step, values)  # NanGuard raises at a NaN/inf loss
        self.state.epoch_loss_sum += float(values.sum())
        self.state.epoch_loss_count += int(values.size)
        self.history.steps.append([self.state.step, float(values.mean())])

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _say_unsaid(self) -> None:
        for msg in self._unsaid:
            self.say(msg)
        self._unsaid = []

    # ------------------------------------------------------------- evaluation
    def _xp(self):
        p = next(iter(self.model.parameters().values()), None)
        return backend.get_array_module(p) if p is not None else backend.xp()

    def evaluate(self, data, batch_size: int | None = None) -> dict:
        """``{"loss": float, <metric>: float, ...}`` on ``data`` ((x, y) arrays or an iterable of batches).

        The model runs in evaluation mode (``forward(train=False)``); ``eval_transform`` is applied.
        """
        xp = self._xp()
        logits_parts, y_parts = [], []
        loss_sum, count = None, 0
        for x, y in eval_batches(data, batch_size or self.eval_batch_size):
            x, y = to_backend(x, xp), to_backend(y, xp)
            if self.eval_transform is not None:
                x, y = self.eval_transform(x, y)
            with oom_guard(self.model, int(x.shape[0]), "evaluation", train=False):
                logits = self.model.forward(x, train=False)
                loss, _ = self.loss(logits, y)
            n = int(x.shape[0])
            loss_sum = loss * n if loss_sum is None else loss_sum + loss * n
            count += n
            logits_parts.append(logits)
            y_parts.append(y)
        if count == 0:
            raise UsageError("the evaluation data is empty.")
        logits = xp.concatenate(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        y = xp.concatenate(y_parts) if len(y_parts) > 1 else y_parts[0]
        out = {"loss": float(loss_sum) / count}
        for name, fn in self.metrics.items():
            out[name] = float(fn(logits, y))
        return out

    # ------------------------------------------------------------- the loop
    def fit(self, train, epochs: int, val=None, steps_per_epoch: int | None = None, resume: bool = False) -> History:
        """Train for ``epochs`` epochs (in total, counting those done before a resume); returns the History."""
        epochs = checks.integer(epochs, "epochs", 1, what="a positive integer (the total number of epochs)")
        xp = self._xp()
        source = make_source(train, steps_per_epoch, self.batch_size, xp, self.device_data_bytes)
        monitor, mode = self.early_stopping.resolve(val is not None, self.metrics)
        self.checkpoints.prepare()
        self.data_rng = numpy.random.default_rng(self.seed)
        self.state = TrainState(epochs_planned=epochs, steps_per_epoch=source.steps_per_epoch, monitor=monitor,
                                mode=mode, batch_size=self.batch_size, seed=self.seed)
        self.lr = self.optimizer.current_lr()
        self._pending, self._unsaid, self.stopping, self.interrupted = [], [], False, False
        self.checkpoints.start(self, resume, source)
        s, limit = self.state, self.limits.reached(self)
        if s.stopped_early or s.epoch >= epochs or limit:
            why = "stopped early" if s.stopped_early else limit or f"completed {s.epoch} of {epochs} epoch(s)"
            self.say(f"nothing to do: the run in {self.out_dir} already {why}")
            return self.history
        with _ctrl_c_sets(self):
            self._session_start = time.monotonic()
            try:
                self._call("on_fit_start")
                self._run(source, val, xp)
            finally:
                self._call("on_close")
                self.state.elapsed = self.elapsed()
                self._session_start = None
        return self.history

    def _run(self, source, val, xp) -> None:
        s = self.state
        while s.epoch < s.epochs_planned:
            if s.batch_in_epoch == 0:
                s.epoch_rng_state = self.data_rng.bit_generator.state
                s.epoch_loss_sum, s.epoch_loss_count, s.epoch_images, s.epoch_seconds = 0.0, 0, 0, 0.0
                s.epoch_data_wait = 0.0
            else:  # resumed inside this epoch: replay its shuffle from the saved state
                self.data_rng.bit_generator.state = s.epoch_rng_state
            source.start_epoch(self.data_rng, skip=s.batch_in_epoch)
            self._call("on_epoch_start")
            self._epoch_clock = time.monotonic()
            with Prefetcher(source, s.batch_in_epoch, s.steps_per_epoch, xp, self.prefetch) as batches:
                for _ in range(s.batch_in_epoch, s.steps_per_epoch):
                    t = time.monotonic()
                    x, y = next(batches)
                    s.epoch_data_wait += time.monotonic() - t  # the loop waiting for data
                    self._step(x, y, xp)
                    del x, y  # the batch is the prefetcher's again once the next one is taken
                    self._call("on_step_end")  # Limits may stop, Checkpointer may write
                    if self.interrupted:
                        self._interrupt(saved=False)
                    if self.stopping:
                        break
            self.flush()
            self._clock_epoch()
            self._say_unsaid()
            self._end_epoch(val)
            if self.interrupted:
                self._interrupt(saved=True)
            if self.stopping:
                break
        self._call("on_fit_end")

    def _step(self, x, y, xp) -> None:
        x, y = to_backend(x, xp), to_backend(y, xp)
        if self.transform is not None:
            x, y = self.transform(x, y)
        n = int(x.shape[0])
        with oom_guard(self.model, n):
            logits = self.model.forward(x, train=True)
            loss, dlogits = self.loss(logits, y)
            if getattr(loss, "ndim", None) != 0:
                raise ShapeError("the loss function must return (loss as a 0-d array, dlogits).")
            self.model.backward(dlogits)
            self.lr = self.optimizer.step()
        s = self.state
        s.step += 1
        s.batch_in_epoch += 1
        s.epoch_images += n
        self._pending.append(loss)  # read back every log_every steps: one device synchronisation
        if len(self._pending) >= self.log_every:
            self.flush()
        self._clock_epoch()

    def _clock_epoch(self) -> None:
        now = time.monotonic()
        self.state.epoch_seconds += now - self._epoch_clock
        self._epoch_clock = now

    def _end_epoch(self, val) -> None:
        """Evaluate, record the epoch in the history, then ``on_epoch_end``."""
        s = self.state
        s.epoch += 1
        s.batch_in_epoch = 0
        record = {"epoch": s.epoch, "step": s.step, "lr": self.lr,
                  "train_loss": (s.epoch_loss_sum / s.epoch_loss_count) if s.epoch_loss_count else None}
        t_eval = time.monotonic()
        if val is not None:
            record.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
        record["seconds"] = round(s.epoch_seconds, 3)
        record["elapsed"] = round(self.elapsed(), 3)
        record["eval_seconds"] = round(time.monotonic() - t_eval, 3)
        record["images_per_s"] = round(s.epoch_images / s.epoch_seconds, 1) if s.epoch_seconds > 0 else None
        # Share of the epoch's training time spent waiting for batches (an upper bound on a GPU's idle share).
        record["data_wait"] = round(min(1.0, s.epoch_data_wait / s.epoch_seconds), 4) if s.epoch_seconds > 0 else None
        self.history.epochs.append(record)
        self._call("on_epoch_end", record)
        self._say_unsaid()

    def _interrupt(self, saved: bool) -> None:
        self._call("on_interrupt", saved)
        raise KeyboardInterrupt


@contextlib.contextmanager
def _ctrl_c_sets(trainer):
    """The first Ctrl-C sets ``trainer.interrupted`` (the step finishes, a checkpoint is written, then
    KeyboardInterrupt); a second one interrupts at once.  Only the main thread receives signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        trainer.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(model, optimizer, train, epochs: int, val=None, steps_per_epoch=None, resume=False, **trainer_kwargs):
    """Shortcut: ``Trainer(model, optimizer, **trainer_kwargs).fit(train, epochs, val, steps_per_epoch, resume)``."""
    return Trainer(model, optimizer, **trainer_kwargs).fit(train, epochs, val=val, steps_per_epoch=steps_per_epoch,
                                                          resume=resume)


__all__ = ["Trainer", "History", "TrainState", "fit"]
