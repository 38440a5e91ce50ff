"""The fused convolution stage: Conv2D [-> BatchNorm] [-> ReLU] [-> MaxPool2D], channel-last,
over chunks of a few images so the im2col block and the conv output stay in cache.

Per chunk, forward: one strided im2col copy, one matrix product, the pool as
K-1 element-wise maxima of contiguous blocks (rows grouped by pool window, see
``xpnet.ops.nhwc``), then bias and ReLU on the 4x smaller pooled map (max
commutes with a per-channel shift and with ReLU).  Backward: the ReLU mask, the
pool's routing (from K-1 bool "beat the running max" records), im2col again
(cheaper than keeping it), the weight gradient, and the input gradient: for
'same' stride-1 convs one product with the flipped kernel over the im2col of
the zero-padded dz, otherwise dz times all kernel taps in one product (every
tap's (rows, C) slab side by side) and one strided addition per tap into dx.

With BatchNorm in training the order changes: convolve every chunk and keep z,
all-reduce the batch statistics between shards, then normalise, pool and ReLU;
backward all-reduces dbeta and dgamma before the convolution gradients.  In
evaluation BatchNorm is folded into the weights and bias.

The products run per chunk (about ``stages.CHUNK_BYTES`` of im2col); the
element-wise work on the conv output (pool, bias, ReLU, BatchNorm, and their
gradients) per group of chunks (about ``stages.GROUP_BYTES`` of conv output):
fewer, larger NumPy calls, each of which costs the shard threads a turn at the
GIL.  A K-major im2col (few input channels) is copied from phase planes of the
input (``nhwc.phase_planes_view``): long runs instead of many short ones.

Everything a shard needs for n images -- buffers and every strided view of
every chunk -- is built once (``_ShardPlan``) and reused step after step:
building views costs Python time, and Python time is what the two shards'
threads contend for (the GIL).
"""

from __future__ import annotations

from functools import partial

import numpy

from .. import config as settings
from ..errors import UsageError
from ..nn.layers import Conv2D, MaxPool2D
from . import grouped_im2col as nhwc
from ..ops.pool import pool_blocks_backward, pool_blocks_forward
from .stages import (NCHW, NHWC, BatchStats, Stage, batch_moments, bn_check_batch, bn_update_running, chunk_images,
                     column_sums, convert, group_images, workspace)


class _Chunk:
    """Views of one chunk (images a:e of the shard) for its products: im2col, conv output rows."""


def _buffer_key(a):
    """What identifies the memory an array view reads: (address, shape, strides, dtype)."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


class _Group:
    """Consecutive chunks whose element-wise work (pool, bias, ReLU, BatchNorm) runs as one set of calls."""


class _ShardPlan:
    """Buffers and prebuilt views for one shard running the block on n images."""

    def __init__(self, blk: "ConvBlock", n: int, dt, train: bool, need_dx: bool):
        g = blk.g
        self.n, self.train, self.need_dx = n, train, need_dx
        pooled = blk.pool is not None
        bn_train = blk.bn is not None and train
        # Backward works in plain row order only for the tap-by-tap input gradient
        # (long runs for its additions); BatchNorm keeps z in backward's order.
        self.bwd_plain = need_dx and not blk.dx_im2col
        self.fwd_plain = bn_train and self.bwd_plain
        emp, zer = workspace, partial(workspace, zero=True)  # cache-line aligned (stages.workspace)
        self.xbuf, self.xin = blk.padded(n, dt, zer)  # the padding border stays zero
        self.interior = self.xin[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w]
        # A K-major im2col in grouped order is copied from phase planes: long runs
        # (nhwc.phase_planes_view), when they fit the im2col budget.
        self.planes = None
        if blk.kmajor and not (self.fwd_plain or self.bwd_plain):
            shape = nhwc.phase_shape(n, g)
            if int(numpy.prod(shape)) * numpy.dtype(dt).itemsize <= settings.get_im2col_budget_bytes():
                self.planes = emp(shape, dt)
        self.y = emp((n, g.qh, g.qw, g.f), dt)
        self.gt = emp((g.k - 1, n, g.qh, g.qw, g.f), bool) if (pooled and train) else None
        itemsize = numpy.dtype(dt).itemsize
        chunk = chunk_images(g.rows * g.kdim * itemsize, n)
        group = group_images(chunk, g.rows * g.f * itemsize, n)
        cr, gr = chunk * g.rows, group * g.rows
        # Buffers every chunk reuses: the im2col block, and for the input gradient its
        # counterpart (and the zero-padded dz it is built from).
        self._col = emp((g.kdim, cr) if blk.kmajor else (cr, g.kdim), dt)
        z = emp((gr, g.f), dt) if (pooled and not bn_train) else None
        if bn_train:
            self.zall = emp((n * g.rows, g.f), dt)
            u = emp((gr, g.f), dt) if pooled else None
            tmp = emp((gr, g.f), dt)
        if train:
            self.d = emp((n, g.qh, g.qw, g.f), dt)
            self.pos = emp(self.d.shape, bool) if blk.relu is not None else None
            self.dwmat = emp((g.kdim, g.f), dt)
            self.dwtmp = emp((g.kdim, g.f), dt)
            dz = emp((gr, g.f), dt) if (pooled or bn_train) else None
            if bn_train:
                self.du_all = emp((n * g.rows, g.f), dt) if pooled else self.d.reshape(n * g.rows, g.f)
            if pooled:
                later, mask = emp((group, g.qh, g.qw, g.f), bool), emp((group, g.qh, g.qw, g.f), bool)
                fmask = emp((group, g.qh, g.qw, g.f), dt)
            if need_dx and blk.dx_im2col:
                gd = blk.gd
                self._dzpad = zer((chunk, gd.hp, gd.wp, gd.c), dt)  # borders (and rows no pool reads) stay zero
                self._dcol = emp((chunk * gd.rows, gd.kdim), dt)
                self.dxbuf = emp((n, g.h, g.w, g.c), dt)
            elif need_dx:
                self.dxbuf, self.dxpad = blk.padded(n, dt, emp)
                self._dcol = emp((cr, g.kdim), dt)  # one (rows, C) slab per kernel tap, side by side
        self.groups = []
        for ga in range(0, n, group):
            ge = min(n, ga + group)
            m, r = ge - ga, (ge - ga) * g.rows
            gp = _Group()
            gp.y = self.y[ga:ge]
            gp.gt = self.gt[:, ga:ge] if self.gt is not None else None
            if bn_train:
                gp.zall = gp.z = self.zall[ga * g.rows:ge * g.rows]  # the products go to z, kept whole
                gp.tmp = tmp[:r]
                gp.u = u[:r] if pooled else gp.y.reshape(r, g.f)
                gp.u_blocks = nhwc.grouped_blocks(gp.u, g, m, plain=self.fwd_plain) if pooled else None
            else:
                gp.z = z[:r] if pooled else gp.y.reshape(r, g.f)  # where the chunks' products go
                gp.z_blocks = nhwc.grouped_blocks(gp.z, g, m, plain=False) if pooled else None
            if train:
                gp.d = self.d[ga:ge]
                gp.dz = dz[:r] if dz is not None else gp.d.reshape(r, g.f)
                if pooled:
                    gp.dz_blocks = nhwc.grouped_blocks(gp.dz, g, m, plain=self.bwd_plain)
                    gp.later, gp.mask, gp.fmask = later[:m], mask[:m], fmask[:m]
                if bn_train:
                    gp.du = self.du_all[ga * g.rows:ge * g.rows]
                    gp.du_blocks = nhwc.grouped_blocks(gp.du, g, m, plain=self.bwd_plain) if pooled else None
            gp.chunks = [self._chunk(blk, gp, ga, a, min(ge, a + chunk), train, need_dx)
                         for a in range(ga, ge, chunk)]
            self.groups.append(gp)
        # Without padding, a block that is not the first can read its input where it
        # lies -- the previous stage's output, which nothing changes before the next
        # forward -- instead of copying it into xin, once the same buffer comes twice.
        self.may_read_input = blk.index > 0 and g.ph == g.pw == 0 and not blk.kmajor
        self.src_key, self.seen_key = _buffer_key(self.xin), None

    def read_from(self, blk, src):
        """Point the chunks' im2col sources at src (N, Hp, Wp, C): xin, or the input itself."""
        g = blk.g
        for gp in self.groups:
            for ch in gp.chunks:
                same = getattr(ch, "b_src", None) is ch.f_src
                ch.f_src = nhwc.grouped_window_view(src[ch.a:ch.e], g, self.fwd_plain)
                if same:
                    ch.b_src = ch.f_src
                elif hasattr(ch, "b_src"):
                    ch.b_src = nhwc.grouped_window_view(src[ch.a:ch.e], g, self.bwd_plain)
        self.src_key = _buffer_key(src)

    def _chunk(self, blk, gp, ga, a, e, train, need_dx):
        """The views the products of chunk a:e (in the group starting at image ga) read and write."""
        g = blk.g
        m, r = e - a, (e - a) * g.rows
        rows = slice((a - ga) * g.rows, (e - ga) * g.rows)
        ch = _Chunk()
        ch.a, ch.e = a, e
        col = self._col
        if self.planes is not None:
            part = col[:, :r]
            ch.f_src = nhwc.phase_window_view(self.planes[a:e], g)
            ch.f_dst, ch.f_mat = part.reshape(ch.f_src.shape), part.T
        else:
            ch.f_src, ch.f_dst, ch.f_mat = blk.im2col_views(self.xin[a:e], col, r, self.fwd_plain)
        ch.z = gp.z[rows]
        if not train:
            return ch
        if self.bwd_plain == self.fwd_plain:
            ch.b_src, ch.b_dst, ch.b_mat = ch.f_src, ch.f_dst, ch.f_mat
        else:
            ch.b_src, ch.b_dst, ch.b_mat = blk.im2col_views(self.xin[a:e], col, r, self.bwd_plain)
        ch.b_matT = ch.b_mat.T
        ch.dz = gp.dz[rows]
        if need_dx and blk.dx_im2col:
            # dz (grouped rows) -> a zero-padded NHWC map -> im2col -> one product.
            gd, dzpad, dcol = blk.gd, self._dzpad, self._dcol
            inner = dzpad[:m, gd.ph:gd.ph + g.qh * g.pkh, gd.pw:gd.pw + g.qw * g.pkw]
            ch.dz_dst = inner.reshape(m, g.qh, g.pkh, g.qw, g.pkw, g.f).transpose(0, 2, 4, 1, 3, 5)
            ch.dz_src = ch.dz.reshape(ch.dz_dst.shape)
            rd = m * gd.rows
            ch.dcol_src = nhwc.grouped_window_view(dzpad[:m], gd)
            ch.dcol_dst = dcol[:rd].reshape(ch.dcol_src.shape)
            ch.dcol = dcol[:rd]
            ch.dx2 = self.dxbuf[a:e].reshape(rd, g.c)
        elif need_dx:
            ch.dx = self.dxbuf[a:e]
            views = nhwc.tap_views(self.dxpad[a:e], g, plain=True)
            ch.dcol = self._dcol[:r]
            taps = ch.dcol.reshape(views[0].shape[:3] + (g.kh * g.kw, g.c))
            ch.taps = [(v, taps[:, :, :, t]) for t, v in enumerate(views)]
        return ch


class ConvBlock(Stage):
    """Conv2D [-> BatchNorm] [-> ReLU] [-> MaxPool2D (grouped)] on NHWC chunks."""

    accepts = (NHWC, NCHW)
    # Below this many bytes per window row (KW*C values) im2col is built K-major
    # from an NCHW copy of the input: runs along the width are longer (first layers).
    KMAJOR_BELOW_BYTES = 64
    KEEP_PLANS = 3  # per shard: e.g. the training batch, the last short batch, an evaluation batch

    def __init__(self, index, conv: Conv2D, bn=None, relu=None, pool=None):
        super().__init__(index, [l for l in (conv, bn, relu, pool) if l is not None])
        self.conv, self.bn, self.relu, self.pool = conv, bn, relu, pool
        w = conv.params["W"]
        self.g = g = nhwc.ConvGeometry.make(conv.input_shape, w.shape, conv.stride, conv.pad,
                                            pool.size if pool is not None else (1, 1))
        dt = w.dtype
        self.kmajor = g.kw * g.c * dt.itemsize < self.KMAJOR_BELOW_BYTES
        # Weights in the layouts the products read, refreshed in place every step
        # (shard plans hold views of them).  Evaluation with BatchNorm folds it in.
        self.wmat = {True: workspace((g.kdim, g.f), dt), False: workspace((g.kdim, g.f), dt)}
        self.bias = {True: workspace(g.f, dt), False: workspace(g.f, dt)}
        self.has_bias = {True: conv.bias, False: conv.bias or bn is not None}
        # (F, KH*KW*C): the kernel taps' (F, C) matrices side by side, for the input gradient.
        self.wtaps = workspace((g.f, g.kh * g.kw * g.c), dt)
        # Input gradient: for a stride-1 conv whose output covers about as many
        # pixels as its input ('same' padding), one product with the flipped kernel
        # over the im2col of the zero-padded dz (K = KH*KW*F) beats the tap
        # products (K = F) and their additions.  Otherwise dz @ wtaps, then col2im.
        self.dx_im2col = (g.sh, g.sw) == (1, 1) and g.ph < g.kh and g.pw < g.kw and g.h * g.w <= 1.15 * g.rows
        if self.dx_im2col:
            self.gd = nhwc.ConvGeometry(g.f, g.oh, g.ow, g.c, g.kh, g.kw, 1, 1, g.kh - 1 - g.ph, g.kw - 1 - g.pw)
            self.wflip = workspace((g.kh * g.kw * g.f, g.c), dt)

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

    # -- helpers shared by the plans
    def padded(self, n, dt, alloc):
        """A padded input-shaped buffer and its (N, Hp, Wp, C) view (NCHW storage when K-major)."""
        g = self.g
        if self.kmajor:
            buf = alloc((n, g.c, g.hp, g.wp), dt)
            return buf, buf.transpose(0, 2, 3, 1)
        buf = alloc((n, g.hp, g.wp, g.c), dt)
        return buf, buf

    def im2col_views(self, xin_chunk, col, r, plain):
        """(source window view, destination view, (rows, KH*KW*C) matrix) for one chunk."""
        g = self.g
        src = nhwc.grouped_window_view(xin_chunk, g, plain)
        if self.kmajor:
            part = col[:, :r]
            dst = part.reshape(src.shape[5:] + src.shape[:5])
            return src.transpose(5, 6, 7, 0, 1, 2, 3, 4), dst, part.T
        part = col[:r]
        return src, part.reshape(src.shape), part

    def plan(self, sh, n, dt, train, need_dx):
        key = (self.index, n, train, need_dx)
        plans = sh.plans
        p = plans.get(key)
        if p is None:
            p = plans[key] = _ShardPlan(self, n, dt, train, need_dx)
            mine = [k for k in plans if k[0] == self.index]
            for old in mine[:-self.KEEP_PLANS]:
                del plans[old]
        return p

    def prepare(self, step):
        w = self.conv.params["W"]
        b = self.conv.params.get("b")
        train = step.train
        if self.bn is not None and not train:
            # Evaluation: fold the running-statistics affine map into the weights.
            bn = self.bn
            inv_std = 1 / numpy.sqrt(bn.buffers["running_var"] + w.dtype.type(bn.eps))
            scale = bn.params["gamma"] * inv_std
            shift = bn.params["beta"] - bn.buffers["running_mean"] * scale
            w = w * scale[:, None, None, None]
            b = shift if b is None else b * scale + shift
        g = self.g
        numpy.copyto(self.wmat[train].reshape(g.kh, g.kw, g.c, g.f), w.transpose(2, 3, 1, 0))
        if b is not None:
            numpy.copyto(self.bias[train], b)
        if train and self.dx_im2col:
            numpy.copyto(self.wflip.reshape(g.kh, g.kw, g.f, g.c), w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
        elif train:
            numpy.copyto(self.wtaps.reshape(g.f, g.kh, g.kw, g.c), w.transpose(0, 2, 3, 1))

    # -- forward
    def forward(self, x, sh, step):
        g = self.g
        train = step.train
        need_dx = bool(train and self.conv.needs_input_grad)
        p = self.plan(sh, x.shape[0], x.dtype, train, need_dx)
        x = convert(x, step.layouts[self.index], NHWC)
        key = _buffer_key(x) if p.may_read_input else None
        if p.planes is not None and g.ph == g.pw == 0:
            numpy.copyto(p.planes, nhwc.phase_planes_view(x, g))  # straight from the input
        elif key is not None and key in (p.src_key, p.seen_key):
            if key != p.src_key:
                p.read_from(self, x)  # the same buffer as last time: read it where it lies
        else:
            if p.may_read_input:
                if p.src_key != _buffer_key(p.xin):
                    p.read_from(self, p.xin)
                p.seen_key = key
            numpy.copyto(p.interior, x)
            if p.planes is not None:
                numpy.copyto(p.planes, nhwc.phase_planes_view(p.xin, g))
        wmat, bias = self.wmat[train], self.bias[train] if self.has_bias[train] else None
        if self.bn is not None and train:
            self._forward_bn(p, sh, step)
        else:
            mm, cp, mx, add = numpy.matmul, numpy.copyto, numpy.maximum, numpy.add
            pooled, relu = self.pool is not None, self.relu is not None
            for gp in p.groups:
                for ch in gp.chunks:
                    cp(ch.f_dst, ch.f_src)  # im2col, rows grouped by pool position
                    mm(ch.f_mat, wmat, out=ch.z)
                if pooled:
                    pool_blocks_forward(gp.z_blocks, gp.y, gp.gt)
                if bias is not None:
                    add(gp.y, bias, out=gp.y)  # after the pool: max commutes with a per-channel shift
                if relu:
                    mx(gp.y, 0, out=gp.y)
        if train:
            sh.cache[self.index] = p
        return p.y

    def _forward_bn(self, p, sh, step):
        g, bn = self.g, self.bn
        dt = p.y.dtype
        wmat = self.wmat[True]
        bias = self.bias[True] if self.conv.bias else None
        stats = BatchStats()
        for gp in p.groups:
            for ch in gp.chunks:
                numpy.copyto(ch.f_dst, ch.f_src)
                numpy.matmul(ch.f_mat, wmat, out=ch.z)
            if bias is not None:
                numpy.add(gp.zall, bias, out=gp.zall)
            stats.add(batch_moments(gp.zall, dt, gp.tmp))
        m_total = step.n * g.rows
        bn_check_batch(bn, m_total)
        mean, var = stats.finish(sh, step, self.key("bn"), m_total)
        inv_std = (1 / numpy.sqrt(var + bn.eps)).astype(dt)
        scale = bn.params["gamma"] * inv_std
        shift = bn.params["beta"] - mean.astype(dt) * scale
        if sh.k == 0:
            bn_update_running(bn, mean, var, m_total)
        for gp in p.groups:
            numpy.multiply(gp.zall, scale, out=gp.u)
            numpy.add(gp.u, shift, out=gp.u)
            if self.pool is not None:
                pool_blocks_forward(gp.u_blocks, gp.y, gp.gt)
            if self.relu is not None:
                numpy.maximum(gp.y, 0, out=gp.y)
        p.bn = (mean.astype(dt), inv_std, scale, m_total)

    # -- backward
    def backward(self, dy, sh, step, need_dx):
        g = self.g
        p = sh.cache.pop(self.index)
        if need_dx and not p.need_dx:
            raise UsageError("compute_input_grad was switched on between forward and backward: "
                             "run forward(x, train=True) again.")
        if self.relu is not None:
            numpy.greater(p.y, 0, out=p.pos)
            numpy.copyto(p.d, p.pos)  # the ReLU mask as a float: a float*bool multiply is slower
            numpy.multiply(p.d, dy, out=p.d)
        else:
            numpy.copyto(p.d, dy)
        dt = p.d.dtype
        db = None
        if self.conv.bias and self.bn is None:
            # The pool only routes values: sum the (smaller) pooled gradient.
            db = column_sums(p.d.reshape(-1, g.f))
        bn_terms = self._bn_backward_terms(p, sh, step) if self.bn is not None else None
        if bn_terms is not None and self.conv.bias:
            db = numpy.zeros(g.f, numpy.float64)
        p.dwmat.fill(0)
        mm, add = numpy.matmul, numpy.add
        pooled = self.pool is not None
        for gp in p.groups:
            if bn_terms is not None:
                c_a, c_z, c_0 = bn_terms
                numpy.multiply(gp.du, c_a, out=gp.dz)
                numpy.multiply(gp.zall, c_z, out=gp.tmp)
                add(gp.dz, gp.tmp, out=gp.dz)
                add(gp.dz, c_0, out=gp.dz)
                if db is not None:
                    db += column_sums(gp.dz)
            elif pooled:
                pool_blocks_backward(gp.d, gp.gt, gp.dz_blocks, gp.later, gp.mask, gp.fmask)
            for ch in gp.chunks:
                numpy.copyto(ch.b_dst, ch.b_src)  # im2col again
                mm(ch.b_matT, ch.dz, out=p.dwtmp)
                add(p.dwmat, p.dwtmp, out=p.dwmat)
                if need_dx and self.dx_im2col:
                    numpy.copyto(ch.dz_dst, ch.dz_src)
                    numpy.copyto(ch.dcol_dst, ch.dcol_src)
                    mm(ch.dcol, self.wflip, out=ch.dx2)
                elif need_dx:
                    mm(ch.dz, self.wtaps, out=ch.dcol)  # every tap's slab in one product
                    ch.dx.fill(0)
                    for view, tap in ch.taps:  # col2im: one strided addition per kernel tap
                        add(view, tap, out=view)
        sh.grads[(self.conv, "W")] = nhwc.weight_grad_from_matrix(p.dwmat, self.conv.params["W"].shape)
        if db is not None:
            sh.grads[(self.conv, "b")] = db.astype(dt)
        if not need_dx:
            return None
        # dx in the layout the input came in (the block reads either).
        dx = p.dxbuf if self.dx_im2col else p.dxpad[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w]
        return convert(dx, NHWC, step.layouts[self.index])

    def _bn_backward_terms(self, p, sh, step):
        """Gradient through the pool and BatchNorm, as dz = du*c_a + z*c_z + c_0 per channel."""
        g = self.g
        mean, inv_std, scale, m_total = p.bn
        dt = p.d.dtype
        dbeta = numpy.zeros(g.f, numpy.float64)
        dxc = numpy.zeros(g.f, numpy.float64)  # sum of du * (z - mean)
        for gp in p.groups:
            if self.pool is not None:
                pool_blocks_backward(gp.d, gp.gt, gp.du_blocks, gp.later, gp.mask, gp.fmask)
            dbeta += column_sums(gp.du)
            numpy.subtract(gp.zall, mean, out=gp.tmp)
            dxc += numpy.einsum("ij,ij->j", gp.du, gp.tmp)
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
        return scale, c_z.astype(dt), c_0.astype(dt)

