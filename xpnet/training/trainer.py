"""The training loop: batches, progress, evaluation, checkpoints, resume, history and plots.

    import xpnet
    from xpnet import metrics, optim
    from xpnet.data import augment       # random per-image shifts (xpnet.data.augment)

    xpnet.seed(0)
    model = xpnet.models.simple_convnet()
    opt = optim.AdamW(model, lr=optim.OneCycle(3e-3, total_steps=20 * 71), weight_decay=1e-4)

    def to_float(x, y):                  # runs on the device, after the uint8 batch got there
        return x.astype("float32") / 255, y.astype("float32")

    def train_transform(x, y):           # draws from xpnet's generator: resumes exactly
        return to_float(augment(x, xpnet.backend.rng(), max_shift=2, fill=0), y)

    trainer = xpnet.Trainer(model, opt, out_dir="runs/mnist", batch_size=128,
                            transform=train_transform, eval_transform=to_float,
                            metrics={"accuracy": metrics.accuracy})
    history = trainer.fit((x_train, y_onehot), epochs=20, val=(x_test, y_test_onehot))
    # after a crash or Ctrl-C, the same call with resume=True continues where it stopped

Data sources
* arrays ``(x, y)`` (NumPy, or already on the device): shuffled every epoch
  by the trainer's own generator (seeded by ``seed``); an epoch is one pass
  (the last batch may be smaller).  When the model lives on CuPy and the
  arrays on the host, they are moved to the device once at the start if they
  take less than ``device_data_bytes`` (then a step copies nothing from the
  host but a few indices).
* any iterable or iterator of ``(x, y)`` batches, e.g. an endless generator
  of freshly drawn CAPTCHAs: give ``steps_per_epoch`` (an "epoch" is then a
  fixed number of steps between evaluations and checkpoints).  A sized,
  re-iterable source (a list of batches) without ``steps_per_epoch`` runs one
  pass per epoch.

``transform(x, y) -> (x, y)`` runs on every training batch after it reached
the model's backend (cast uint8 to float there, augment);
``eval_transform`` does the same for evaluation (no augmentation).  Random
draws in transforms should come from ``xpnet.backend.rng()``: its state is
saved in checkpoints, so a resumed run draws the same numbers.

What you get in ``out_dir``
* ``checkpoints/ckpt-<step>.npz``: the latest ``keep_checkpoints`` checkpoints
  (model, optimizer, step, RNG states, history), written atomically at the end
  of every epoch, every ``checkpoint_every`` steps and every
  ``checkpoint_seconds`` seconds;
* ``best.npz``: the checkpoint of the best epoch on ``monitor`` (when there is
  validation data);
* ``model.npz``: the final model file (``xpnet.load`` reads it), with the best
  weights when ``restore_best`` and validation data are used;
* ``history.csv`` / ``history.json`` / ``history.png``: per-epoch records
  (train loss, validation loss and metrics, learning rate, time, images/s),
  step losses, and a loss + metric plot (matplotlib, no display needed).

Behaviour worth knowing
* The loss is read back to the host only every ``log_every`` steps (one
  device synchronisation per window), at checkpoints and at evaluation.  A
  NaN/inf loss raises ``TrainingError`` naming the exact step; no checkpoint
  is ever written after it (checkpoints read the loss first), so the last one
  on disk is good, and the message names it.
* Running out of memory in a step or an evaluation raises
  ``xpnet.gpu_errors.OutOfMemoryError`` (an ``XpnetError`` and a
  ``MemoryError``) with the batch size that should fit; a checkpoint whose
  training state is damaged is refused (``ModelFileError``) before anything
  is restored.
* Ctrl-C (SIGINT) during ``fit``: the current step finishes, a checkpoint is
  written, and ``KeyboardInterrupt`` is re-raised (the CLI exits with 130).
  A second Ctrl-C interrupts at once.
* ``resume=True`` continues from the newest complete checkpoint in
  ``out_dir/checkpoints`` (or starts fresh, saying so, when there is none):
  weights, optimizer slots and step, the trainer's and xpnet's RNG states,
  position inside the epoch, history and early-stopping counters.  The result
  equals an uninterrupted run with the same seed (same backend; on CuPy,
  Dropout draws from CuPy's generator, which is not checkpointed).  With
  ``resume=False`` an ``out_dir`` that already holds checkpoints is refused
  rather than overwritten.
* Usage errors are raised before any training: ``epochs < 1``, a batch size
  larger than the training set (no silent clamping), an output folder that
  cannot be written, an iterator without ``steps_per_epoch``.
* Early stopping: with ``patience`` set, training stops after ``patience``
  epochs without an improvement of ``monitor`` by more than ``min_delta``.
* Limits: ``time_budget`` (seconds of wall-clock time inside ``fit``, evaluations
  included, summed over resumes) and ``max_steps`` (optimizer steps in total)
  stop training cleanly after the step that reaches them: the epoch in progress
  ends there (evaluated, checkpointed, recorded in the history as a shorter
  epoch), then the best weights are restored and ``model.npz`` is written as
  usual.  ``trainer.fraction_done()`` is the fraction of the planned work done (the
  largest of steps / planned steps, steps / ``max_steps`` and time / budget), so
  a learning-rate schedule can follow the time budget (``xpnet.captcha_train``'s
  ``ProgressOneCycle``).  Every history record carries ``elapsed`` (seconds of
  training so far), so curves can be drawn against time.
* Memory: each step runs inside ``xpnet.gpu_errors.oom_guard``, so running out of
  device (or host) memory raises one sentence naming a batch size that fits.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy

from .. import backend
from ..nn import serialization as xio
from ..memory import oom_guard
from ..errors import DataError, ModelFileError, ShapeError, TrainingError, UsageError
from ..ops.loss import sigmoid_bce_with_logits

# --------------------------------------------------------------------------
# Data sources


class _ArraySource:
    """(x, y) arrays, shuffled per epoch by the trainer's generator."""

    resumable = True

    def __init__(self, x, y, batch_size, xp, device_data_bytes):
        if not hasattr(x, "shape") or not hasattr(y, "shape"):
            raise UsageError("training data must be a pair of arrays (x, y) or an iterable of (x, y) batches.")
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"training data has {x.shape[0]} inputs but {y.shape[0]} targets.")
        n = int(x.shape[0])
        if n == 0:
            raise UsageError("the training set is empty.")
        if batch_size > n:
            raise UsageError(
                f"batch_size {batch_size} is larger than the training set ({n} samples): "
                f"use batch_size={n} or less."
            )
        if xp is not numpy and not backend.is_cupy_array(x) and x.nbytes + y.nbytes <= device_data_bytes:
            x, y = xp.asarray(x), xp.asarray(y)  # once, so steps copy nothing from the host
        self.x, self.y, self.n, self.batch_size = x, y, n, batch_size
        self.steps_per_epoch = -(-n // batch_size)
        self._order = None

    def start_epoch(self, rng, skip=0):
        order = rng.permutation(self.n)
        xp = backend.get_array_module(self.x)
        self._order = xp.asarray(order) if xp is not numpy else order

    def batch(self, b):
        idx = self._order[b * self.batch_size:(b + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


class _IterSource:
    """An iterable/iterator of (x, y) batches."""

    def __init__(self, data, steps_per_epoch):
        if not hasattr(data, "__iter__"):
            raise UsageError(
                f"training data must be a pair of arrays (x, y) or an iterable of (x, y) batches, "
                f"got {type(data).__name__}."
            )
        self.data = data
        # A list or a dataset object gives a new iterator each time; a generator is its own iterator.
        self.reiterable = iter(data) is not data
        if steps_per_epoch is None:
            if self.reiterable and hasattr(data, "__len__"):
                steps_per_epoch = len(data)
                self.pass_per_epoch = True
            else:
                raise UsageError(
                    "training from an iterator or generator needs steps_per_epoch (the number of steps "
                    "between evaluations and checkpoints)."
                )
        else:
            self.pass_per_epoch = False
        if int(steps_per_epoch) < 1:
            raise UsageError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
        self.steps_per_epoch = int(steps_per_epoch)
        # A pass-per-epoch source (a list of batches) can be replayed up to the resume point.
        self.resumable = self.pass_per_epoch
        self._it = None

    def start_epoch(self, rng, skip=0):
        if self._it is None or self.pass_per_epoch:
            self._it = iter(self.data)
            if self.pass_per_epoch and skip:
                for _ in range(skip):  # resumed inside an epoch: skip the batches already trained on
                    next(self._it)

    def batch(self, b):
        try:
            item = next(self._it)
        except StopIteration:
            if not self.reiterable:
                raise DataError(
                    "the batch iterator ran out before the planned number of steps: make it endless or "
                    "lower epochs * steps_per_epoch."
                ) from None
            self._it = iter(self.data)
            try:
                item = next(self._it)
            except StopIteration:
                raise DataError("the training data yields no batches.") from None
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise UsageError(f"each training batch must be a pair (x, y), got {type(item).__name__}.")
        return item[0], item[1]


def _to_backend(a, xp):
    if xp is numpy:
        return backend.to_numpy(a)
    return xp.asarray(a)


# --------------------------------------------------------------------------
# History


class History:
    """Per-epoch records and step losses; written as CSV, JSON and a PNG plot."""

    def __init__(self, epochs=None, steps=None):
        self.epochs: list[dict] = list(epochs or [])
        self.steps: list[list] = [list(s) for s in (steps or [])]  # [step, mean loss of the window]

    def to_dict(self):
        return {"epochs": self.epochs, "steps": self.steps}

    @classmethod
    def from_dict(cls, d):
        d = d or {}
        return cls(d.get("epochs"), d.get("steps"))

    def column(self, key):
        return [r.get(key) for r in self.epochs]

    def __len__(self):
        return len(self.epochs)

    def __getitem__(self, i):
        return self.epochs[i]

    def write_json(self, path):
        data = json.dumps(self.to_dict(), indent=1, default=float).encode("utf-8")
        xio.atomic_write(path, lambda f: f.write(data), "history")

    def write_csv(self, path):
        keys = []
        for r in self.epochs:
            keys += [k for k in r if k not in keys]
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        for r in self.epochs:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
        data = buf.getvalue().encode("utf-8")
        xio.atomic_write(path, lambda f: f.write(data), "history")

    def plot(self, path, title: str = ""):
        """Loss (left) and validation metrics (right) against epochs, as a PNG (no display used)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax_loss, ax_metric = fig.subplots(1, 2)
        spe = None
        if self.epochs and self.epochs[0].get("step"):
            spe = self.epochs[0]["step"] / max(1, self.epochs[0]["epoch"])
        if self.steps and spe:
            xs = [s / spe for s, _ in self.steps]
            ax_loss.plot(xs, [v for _, v in self.steps], color="0.75", lw=0.8, label="train (steps)")
        ep = self.column("epoch")
        for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
            vals = self.column(key)
            if any(v is not None for v in vals):
                ax_loss.plot(ep, vals, style, ms=3, label=key.replace("_", " "))
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log") if all((v or 1) > 0 for v in self.column("train_loss")) else None
        ax_loss.legend(fontsize=8)
        ax_loss.grid(alpha=0.3)
        metric_keys = []
        for r in self.epochs:
            metric_keys += [k for k in r if k.startswith(("val_", "train_")) and k not in ("val_loss", "train_loss")
                            and k not in metric_keys]
        for key in metric_keys:
            ax_metric.plot(ep, self.column(key), "o-", ms=3, label=key.replace("_", " "))
        ax_metric.set_xlabel("epoch")
        ax_metric.set_ylabel("metric")
        if metric_keys:
            ax_metric.legend(fontsize=8)
        else:
            ax_metric.text(0.5, 0.5, "no validation metrics", ha="center", va="center", transform=ax_metric.transAxes)
        ax_metric.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buf = _io.BytesIO()
        fig.savefig(buf, format="png")
        data = buf.getvalue()
        xio.atomic_write(path, lambda f: f.write(data), "plot")


# --------------------------------------------------------------------------
# The trainer


def _rng_state_json(rng: numpy.random.Generator) -> dict:
    return rng.bit_generator.state


def _checked_train_state(path, st, data_state, xpnet_state, history) -> History:
    """Validate the restored counters, RNG states and history of a checkpoint; ModelFileError if damaged."""
    def bad(what):
        return ModelFileError(f"checkpoint {path} has a damaged training state ({what}): "
                              "resume from an earlier checkpoint or start a new run.")

    for key in ("step", "epoch", "batch_in_epoch", "epoch_loss_count", "epoch_images", "bad_epochs"):
        v = st[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{key} is {v!r}")
    for key, optional in (("epoch_loss_sum", False), ("epoch_seconds", False), ("best_value", True)):
        v = st[key]
        if not (optional and v is None) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(f"{key} is {v!r}")
    if st["best_epoch"] is not None and (isinstance(st["best_epoch"], bool) or not isinstance(st["best_epoch"], int)):
        raise bad(f"best_epoch is {st['best_epoch']!r}")
    for name, state in (("data_rng_state", data_state), ("xpnet_rng_state", xpnet_state),
                        ("epoch_rng_state", st["epoch_rng_state"])):
        if name == "epoch_rng_state" and state is None:
            continue
        try:  # on a throw-away generator: the same checks numpy makes when the state is restored
            numpy.random.default_rng().bit_generator.state = state
        except (TypeError, ValueError, KeyError) as exc:
            raise bad(f"{name}: {exc}") from None
    history = history or {}
    epochs, steps = history.get("epochs", []) if isinstance(history, dict) else None, \
        history.get("steps", []) if isinstance(history, dict) else None
    if not (isinstance(epochs, list) and all(isinstance(r, dict) for r in epochs)
            and isinstance(steps, list) and all(isinstance(s, list) and len(s) == 2 for s in steps)):
        raise bad("history is not a list of epoch records and step losses")
    return History(epochs, steps)


class Trainer:
    """Trains ``model`` with ``optimizer`` on ``loss`` (default ``sigmoid_bce_with_logits``).

    See the module docstring for the data sources, the files written and the
    behaviour on NaN, Ctrl-C and resume.

    Parameters (all keyword except the first three):
    * ``out_dir``: folder for checkpoints, history and plot (None: nothing written, no resume);
    * ``batch_size`` (array sources and evaluation), ``eval_batch_size`` (default ``2 * batch_size``);
    * ``metrics``: ``{name: f(logits, y) -> float}`` computed on the validation set
      (recorded as ``val_<name>``);
    * ``monitor`` / ``mode`` / ``patience`` / ``min_delta``: early stopping and the choice of
      ``best.npz``; ``monitor`` defaults to the first metric (mode "max") or ``val_loss`` (mode "min");
      ``tie_break`` (e.g. ``"val_loss"``): when ``monitor`` equals the best so far exactly (an
      accuracy stuck at 100%), an epoch that is better on this value (lower for a loss) counts as
      an improvement;
    * ``transform`` / ``eval_transform``: ``f(x, y) -> (x, y)`` on each batch, on the device;
    * ``seed``: the trainer's data-order generator;
    * ``log_every``: steps between loss read-backs (device synchronisations);
    * ``checkpoint_every`` (steps) / ``checkpoint_seconds`` / ``keep_checkpoints``;
    * ``progress``: tqdm bar (loss, images/s, ETA); ``log``: a ``print``-like function for
      one line per epoch (None: silent);
    * ``plot``: write ``history.png`` after every epoch (True), never (False), or -- a number --
      at most every ``plot`` seconds and once more at the end (a plot costs ~1 s of CPU);
      ``restore_best``: end with the best weights;
    * ``metadata``: JSON-safe dict stored in every checkpoint and model file (charset, ...);
    * ``time_budget`` (seconds) / ``max_steps``: stop cleanly when reached (see the module docstring).
    """

    def __init__(self, model, optimizer, loss=sigmoid_bce_with_logits, *, out_dir=None, batch_size: int = 128,
                 eval_batch_size: int | None = None, metrics: dict | None = None, monitor: str | None = None,
                 mode: str | None = None, patience: int | None = None, min_delta: float = 0.0,
                 transform=None, eval_transform=None, seed: int = 0, log_every: int = 20,
                 checkpoint_every: int | None = None, checkpoint_seconds: float | None = 600.0,
                 keep_checkpoints: int = 2, progress: bool = True, log=print, plot: bool = True,
                 restore_best: bool = True, metadata: dict | None = None,
                 device_data_bytes: int = 2 * 1024 ** 3, time_budget: float | None = None,
                 max_steps: int | None = None, tie_break: str | None = None):
        if not callable(loss):
            raise UsageError("loss must be a function (logits, targets) -> (loss, dlogits).")
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.batch_size = self._positive_int(batch_size, "batch_size")
        self.eval_batch_size = self._positive_int(eval_batch_size or 2 * self.batch_size, "eval_batch_size")
        self.metrics = dict(metrics or {})
        for name, fn in self.metrics.items():
            if not callable(fn):
                raise UsageError(f"metric {name!r} must be a function (logits, y) -> float.")
        self.monitor, self.mode = monitor, mode
        self.tie_break = tie_break
        if mode not in (None, "min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.patience = None if patience is None else self._positive_int(patience, "patience")
        self.min_delta = float(min_delta)
        self.transform, self.eval_transform = transform, eval_transform
        if not isinstance(seed, (int, numpy.integer)) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}.")
        self.seed = int(seed)
        self.log_every = self._positive_int(log_every, "log_every")
        self.checkpoint_every = None if checkpoint_every is None else self._positive_int(checkpoint_every,
                                                                                        "checkpoint_every")
        self.checkpoint_seconds = checkpoint_seconds
        self.keep_checkpoints = self._positive_int(keep_checkpoints, "keep_checkpoints")
        self.progress, self.log = bool(progress), log
        if isinstance(plot, bool) or plot is None:
            self.plot, self.plot_seconds = bool(plot), None
        else:
            self.plot, self.plot_seconds = True, float(plot)
        self._last_plot, self._plotted_epoch = None, 0
        self.restore_best = bool(restore_best)
        self.metadata = dict(metadata or {})
        self.device_data_bytes = int(device_data_bytes)
        if time_budget is not None:
            try:
                time_budget = float(time_budget)
            except (TypeError, ValueError):
                raise UsageError(f"time_budget must be a number of seconds, got {time_budget!r}.") from None
            if not math.isfinite(time_budget) or time_budget <= 0:
                raise UsageError(f"time_budget must be a positive number of seconds, got {time_budget!r}.")
        self.time_budget = time_budget
        self.max_steps = None if max_steps is None else self._positive_int(max_steps, "max_steps")
        self.history = History()
        self._st = None
        self.last_checkpoint: Path | None = None
        self._stop_requested = False
        self._bar = None

    @staticmethod
    def _positive_int(v, name):
        if isinstance(v, bool) or not isinstance(v, (int, numpy.integer)) or v < 1:
            raise UsageError(f"{name} must be a positive integer, got {v!r}.")
        return int(v)

    # ------------------------------------------------------------- paths
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / "checkpoints" if self.out_dir is not None else None

    @property
    def best_epoch(self) -> int | None:
        """The epoch (1-based) whose weights are the best so far by ``monitor`` (ties: ``tie_break``)."""
        return None if self._st is None else self._st["best_epoch"]

    @property
    def best_path(self) -> Path | None:
        return self.out_dir / "best.npz" if self.out_dir is not None else None

    def _say(self, msg):
        if self.log is None:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            self.log(msg)

    # ------------------------------------------------------------- limits
    def elapsed(self) -> float:
        """Seconds of training in ``fit`` so far, summed over resumed sessions (0 before ``fit``)."""
        st = self._st
        if st is None:
            return 0.0
        if st.get("session_start") is None:
            return float(st["elapsed_before"])
        return float(st["elapsed_before"]) + time.monotonic() - st["session_start"]

    def fraction_done(self) -> float:
        """Fraction of the planned work done, in [0, 1]: the largest of step / (epochs * steps per
        epoch), step / ``max_steps`` and elapsed / ``time_budget`` (0 before ``fit``)."""
        st = self._st
        if st is None:
            return 0.0
        done = st["step"] / max(1, st["epochs"] * st["spe"])
        if self.max_steps is not None:
            done = max(done, st["step"] / self.max_steps)
        if self.time_budget is not None:
            done = max(done, self.elapsed() / self.time_budget)
        return min(1.0, done)

    def _limit_reached(self, st) -> str | None:
        if self.max_steps is not None and st["step"] >= self.max_steps:
            return f"reached max_steps ({self.max_steps})"
        if self.time_budget is not None and self.elapsed() >= self.time_budget:
            return f"reached the time budget ({self.time_budget:.0f} s)"
        return None

    # ------------------------------------------------------------- evaluation
    def _xp(self):
        p = next(iter(self.model.parameters().values()), None)
        return backend.get_array_module(p) if p is not None else backend.xp()

    def evaluate(self, data, batch_size: int | None = None) -> dict:
        """``{"loss": float, <metric>: float, ...}`` on ``data`` ((x, y) arrays or an iterable of batches).

        The model runs in evaluation mode (``forward(train=False)``); ``eval_transform`` is applied.
        """
        bs = batch_size or self.eval_batch_size
        xp = self._xp()
        if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
            x_all, y_all = data
            if x_all.shape[0] != y_all.shape[0]:
                raise UsageError(f"evaluation data has {x_all.shape[0]} inputs but {y_all.shape[0]} targets.")
            batches = ((x_all[i:i + bs], y_all[i:i + bs]) for i in range(0, x_all.shape[0], bs))
        else:
            batches = iter(data)
        logits_parts, y_parts = [], []
        loss_sum, count = None, 0
        for x, y in batches:
            x, y = _to_backend(x, xp), _to_backend(y, xp)
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

    # ------------------------------------------------------------- checkpoints
    def _train_state(self, st) -> dict:
        return {
            "step": st["step"], "epoch": st["epoch"], "batch_in_epoch": st["batch_in_epoch"],
            "epochs_planned": st["epochs"], "steps_per_epoch": st["spe"],
            "epoch_rng_state": st["epoch_rng_state"], "data_rng_state": _rng_state_json(self._data_rng),
            "xpnet_rng_state": backend.get_rng_state(),
            "epoch_loss_sum": st["epoch_loss_sum"], "epoch_loss_count": st["epoch_loss_count"],
            "epoch_images": st["epoch_images"], "epoch_seconds": st["epoch_seconds"],
            "best_value": st["best_value"], "best_epoch": st["best_epoch"], "bad_epochs": st["bad_epochs"],
            "best_tie": st.get("best_tie"), "monitor": st["monitor"], "mode": st["mode"], "stopped_early": st["stopped_early"],
            "batch_size": self.batch_size, "seed": self.seed, "history": self.history.to_dict(),
            "elapsed": round(self.elapsed(), 3),
        }

    def _save(self, path, st):
        try:
            return xio.save_checkpoint(path, self.model, self.optimizer, self._train_state(st), self.metadata)
        except ModelFileError as exc:
            name = getattr(exc, "array_name", None)
            if name is None:
                raise
            # Non-finite weights (a loss can stay finite while e.g. BatchNorm statistics overflow).
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint had been written yet")
            raise TrainingError(
                f"the weights became NaN or infinite by step {st['step']} (first in '{name}'); {where} "
                "-- lower the learning rate or clip gradients (clip_norm)."
            ) from None

    def _checkpoint(self, st):
        """Write ckpt-<step>.npz (after reading the pending losses) and prune old ones."""
        if self.checkpoint_dir is None:
            return None
        self._flush(st)
        path = self.checkpoint_dir / xio.checkpoint_name(st["step"])
        self._save(path, st)
        self.last_checkpoint = path
        st["last_ckpt_time"] = time.monotonic()
        for old in xio.list_checkpoints(self.checkpoint_dir)[self.keep_checkpoints:]:
            try:
                old.unlink()
            except OSError:
                pass
        return path

    # ------------------------------------------------------------- the loop
    def _flush(self, st):
        """Read the pending step losses (one synchronisation); raise TrainingError on NaN/inf."""
        pending = st["pending"]
        if not pending:
            return
        xp = backend.get_array_module(pending[0])
        values = backend.to_numpy(xp.stack(pending)).astype(numpy.float64)
        first_step = st["step"] - len(pending) + 1
        st["pending"] = []
        bad = numpy.flatnonzero(~numpy.isfinite(values))
        if bad.size:
            step = first_step + int(bad[0])
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint had been written yet")
            raise TrainingError(
                f"the training loss became {values[bad[0]]} at step {step} (epoch {st['epoch'] + 1}); {where} "
                "-- lower the learning rate or look for NaN/inf values in the data."
            )
        st["epoch_loss_sum"] += float(values.sum())
        st["epoch_loss_count"] += int(values.size)
        now = time.monotonic()
        window = now - st["window_start"]
        st["ips"] = st["window_images"] / window if window > 0 else float("nan")
        st["window_start"], st["window_images"] = now, 0
        st["last_loss"] = float(values[-1])
        self.history.steps.append([st["step"], float(values.mean())])
        if self._bar is not None:
            left = ""
            if self.time_budget is not None:
                left = f"  {max(0.0, self.time_budget - self.elapsed()):.0f}s left"
            self._bar.set_postfix_str(f"loss {values.mean():.4g}  {st['ips']:,.0f} img/s  lr {st['lr']:.3g}{left}",
                                      refresh=False)

    def _resolve_monitor(self, has_val):
        monitor, mode = self.monitor, self.mode
        if monitor is None:
            if not has_val:
                return None, None
            monitor = f"val_{next(iter(self.metrics))}" if self.metrics else "val_loss"
        if mode is None:
            mode = "min" if "loss" in monitor else "max"
        return monitor, mode

    def fit(self, train, epochs: int, val=None, steps_per_epoch: int | None = None, resume: bool = False) -> History:
        """Train for ``epochs`` epochs (in total, counting those done before a resume); returns the History."""
        if isinstance(epochs, bool) or not isinstance(epochs, (int, numpy.integer)) or epochs < 1:
            raise UsageError(f"epochs must be a positive integer (the total number of epochs), got {epochs!r}.")
        epochs = int(epochs)
        xp = self._xp()
        if isinstance(train, (tuple, list)) and len(train) == 2 and hasattr(train[0], "shape"):
            if steps_per_epoch is not None:
                raise UsageError("steps_per_epoch is only for iterator sources: with arrays an epoch is one pass.")
            source = _ArraySource(train[0], train[1], self.batch_size, xp, self.device_data_bytes)
        else:
            source = _IterSource(train, steps_per_epoch)
        spe = source.steps_per_epoch
        monitor, mode = self._resolve_monitor(val is not None)
        if monitor is not None and monitor != "val_loss" and monitor.startswith("val_") \
                and monitor[4:] not in self.metrics:
            raise UsageError(f"monitor {monitor!r} names no metric: choose val_loss or val_<one of {list(self.metrics)}>.")
        if self.patience is not None and val is None:
            raise UsageError("patience (early stopping) needs validation data: pass val=(x, y).")

        if self.out_dir is not None:
            xio.check_writable(self.out_dir)
            xio.check_writable(self.checkpoint_dir, "checkpoint folder")
            for folder in (self.out_dir, self.checkpoint_dir):  # half-written files of a killed run
                xio.remove_stale_temp_files(folder)

        self._data_rng = numpy.random.default_rng(self.seed)
        st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epochs": epochs, "spe": spe,
              "epoch_rng_state": None, "epoch_loss_sum": 0.0, "epoch_loss_count": 0, "epoch_images": 0,
              "epoch_seconds": 0.0, "best_value": None, "best_epoch": None, "bad_epochs": 0,
              "monitor": monitor, "mode": mode, "stopped_early": False, "pending": [], "lr": self.optimizer.current_lr(),
              "ips": float("nan"), "last_loss": float("nan"), "window_images": 0,
              "elapsed_before": 0.0, "session_start": None}
        self._st = st
        self.history = History()
        self.last_checkpoint = None
        self._bar = None

        existing = xio.list_checkpoints(self.checkpoint_dir) if self.checkpoint_dir else []
        if resume:
            if self.out_dir is None:
                raise UsageError("resume=True needs out_dir (the folder of the run to continue).")
            path = xio.latest_checkpoint(self.checkpoint_dir)
            if path is None:
                self._say(f"no checkpoint in {self.checkpoint_dir}: starting a new run")
            else:
                self._restore(path, st, source)
        elif existing:
            raise UsageError(
                f"{self.checkpoint_dir} already holds checkpoints of a run: pass resume=True to continue it, "
                "or choose another out_dir."
            )
        limit = self._limit_reached(st)
        if st["stopped_early"] or st["epoch"] >= epochs or limit:
            why = ("stopped early" if st["stopped_early"] else limit if limit
                   else f"completed {st['epoch']} of {epochs} epoch(s)")
            self._say(f"nothing to do: the run in {self.out_dir} already {why}")
            return self.history

        handler_installed = False
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                self._stop_requested = True
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            previous_handler = signal.signal(signal.SIGINT, on_sigint)
            handler_installed = True
        self._stop_requested = False
        st["session_start"] = time.monotonic()
        self._last_plot, self._plotted_epoch = st["session_start"], 0
        try:
            self._run(source, st, val, xp)
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous_handler)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            st["elapsed_before"] = self.elapsed()
            st["session_start"] = None
        return self.history

    def _restore(self, path, st, source):
        ts = xio.read_header(path).get("train_state") or {}
        if ts.get("batch_size") != self.batch_size or ts.get("seed") != self.seed:
            raise UsageError(
                f"checkpoint {path} was written with batch_size {ts.get('batch_size')} and seed {ts.get('seed')}, "
                f"this trainer has {self.batch_size} and {self.seed}: use the same settings to resume."
            )
        if ts.get("steps_per_epoch") != st["spe"]:
            raise UsageError(
                f"checkpoint {path} was written with {ts.get('steps_per_epoch')} steps per epoch, this run has "
                f"{st['spe']}: resume with the same data and batch size."
            )
        try:
            for key in ("step", "epoch", "batch_in_epoch", "epoch_rng_state", "epoch_loss_sum", "epoch_loss_count",
                        "epoch_images", "epoch_seconds", "best_value", "best_epoch", "bad_epochs", "stopped_early"):
                st[key] = ts[key]
            data_state, xpnet_state = ts["data_rng_state"], ts["xpnet_rng_state"]
        except KeyError as exc:
            raise ModelFileError(f"checkpoint {path} was not written by xpnet's Trainer (no {exc} in it).") from None
        # Check every value before anything is restored: a damaged state must not leave a half-resumed trainer.
        history = _checked_train_state(path, st, data_state, xpnet_state, ts.get("history"))
        elapsed, best_tie = ts.get("elapsed", 0.0), ts.get("best_tie")
        for key, v in (("elapsed", elapsed), ("best_tie", best_tie)):
            if not (v is None and key == "best_tie") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ModelFileError(f"checkpoint {path} has a damaged training state ({key} is {v!r}): "
                                     "resume from an earlier checkpoint or start a new run.")
        xio.load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        if ts.get("monitor") != st["monitor"]:
            st["best_value"], st["best_epoch"], st["bad_epochs"] = None, None, 0
        self._data_rng.bit_generator.state = data_state
        backend.set_rng_state(xpnet_state)
        st["elapsed_before"], st["best_tie"] = float(elapsed), best_tie
        self.history = history
        self.last_checkpoint = Path(path)
        if st["batch_in_epoch"] and not source.resumable:
            self._say("resuming an iterator source: the batches continue from a fresh iterator "
                      "(exact when it draws from xpnet.backend.rng() lazily)")
        self._say(f"resumed from {path} (step {st['step']}, epoch {st['epoch'] + (1 if st['batch_in_epoch'] else 0)})")

    def _run(self, source, st, val, xp):
        # Imported here: gpu_errors pulls in importlib.metadata, which would slow every `import xpnet`
        # (and every spawned data worker's start-up) for a guard that only training needs.
        from ..memory import oom_guard

        epochs, spe = st["epochs"], st["spe"]
        if self.progress:
            from tqdm.auto import tqdm

            total = epochs * spe if self.max_steps is None else min(epochs * spe, self.max_steps)
            if self.time_budget is not None and total > 10 ** 6:
                total = None  # the budget ends the run: count steps, show the time left
            self._bar = tqdm(total=total, initial=st["step"], unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=True)
        st["last_ckpt_time"] = time.monotonic()
        while st["epoch"] < epochs:
            epoch = st["epoch"]
            if st["batch_in_epoch"] == 0:
                st["epoch_rng_state"] = _rng_state_json(self._data_rng)
                st["epoch_loss_sum"], st["epoch_loss_count"] = 0.0, 0
                st["epoch_images"], st["epoch_seconds"] = 0, 0.0
            else:  # resumed inside this epoch: replay its shuffle from the saved state
                self._data_rng.bit_generator.state = st["epoch_rng_state"]
            source.start_epoch(self._data_rng, skip=st["batch_in_epoch"])
            if self._bar is not None:
                self._bar.set_description(self._epoch_name(epoch + 1, epochs), refresh=False)
            t_epoch = time.monotonic()
            st["window_start"], st["window_images"] = t_epoch, 0
            for b in range(st["batch_in_epoch"], spe):
                x, y = source.batch(b)
                x, y = _to_backend(x, xp), _to_backend(y, xp)
                if self.transform is not None:
                    x, y = self.transform(x, y)
                n = int(x.shape[0])
                with oom_guard(self.model, n):
                    logits = self.model.forward(x, train=True)
                    loss, dlogits = self.loss(logits, y)
                    if getattr(loss, "ndim", None) != 0:
                        raise ShapeError("the loss function must return (loss as a 0-d array, dlogits).")
                    self.model.backward(dlogits)
                    st["lr"] = self.optimizer.step()
                st["step"] += 1
                st["batch_in_epoch"] = b + 1
                st["epoch_images"] += n
                st["window_images"] += n
                st["pending"].append(loss)
                if len(st["pending"]) >= self.log_every:
                    self._flush(st)
                if self._bar is not None:
                    self._bar.update(1)
                if self._stop_requested:
                    st["epoch_seconds"] += time.monotonic() - t_epoch
                    self._interrupt(st)
                limit = self._limit_reached(st)
                if limit:
                    break
                if b + 1 < spe and self._checkpoint_due(st):
                    st["epoch_seconds"] += time.monotonic() - t_epoch
                    t_epoch = time.monotonic()
                    self._checkpoint(st)
            else:
                limit = None
            self._flush(st)
            st["epoch_seconds"] += time.monotonic() - t_epoch
            if limit:
                self._say(f"stopping: {limit} at step {st['step']} (epoch {epoch + 1} ends here)")
            stop = self._end_epoch(st, val)
            if self._stop_requested:
                self._interrupt(st, saved=True)
            if stop or limit:
                break
        self._finish(st)

    def _checkpoint_due(self, st):
        if self.checkpoint_dir is None:
            return False
        if self.checkpoint_every and st["step"] % self.checkpoint_every == 0:
            return True
        if self.checkpoint_seconds is not None and time.monotonic() - st["last_ckpt_time"] >= self.checkpoint_seconds:
            return True
        return False

    def _interrupt(self, st, saved=False):
        path = self.last_checkpoint if saved else self._checkpoint(st)
        if path is not None:
            self._say(f"interrupted at step {st['step']}: checkpoint saved to {path}; "
                      "run again with resume=True to continue")
        else:
            self._say(f"interrupted at step {st['step']} (no out_dir, nothing saved)")
        raise KeyboardInterrupt

    def _end_epoch(self, st, val) -> bool:
        """Evaluate, record history, save best/latest; returns True to stop early."""
        st["epoch"] += 1
        st["batch_in_epoch"] = 0
        epoch = st["epoch"]
        record = {"epoch": epoch, "step": st["step"], "lr": st["lr"],
                  "train_loss": (st["epoch_loss_sum"] / st["epoch_loss_count"]) if st["epoch_loss_count"] else None}
        t_eval = time.monotonic()
        if val is not None:
            for k, v in self.evaluate(val).items():
                record[f"val_{k}"] = v
        record["seconds"] = round(st["epoch_seconds"], 3)
        record["elapsed"] = round(self.elapsed(), 3)
        record["eval_seconds"] = round(time.monotonic() - t_eval, 3)
        record["images_per_s"] = round(st["epoch_images"] / st["epoch_seconds"], 1) if st["epoch_seconds"] > 0 else None
        self.history.epochs.append(record)

        improved, stop = False, False
        monitor, mode = st["monitor"], st["mode"]
        if monitor is not None:
            if monitor not in record:
                raise UsageError(f"monitor {monitor!r} is not among the recorded values {sorted(record)}.")
            value, best = record[monitor], st["best_value"]
            if value is None or math.isnan(value):
                better = False  # a NaN validation value never counts as an improvement
            else:
                better = best is None or (value > best + self.min_delta if mode == "max"
                                          else value < best - self.min_delta)
                if not better and self.tie_break is not None and value == best:
                    better = self._tie_better(record.get(self.tie_break), st.get("best_tie"))
            if better:
                st["best_value"], st["best_epoch"], st["bad_epochs"] = value, epoch, 0
                st["best_tie"] = record.get(self.tie_break) if self.tie_break is not None else None
                improved = True
            else:
                st["bad_epochs"] += 1
                if self.patience is not None and st["bad_epochs"] >= self.patience:
                    stop = True
        st["stopped_early"] = stop
        if self.out_dir is not None:
            if improved:
                self._save(self.best_path, st)
            self._checkpoint(st)
            self.history.write_json(self.out_dir / "history.json")
            self.history.write_csv(self.out_dir / "history.csv")
            self._plot(final=False)
        self._say(self._epoch_line(record, improved, st))
        if stop:
            self._say(f"early stop: {monitor} did not improve for {self.patience} epoch(s); "
                      f"best {st['best_value']:.4f} at epoch {st['best_epoch']}")
        return stop

    def _tie_better(self, value, best) -> bool:
        """Whether ``value`` of the tie-breaker beats ``best`` (lower wins for a loss, else higher)."""
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        return value < best if "loss" in self.tie_break else value > best

    def _epoch_name(self, epoch, epochs):
        # With a time budget and no real epoch limit, "epoch 3/1000000" would only confuse.
        return f"epoch {epoch}" if self.time_budget is not None and epochs >= 10 ** 6 else f"epoch {epoch}/{epochs}"

    def _epoch_line(self, record, improved, st):
        parts = [self._epoch_name(record["epoch"], st["epochs"]), f"step {record['step']}"]
        if record.get("train_loss") is not None:
            parts.append(f"train loss {record['train_loss']:.4f}")
        for k, v in record.items():
            if k.startswith("val_") and isinstance(v, float):
                parts.append(f"{k.replace('_', ' ')} {v:.4f}")
        if record.get("images_per_s"):
            parts.append(f"{record['images_per_s']:,.0f} img/s")
        parts.append(f"{record['seconds']:.1f}s")
        if self.time_budget is not None:
            parts.append(f"({record['elapsed']:.0f}/{self.time_budget:.0f}s of the budget)")
        return "  ".join(parts) + ("  *" if improved else "")

    def _plot(self, final: bool):
        if not self.plot or self.out_dir is None or not len(self.history):
            return
        now = time.monotonic()
        if self.plot_seconds is not None:
            due = now - self._last_plot >= self.plot_seconds
            if not (due or final) or (final and self._plotted_epoch == len(self.history)):
                return
        elif final:
            return  # plotted after every epoch already
        self.history.plot(self.out_dir / "history.png", title=getattr(self.model, "name", ""))
        self._last_plot, self._plotted_epoch = now, len(self.history)

    def _finish(self, st):
        if self.restore_best and self.best_path is not None and self.best_path.exists() \
                and st["best_epoch"] is not None and st["best_epoch"] != st["epoch"]:
            xio.load_weights(self.model, self.best_path)
            self._say(f"restored the best weights (epoch {st['best_epoch']}, {st['monitor']} {st['best_value']:.4f})")
        if self.out_dir is not None:
            self._plot(final=True)
            xio.save(self.model, self.out_dir / "model.npz", self.metadata)


def fit(model, optimizer, train, epochs: int, val=None, steps_per_epoch=None, resume=False, **trainer_kwargs):
    """Shortcut: ``Trainer(model, optimizer, **trainer_kwargs).fit(train, epochs, val, steps_per_epoch, resume)``."""
    return Trainer(model, optimizer, **trainer_kwargs).fit(train, epochs, val=val, steps_per_epoch=steps_per_epoch,
                                                          resume=resume)


__all__ = ["Trainer", "History", "fit"]
