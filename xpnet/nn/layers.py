"""Layers: objects that hold parameters, gradients and the cache between
forward and backward.  The arithmetic lives in ``xpnet.ops``.

Every layer has
* ``params`` / ``grads``: dicts of arrays (``"W"``, ``"b"``, ...), on the
  backend the layer lives on; ``backward`` overwrites ``grads``;
* ``buffers``: non-trained state (BatchNorm running statistics);
* ``build(input_shape, dtype)``: creates the parameters once the per-sample
  input shape (without N) is known; ``output_shape`` afterwards;
* ``config()``: the JSON-safe constructor arguments, so a model file can
  rebuild it from ``LAYER_TYPES`` (a fixed registry: nothing is imported or
  evaluated by name).

Shapes in docstrings include the batch axis N; ``input_shape`` /
``output_shape`` attributes do not.
"""

from __future__ import annotations

import math

import numpy

from .. import backend, ops
from ..errors import ShapeError, UsageError
from ..ops.im2col import output_hw, pair


def _init_weight(shape, fan_in, fan_out, init, dtype):
    """Draw a weight on the host from xpnet's generator, then move it to the current backend.

    Drawing on the host means the same seed gives the same weights on NumPy and CuPy.
    """
    if init == "he":
        std = math.sqrt(2.0 / fan_in)
    elif init == "glorot":
        std = math.sqrt(2.0 / (fan_in + fan_out))
    elif init == "normal":  # the seed's 0.01 * N(0, 1)
        std = 0.01
    elif isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0:
        std = float(init)
    else:
        raise UsageError(f"Unknown init {init!r}: choose he, glorot, normal or a positive standard deviation.")
    w = backend.rng().standard_normal(shape, dtype=numpy.float64) * std
    return backend.asarray(w.astype(dtype))


class Layer:
    """Base class.  Subclasses override build/forward/backward/config as needed."""

    kind = "layer"  # short prefix for automatic names

    def __init__(self, name: str | None = None):
        self.name = name
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.input_shape: tuple | None = None
        self.output_shape: tuple | None = None
        self.needs_input_grad = True  # False for the first layers of a model: dx is never used
        self._cache = None

    # -- shape handling
    def build(self, input_shape, dtype) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = self.compute_output_shape(self.input_shape)

    @property
    def built(self) -> bool:
        return self.output_shape is not None

    def compute_output_shape(self, input_shape):
        return input_shape

    # -- computation
    def forward(self, x, train: bool = False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop what the last forward kept for backward (another path ran the model)."""
        self._cache = None

    def _take_cache(self):
        if self._cache is None:
            raise UsageError(
                f"Layer '{self.name}': backward called without a forward(train=True) before it."
            )
        cache, self._cache = self._cache, None
        return cache

    def _check_input(self, x):
        """Backend and dtype of x must match the parameters (never copied or cast silently)."""
        if not self.params:
            return
        p = next(iter(self.params.values()))
        backend.check_same_backend(x, p, f"Layer '{self.name}'")
        if x.dtype != p.dtype:
            raise ShapeError(
                f"Layer '{self.name}' has {p.dtype} parameters but was given a {x.dtype} array: "
                f"cast the batch with x.astype('{p.dtype}') (xpnet never upcasts silently)."
            )

    # -- description
    def config(self) -> dict:
        return {}

    def param_count(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Conv2D(Layer):
    """2-D convolution.  x (N, C, H, W) -> (N, F, OH, OW).

    ``pad="same"`` pads by kernel // 2 (output size = input size for odd kernels, stride 1).
    """

    kind = "conv"

    def __init__(self, out_channels: int, kernel_size=3, stride=1, pad=0, in_channels=None,
                 bias: bool = True, init="he", name=None):
        super().__init__(name)
        if int(out_channels) < 1:
            raise UsageError(f"Conv2D needs out_channels >= 1, got {out_channels}.")
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel size")
        self.stride = pair(stride, "stride")
        if pad == "same":
            pad = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        self.pad = pair(pad, "padding")
        self.in_channels = in_channels
        self.bias = bool(bias)
        self.init = init

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"Conv2D '{self.name}' needs (C, H, W) inputs, got {input_shape}.")
        c, h, w = input_shape
        if self.in_channels is not None and c != self.in_channels:
            raise ShapeError(f"Conv2D '{self.name}' expects {self.in_channels} channels, got {c}.")
        oh, ow = output_hw(h, w, self.kernel_size, self.stride, self.pad)
        return (self.out_channels, oh, ow)

    def build(self, input_shape, dtype):
        super().build(input_shape, dtype)
        c = self.input_shape[0]
        self.in_channels = c
        kh, kw = self.kernel_size
        fan_in, fan_out = c * kh * kw, self.out_channels * kh * kw
        self.params["W"] = _init_weight((self.out_channels, c, kh, kw), fan_in, fan_out, self.init, dtype)
        if self.bias:
            self.params["b"] = backend.asarray(numpy.zeros(self.out_channels, dtype=dtype))

    def im2col_nbytes(self, batch_size: int) -> int:
        """Bytes of the im2col matrix the plain path builds for a batch (chunked above
        ``xpnet.set_im2col_budget``; the fused CPU path works on cache-sized chunks)."""
        if self.input_shape is None:
            raise UsageError(f"Conv2D '{self.name}' is not built yet: its input shape is unknown.")
        itemsize = numpy.dtype(self.params["W"].dtype).itemsize
        return ops.im2col_nbytes((int(batch_size),) + self.input_shape, self.kernel_size, self.stride, self.pad,
                                 itemsize)

    def forward(self, x, train=False):
        self._check_input(x)
        y, cache = ops.conv2d_forward(x, self.params["W"], self.params.get("b"), self.stride, self.pad)
        self._cache = cache if train else None
        return y

    def backward(self, dy):
        dx, dw, db = ops.conv2d_backward(dy, self._take_cache(), need_dx=self.needs_input_grad)
        self.grads["W"] = dw
        if self.bias:
            self.grads["b"] = db
        return dx

    def config(self):
        return {"out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "pad": list(self.pad), "in_channels": self.in_channels,
                "bias": self.bias, "init": self.init}


class MaxPool2D(Layer):
    """Max pooling.  x (N, C, H, W) -> (N, C, OH, OW); stride defaults to the size."""

    kind = "pool"

    def __init__(self, size=2, stride=None, pad=0, name=None):
        super().__init__(name)
        self.size = pair(size, "pool size")
        self.stride = pair(stride, "pool stride") if stride is not None else self.size
        self.pad = pair(pad, "pool padding")

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"MaxPool2D '{self.name}' needs (C, H, W) inputs, got {input_shape}.")
        c, h, w = input_shape
        return (c,) + output_hw(h, w, self.size, self.stride, self.pad)

    def forward(self, x, train=False):
        y, cache = ops.max_pool2d_forward(x, self.size, self.stride, self.pad)
        self._cache = cache if train else None
        return y

    def backward(self, dy):
        cache = self._take_cache()
        return ops.max_pool2d_backward(dy, cache) if self.needs_input_grad else None

    def config(self):
        return {"size": list(self.size), "stride": list(self.stride), "pad": list(self.pad)}


class Dense(Layer):
    """Fully connected.  x (N, D_in) -> (N, D_out); W has shape (D_in, D_out)."""

    kind = "dense"

    def __init__(self, out_features: int, in_features=None, bias: bool = True, init="he", name=None):
        super().__init__(name)
        if int(out_features) < 1:
            raise UsageError(f"Dense needs out_features >= 1, got {out_features}.")
        self.out_features = int(out_features)
        self.in_features = in_features
        self.bias = bool(bias)
        self.init = init

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ShapeError(
                f"Dense '{self.name}' needs flat (D,) inputs, got {input_shape}: put a Flatten() before it."
            )
        if self.in_features is not None and input_shape[0] != self.in_features:
            raise ShapeError(f"Dense '{self.name}' expects {self.in_features} features, got {input_shape[0]}.")
        return (self.out_features,)

    def build(self, input_shape, dtype):
        super().build(input_shape, dtype)
        d = self.input_shape[0]
        self.in_features = d
        self.params["W"] = _init_weight((d, self.out_features), d, self.out_features, self.init, dtype)
        if self.bias:
            self.params["b"] = backend.asarray(numpy.zeros(self.out_features, dtype=dtype))

    def forward(self, x, train=False):
        self._check_input(x)
        y, cache = ops.dense_forward(x, self.params["W"], self.params.get("b"))
        self._cache = cache if train else None
        return y

    def backward(self, dy):
        dx, dw, db = ops.dense_backward(dy, self._take_cache(), need_dx=self.needs_input_grad)
        self.grads["W"] = dw
        if self.bias:
            self.grads["b"] = db
        return dx

    def config(self):
        return {"out_features": self.out_features, "in_features": self.in_features,
                "bias": self.bias, "init": self.init}


class ReLU(Layer):
    """max(x, 0), any shape."""

    kind = "relu"

    def forward(self, x, train=False):
        y, cache = ops.relu_forward(x)
        self._cache = cache if train else None
        return y

    def backward(self, dy):
        cache = self._take_cache()
        return ops.relu_backward(dy, cache) if self.needs_input_grad else None


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W); no copy when the input is contiguous."""

    kind = "flatten"

    def compute_output_shape(self, input_shape):
        return (int(numpy.prod(input_shape)),)

    def forward(self, x, train=False):
        if train:
            self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        shape = self._take_cache()
        return dy.reshape(shape) if self.needs_input_grad else None


class Dropout(Layer):
    """Inverted dropout: in training, zero each value with probability ``rate`` and
    scale the rest by 1/(1-rate); identity in evaluation."""

    kind = "dropout"

    def __init__(self, rate: float = 0.5, name=None):
        super().__init__(name)
        if not 0.0 <= float(rate) < 1.0:
            raise UsageError(f"Dropout rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)

    def forward(self, x, train=False):
        if not train:
            return x
        if self.rate == 0.0:
            self._cache = "identity"
            return x
        xp = backend.get_array_module(x)
        if xp is numpy:
            u = backend.rng().random(x.shape, dtype=x.dtype)
        else:  # device draws, seeded by xpnet.seed
            u = xp.random.random(x.shape, dtype=x.dtype)
        y, self._cache = ops.dropout_forward(x, ops.dropout_mask(u, self.rate))
        return y

    def backward(self, dy):
        cache = self._take_cache()
        if not self.needs_input_grad:
            return None
        return dy if isinstance(cache, str) else ops.dropout_backward(dy, cache)

    def config(self):
        return {"rate": self.rate}


class BatchNorm(Layer):
    """Batch normalisation over channels: (N, C, H, W) or (N, C) -> same shape.

    ``forward(x, train=True)`` normalises with batch statistics and updates the
    running averages; ``train=False`` uses the running averages.
    """

    kind = "bn"

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, name=None):
        super().__init__(name)
        if not 0.0 < float(momentum) <= 1.0 or float(eps) <= 0:
            raise UsageError(f"BatchNorm needs 0 < momentum <= 1 and eps > 0, got {momentum}, {eps}.")
        self.momentum = float(momentum)
        self.eps = float(eps)

    def compute_output_shape(self, input_shape):
        if len(input_shape) not in (1, 3):
            raise ShapeError(f"BatchNorm '{self.name}' needs (C, H, W) or (C,) inputs, got {input_shape}.")
        return input_shape

    def build(self, input_shape, dtype):
        super().build(input_shape, dtype)
        c = self.input_shape[0]
        self.params["gamma"] = backend.asarray(numpy.ones(c, dtype=dtype))
        self.params["beta"] = backend.asarray(numpy.zeros(c, dtype=dtype))
        self.buffers["running_mean"] = backend.asarray(numpy.zeros(c, dtype=dtype))
        self.buffers["running_var"] = backend.asarray(numpy.ones(c, dtype=dtype))

    def forward(self, x, train=False):
        self._check_input(x)
        y, cache = ops.batchnorm_forward(
            x, self.params["gamma"], self.params["beta"], self.buffers["running_mean"],
            self.buffers["running_var"], train, self.momentum, self.eps)
        self._cache = cache if train else None
        return y

    def backward(self, dy):
        dx, dgamma, dbeta = ops.batchnorm_backward(dy, self._take_cache())
        self.grads["gamma"] = dgamma
        self.grads["beta"] = dbeta
        return dx if self.needs_input_grad else None

    def config(self):
        return {"momentum": self.momentum, "eps": self.eps}


# The fixed registry used to rebuild models from files: names -> classes.
LAYER_TYPES = {cls.__name__: cls for cls in (Conv2D, MaxPool2D, Dense, ReLU, Flatten, Dropout, BatchNorm)}

# Layers defined in other modules build on Layer above, so they are imported last.
from .recurrent import GRU  # noqa: E402

LAYER_TYPES["GRU"] = GRU

from .sequence import Columns, TimeDense  # noqa: E402

LAYER_TYPES["Columns"] = Columns
LAYER_TYPES["TimeDense"] = TimeDense
