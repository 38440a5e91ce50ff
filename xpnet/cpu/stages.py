"""Stages of the fused CPU path: the per-shard contract and the stages other than conv blocks.

A stage covers one layer, or several fused ones (``conv_block``).  Per step the
executor calls ``prepare(step)`` once in the main thread, then in each shard's
thread ``forward(x, shard, step)`` and later ``backward(dy, shard, step,
need_dx)``; a stage keeps what backward needs in ``shard.cache`` and writes
per-shard partial gradients to ``shard.grads[(layer, name)]`` (fresh arrays:
the executor adds them up in shard order).  Whole-batch quantities (BatchNorm
statistics) go through ``step.reducer.allreduce``.

Layouts: 4-D activations travel as NCHW or NHWC views (``convert`` is free);
each stage says which it ``accepts``.  BatchNorm and dropout compute with the
formulas of ``xpnet.ops.norm`` and ``xpnet.ops.dropout``.
"""

from __future__ import annotations

import numpy

from .. import backend
from ..nn.layers import BatchNorm
from ..ops import norm, pool as pool_ops
from ..ops.dense import dense_backward, dense_forward
from ..ops.dropout import dropout_backward, dropout_forward, dropout_mask
from .threads import shard_bounds
from .workspace import aligned_buffer, column_sums

NCHW, NHWC, FLAT = "nchw", "nhwc", "flat"


def convert(x, src: str, dst: str):
    """A view of a 4-D array in another layout (flat arrays pass through)."""
    if src == dst or x.ndim != 4:
        return x
    if src == NCHW and dst == NHWC:
        return x.transpose(0, 2, 3, 1)
    if src == NHWC and dst == NCHW:
        return x.transpose(0, 3, 1, 2)
    raise AssertionError(f"no conversion from {src} to {dst}")


class Step:
    """What all shards of one forward/backward share (read-only once prepared)."""

    def __init__(self, train: bool, n: int, t: int, reducer):
        self.train = train
        self.n = n
        self.t = t
        self.bounds = shard_bounds(n, t)
        self.reducer = reducer
        self.data: dict = {}
        self.layouts: list = []  # per stage: layout its input was given in


class Shard:
    """One shard's persistent buffers and its per-step caches and partial gradients."""

    def __init__(self, k: int):
        self.k = k
        self.plans: dict = {}  # stage buffers and views by (stage, batch size, mode): reused every step
        self.buffers: dict = {}  # intermediates by (stage, name): see ``buffer``
        self.cache: dict = {}
        self.grads: dict = {}

    def buffer(self, key, shape, dtype):
        """This shard's buffer for ``key``, reused from step to step (new when the shape or dtype changes).

        For intermediates only (never a partial gradient or a result the caller keeps).  Fresh
        arrays of a few hundred kB per step are not free: the allocator maps them from the
        system and every first touch of a page faults, which cost the shard that runs in the
        main thread several milliseconds a step in a CRNN's GRU.
        """
        shape = tuple(int(s) for s in shape)
        found = self.buffers.get(key)
        if found is None or found.shape != shape or found.dtype != dtype:
            found = self.buffers[key] = aligned_buffer(shape, dtype)
        return found


# --------------------------------------------------------------------------- stages
class Stage:
    """One or more layers run on one shard's slice of the batch (see the module docstring)."""

    accepts = (NCHW, NHWC, FLAT)

    def __init__(self, index: int, layers):
        self.index = index
        self.layers = list(layers)

    def out_layout(self, in_layout: str) -> str:
        return in_layout

    def prepare(self, step: Step) -> None:
        """Per-step work done once, before the shards start (main thread)."""

    def forward(self, x, sh: Shard, step: Step):
        raise NotImplementedError

    def backward(self, dy, sh: Shard, step: Step, need_dx: bool):
        raise NotImplementedError

    def key(self, name):
        return (self.index, name)


def batch_moments(z2d, dtype, scratch=None):
    """(rows, sum, M2) of the columns of z2d (R, C) in float64: two passes over cached data.

    ``scratch``: an optional array of z2d's shape for the centred values.
    """
    r = z2d.shape[0]
    s = column_sums(z2d).astype(numpy.float64)
    centred = numpy.subtract(z2d, (s / r).astype(dtype), out=scratch)
    return r, s, numpy.einsum("ij,ij->j", centred, centred).astype(numpy.float64)


class BatchStats:
    """Chan-style combination of per-chunk moments into whole-batch mean and variance (float64)."""

    def __init__(self):
        self.parts = []

    def add(self, moments):
        self.parts.append(moments)

    def finish(self, sh: Shard, step: Step, key, m_total: int):
        """(mean, variance) of the whole batch, with one all-reduce (one barrier between the shards).

        The shard's chunks combine about the shard's own mean (Chan: stable); the shards then
        combine as M2 = sum_k (M2_k + S_k^2 / n_k) - S^2 / N, whose float64 cancellation costs
        ~1e-16 mean^2 / var of the variance.
        """
        n_k = sum(p[0] for p in self.parts)
        if n_k:
            s_k = sum(p[1] for p in self.parts)
            mean_k = s_k / n_k
            m2_k = 0.0
            for r, sc, m2c in self.parts:
                dev = sc / r - mean_k
                m2_k = m2_k + m2c + r * dev * dev
            local = numpy.stack([s_k, m2_k + s_k * s_k / n_k])
        else:  # no rows in this shard
            local = 0.0
        s, q = step.reducer.allreduce(sh.k, key + ("moments",), local)
        mean = s / m_total
        return mean, numpy.maximum(q - s * mean, 0.0) / m_total


def bn_update_running(bn: BatchNorm, mean, var, m_total: int):
    """The layer's running averages from whole-batch float64 statistics of m_total values."""
    norm.update_running_stats(bn.buffers["running_mean"], bn.buffers["running_var"], mean, var, m_total,
                              bn.momentum)


class DenseStage(Stage):
    accepts = (FLAT,)

    def forward(self, x, sh, step):
        layer = self.layers[0]
        y, cache = dense_forward(x, layer.params["W"], layer.params.get("b"))
        if step.train:
            sh.cache[self.index] = cache
        return y

    def backward(self, dy, sh, step, need_dx):
        layer = self.layers[0]
        dx, dw, db = dense_backward(dy, sh.cache.pop(self.index), need_dx=need_dx)
        sh.grads[(layer, "W")] = dw
        if db is not None:
            sh.grads[(layer, "b")] = db
        return dx


class ReLUStage(Stage):
    def forward(self, x, sh, step):
        y = numpy.maximum(x, 0)
        if step.train:
            sh.cache[self.index] = y
        return y

    def backward(self, dy, sh, step, need_dx):
        y = sh.cache.pop(self.index)
        return dy * (y > 0) if need_dx else None


class FlattenStage(Stage):
    accepts = (NCHW, FLAT)

    def out_layout(self, in_layout):
        return FLAT

    def forward(self, x, sh, step):
        if step.train:
            sh.cache[self.index] = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy, sh, step, need_dx):
        shape = sh.cache.pop(self.index)
        return dy.reshape(shape) if need_dx else None


class DropoutStage(Stage):
    """Dropout with one mask for the whole batch, drawn before the shards start (a shard worker
    process gets the main process's mask in ``step.data``: it does not draw one)."""

    def prepare(self, step):
        layer = self.layers[0]
        if step.train and layer.rate > 0 and self.key("mask") not in step.data:
            # The same draw, from the same generator, as the plain path (layers.Dropout).
            u = backend.rng().random((step.n,) + tuple(layer.input_shape), dtype=numpy.dtype(self.dtype))
            step.data[self.key("mask")] = dropout_mask(u, layer.rate)

    def forward(self, x, sh, step):
        mask = step.data.get(self.key("mask"))
        if mask is None:
            return x
        a, e = step.bounds[sh.k]
        y, sh.cache[self.index] = dropout_forward(x, convert(mask[a:e], NCHW, step.layouts[self.index]))
        return y

    def backward(self, dy, sh, step, need_dx):
        cache = sh.cache.pop(self.index, None)
        if not need_dx:
            return None
        return dy if cache is None else dropout_backward(dy, cache)


class BatchNormStage(Stage):
    """BatchNorm not fused into a conv block: (N, C) or NHWC, whole-batch statistics all-reduced."""

    accepts = (FLAT, NHWC)

    def forward(self, x, sh, step):
        bn = self.layers[0]
        c = x.shape[-1]
        dt = x.dtype
        x2 = numpy.ascontiguousarray(x).reshape(-1, c)
        if step.train:
            m_total = step.n * int(numpy.prod(x.shape[1:-1], dtype=numpy.int64))
            norm.check_training_batch(m_total)
            stats = BatchStats()
            if x2.shape[0]:
                stats.add(batch_moments(x2, dt))
            mean, var = stats.finish(sh, step, self.key("bn"), m_total)
            if sh.k == 0:
                bn_update_running(bn, mean, var, m_total)
            mean = mean.astype(dt)
        else:
            mean, var = bn.buffers["running_mean"], bn.buffers["running_var"]
        inv_std = norm.inverse_std(var, bn.eps, dt)
        xhat, y = norm.normalise(x2 - mean, inv_std, bn.params["gamma"], bn.params["beta"])
        if step.train:
            sh.cache[self.index] = (xhat, inv_std, m_total)
        return y.reshape(x.shape)

    def backward(self, dy, sh, step, need_dx):
        bn = self.layers[0]
        xhat, inv_std, m_total = sh.cache.pop(self.index)
        dt = xhat.dtype
        c = dy.shape[-1]
        dy2 = numpy.ascontiguousarray(dy).reshape(-1, c)
        dbeta, dgamma = step.reducer.allreduce(sh.k, self.key("dbeta_dgamma"), numpy.stack(  # one barrier
            [column_sums(dy2).astype(numpy.float64), numpy.einsum("ij,ij->j", dy2, xhat).astype(numpy.float64)]))
        if sh.k == 0:
            sh.grads[(bn, "gamma")] = dgamma.astype(dt)
            sh.grads[(bn, "beta")] = dbeta.astype(dt)
        if not need_dx:
            return None
        dx = norm.input_grad(dy2, xhat, bn.params["gamma"] * inv_std, dgamma.astype(dt), dbeta.astype(dt), m_total)
        return dx.reshape(dy.shape)


class PoolStage(Stage):
    """A MaxPool2D not fused into a conv block: the plain op on NCHW views."""

    accepts = (NCHW,)

    def forward(self, x, sh, step):
        p = self.layers[0]
        y, cache = pool_ops.max_pool2d_forward(x, p.size, p.stride, p.pad)
        if step.train:
            sh.cache[self.index] = cache
        return y

    def backward(self, dy, sh, step, need_dx):
        cache = sh.cache.pop(self.index)
        return pool_ops.max_pool2d_backward(dy, cache) if need_dx else None


