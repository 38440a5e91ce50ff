"""Recurrent layers.  The arithmetic lives in ``xpnet.ops.recurrent``.

``GRU``: x (N, T, F) -> (N, T, 2H) for a bidirectional layer (the forward direction's
states in the first H features, the reverse direction's in the last H), (N, T, H) for
a one-way layer.  Per-sample shapes (without N): (T, F) -> (T, 2H).

Why a GRU rather than an LSTM: per step it does three gate products instead of four
and carries one state instead of two, so it has a quarter fewer weights and a quarter
less arithmetic in the recurrence, the part that cannot be batched over time.  On short
sequences such as the columns of a CAPTCHA (tens of steps) the two read about equally
well in published comparisons (Chung et al. 2014; Jozefowicz et al. 2015), so the
cheaper cell wins.
"""

from __future__ import annotations

import numpy

from .. import backend
from ..errors import ShapeError, UsageError
from ..ops.recurrent import gru_backward, gru_forward
from .layers import Layer, _init_weight

DIRECTIONS = ("fw", "bw")  # parameter-name suffixes: forward in time, reverse in time


def _orthogonal_blocks(h, blocks, dtype):
    """(H, blocks*H): one random orthogonal (H, H) matrix per gate, drawn on the host from
    xpnet's generator (the same seed gives the same weights on every backend)."""
    parts = []
    for _ in range(blocks):
        q, r = numpy.linalg.qr(backend.rng().standard_normal((h, h)))
        parts.append(q * numpy.sign(numpy.diag(r)))  # the sign fix makes q uniformly distributed
    return backend.asarray(numpy.concatenate(parts, axis=1).astype(dtype))


class GRU(Layer):
    """Gated recurrent unit over sequences, bidirectional by default.

    x (N, T, F) -> (N, T, 2H) (``bidirectional=False``: (N, T, H)).  Parameters per
    direction d in ("fw", "bw"): ``Wx_d`` (F, 3H) drawn with ``init``, ``Wh_d`` (H, 3H)
    orthogonal per gate, ``bx_d`` and ``bh_d`` (3H,) zeros; gate order and equations in
    ``xpnet.ops.recurrent``.  The state starts at zero for every sequence.
    """

    kind = "gru"

    def __init__(self, hidden_size: int, bidirectional: bool = True, in_features=None, init="glorot",
                 name=None):
        super().__init__(name)
        if isinstance(hidden_size, bool) or int(hidden_size) < 1:
            raise UsageError(f"GRU needs hidden_size >= 1, got {hidden_size}.")
        self.hidden_size = int(hidden_size)
        self.bidirectional = bool(bidirectional)
        self.in_features = in_features
        self.init = init

    @property
    def directions(self):
        return DIRECTIONS if self.bidirectional else DIRECTIONS[:1]

    def compute_output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ShapeError(f"GRU '{self.name}' needs (T, F) sequences, got per-sample shape {input_shape}.")
        if self.in_features is not None and input_shape[1] != self.in_features:
            raise ShapeError(f"GRU '{self.name}' expects {self.in_features} features per step, got {input_shape[1]}.")
        return (input_shape[0], len(self.directions) * self.hidden_size)

    def build(self, input_shape, dtype):
        super().build(input_shape, dtype)
        f, h = self.input_shape[1], self.hidden_size
        self.in_features = f
        for d in self.directions:
            self.params[f"Wx_{d}"] = _init_weight((f, 3 * h), f, 3 * h, self.init, dtype)
            self.params[f"Wh_{d}"] = _orthogonal_blocks(h, 3, dtype)
            self.params[f"bx_{d}"] = backend.asarray(numpy.zeros(3 * h, dtype=dtype))
            self.params[f"bh_{d}"] = backend.asarray(numpy.zeros(3 * h, dtype=dtype))

    def _weights(self, d):
        p = self.params
        return p[f"Wx_{d}"], p[f"Wh_{d}"], p[f"bx_{d}"], p[f"bh_{d}"]

    def forward(self, x, train=False):
        self._check_input(x)
        if getattr(x, "ndim", None) != 3 or x.shape[2] != self.in_features:
            raise ShapeError(f"GRU '{self.name}' needs a batch of shape (N, T, {self.in_features}), "
                             f"got {getattr(x, 'shape', None)}.")
        outs, caches = [], []
        for d in self.directions:
            y, cache = gru_forward(x, *self._weights(d), reverse=(d == "bw"))
            outs.append(y)
            caches.append(cache)
        self._cache = caches if train else None
        if len(outs) == 1:
            return backend.get_array_module(x).ascontiguousarray(outs[0])
        return backend.get_array_module(x).concatenate(outs, axis=2)

    def backward(self, dy):
        caches = self._take_cache()
        h = self.hidden_size
        dx = None
        for i, (d, cache) in enumerate(zip(self.directions, caches)):
            dxd, dwx, dwh, dbx, dbh = gru_backward(dy[:, :, i * h:(i + 1) * h], cache,
                                                   need_dx=self.needs_input_grad)
            self.grads[f"Wx_{d}"], self.grads[f"Wh_{d}"] = dwx, dwh
            self.grads[f"bx_{d}"], self.grads[f"bh_{d}"] = dbx, dbh
            if dxd is not None:
                dx = dxd if dx is None else dx + dxd
        return dx

    def config(self):
        return {"hidden_size": self.hidden_size, "bidirectional": self.bidirectional,
                "in_features": self.in_features, "init": self.init}
