"""Optimizers and learning-rate schedules.

    opt = xpnet.optim.AdamW(model, lr=xpnet.optim.OneCycle(3e-3, total_steps=2000), weight_decay=1e-4)
    logits = model.forward(x, train=True)
    loss, dlogits = sigmoid_bce_with_logits(logits, t)
    model.backward(dlogits)
    opt.step()                      # reads model.gradients(), updates parameters in place

An optimizer takes a ``Sequential`` (it then reads ``model.parameters()`` and
``model.gradients()`` afresh at every step, so ``model.to("cupy")`` after
creating the optimizer still works) or a dict ``{name: array}`` of parameters
(then ``step(grads)`` needs the matching gradient dict).  Parameters are
updated in place (``p -= ...``): ``model.parameters()`` are live references.

Everything stays on the parameters' backend: the slots (velocity, moments) are
allocated with ``xp = get_array_module(param)``, learning rates and bias
corrections are Python floats, so a step never synchronises the GPU.  The
update keeps the parameters' dtype (Python scalars do not upcast float32).
The update itself is the op ``optimizer_update`` (``xpnet.dispatch``): on NumPy,
large models are updated on the fused path's CPU threads (some parameters whole,
large ones in slices); every built-in update is element-wise, so the result is
the same bits as on one thread.

State for checkpoints: ``state_dict()`` returns ``(meta, arrays)`` -- a
JSON-safe dict and a dict of NumPy arrays -- and ``load_state_dict(meta,
arrays)`` puts them back (``xpnet.nn.serialization`` stores both in one ``.npz``).

Learning rates: a float, or a schedule -- any callable ``step -> lr`` where
``step`` is the number of updates already done (0 for the first update).
The built-in schedules (``StepDecay``, ``Cosine`` with optional linear warm-up,
``OneCycle``) are saved with the optimizer's state.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import numpy

from .. import backend, dispatch
from ..checks import integer, number
from ..errors import ModelFileError, UsageError

# --------------------------------------------------------------------------
# Schedules: callables step -> lr, described by JSON-safe dicts.


class Schedule:
    """Base class: ``schedule(step)`` is the learning rate of update number ``step`` (0-based)."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **self._config()}

    def _config(self) -> dict:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config().items())})"


class Constant(Schedule):
    """The same learning rate at every step."""

    def __init__(self, lr: float):
        self.lr = number(lr, "lr")

    def __call__(self, step):
        return self.lr

    def _config(self):
        return {"lr": self.lr}


class StepDecay(Schedule):
    """``lr * gamma ** (step // step_size)``: divide by 1/gamma every ``step_size`` updates."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr = number(lr, "lr")
        self.step_size = integer(step_size, "step_size")
        self.gamma = number(gamma, "gamma")

    def __call__(self, step):
        return self.lr * self.gamma ** (int(step) // self.step_size)

    def _config(self):
        return {"lr": self.lr, "step_size": self.step_size, "gamma": self.gamma}


class Cosine(Schedule):
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    Warm-up step ``s`` (0-based) uses ``lr * (s + 1) / warmup_steps``; after
    ``total_steps`` the rate stays at ``min_lr``.
    """

    def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        self.lr = number(lr, "lr")
        self.total_steps = integer(total_steps, "total_steps")
        self.warmup_steps = integer(warmup_steps, "warmup_steps", minimum=0)
        self.min_lr = number(min_lr, "min_lr", allow_zero=True)
        if self.warmup_steps >= self.total_steps:
            raise UsageError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps}).")
        if self.min_lr > self.lr:
            raise UsageError(f"min_lr ({min_lr}) must not exceed lr ({lr}).")

    def __call__(self, step):
        step = int(step)
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def _config(self):
        return {"lr": self.lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr}


def anneal(start: float, end: float, fraction: float) -> float:
    """Cosine interpolation from ``start`` (fraction 0) to ``end`` (fraction 1, clipped to [0, 1])."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


class OneCycle(Schedule):
    """One-cycle policy: cosine rise from ``max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start`` of ``total_steps``, then cosine fall to ``max_lr / (div_factor * final_div_factor)``.

    Good for short runs: a high rate in the middle, a very small one at the end.
    """

    def __init__(self, max_lr: float, total_steps: int, pct_start: float = 0.25, div_factor: float = 25.0,
                 final_div_factor: float = 1e4):
        self.max_lr = number(max_lr, "max_lr")
        self.total_steps = integer(total_steps, "total_steps", minimum=2)
        self.pct_start = float(pct_start)
        if not 0.0 < self.pct_start < 1.0:
            raise UsageError(f"pct_start must be between 0 and 1 (exclusive), got {pct_start!r}.")
        self.div_factor = number(div_factor, "div_factor")
        self.final_div_factor = number(final_div_factor, "final_div_factor")
        self.initial_lr = self.max_lr / self.div_factor
        self.final_lr = self.initial_lr / self.final_div_factor
        self.up_steps = max(1, int(round(self.pct_start * self.total_steps)))

    def __call__(self, step):
        step = int(step)
        if step <= self.up_steps:
            return anneal(self.initial_lr, self.max_lr, step / self.up_steps)
        down = max(1, self.total_steps - 1 - self.up_steps)
        return anneal(self.max_lr, self.final_lr, (step - self.up_steps) / down)

    def _config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor}


SCHEDULES = {cls.__name__: cls for cls in (Constant, StepDecay, Cosine, OneCycle)}


def schedule_from_dict(d) -> Schedule:
    """Rebuild a built-in schedule from ``Schedule.to_dict()`` output."""
    if not isinstance(d, dict) or d.get("type") not in SCHEDULES:
        raise UsageError(f"unknown learning-rate schedule {d!r}: known types are {', '.join(SCHEDULES)}.")
    kwargs = {k: v for k, v in d.items() if k != "type"}
    return SCHEDULES[d["type"]](**kwargs)


def _lr_description(lr):
    """JSON-safe description of a float or schedule (None for foreign callables)."""
    if isinstance(lr, Schedule):
        return lr.to_dict()
    if callable(lr):
        return {"type": "callable", "repr": repr(lr)}
    return float(lr)


# --------------------------------------------------------------------------
# Optimizers


@dispatch.op("optimizer_update", array_arg=lambda update, jobs, *a, **k: jobs[0][1] if jobs else None)
def apply_updates(update, jobs, scale, lr, sliceable: bool = False, scratch=None):
    """Run ``update(name, p, g, lr, slots)`` for each job (name, p, g, slots), in order.

    ``scale``: a gradient factor (clipping) or None.  ``sliceable``: the update is
    element-wise, so a registered implementation may run it on slices of each
    parameter (``xpnet.cpu.sliced_update``); ``scratch(t)`` is told the slice count.
    """
    for name, p, g, slots in jobs:
        update(name, p, g if scale is None else g * scale, lr, slots)


def _is_model(obj) -> bool:
    return hasattr(obj, "parameters") and hasattr(obj, "gradients") and callable(obj.parameters)


class Optimizer:
    """Base class.  Subclasses define ``SLOTS`` (per-parameter state names) and ``_update``.

    ``params``: a ``Sequential`` or a dict ``{name: array}``.
    ``lr``: a float or a schedule ``step -> lr``.
    ``clip_norm``: when set, gradients are scaled so that their global L2 norm
    is at most this value (computed on the device, no synchronisation).
    """

    SLOTS: tuple = ()

    def __init__(self, params, lr=0.01, weight_decay: float = 0.0, clip_norm: float | None = None):
        if _is_model(params):
            self._model, self._params = params, None
        elif isinstance(params, dict):
            if not params:
                raise UsageError(f"{type(self).__name__} was given an empty parameter dict: nothing to train.")
            self._model, self._params = None, OrderedDict(params)
        else:
            raise UsageError(
                f"{type(self).__name__} takes a model or a dict of parameters, got {type(params).__name__}."
            )
        if callable(lr):
            self.lr = lr
        else:
            self.lr = number(lr, "lr")
        self.weight_decay = number(weight_decay, "weight_decay", allow_zero=True)
        self.clip_norm = None if clip_norm is None else number(clip_norm, "clip_norm")
        self.step_count = 0  # number of updates done
        self.state: dict = {}  # param name -> {slot: array on the parameter's backend}

    # ------------------------------------------------------------------ use
    def parameters(self):
        return self._model.parameters() if self._model is not None else self._params

    def current_lr(self) -> float:
        """The learning rate the next ``step()`` will use."""
        lr = self.lr(self.step_count) if callable(self.lr) else self.lr
        return float(lr)

    def step(self, grads=None) -> float:
        """Apply one update in place; returns the learning rate used.

        ``grads``: dict {name: gradient}; default ``model.gradients()`` when the
        optimizer was given a model.
        """
        params = self.parameters()
        if grads is None:
            if self._model is None:
                raise UsageError(f"{type(self).__name__}.step() needs the gradients when it was given a parameter dict.")
            grads = self._model.gradients()
        missing = [k for k in params if k not in grads]
        if missing:
            raise UsageError(f"{type(self).__name__}.step(): no gradient for parameter(s) {missing[:5]}.")
        lr = self.current_lr()
        if not math.isfinite(lr) or lr < 0:
            raise UsageError(f"the learning rate at step {self.step_count} is {lr!r}: it must be finite and >= 0.")
        scale = self._clip_scale(grads, params) if self.clip_norm is not None else None
        jobs = []
        for name, p in params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise UsageError(f"gradient of '{name}' has shape {g.shape} but the parameter has {p.shape}.")
            jobs.append((name, p, g, self._slots(name, p)))
        apply_updates(self._update, jobs, scale, lr, sliceable=self.sliceable, scratch=self._scratch_for_threads)
        self.step_count += 1
        return lr

    @property
    def sliceable(self) -> bool:
        """True for the built-in element-wise updates, which may run on slices of a parameter."""
        return type(self)._update in _SLICEABLE_UPDATES

    def _scratch_for_threads(self, t: int) -> None:
        """Called by a sliced update with its slice count: scratch made for another count goes."""
        if getattr(self, "_scratch_threads", t) != t:
            self.__dict__.get("_scratch_buffers", {}).clear()
        self._scratch_threads = t

    def _clip_scale(self, grads, params):
        first = next(iter(params.values()))
        xp = backend.get_array_module(first)
        total = xp.zeros((), dtype=first.dtype)
        for name in params:
            g = grads[name]
            total = total + (g * g).sum(dtype=first.dtype)
        norm = xp.sqrt(total)
        return xp.minimum(first.dtype.type(1.0), first.dtype.type(self.clip_norm) / (norm + first.dtype.type(1e-6)))

    def _slots(self, name, p) -> dict:
        """The state arrays of one parameter, created as zeros or moved to p's backend when needed."""
        slots = self.state.get(name)
        xp = backend.get_array_module(p)
        if slots is None:
            slots = {s: xp.zeros_like(p) for s in self.SLOTS}
            self.state[name] = slots
        else:
            for s, v in slots.items():
                if not backend.same_backend(v, p) or v.dtype != p.dtype:
                    # The model moved (model.to(...)) or the state came from a file: one transfer.
                    host = backend.to_numpy(v).astype(p.dtype)
                    slots[s] = xp.asarray(host) if xp is not numpy else host
        return slots

    def _update(self, name, p, g, lr, slots, part=None):
        """Update p (and its slots) in place.  ``part``: which slice of a parameter split
        across threads this is (built-in optimizers only; None for the whole array)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- state
    def config(self) -> dict:
        return {"lr": _lr_description(self.lr), "weight_decay": self.weight_decay, "clip_norm": self.clip_norm}

    def state_dict(self):
        """``(meta, arrays)``: JSON-safe description and step, and NumPy copies of the slots.

        Array keys are ``"<slot>/<parameter name>"``.
        """
        meta = {"type": type(self).__name__, "config": self.config(), "step_count": self.step_count,
                "slots": list(self.SLOTS)}
        arrays = {}
        for name, slots in self.state.items():
            for s, v in slots.items():
                arrays[f"{s}/{name}"] = backend.to_numpy(v).copy()
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        """Restore the step count and slots saved by ``state_dict()``.

        Hyper-parameters stay as constructed; a difference from the saved ones
        gives a warning (the resumed run would not match an uninterrupted one).
        """
        if not isinstance(meta, dict) or meta.get("type") != type(self).__name__:
            kind = meta.get("type") if isinstance(meta, dict) else None
            raise ModelFileError(
                f"the saved optimizer state is for {kind!r}, not {type(self).__name__}: "
                "create the same optimizer type as the run that wrote it."
            )
        saved_config = meta.get("config", {})
        if saved_config != self.config():
            warnings.warn(
                f"{type(self).__name__} hyper-parameters differ from the saved ones ({saved_config} vs "
                f"{self.config()}): the resumed run will not match an uninterrupted one.",
                stacklevel=2,
            )
        params = self.parameters()
        state: dict = {}
        for key, value in arrays.items():
            slot, _, name = key.partition("/")
            if slot not in self.SLOTS or name not in params:
                raise ModelFileError(
                    f"the saved optimizer state has an entry {key!r} that does not fit this model: "
                    "was it saved for another architecture?"
                )
            if tuple(value.shape) != tuple(params[name].shape):
                raise ModelFileError(
                    f"the saved optimizer state {key!r} has shape {tuple(value.shape)} but the parameter "
                    f"has {tuple(params[name].shape)}."
                )
            state.setdefault(name, {})[slot] = numpy.array(value)
        self.state = state
        for name, p in params.items():
            if name in self.state:
                self._slots(name, p)  # move to the parameters' backend now
        self.step_count = int(meta.get("step_count", 0))

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({cfg})"


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with (Nesterov) momentum and L2 weight decay.

    With ``g = grad + weight_decay * p`` (L2, added to the gradient)::

        v = momentum * v + g                         (v starts at 0)
        p -= lr * (g + momentum * v)   if nesterov
        p -= lr * v                    otherwise (plain SGD when momentum == 0)
    """

    def __init__(self, params, lr=0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, clip_norm: float | None = None):
        super().__init__(params, lr, weight_decay, clip_norm)
        self.momentum = float(momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"momentum must be in [0, 1), got {momentum!r}.")
        if nesterov and self.momentum == 0.0:
            raise UsageError("nesterov=True needs a momentum > 0.")
        self.nesterov = bool(nesterov)
        self.SLOTS = ("velocity",) if self.momentum > 0 else ()

    def _update(self, name, p, g, lr, slots, part=None):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            v = slots["velocity"]
            v *= self.momentum
            v += g
            update = g + self.momentum * v if self.nesterov else v
        else:
            update = g
        p -= lr * update

    def config(self):
        return {**super().config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Adam (Kingma & Ba).  ``weight_decay`` here is L2 (added to the gradient); use ``AdamW``
    for decoupled weight decay.  With t = step_count + 1::

        m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    SLOTS = ("m", "v")
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_norm: float | None = None):
        super().__init__(params, lr, weight_decay, clip_norm)
        try:
            b1, b2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise UsageError(f"betas must be a pair of numbers, got {betas!r}.") from None
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise UsageError(f"betas must lie in [0, 1), got {betas!r}.")
        self.betas = (b1, b2)
        self.eps = number(eps, "eps")

    def _update(self, name, p, g, lr, slots, part=None):
        b1, b2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                p *= 1.0 - lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        xp = backend.get_array_module(p)
        m, v = slots["m"], slots["v"]
        tmp = self._scratch(name if part is None else (name, part), p, xp)  # reused: no allocations per step
        m *= b1
        xp.multiply(g, 1.0 - b1, out=tmp)
        m += tmp
        v *= b2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp
        t = self.step_count + 1
        xp.sqrt(v, out=tmp)
        tmp *= 1.0 / math.sqrt(1.0 - b2 ** t)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= lr / (1.0 - b1 ** t)
        p -= tmp

    def _scratch(self, name, p, xp):
        store = self.__dict__.setdefault("_scratch_buffers", {})
        buf = store.get(name)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or not backend.same_backend(buf, p):
            buf = store[name] = xp.empty_like(p)
        return buf

    def config(self):
        return {**super().config(), "betas": list(self.betas), "eps": self.eps}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): before the Adam update,
    ``p *= 1 - lr * weight_decay`` (the decay follows the schedule, not the gradient scale)."""

    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 clip_norm: float | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, clip_norm)


OPTIMIZERS = {cls.__name__: cls for cls in (SGD, Adam, AdamW)}
# Element-wise updates that give the same bits on slices of a parameter as on the whole.
_SLICEABLE_UPDATES = (SGD._update, Adam._update)

__all__ = ["anneal", "Optimizer", "SGD", "Adam", "AdamW", "Schedule", "Constant", "StepDecay", "Cosine", "OneCycle",
           "schedule_from_dict", "OPTIMIZERS", "SCHEDULES"]
