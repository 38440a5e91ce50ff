"""Sequential: a list of layers run in order, forward and backward.

    model = Sequential([Conv2D(32, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(10)],
                       input_shape=(1, 28, 28))
    logits = model.forward(x, train=True)          # x (N, 1, 28, 28)
    loss, dlogits = sigmoid_bce_with_logits(logits, t)
    model.backward(dlogits)                          # fills model.gradients()

Parameters, gradients and buffers are addressed by ``"<layer>.<name>"``
(``"conv1.W"``).  ``spec()`` / ``Sequential.from_spec()`` describe the
architecture as plain JSON-safe data (used by model files).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy

from .. import backend, dispatch
from ..errors import ShapeError, UsageError
from .layers import LAYER_TYPES, Layer

SPEC_VERSION = 1


class Sequential:
    def __init__(self, layers, input_shape=None, name: str = "model"):
        layers = list(layers)
        if not layers:
            raise UsageError("Sequential needs at least one layer.")
        for layer in layers:
            if not isinstance(layer, Layer):
                raise UsageError(f"Sequential takes xpnet layers, got {type(layer).__name__}.")
        self.layers = layers
        self.name = name
        self.input_shape: tuple | None = None
        self.dtype: numpy.dtype | None = None
        self.compute_input_grad = False  # backward returns dx for the input only when True
        self._executor = None  # a chain executor from xpnet.dispatch, built on first use
        self._executor_impl = None
        self._chain_ran = False  # whether the last forward ran on the chain executor
        self._name_layers()
        if input_shape is not None:
            self.build(input_shape)

    def _name_layers(self):
        counts: dict = {}
        seen = set()
        for layer in self.layers:
            if layer.name is None:
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
                layer.name = f"{layer.kind}{counts[layer.kind]}"
            if layer.name in seen:
                raise UsageError(f"Two layers are named '{layer.name}': layer names must be unique.")
            seen.add(layer.name)

    # ------------------------------------------------------------------ build
    def build(self, input_shape, dtype=None):
        """Create every layer's parameters for per-sample inputs of ``input_shape`` (no N)."""
        shape = tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ShapeError(f"input_shape must be a tuple of positive sizes such as (3, 32, 80), got {input_shape}.")
        dtype = numpy.dtype(dtype) if dtype is not None else backend.get_dtype()
        self.input_shape, self.dtype = shape, dtype
        for layer in self.layers:
            try:
                layer.build(shape, dtype)
            except ShapeError as exc:
                raise ShapeError(f"Cannot build layer '{layer.name}' on input {shape}: {exc}") from None
            shape = layer.output_shape
        self._set_input_grad_flags()
        return self

    def _set_input_grad_flags(self):
        # The input's gradient is of no use (unless asked for): every layer up to
        # and including the first one with parameters can skip computing its dx.
        needed = self.compute_input_grad
        for layer in self.layers:
            layer.needs_input_grad = needed
            if layer.params:
                needed = True

    @property
    def built(self) -> bool:
        return self.input_shape is not None

    @property
    def output_shape(self):
        return self.layers[-1].output_shape

    # ------------------------------------------------------------ computation
    def _check_batch(self, x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ShapeError(f"model input must be an array, got {type(x).__name__}: use xpnet.asarray(x).")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"model '{self.name}' takes batches of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}."
            )
        if x.dtype != self.dtype:
            raise ShapeError(
                f"model '{self.name}' has {self.dtype} parameters but the batch is {x.dtype}: "
                f"cast it with x.astype('{self.dtype}') (xpnet never casts silently)."
            )
        for layer in self.layers:
            if layer.params:
                p = next(iter(layer.params.values()))
                backend.check_same_backend(x, p, f"Layer '{layer.name}'")
                break

    def forward(self, x, train: bool = False):
        """Logits for a batch x (N, *input_shape).  ``train=True`` keeps what backward needs."""
        if not self.built:
            self.build(x.shape[1:])
        self._check_batch(x)
        executor = self._chain_executor(x)
        self._chain_ran = executor is not None
        if executor is not None:
            if self.compute_input_grad != self.layers[0].needs_input_grad:
                self._set_input_grad_flags()
            for layer in self.layers:  # the layer-by-layer caches are stale from here on
                layer.clear_cache()
            return executor.forward(x, train)
        if self._executor is not None:
            self._executor.invalidate()
        for layer in self.layers:
            x = layer.forward(x, train=train)
        return x

    def _chain_executor(self, x):
        """The executor ``xpnet.dispatch`` picks for this model and batch, or None (layer by layer).

        On NumPy the fused CPU executor takes models of built-in layers; reused while it
        matches the model's layers and dtype.
        """
        impl = dispatch.chain_for(self, x)
        if impl is None:
            return None
        if self._executor is None or self._executor_impl is not impl or not self._executor.matches(self):
            self._executor, self._executor_impl = impl.fn(self), impl
        return self._executor

    @property
    def executor(self):
        """The chain executor that ran the last forward (``xpnet.dispatch``), or None: layer by layer."""
        return self._executor if self._chain_ran else None

    __call__ = forward

    def backward(self, dout):
        """Back-propagate d(loss)/d(logits); fills every layer's ``grads``.

        Returns d(loss)/d(input) when ``compute_input_grad`` is True, else None.
        """
        if self.compute_input_grad != self.layers[0].needs_input_grad:
            self._set_input_grad_flags()
        if self._executor is not None and self._executor.has_pending:
            return self._executor.backward(dout)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def predict(self, x, batch_size: int = 256):
        """Logits in evaluation mode, computed in chunks of ``batch_size``."""
        if not self.built:
            self.build(x.shape[1:])
        xp = backend.get_array_module(x)
        if x.shape[0] <= batch_size:
            return self.forward(x, train=False)
        return xp.concatenate([self.forward(x[i:i + batch_size], train=False)
                               for i in range(0, x.shape[0], batch_size)])

    # -------------------------------------------------------------- state
    def parameters(self) -> "OrderedDict[str, object]":
        """Trainable arrays by name (live references: update them in place)."""
        return OrderedDict((f"{l.name}.{k}", v) for l in self.layers for k, v in l.params.items())

    def gradients(self) -> "OrderedDict[str, object]":
        """Gradients from the last backward, same names as ``parameters()``."""
        out = OrderedDict()
        for l in self.layers:
            for k in l.params:
                if k not in l.grads:
                    raise UsageError("No gradients yet: run forward(x, train=True) and backward() first.")
                out[f"{l.name}.{k}"] = l.grads[k]
        return out

    def buffers(self) -> "OrderedDict[str, object]":
        """Non-trained state (BatchNorm running statistics) by name."""
        return OrderedDict((f"{l.name}.{k}", v) for l in self.layers for k, v in l.buffers.items())

    def state_dict(self) -> "OrderedDict[str, object]":
        """Parameters and buffers by name (arrays on the model's backend)."""
        out = self.parameters()
        out.update(self.buffers())
        return out

    def state_mismatch(self, state: dict) -> str | None:
        """Why ``state`` cannot be loaded into this model (missing, unexpected or misshaped arrays), or None."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own]
        if missing or extra:
            return f"missing weights {missing[:5]}, unexpected {extra[:5]}"
        for key, target in own.items():
            shape = tuple(getattr(state[key], "shape", ()))
            if shape != tuple(target.shape):
                return f"weight {key!r} has shape {shape} but the model needs {tuple(target.shape)}"
        return None

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the model's parameters and buffers; names and shapes must match.

        Everything is checked before anything is copied, so a refused state leaves the model as it was.
        """
        why = self.state_mismatch(state)
        if why is not None:
            raise ShapeError(f"state does not fit model '{self.name}': {why}.")
        for key, target in self.state_dict().items():
            xp = backend.get_array_module(target)
            value = state[key]
            src = xp.asarray(value) if xp is not numpy else backend.to_numpy(value)
            target[...] = src.astype(target.dtype, copy=False)

    @property
    def backend(self) -> str | None:
        for l in self.layers:
            for p in l.params.values():
                return "cupy" if backend.is_cupy_array(p) else "numpy"
        return None

    def to(self, name: str):
        """Move every parameter and buffer to backend ``name`` ("numpy" or "cupy"); returns self."""
        xp = backend.module_for(name)
        for l in self.layers:
            for store in (l.params, l.buffers, l.grads):
                for k, v in store.items():
                    store[k] = backend.to_numpy(v) if xp is numpy else xp.asarray(v)
            l.clear_cache()
        self._executor = None
        return self

    def astype(self, dtype):
        """Cast every parameter and buffer to ``dtype`` (explicitly); returns self."""
        dtype = numpy.dtype(dtype)
        for l in self.layers:
            for store in (l.params, l.buffers):
                for k, v in store.items():
                    store[k] = v.astype(dtype)
            l.grads.clear()
            l.clear_cache()
        self.dtype = dtype
        self._executor = None
        return self

    def clone(self, to: str | None = None) -> "Sequential":
        """A copy with the same architecture and weights, on backend ``to`` (default: the model's).

        Does not consume xpnet's random generator.
        """
        if not self.built:
            raise UsageError("Only a built model can be cloned: give input_shape or run a batch first.")
        target = to or self.backend or backend.current()
        state = backend.get_rng_state()
        try:
            with backend.using(target):
                twin = Sequential.from_spec(self.spec(), dtype=self.dtype)
        finally:
            backend.set_rng_state(state)
        twin.compute_input_grad = self.compute_input_grad
        twin.load_state_dict(self.state_dict())
        return twin

    def n_params(self) -> int:
        return sum(l.param_count() for l in self.layers)

    # -------------------------------------------------------------- description
    def summary(self) -> str:
        """A table of layers, output shapes and parameter counts."""
        if not self.built:
            return f"Sequential '{self.name}' (not built yet: give input_shape or run a batch)"
        rows = [("layer", "type", "output shape", "params")]
        rows.append(("input", "", str(self.input_shape), ""))
        for l in self.layers:
            rows.append((l.name, type(l).__name__, str(l.output_shape), f"{l.param_count():,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        out = [fmt(rows[0]), line] + [fmt(r) for r in rows[1:]] + [line]
        out.append(f"total parameters: {self.n_params():,}   dtype: {self.dtype}   backend: {self.backend}")
        return "\n".join(out)

    def spec(self) -> dict:
        """The architecture as JSON-safe data: enough to rebuild the model without its weights."""
        return {
            "spec_version": SPEC_VERSION,
            "name": self.name,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "layers": [{"type": type(l).__name__, "name": l.name, "config": l.config()} for l in self.layers],
        }

    @classmethod
    def from_spec(cls, spec: dict, dtype=None) -> "Sequential":
        """Rebuild a model from ``spec()`` output.  Layer types come from the fixed registry only."""
        if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
            raise ShapeError("model architecture is malformed: it needs 'spec_version' and a 'layers' list.")
        version, entries, input_shape = spec.get("spec_version", 0), spec["layers"], spec.get("input_shape")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ShapeError(f"model architecture has a malformed spec_version {version!r}: it must be an integer.")
        if input_shape is not None and (not isinstance(input_shape, (list, tuple)) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in input_shape)):
            raise ShapeError(f"model architecture has a malformed input_shape {input_shape!r}: it must be a "
                             "list of positive integers.")
        if version > SPEC_VERSION:
            raise ShapeError(
                f"model architecture has spec version {version}, newer than this xpnet understands "
                f"({SPEC_VERSION}): upgrade xpnet."
            )
        layers = []
        for i, entry in enumerate(entries):
            type_name = entry.get("type") if isinstance(entry, dict) else None
            layer_cls = LAYER_TYPES.get(type_name) if isinstance(type_name, str) else None
            if layer_cls is None:
                raise ShapeError(
                    f"model architecture names an unknown layer type {type_name!r} at position {i}: "
                    f"known types are {', '.join(sorted(LAYER_TYPES))}."
                )
            config = entry.get("config") or {}
            if not isinstance(config, dict):
                raise ShapeError(f"layer {i} ({type_name}) has a malformed config.")
            try:
                layers.append(layer_cls(**config, name=entry.get("name")))
            except (TypeError, OverflowError) as exc:
                raise ShapeError(f"layer {i} ({type_name}) has an invalid config: {exc}.") from None
        model = cls(layers, name=str(spec.get("name", "model")))
        if input_shape is not None:
            model.build(input_shape, dtype=dtype)
        return model

    def __repr__(self):
        return f"Sequential(name={self.name!r}, layers={len(self.layers)}, input_shape={self.input_shape})"
