"""Stages of the fused CPU path (``xpnet.fuse``): the per-shard contract and the simple stages.

A stage covers one layer, or several fused ones (``xpnet.conv_block``).  Per
step the executor calls ``prepare(step)`` once in the main thread, then in each
shard's thread ``forward(x, shard, step)`` and later ``backward(dy, shard, step,
need_dx)``; a stage keeps what backward needs in ``shard.cache`` and writes
per-shard partial gradients to ``shard.grads[(layer, name)]`` (fresh arrays:
the executor adds them up in shard order).  Whole-batch quantities (BatchNorm
statistics) go through ``step.reducer.allreduce``.

Layouts: 4-D activations travel as NCHW or NHWC views (``convert`` is free);
each stage says which it ``accepts``.
"""

from __future__ import annotations

import numpy

from .. import backend, config as settings
from ..errors import ShapeError
from ..nn.layers import BatchNorm
from ..ops import pool as pool_ops
from ..ops.dense import dense_backward, dense_forward
from .threads import shard_bounds

# Conv work is done on chunks of images whose im2col block is about this big:
# small enough to stay near a core's L2 cache with the conv output next to it.
CHUNK_BYTES = 1024 * 1024
# The element-wise work on a conv block's output (pool, bias, ReLU, their
# gradients) runs over groups of chunks whose conv output is about this big:
# fewer, larger NumPy calls, each of which costs the two shard threads a turn
# at the GIL, still in cache.
GROUP_BYTES = 1024 * 1024

NCHW, NHWC, FLAT = "nchw", "nhwc", "flat"

# Workspace buffers start on a cache line.  NumPy only promises 16 bytes (a large
# array starts 16 bytes into a page), so every 64-byte AVX-512 load or store of an
# element-wise pass over such a buffer straddles two cache lines.  Aligned conv-block
# buffers: captcha_net's step 1-3% faster, captcha_net_bn's ~5% (benchmarks/NOTES.md #33).
ALIGN_BYTES = 64


def workspace(shape, dtype, zero: bool = False):
    """A NumPy buffer of ``shape`` and ``dtype`` whose first byte is ALIGN_BYTES-aligned.

    Views that start at a multiple of 64 bytes into it (rows of 16 float32
    channels or more) are aligned too.  ``zero`` fills it with zeros.
    """
    shape = (int(shape),) if numpy.ndim(shape) == 0 else tuple(int(s) for s in shape)
    dtype = numpy.dtype(dtype)
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    raw = numpy.empty(nbytes + ALIGN_BYTES, numpy.uint8)
    start = -raw.ctypes.data % ALIGN_BYTES
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    if zero:
        out.fill(0)
    return out


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
        self.cache: dict = {}
        self.grads: dict = {}


def chunk_images(bytes_per_image: int, n: int) -> int:
    """Images per chunk: about CHUNK_BYTES of im2col, never above the im2col budget."""
    budget = min(CHUNK_BYTES, settings.get_im2col_budget_bytes())
    return max(1, min(n, budget // max(1, bytes_per_image)))


def group_images(chunk: int, bytes_per_image: int, n: int) -> int:
    """Images per element-wise group: a multiple of ``chunk``, about GROUP_BYTES of conv output."""
    return min(n, chunk * max(1, GROUP_BYTES // max(1, chunk * bytes_per_image)))


# --------------------------------------------------------------------------- stages
class Stage:
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


_ONES: dict = {}


def column_sums(a2d):
    """Sum of the rows of a2d (R, C), as one BLAS product with a ones vector: ~5x faster
    than ``a2d.sum(axis=0)`` for C = 32..128 (NumPy then adds row after row)."""
    r, dt = a2d.shape[0], a2d.dtype
    ones = _ONES.get(dt)
    if ones is None or ones.shape[0] < r:
        ones = _ONES[dt] = numpy.ones(max(r, 4096), dt)  # read-only, shared by all shards
    return numpy.matmul(ones[:r], a2d)


def batch_moments(z2d, dtype, scratch=None):
    """(rows, sum, M2) of the columns of z2d (R, C) in float64: two passes over cached data.

    ``scratch``: an optional array of z2d's shape for the centred values.
    """
    r = z2d.shape[0]
    s = column_sums(z2d).astype(numpy.float64)
    centred = numpy.subtract(z2d, (s / r).astype(dtype), out=scratch)
    return r, s, numpy.einsum("ij,ij->j", centred, centred).astype(numpy.float64)


class BatchStats:
    """Chan-style combination of per-chunk moments into whole-batch mean and variance."""

    def __init__(self):
        self.parts = []

    def add(self, moments):
        self.parts.append(moments)

    def finish(self, sh: Shard, step: Step, key, m_total: int):
        s = sum(p[1] for p in self.parts) if self.parts else 0.0
        s = step.reducer.allreduce(sh.k, key + ("sum",), s)
        mean = s / m_total
        m2 = 0.0
        for r, sc, m2c in self.parts:
            dev = sc / r - mean
            m2 = m2 + m2c + r * dev * dev
        m2 = step.reducer.allreduce(sh.k, key + ("m2",), m2)
        return mean, m2 / m_total


def bn_update_running(bn: BatchNorm, mean, var, m_total: int):
    """Running averages as in ops.batchnorm_forward (unbiased variance)."""
    rm, rv = bn.buffers["running_mean"], bn.buffers["running_var"]
    mom = bn.momentum
    rm *= 1 - mom
    rm += (mom * mean).astype(rm.dtype)
    rv *= 1 - mom
    rv += (mom * m_total / (m_total - 1) * var).astype(rv.dtype)


def bn_check_batch(bn: BatchNorm, m_total: int):
    if m_total < 2:
        raise ShapeError("batch norm in training mode needs more than one value per channel (batch of 1?).")


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
    def prepare(self, step):
        layer = self.layers[0]
        if step.train and layer.rate > 0:
            dt = numpy.dtype(self.dtype)
            # The same draw, from the same generator, as the plain path (layers.Dropout).
            u = backend.rng().random((step.n,) + tuple(layer.input_shape), dtype=dt)
            step.data[self.key("mask")] = (u >= layer.rate) * dt.type(1.0 / (1.0 - layer.rate))

    def forward(self, x, sh, step):
        mask = step.data.get(self.key("mask"))
        if mask is None:
            return x
        a, e = step.bounds[sh.k]
        m = convert(mask[a:e], NCHW, step.layouts[self.index])
        sh.cache[self.index] = m
        return x * m

    def backward(self, dy, sh, step, need_dx):
        m = sh.cache.pop(self.index, None)
        if not need_dx:
            return None
        return dy if m is None else dy * m


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
            bn_check_batch(bn, m_total)
            stats = BatchStats()
            if x2.shape[0]:
                stats.add(batch_moments(x2, dt))
            mean, var = stats.finish(sh, step, self.key("bn"), m_total)
            if sh.k == 0:
                bn_update_running(bn, mean, var, m_total)
            mean = mean.astype(dt)
            inv_std = (1 / numpy.sqrt(var + bn.eps)).astype(dt)
        else:
            mean = bn.buffers["running_mean"]
            inv_std = 1 / numpy.sqrt(bn.buffers["running_var"] + dt.type(bn.eps))
        xhat = (x2 - mean) * inv_std
        y = xhat * bn.params["gamma"] + bn.params["beta"]
        if step.train:
            sh.cache[self.index] = (xhat, inv_std, m_total)
        return y.reshape(x.shape)

    def backward(self, dy, sh, step, need_dx):
        bn = self.layers[0]
        xhat, inv_std, m_total = sh.cache.pop(self.index)
        dt = xhat.dtype
        c = dy.shape[-1]
        dy2 = numpy.ascontiguousarray(dy).reshape(-1, c)
        dbeta = step.reducer.allreduce(sh.k, self.key("dbeta"), column_sums(dy2).astype(numpy.float64))
        dgamma = step.reducer.allreduce(sh.k, self.key("dgamma"),
                                        numpy.einsum("ij,ij->j", dy2, xhat).astype(numpy.float64))
        if sh.k == 0:
            sh.grads[(bn, "gamma")] = dgamma.astype(dt)
            sh.grads[(bn, "beta")] = dbeta.astype(dt)
        if not need_dx:
            return None
        g = bn.params["gamma"] * inv_std
        dx = g * (dy2 - (dbeta.astype(dt) + xhat * dgamma.astype(dt)) / dt.type(m_total))
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


