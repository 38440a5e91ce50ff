"""The fused convolution stage: Conv2D [-> BatchNorm] [-> ReLU] [-> MaxPool2D], channel-last,
over chunks of a few images so the im2col block and the conv output stay in cache.

Forward, per chunk: one strided im2col copy and one matrix product whose rows are
grouped by pool window (``grouped_im2col``); per group of chunks: the pool as K-1
element-wise maxima of contiguous blocks, then bias and ReLU on the pooled map
(max commutes with a per-channel shift and with ReLU).  Backward: the ReLU mask,
the pool's routing (from K-1 bool "beat the running max" records), im2col again
(cheaper than keeping it), the weight gradient, and the input gradient -- for
'same' stride-1 convs one product with the flipped kernel over the im2col of the
zero-padded dz, otherwise one product with every kernel tap side by side and one
strided addition per tap into dx.

**Winograd** (``winograd``): a 3x3 'same' stride-1 conv on 32 or more channels whose
pool (if any) is 1 or 2 in each direction computes each chunk's z as 2x2 output tiles
-- 16 products of (tiles, C) x (C, F) between an input and an output transform, 2.25x
fewer multiplications -- and its backward as their transposes, z and dz in the same
pool-grouped row order.  Its input is kept padded and split by column parity, so the
transforms' strided slices are contiguous.

BatchNorm in training: convolve every chunk and keep z, all-reduce the batch
statistics between shards, then normalise, pool and ReLU -- or, when every
BatchNorm scale is positive (max commutes with a positive affine map), pool the
raw z first and normalise the pooled map; backward all-reduces dbeta and dgamma
first (over the pooled map when pooled first).  A first block (no input gradient,
no bias, im2col rows of at most GRAM_MAX_KDIM values) whose gammas are all positive
takes its statistics from the float64 Gram matrix G of its im2col rows and their
sums s (sum z = s W, sum z^2 = diag(W^T G W)), pools each group's z as soon as it
is made (z is not kept), and its backward takes dW's z-linear part from the same
G.  In evaluation BatchNorm is folded into the weights and bias.  The formulas are
those of ``xpnet.ops.norm``.

Every buffer and strided view a shard needs for n images is built once
(``conv_plan.ShardPlan``) and reused step after step.

Notation: z is the conv output (rows, F) in im2col row order, u the BatchNorm
output before the pool, y the block output (N, QH, QW, F); dz, du are their
gradients and ``dpooled`` the gradient at the pool's output (after the ReLU mask).
"""

from __future__ import annotations

import numpy

from ..errors import UsageError
from ..nn.layers import Conv2D, MaxPool2D
from ..ops import norm
from ..ops.pool import pool_blocks_backward, pool_blocks_forward
from . import grouped_im2col
from . import winograd as winograd_conv
from .conv_plan import ShardPlan, buffer_key
from .grouped_im2col import ConvGeometry
from .stages import NCHW, NHWC, BatchStats, Stage, batch_moments, bn_update_running, convert
from .workspace import aligned_buffer, column_sums


class ConvBlock(Stage):
    """Conv2D [-> BatchNorm] [-> ReLU] [-> MaxPool2D (grouped)] on NHWC chunks."""

    accepts = (NHWC, NCHW)
    # Below this many bytes per window row (KW*C values) im2col is built K-major
    # from an NCHW copy of the input: runs along the width are longer (first layers).
    KMAJOR_BELOW_BYTES = 64
    KEEP_PLANS = 3  # per shard: e.g. the training batch, the last short batch, an evaluation batch
    # A first BatchNorm block whose im2col rows are at most this long (a 3x3 kernel on 1-3
    # channels) takes its statistics from their (KH*KW*C)^2 Gram matrix: cheaper than two passes
    # over its many-channel z, and the weight gradient reuses it.
    GRAM_MAX_KDIM = 32
    USE_WINOGRAD = True  # the executors' default; off: every block convolves by im2col (the tests compare the two)

    def __init__(self, index, conv: Conv2D, bn=None, relu=None, pool=None, winograd: bool = True):
        super().__init__(index, [l for l in (conv, bn, relu, pool) if l is not None])
        self.conv, self.bn, self.relu, self.pool = conv, bn, relu, pool
        w = conv.params["W"]
        self.geom = geom = ConvGeometry.make(conv.input_shape, w.shape, conv.stride, conv.pad,
                                             pool.size if pool is not None else (1, 1))
        dt = w.dtype
        # im2col as (KH*KW*C, rows), copied along the output width from NCHW storage
        self.kmajor = geom.kw * geom.c * dt.itemsize < self.KMAJOR_BELOW_BYTES
        # Weights in the layouts the products read, refreshed in place every step
        # (shard plans hold views of them), by mode (train: True/False).  Evaluation
        # with BatchNorm folds it in.
        self.weight_matrix = {True: aligned_buffer((geom.kdim, geom.f), dt),
                              False: aligned_buffer((geom.kdim, geom.f), dt)}
        self.bias = {True: aligned_buffer(geom.f, dt), False: aligned_buffer(geom.f, dt)}
        self.has_bias = {True: conv.bias, False: conv.bias or bn is not None}
        # 3x3 'same' stride-1 convs on 32+ input channels into pools of 1 or 2 each way
        # (``winograd.applies``): Winograd F(2x2, 3x3), 2.25x fewer multiplications in all three
        # products; U = G W G^T by mode, as (16, C, F).
        self.winograd = bool(winograd) and not self.kmajor and winograd_conv.applies(geom)
        if self.winograd:
            self.winograd_u = {True: aligned_buffer((16, geom.c, geom.f), dt),
                               False: aligned_buffer((16, geom.c, geom.f), dt)}
            self.winograd_ut = aligned_buffer((16, geom.f, geom.c), dt)  # U^T of training, for dV
            self.weight_taps_fc = aligned_buffer((geom.kh * geom.kw, geom.f, geom.c), dt)
        # Input gradient otherwise: for a stride-1 conv whose output covers about as many
        # pixels as its input ('same' padding), one product with the flipped kernel
        # over the im2col of the zero-padded dz (K = KH*KW*F) beats the tap
        # products (K = F) and their additions.  Otherwise dz @ weight_taps, then col2im.
        self.dx_by_im2col = (not self.winograd and (geom.sh, geom.sw) == (1, 1) and geom.ph < geom.kh
                             and geom.pw < geom.kw and geom.h * geom.w <= 1.15 * geom.rows)
        # (F, KH*KW*C): the kernel taps' (F, C) matrices side by side, for the tap-by-tap input gradient.
        self.weight_taps = (None if (self.winograd or self.dx_by_im2col)
                            else aligned_buffer((geom.f, geom.kh * geom.kw * geom.c), dt))
        if self.dx_by_im2col:
            # dx is the 'full' convolution of dz with the flipped kernel: F in, C out
            self.dx_geom = ConvGeometry(geom.f, geom.oh, geom.ow, geom.c, geom.kh, geom.kw, 1, 1,
                                        geom.kh - 1 - geom.ph, geom.kw - 1 - geom.pw)
            self.flipped_weight_matrix = aligned_buffer((geom.kh * geom.kw * geom.f, geom.c), dt)

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

    def plan(self, shard, n, dt, train, need_dx) -> ShardPlan:
        """The shard's plan for n images in this mode, built on first use; a few are kept per block."""
        key = (self.index, n, train, need_dx)
        plans = shard.plans
        found = plans.get(key)
        if found is None:
            found = plans[key] = ShardPlan(self, n, dt, train, need_dx)
            mine = [k for k in plans if k[0] == self.index]
            for old in mine[:-self.KEEP_PLANS]:
                del plans[old]
        return found

    def prepare(self, step):
        w = self.conv.params["W"]
        b = self.conv.params.get("b")
        train = step.train
        if self.bn is not None and not train:
            # Evaluation: fold the running-statistics affine map into the weights.
            bn = self.bn
            inv_std = norm.inverse_std(bn.buffers["running_var"], bn.eps, w.dtype)
            scale, shift = norm.scale_and_shift(bn.buffers["running_mean"], inv_std, bn.params["gamma"],
                                                bn.params["beta"])
            w = w * scale[:, None, None, None]
            b = shift if b is None else b * scale + shift
        geom = self.geom
        numpy.copyto(self.weight_matrix[train].reshape(geom.kh, geom.kw, geom.c, geom.f), w.transpose(2, 3, 1, 0))
        if b is not None:
            numpy.copyto(self.bias[train], b)
        if self.winograd:  # U from the (KH*KW, C, F) taps just laid out; U^T from (KH*KW, F, C) taps
            winograd_conv.kernel_transform(self.weight_matrix[train], out=self.winograd_u[train])
            if train:
                numpy.copyto(self.weight_taps_fc.reshape(geom.kh, geom.kw, geom.f, geom.c), w.transpose(2, 3, 0, 1))
                winograd_conv.kernel_transform(self.weight_taps_fc, out=self.winograd_ut)
        elif train and self.dx_by_im2col:
            numpy.copyto(self.flipped_weight_matrix.reshape(geom.kh, geom.kw, geom.f, geom.c),
                         w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
        elif train:
            numpy.copyto(self.weight_taps.reshape(geom.f, geom.kh, geom.kw, geom.c), w.transpose(0, 2, 3, 1))

    # -- forward
    def forward(self, x, sh, step):
        geom = self.geom
        train = step.train
        need_dx = bool(train and self.conv.needs_input_grad)
        plan = self.plan(sh, x.shape[0], x.dtype, train, need_dx)
        x = convert(x, step.layouts[self.index], NHWC)
        key = buffer_key(x) if plan.may_read_input else None
        if self.winograd:
            winograd_conv.split_columns(x, plan.input_phases)
        elif plan.phase_planes is not None and geom.ph == geom.pw == 0:
            numpy.copyto(plan.phase_planes, grouped_im2col.phase_planes_view(x, geom))  # straight from the input
        elif key is not None and key in (plan.source_key, plan.seen_key):
            if key != plan.source_key:
                plan.read_from(self, x)  # the same buffer as last time: read it where it lies
        else:
            if plan.may_read_input:
                if plan.source_key != buffer_key(plan.padded_input):
                    plan.read_from(self, plan.padded_input)
                plan.seen_key = key
            numpy.copyto(plan.interior, x)
            if plan.phase_planes is not None:
                numpy.copyto(plan.phase_planes, grouped_im2col.phase_planes_view(plan.padded_input, geom))
        wmat, bias = self.weight_matrix[train], self.bias[train] if self.has_bias[train] else None
        if self.bn is not None and train:
            self._forward_bn(plan, sh, step)
        else:
            # Local aliases: these run once per chunk, in every shard's thread.
            mx, add, convolve = numpy.maximum, numpy.add, self._convolve
            pooled, relu = self.pool is not None, self.relu is not None
            for group in plan.groups:
                for chunk in group.chunks:
                    convolve(chunk, wmat, train)
                if pooled:
                    pool_blocks_forward(group.z_blocks, group.y, group.winner_records)
                if bias is not None:
                    add(group.y, bias, out=group.y)  # after the pool: max commutes with a per-channel shift
                if relu:
                    mx(group.y, 0, out=group.y)
        if train:
            sh.cache[self.index] = plan
        return plan.y

    def _convolve(self, chunk, wmat, train):
        """The chunk's conv output z (rows, F), rows grouped by pool window: one im2col copy and one
        product, or Winograd's input transform, 16 products and output transform."""
        views = chunk.winograd
        if views is None:
            numpy.copyto(chunk.im2col_dst, chunk.im2col_src)  # im2col, rows grouped by pool position
            numpy.matmul(chunk.col, wmat, out=chunk.z)
            return
        winograd_conv.input_transform(views.phases, views.cols, views.v)
        numpy.matmul(views.v_mat, self.winograd_u[train], out=views.m_mat)
        winograd_conv.output_transform(views.m, views.scratch_forward, views.z_blocks)

    def _winograd_backward(self, plan, chunk, need_dx):
        """One chunk's share of dW (summed into plan.winograd_du as dU) and its dx, from its dz."""
        views = chunk.winograd
        winograd_conv.output_transform_transpose(views.dz_blocks, views.scratch_backward, views.m)  # dM
        winograd_conv.input_transform(views.phases, views.cols, views.v)  # V again (cheaper than keeping it)
        numpy.matmul(views.v_mat.transpose(0, 2, 1), views.m_mat, out=plan.winograd_du_chunk)
        numpy.add(plan.winograd_du, plan.winograd_du_chunk, out=plan.winograd_du)
        if need_dx:  # dV = dM U^T into V's buffer, then its tiles added into the padded dx
            numpy.matmul(views.m_mat, self.winograd_ut, out=views.v_mat)
            winograd_conv.input_transform_transpose(views.v, views.cols, views.dx_phases)
            winograd_conv.join_columns(views.dx_phases, views.dx)

    def _forward_bn(self, plan, sh, step):
        geom, bn = self.geom, self.bn
        dt = plan.y.dtype
        wmat = self.weight_matrix[True]
        bias = self.bias[True] if self.conv.bias else None
        m_total = step.n * geom.rows
        norm.check_training_batch(m_total)
        # Every gamma > 0 (so every scale >= 0: max commutes with the affine map): a Gram plan pools
        # each group's z as soon as it is made, and z is not kept.
        plan.col_gram = None
        if plan.gram_stats and bool(numpy.all(bn.params["gamma"] > 0)):
            mean, var = self._forward_gram(plan, sh, step, wmat, m_total)
        else:
            stats = BatchStats()
            for group in plan.groups:
                for chunk in group.chunks:
                    self._convolve(chunk, wmat, True)
                if bias is not None:
                    numpy.add(group.z, bias, out=group.z)
                stats.add(batch_moments(group.z, dt, group.scratch))
            mean, var = stats.finish(sh, step, self.key("bn"), m_total)
        inv_std = norm.inverse_std(var, bn.eps, dt)
        mean_dt = mean.astype(dt)
        scale, shift = norm.scale_and_shift(mean_dt, inv_std, bn.params["gamma"], bn.params["beta"])
        if sh.k == 0:
            bn_update_running(bn, mean, var, m_total)
        # The max commutes with a per-channel affine map whose scale is positive (the
        # usual case: gamma > 0): pool the raw z, then normalise the K times smaller
        # pooled map.  Backward then also works on the pooled map, except for dz.
        pooled = plan.col_gram is not None  # pooled already
        pool_first = pooled or (self.pool is not None and bool(numpy.all(scale > 0)))
        for group in plan.groups:
            if pool_first:
                if not pooled:
                    pool_blocks_forward(group.z_blocks, group.z_pooled, group.winner_records)
                numpy.multiply(group.z_pooled, scale, out=group.y)
                numpy.add(group.y, shift, out=group.y)
            else:
                numpy.multiply(group.z, scale, out=group.u)
                numpy.add(group.u, shift, out=group.u)
                if self.pool is not None:
                    pool_blocks_forward(group.u_blocks, group.y, group.winner_records)
            if self.relu is not None:
                numpy.maximum(group.y, 0, out=group.y)
        plan.bn_stats = (mean_dt, inv_std, scale, m_total, mean, pool_first)

    def _forward_gram(self, plan, sh, step, wmat, m_total):
        """Convolve and pool every group, and return the whole batch's (mean, var) (float64, (F,))
        from the im2col rows' Gram matrix G and column sums s: sum z = s W, sum z^2 = diag(W^T G W).

        Float64 sums of float32 products: E[z^2] - mean^2 then loses nothing that matters.
        G and s stay on the plan for the backward (``backward``'s Gram weight gradient).
        """
        kdim = self.geom.kdim
        gram, sums = numpy.zeros((kdim, kdim), numpy.float64), numpy.zeros(kdim, numpy.float64)
        for group in plan.groups:
            for chunk in group.chunks:
                numpy.copyto(chunk.im2col_dst, chunk.im2col_src)
                numpy.matmul(chunk.col, wmat, out=chunk.z_local)
                col64 = plan.col64[:, :chunk.col.shape[0]]
                numpy.copyto(col64, chunk.col.T)
                gram += col64 @ col64.T
                sums += col64.sum(axis=1)
            pool_blocks_forward(group.z_local_blocks, group.z_pooled, group.winner_records)
        w64 = wmat.astype(numpy.float64)
        # one all-reduce (one barrier) for both sums
        both = step.reducer.allreduce(sh.k, self.key("bn") + ("gram",),
                                      numpy.stack([sums @ w64, numpy.einsum("kf,kf->f", gram @ w64, w64)]))
        total, squares = both
        mean = total / m_total
        plan.col_gram = (gram, sums)
        return mean, numpy.maximum(squares / m_total - mean * mean, 0.0)

    # -- backward
    def backward(self, dy, sh, step, need_dx):
        geom = self.geom
        plan = sh.cache.pop(self.index)
        if need_dx and not plan.need_dx:
            raise UsageError("compute_input_grad was switched on between forward and backward: "
                             "run forward(x, train=True) again.")
        if self.relu is not None:
            numpy.greater(plan.y, 0, out=plan.relu_positive)
            numpy.copyto(plan.dpooled, plan.relu_positive)  # the ReLU mask as a float: a float*bool multiply is slower
            numpy.multiply(plan.dpooled, dy, out=plan.dpooled)
        else:
            numpy.copyto(plan.dpooled, dy)
        dt = plan.dpooled.dtype
        db = None
        if self.conv.bias and self.bn is None:
            # The pool only routes values: sum the (smaller) pooled gradient.
            db = column_sums(plan.dpooled.reshape(-1, geom.f))
        bn_terms = self._bn_backward_terms(plan, sh, step) if self.bn is not None else None
        if bn_terms is not None and self.conv.bias:
            db = numpy.zeros(geom.f, numpy.float64)
        (plan.winograd_du if self.winograd else plan.dweight_matrix).fill(0)
        mm, add = numpy.matmul, numpy.add  # local aliases, as in forward
        pooled = self.pool is not None
        dx_by_im2col = need_dx and self.dx_by_im2col
        # Without an input gradient (a first block) dz only feeds dW = col^T dz, which is linear
        # in dz: the z*c_z + c_0 part of it is (col^T col) W * c_z + (col^T 1) c_0, from the
        # (KH*KW*C)^2 Gram matrix of the im2col rows, so dz holds only the routed part.
        # (Only with the forward's float64 Gram sums, whose mean is the one they cancel against.)
        gram = plan.col_gram is not None
        for group in plan.groups:
            if bn_terms is not None:
                c_u, c_z, c_0, pool_first, _ = bn_terms  # dz = du*c_u + z*c_z + c_0 per channel
                if gram:
                    numpy.multiply(group.dpooled, c_u, out=group.dpooled)
                    pool_blocks_backward(group.dpooled, group.winner_records, group.dz_blocks, *group.pool_scratch)
                elif pool_first:  # du is dpooled routed by the pool: scale the smaller map, then route
                    numpy.multiply(group.z, c_z, out=group.dz)
                    add(group.dz, c_0, out=group.dz)
                    numpy.multiply(group.dpooled, c_u, out=group.dpooled)
                    pool_blocks_backward(group.dpooled, group.winner_records, group.dz_blocks, *group.pool_scratch,
                                         accumulate=True)
                else:
                    numpy.multiply(group.du, c_u, out=group.dz)
                    numpy.multiply(group.z, c_z, out=group.scratch)
                    add(group.dz, group.scratch, out=group.dz)
                    add(group.dz, c_0, out=group.dz)
                if db is not None:
                    db += column_sums(group.dz)
            elif pooled:
                pool_blocks_backward(group.dpooled, group.winner_records, group.dz_blocks, *group.pool_scratch)
            for chunk in group.chunks:
                if chunk.winograd is not None:
                    self._winograd_backward(plan, chunk, need_dx)
                    continue
                numpy.copyto(chunk.bwd_im2col_dst, chunk.bwd_im2col_src)  # im2col again
                mm(chunk.bwd_col_t, chunk.dz, out=plan.dweight_chunk)
                add(plan.dweight_matrix, plan.dweight_chunk, out=plan.dweight_matrix)
                if dx_by_im2col:
                    numpy.copyto(chunk.dz_padded_dst, chunk.dz_src)
                    numpy.copyto(chunk.dz_col_dst, chunk.dz_col_src)
                    mm(chunk.dz_col, self.flipped_weight_matrix, out=chunk.dx_rows)
                elif need_dx:
                    mm(chunk.dz, self.weight_taps, out=chunk.tap_slabs)  # every tap's slab in one product
                    chunk.dx_storage.fill(0)
                    for view, tap in chunk.taps:  # col2im: one strided addition per kernel tap
                        add(view, tap, out=view)
        if gram:  # in float64: the two terms nearly cancel when the inputs are far from zero
            col_gram, col_sums = plan.col_gram
            w64 = self.weight_matrix[True].astype(numpy.float64)
            c_z64, c_0_64 = bn_terms[4]
            linear = (col_gram @ w64) * c_z64 + numpy.outer(col_sums, c_0_64)
            plan.dweight_matrix += linear.astype(dt)
        if self.winograd:  # dW as (KH*KW*C, F), the im2col path's layout
            winograd_conv.kernel_transform_transpose(plan.winograd_du, out=plan.dweight_matrix)
        sh.grads[(self.conv, "W")] = grouped_im2col.weight_grad_from_matrix(plan.dweight_matrix,
                                                                             self.conv.params["W"].shape)
        if db is not None:
            sh.grads[(self.conv, "b")] = db.astype(dt)
        if not need_dx:
            return None
        # dx in the layout the input came in (the block reads either).
        if self.dx_by_im2col or self.winograd:
            dx = plan.dx_buffer
        else:
            dx = plan.dx_padded[:, geom.ph:geom.ph + geom.h, geom.pw:geom.pw + geom.w]
        return convert(dx, NHWC, step.layouts[self.index])

    def _bn_backward_terms(self, plan, sh, step):
        """Gradient through the pool and BatchNorm, as dz = du*c_u + z*c_z + c_0 per channel.

        Returns (c_u, c_z, c_0, pooled first, (c_z, c_0) in float64).  Pooled first, du is zero
        but where dpooled was routed, so its sums run over dpooled and the pooled z.
        """
        geom = self.geom
        mean, inv_std, scale, m_total, mean64, pool_first = plan.bn_stats
        dt = plan.dpooled.dtype
        dbeta = numpy.zeros(geom.f, numpy.float64)
        du_zc = numpy.zeros(geom.f, numpy.float64)  # sum of du * (z - mean)
        for group in plan.groups:
            if pool_first:
                dp = group.dpooled.reshape(-1, geom.f)
                centred = group.pool_scratch[2].reshape(dp.shape)  # free until the routing
                numpy.subtract(group.z_pooled.reshape(dp.shape), mean, out=centred)
                dbeta += column_sums(dp)
                du_zc += numpy.einsum("ij,ij->j", dp, centred)
                continue
            if self.pool is not None:
                pool_blocks_backward(group.dpooled, group.winner_records, group.du_blocks, *group.pool_scratch)
            dbeta += column_sums(group.du)
            numpy.subtract(group.z, mean, out=group.scratch)
            du_zc += numpy.einsum("ij,ij->j", group.du, group.scratch)
        dbeta, du_zc = step.reducer.allreduce(sh.k, self.key("dbeta_dxc"), numpy.stack([dbeta, du_zc]))  # one barrier
        inv_std64 = inv_std.astype(numpy.float64)
        dgamma = du_zc * inv_std64  # sum of du * xhat
        if sh.k == 0:
            sh.grads[(self.bn, "gamma")] = dgamma.astype(dt)
            sh.grads[(self.bn, "beta")] = dbeta.astype(dt)
        c_z, c_0 = norm.input_grad_coefficients(scale.astype(numpy.float64), inv_std64, mean64,
                                                dgamma, dbeta, m_total)
        return scale, c_z.astype(dt), c_0.astype(dt), pool_first, (c_z, c_0)
