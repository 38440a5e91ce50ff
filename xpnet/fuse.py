"""The fast path of ``Sequential`` on the CPU: a plan of fused stages run batch-parallel.

``FastExecutor(model)`` turns the layer list into stages:

* ``ConvBlock`` -- a ``Conv2D`` with what directly follows it among
  [``BatchNorm``] [``ReLU``] [``MaxPool2D`` with stride == size, no padding],
  computed channel-last (N, H, W, C) over small batch chunks so the im2col
  matrix and the conv output stay in cache: one strided im2col copy, one matrix
  product whose rows are grouped by pool window (``xpnet.ops.nhwc``), pooling
  as element-wise maxima of contiguous blocks, bias and ReLU after the pool
  (max commutes with a per-channel shift and with ReLU), the input gradient one
  kernel tap at a time.  With BatchNorm the whole-batch statistics are
  all-reduced between shards before the normalisation.
* one stage per remaining layer (Dense, ReLU, Flatten, Dropout, BatchNorm,
  MaxPool2D of any kind), each on the same per-shard contract.

The batch is split into T contiguous shards (``xpnet.set_num_threads``), one
thread each with single-threaded BLAS (``xpnet.parallel``).  Per-shard partial
gradients are added in shard order and BatchNorm statistics are all-reduced in
shard order, so a run is reproducible for a given T.  Dropout masks are drawn
for the whole batch before the split, from the same generator and in the same
order as the plain path, so a seed gives the same masks on both paths.

Only exact instances of the built-in layer classes are planned; a model with
any other layer runs on the plain path.  Buffers live in one ``Workspace`` per
shard and are reused from step to step.
"""

from __future__ import annotations

import numpy

from . import backend, settings
from .errors import UsageError
from .layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .ops import nhwc
from .ops import pool as pool_ops
from .ops.dense import dense_backward, dense_forward
from .parallel import blas_threads, can_limit_blas, shard_bounds, shard_pool
from .workspace import Workspace

PLANNED_TYPES = (Conv2D, MaxPool2D, Dense, ReLU, Flatten, Dropout, BatchNorm)

# Conv work is done on chunks of images whose im2col block is about this big:
# small enough to stay in a core's L2 cache with the conv output next to it.
CHUNK_BYTES = 2097152
# No shard gets fewer images than this (threads cost more than they give below it).
MIN_SHARD = 4

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
        self.ws = Workspace(numpy)
        self.cache: dict = {}
        self.grads: dict = {}


def _chunk_images(bytes_per_image: int, n: int) -> int:
    budget = min(CHUNK_BYTES, settings.get_im2col_budget_bytes())
    return max(1, min(n, budget // max(1, bytes_per_image)))


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


def _batch_moments(z2d, dtype):
    """(rows, sum, M2) of the columns of z2d (R, C) in float64: two passes over cached data."""
    r = z2d.shape[0]
    s = z2d.sum(axis=0).astype(numpy.float64)
    centred = z2d - (s / r).astype(dtype)
    m2 = numpy.einsum("ij,ij->j", centred, centred).astype(numpy.float64)
    # Correct for centring on the rounded mean (exact in real arithmetic).
    d = centred.sum(axis=0).astype(numpy.float64)
    return r, s, m2 - d * d / r


class _BatchStats:
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


def _bn_update_running(bn: BatchNorm, mean, var, m_total: int):
    """Running averages as in ops.batchnorm_forward (unbiased variance)."""
    rm, rv = bn.buffers["running_mean"], bn.buffers["running_var"]
    mom = bn.momentum
    rm *= 1 - mom
    rm += (mom * mean).astype(rm.dtype)
    rv *= 1 - mom
    rv += (mom * m_total / (m_total - 1) * var).astype(rv.dtype)


def _bn_check_batch(bn: BatchNorm, m_total: int):
    if m_total < 2:
        from .errors import ShapeError

        raise ShapeError("batch norm in training mode needs more than one value per channel (batch of 1?).")


class ConvBlock(Stage):
    """Conv2D [-> BatchNorm] [-> ReLU] [-> MaxPool2D (grouped)] on NHWC chunks."""

    accepts = (NHWC, NCHW)
    # Below this many bytes per window row (KW*C values) im2col is built K-major
    # from an NCHW copy of the input: runs along the width are longer (first layers).
    KMAJOR_BELOW_BYTES = 64

    def __init__(self, index, conv: Conv2D, bn=None, relu=None, pool=None):
        super().__init__(index, [l for l in (conv, bn, relu, pool) if l is not None])
        self.conv, self.bn, self.relu, self.pool = conv, bn, relu, pool
        w_shape = (conv.out_channels, conv.in_channels) + conv.kernel_size
        self.g = nhwc.ConvGeometry.make(conv.input_shape, w_shape, conv.stride, conv.pad,
                                        pool.size if pool is not None else (1, 1))
        self.kmajor = self.g.kw * self.g.c * numpy.dtype(conv.params["W"].dtype).itemsize < self.KMAJOR_BELOW_BYTES

    @staticmethod
    def can_group(conv: Conv2D, bn, pool: MaxPool2D) -> bool:
        """A pool joins the block when it tiles the conv output without overlap or padding.

        With BatchNorm every conv output counts for the statistics, so the pool
        must then cover the map exactly (no ignored last row or column).
        """
        if pool.stride != pool.size or pool.pad != (0, 0):
            return False
        oh, ow = conv.output_shape[1:]
        if bn is not None and (oh % pool.size[0] or ow % pool.size[1]):
            return False
        return oh >= pool.size[0] and ow >= pool.size[1]

    def out_layout(self, in_layout):
        return NHWC

    def prepare(self, step):
        w = self.conv.params["W"]
        b = self.conv.params.get("b")
        if self.bn is not None and not step.train:
            # Evaluation: fold the running-statistics affine map into the weights.
            bn = self.bn
            inv_std = 1 / numpy.sqrt(bn.buffers["running_var"] + w.dtype.type(bn.eps))
            scale = bn.params["gamma"] * inv_std
            shift = bn.params["beta"] - bn.buffers["running_mean"] * scale
            w = w * scale[:, None, None, None]
            b = shift if b is None else b * scale + shift
        step.data[self.key("wmat")] = nhwc.weight_matrix(w)
        step.data[self.key("bias")] = b
        if step.train:
            step.data[self.key("wtaps")] = nhwc.weight_taps(w)

    # -- pieces shared by forward and backward
    def _padded(self, ws, name, n, dt, zero):
        """A padded input-shaped buffer and its (N, Hp, Wp, C) view (NCHW storage when K-major)."""
        g = self.g
        if self.kmajor:
            buf = ws.get(self.key(name), (n, g.c, g.hp, g.wp), dt, zero=zero)
            return buf, buf.transpose(0, 2, 3, 1)
        buf = ws.get(self.key(name), (n, g.hp, g.wp, g.c), dt, zero=zero)
        return buf, buf

    def _im2col(self, ws, xin_nhwc, a, e, dt, plain):
        """im2col of images a:e; returns the (rows, KH*KW*C) matrix (a transposed view when K-major)."""
        g = self.g
        r = (e - a) * g.rows
        if self.kmajor:
            col_t = ws.get(self.key("colT"), (g.kdim, r), dt)
            nhwc.im2col_grouped_kmajor(xin_nhwc[a:e], g, col_t, plain)
            return col_t.T
        col = ws.get(self.key("col"), (r, g.kdim), dt)
        return nhwc.im2col_grouped(xin_nhwc[a:e], g, col, plain)

    def _chunk(self, n, dt):
        return _chunk_images(self.g.rows * self.g.kdim * dt.itemsize, n)

    # -- forward
    def forward(self, x, sh, step):
        g = self.g
        n, dt = x.shape[0], x.dtype
        ws = sh.ws
        xbuf, xin = self._padded(ws, "xin", n, dt, zero=True)  # the padding border stays zero
        interior = xin[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w]
        numpy.copyto(interior, convert(x, step.layouts[self.index], NHWC))
        y = ws.get(self.key("y"), (n, g.qh, g.qw, g.f), dt)
        pooled = self.pool is not None
        gt = ws.get(self.key("gt"), (g.k - 1, n, g.qh, g.qw, g.f), bool) if (pooled and step.train) else None
        if self.bn is not None and step.train:
            self._forward_bn(xin, y, gt, sh, step)
        else:
            chunk = self._chunk(n, dt)
            wmat = step.data[self.key("wmat")]
            bias = step.data[self.key("bias")]
            for a in range(0, n, chunk):
                e = min(n, a + chunk)
                m = e - a
                # Rows grouped by pool position: the pool reads K contiguous blocks.
                col = self._im2col(ws, xin, a, e, dt, plain=False)
                yv = y[a:e]
                if not pooled:
                    numpy.matmul(col, wmat, out=yv.reshape(m * g.rows, g.f))
                else:
                    z = ws.get(self.key("z"), (m * g.rows, g.f), dt)
                    numpy.matmul(col, wmat, out=z)
                    nhwc.pool_blocks_forward(nhwc.grouped_blocks(z, g, m), yv,
                                             None if gt is None else gt[:, a:e])
                if bias is not None:
                    yv += bias  # after the pool: max commutes with a per-channel shift
                if self.relu is not None:
                    numpy.maximum(yv, 0, out=yv)
        if step.train:
            sh.cache[self.index] = (xin, y, gt)
        return y

    def _forward_bn(self, xin, y, gt, sh, step):
        g, ws = self.g, sh.ws
        n, dt = y.shape[0], y.dtype
        chunk = self._chunk(n, dt)
        z = ws.get(self.key("zall"), (n * g.rows, g.f), dt)
        wmat = step.data[self.key("wmat")]
        bias = step.data[self.key("bias")]
        stats = _BatchStats()
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            # Plain row order: z is kept for the backward pass, which works in that order.
            col = self._im2col(ws, xin, a, e, dt, plain=True)
            zv = z[a * g.rows:e * g.rows]
            numpy.matmul(col, wmat, out=zv)
            if bias is not None:
                zv += bias
            stats.add(_batch_moments(zv, dt))
        m_total = step.n * g.rows
        _bn_check_batch(self.bn, m_total)
        mean, var = stats.finish(sh, step, self.key("bn"), m_total)
        bn = self.bn
        inv_std = (1 / numpy.sqrt(var + bn.eps)).astype(dt)
        scale = bn.params["gamma"] * inv_std
        shift = bn.params["beta"] - mean.astype(dt) * scale
        if sh.k == 0:
            _bn_update_running(bn, mean, var, m_total)
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            m = e - a
            zv = z[a * g.rows:e * g.rows]
            yv = y[a:e]
            if self.pool is None:
                u = yv.reshape(m * g.rows, g.f)
            else:
                u = ws.get(self.key("u"), (m * g.rows, g.f), dt)
            numpy.multiply(zv, scale, out=u)
            u += shift
            if self.pool is not None:
                nhwc.pool_blocks_forward(nhwc.grouped_blocks(u, g, m, plain=True), yv, gt[:, a:e])
            if self.relu is not None:
                numpy.maximum(yv, 0, out=yv)
        sh.cache[(self.index, "bn")] = (z, mean.astype(dt), inv_std, scale, m_total)

    # -- backward
    def _unpool(self, ws, d, gt, a, e, out):
        """dy of images a:e (pooled) -> out (rows, F) in plain row order: the gradient before the pool."""
        g = self.g
        m = e - a
        shape = (m, g.qh, g.qw, g.f)
        nhwc.pool_blocks_backward(d[a:e], gt[:, a:e], nhwc.grouped_blocks(out, g, m, plain=True),
                                  ws.get(self.key("later"), shape, bool), ws.get(self.key("mask"), shape, bool),
                                  ws.get(self.key("fmask"), shape, d.dtype))
        return out

    def backward(self, dy, sh, step, need_dx):
        g = self.g
        xin, y, gt = sh.cache.pop(self.index)
        n, dt = y.shape[0], y.dtype
        ws = sh.ws
        chunk = self._chunk(n, dt)
        d = ws.get(self.key("dy"), (n, g.qh, g.qw, g.f), dt)
        if self.relu is not None:
            positive = ws.get(self.key("positive"), y.shape, bool)
            numpy.greater(y, 0, out=positive)
            numpy.copyto(d, positive)  # the ReLU mask as a float: a float*bool multiply is slower
            d *= dy
        else:
            numpy.copyto(d, dy)
        wtaps = step.data[self.key("wtaps")]
        dwmat = numpy.zeros((g.kdim, g.f), dtype=dt)
        db = None
        if self.conv.bias:
            # Without BatchNorm, the pool only routes values: sum the (smaller) pooled gradient.
            db = numpy.zeros(g.f, dtype=numpy.float64) if self.bn is not None else \
                d.reshape(-1, g.f).sum(axis=0).astype(numpy.float64)
        if need_dx:
            dxbuf, dxpad = self._padded(ws, "dxpad", n, dt, zero=False)
        bn_terms = self._bn_backward_terms(d, gt, chunk, sh, step) if self.bn is not None else None
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            m = e - a
            r = m * g.rows
            if bn_terms is not None:
                du_all, z_all, c_a, c_z, c_0 = bn_terms
                dz = ws.get(self.key("dz"), (r, g.f), dt)
                numpy.multiply(du_all[a * g.rows:e * g.rows], c_a, out=dz)
                tmp = ws.get(self.key("tmp"), (r, g.f), dt)
                numpy.multiply(z_all[a * g.rows:e * g.rows], c_z, out=tmp)
                dz += tmp
                dz += c_0
            elif self.pool is not None:
                dz = self._unpool(ws, d, gt, a, e, ws.get(self.key("dz"), (r, g.f), dt))
            else:
                dz = d[a:e].reshape(r, g.f)
            if db is not None and bn_terms is not None:
                db += dz.sum(axis=0)
            # Plain row order: each kernel tap's rows reach long contiguous runs of dx.
            col = self._im2col(ws, xin, a, e, dt, plain=True)
            dwmat += col.T @ dz
            if need_dx:
                taps = ws.get(self.key("taps"), (g.kh * g.kw, r, g.c), dt)
                numpy.matmul(dz, wtaps, out=taps)  # one (rows, C) slab per kernel tap
                dxv = dxbuf[a:e]
                dxv.fill(0)
                nhwc.col2im_grouped_taps(taps, g, dxpad[a:e], plain=True)
        sh.grads[(self.conv, "W")] = nhwc.weight_grad_from_matrix(dwmat, self.conv.params["W"].shape)
        if db is not None:
            sh.grads[(self.conv, "b")] = db.astype(dt)
        if not need_dx:
            return None
        # dx in the layout the input came in (the block reads either).
        return convert(dxpad[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w], NHWC, step.layouts[self.index])

    def _bn_backward_terms(self, d, gt, chunk, sh, step):
        """Gradient through the pool and BatchNorm, as dz = du*c_a + z*c_z + c_0 per channel."""
        g, ws = self.g, sh.ws
        z_all, mean, inv_std, scale, m_total = sh.cache.pop((self.index, "bn"))
        n, dt = d.shape[0], d.dtype
        if self.pool is not None:
            du_all = ws.get(self.key("du"), (n * g.rows, g.f), dt)
        else:
            du_all = d.reshape(n * g.rows, g.f)
        dbeta = numpy.zeros(g.f, numpy.float64)
        dxc = numpy.zeros(g.f, numpy.float64)  # sum of du * (z - mean)
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            r = (e - a) * g.rows
            du = du_all[a * g.rows:e * g.rows]
            if self.pool is not None:
                self._unpool(ws, d, gt, a, e, du)
            dbeta += du.sum(axis=0)
            t = ws.get(self.key("tmp"), (r, g.f), dt)
            numpy.subtract(z_all[a * g.rows:e * g.rows], mean, out=t)
            dxc += numpy.einsum("ij,ij->j", du, t)
        dbeta = step.reducer.allreduce(sh.k, self.key("dbeta"), dbeta)
        dxc = step.reducer.allreduce(sh.k, self.key("dxc"), dxc)
        inv_std64 = inv_std.astype(numpy.float64)
        dgamma = dxc * inv_std64
        if sh.k == 0:
            sh.grads[(self.bn, "gamma")] = dgamma.astype(dt)
            sh.grads[(self.bn, "beta")] = dbeta.astype(dt)
        scale64 = scale.astype(numpy.float64)
        c_z = -(scale64 * inv_std64 * dgamma / m_total)
        c_0 = -(scale64 * dbeta / m_total) - c_z * mean.astype(numpy.float64)
        return du_all, z_all, scale, c_z.astype(dt), c_0.astype(dt)


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
            _bn_check_batch(bn, m_total)
            stats = _BatchStats()
            if x2.shape[0]:
                stats.add(_batch_moments(x2, dt))
            mean, var = stats.finish(sh, step, self.key("bn"), m_total)
            if sh.k == 0:
                _bn_update_running(bn, mean, var, m_total)
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
        dbeta = step.reducer.allreduce(sh.k, self.key("dbeta"), dy2.sum(axis=0).astype(numpy.float64))
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


# --------------------------------------------------------------------------- planning
def plan_stages(layers) -> list[Stage]:
    """Group a layer list into stages (the list must hold only PLANNED_TYPES, built)."""
    stages: list[Stage] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        idx = len(stages)
        if type(layer) is Conv2D:
            j = i + 1
            bn = relu = pool = None
            if j < len(layers) and type(layers[j]) is BatchNorm:
                bn, j = layers[j], j + 1
            if j < len(layers) and type(layers[j]) is ReLU:
                relu, j = layers[j], j + 1
            if j < len(layers) and type(layers[j]) is MaxPool2D and ConvBlock.can_group(layer, bn, layers[j]):
                pool, j = layers[j], j + 1
            stages.append(ConvBlock(idx, layer, bn, relu, pool))
            i = j
            continue
        cls = {Dense: DenseStage, ReLU: ReLUStage, Flatten: FlattenStage, Dropout: DropoutStage,
               BatchNorm: BatchNormStage, MaxPool2D: PoolStage}[type(layer)]
        stages.append(cls(idx, [layer]))
        i += 1
    return stages


def plannable(model) -> bool:
    return all(type(l) in PLANNED_TYPES for l in model.layers)


class FastExecutor:
    """Runs a built ``Sequential`` through fused stages on T CPU threads."""

    def __init__(self, model):
        self.model = model
        self.key = self._key(model)
        self.stages = plan_stages(model.layers)
        for s in self.stages:
            s.dtype = model.dtype
        self.shards: list[Shard] = []
        self.pending: Step | None = None

    @staticmethod
    def _key(model):
        return (tuple(id(l) for l in model.layers), numpy.dtype(model.dtype).str)

    def threads_for(self, n: int) -> int:
        if not can_limit_blas():
            return 1
        return max(1, min(settings.get_num_threads(), n // MIN_SHARD))

    def _shard(self, k: int) -> Shard:
        while len(self.shards) <= k:
            self.shards.append(Shard(len(self.shards)))
        return self.shards[k]

    def forward(self, x, train: bool):
        n = x.shape[0]
        t = self.threads_for(n)
        pool = shard_pool()
        step = Step(train, n, t, pool.reducer(t))
        self.pending = None
        for s in self.stages:
            s.prepare(step)
        # The layout each stage gets its input in: the one it accepts, converting
        # between NCHW and NHWC (a free view) when it does not take the current one.
        layouts, src_layouts = [], []
        layout = NCHW if x.ndim == 4 else FLAT
        for s in self.stages:
            src_layouts.append(layout)
            if layout not in s.accepts:
                layout = next(a for a in s.accepts if a != FLAT)
            layouts.append(layout)
            layout = s.out_layout(layout)
        step.layouts = layouts
        step.out_layout = layout
        out = numpy.empty((n,) + tuple(self.model.output_shape), dtype=x.dtype)

        def run_shard(k):
            sh = self._shard(k)
            sh.cache.clear()
            sh.grads.clear()
            a, e = step.bounds[k]
            h = x[a:e]
            for s, src, dst in zip(self.stages, src_layouts, layouts):
                h = s.forward(convert(h, src, dst), sh, step)
            out[a:e] = convert(h, layout, NCHW)

        self._run(run_shard, t)
        if train:
            step.src_layouts = src_layouts
            self.pending = step
        return out

    def backward(self, dout):
        step = self.pending
        if step is None:
            raise UsageError("Model backward called without a forward(train=True) before it.")
        self.pending = None
        if tuple(dout.shape) != (step.n,) + tuple(self.model.output_shape):
            from .errors import ShapeError

            raise ShapeError(f"backward got d(logits) of shape {tuple(dout.shape)}, expected "
                             f"{(step.n,) + tuple(self.model.output_shape)}.")
        need = [s.layers[0].needs_input_grad for s in self.stages]
        want_dx = self.model.compute_input_grad
        dx_full = numpy.empty((step.n,) + tuple(self.model.input_shape), dtype=dout.dtype) if want_dx else None

        def run_shard(k):
            sh = self._shard(k)
            a, e = step.bounds[k]
            d = convert(dout[a:e], NCHW, step.out_layout)
            for i in range(len(self.stages) - 1, -1, -1):
                s = self.stages[i]
                d = s.backward(d, sh, step, need[i])
                if d is None:
                    break
                d = convert(d, step.layouts[i], step.src_layouts[i])
            if want_dx:
                dx_full[a:e] = convert(d, step.src_layouts[0], NCHW)
            return sh.grads

        shard_grads = self._run(run_shard, step.t)
        # Partial gradients are added in shard order: deterministic for a given T.
        for layer in self.model.layers:
            for name in layer.params:
                parts = [g[(layer, name)] for g in shard_grads if (layer, name) in g]
                total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
                for p in parts[2:]:
                    total += p
                layer.grads[name] = total
        for g in shard_grads:
            g.clear()
        return dx_full

    def _run(self, fn, t):
        # One BLAS thread per shard, also when there is a single shard (a small
        # batch): waking BLAS helper threads for tiny products costs more than it
        # gives, and on a busy machine it can wait a whole scheduler slice.
        with blas_threads(1):
            return shard_pool().run(fn, t)

    def invalidate(self):
        self.pending = None
