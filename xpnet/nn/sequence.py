"""Layers between images and sequences, for readers of any length (CRNN + CTC).

``Columns``: feature maps (N, C, H, W) -> sequences (N, W, C*H), one feature vector per
image column (the sequence axis is the width); feature ``c*H + h`` is channel c at row h.

``TimeDense``: a Dense applied to every time step, (N, T, F) -> (N, T, K), as one
whole-batch matrix product (N*T, F) @ (F, K).
"""

from __future__ import annotations

import numpy

from .. import backend, ops
from ..errors import ShapeError, UsageError
from .layers import Layer, _init_weight


class Columns(Layer):
    """(N, C, H, W) -> (N, W, C*H): the columns of a feature map as a sequence of W steps."""

    kind = "columns"

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"Columns '{self.name}' needs (C, H, W) inputs, got {input_shape}.")
        c, h, w = input_shape
        return (w, c * h)

    def forward(self, x, train=False):
        if getattr(x, "ndim", None) != 4:
            raise ShapeError(f"Columns '{self.name}' needs a batch of shape (N, C, H, W), "
                             f"got {getattr(x, 'shape', None)}.")
        n, c, h, w = x.shape
        if train:
            self._cache = x.shape
        xp = backend.get_array_module(x)
        return xp.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, w, c * h)

    def backward(self, dy):
        n, c, h, w = self._take_cache()
        if not self.needs_input_grad:
            return None
        xp = backend.get_array_module(dy)
        return xp.ascontiguousarray(dy.reshape(n, w, c, h).transpose(0, 2, 3, 1))


class TimeDense(Layer):
    """The same fully connected layer at every step: x (N, T, F) -> (N, T, K).

    W (F, K), b (K,); computed as one product of the (N*T, F) batch with W.
    """

    kind = "timedense"

    def __init__(self, out_features: int, in_features=None, bias: bool = True, init="glorot", name=None):
        super().__init__(name)
        if isinstance(out_features, bool) or int(out_features) < 1:
            raise UsageError(f"TimeDense needs out_features >= 1, got {out_features}.")
        self.out_features = int(out_features)
        self.in_features = in_features
        self.bias = bool(bias)
        self.init = init

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ShapeError(f"TimeDense '{self.name}' needs (T, F) sequences, got per-sample shape {input_shape}.")
        if self.in_features is not None and input_shape[1] != self.in_features:
            raise ShapeError(f"TimeDense '{self.name}' expects {self.in_features} features per step, "
                             f"got {input_shape[1]}.")
        return (input_shape[0], self.out_features)

    def build(self, input_shape, dtype):
        super().build(input_shape, dtype)
        f = self.input_shape[1]
        self.in_features = f
        self.params["W"] = _init_weight((f, self.out_features), f, self.out_features, self.init, dtype)
        if self.bias:
            self.params["b"] = backend.asarray(numpy.zeros(self.out_features, dtype=dtype))

    def forward(self, x, train=False):
        self._check_input(x)
        if getattr(x, "ndim", None) != 3 or x.shape[2] != self.in_features:
            raise ShapeError(f"TimeDense '{self.name}' needs a batch of shape (N, T, {self.in_features}), "
                             f"got {getattr(x, 'shape', None)}.")
        n, t, f = x.shape
        y, cache = ops.dense_forward(x.reshape(n * t, f), self.params["W"], self.params.get("b"))
        self._cache = (cache, x.shape) if train else None
        return y.reshape(n, t, self.out_features)

    def backward(self, dy):
        cache, shape = self._take_cache()
        n, t, _ = shape
        dx, dw, db = ops.dense_backward(dy.reshape(n * t, self.out_features), cache,
                                        need_dx=self.needs_input_grad)
        self.grads["W"] = dw
        if self.bias:
            self.grads["b"] = db
        return dx.reshape(shape) if dx is not None else None

    def config(self):
        return {"out_features": self.out_features, "in_features": self.in_features,
                "bias": self.bias, "init": self.init}


__all__ = ["Columns", "TimeDense"]
