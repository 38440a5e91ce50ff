"""Per-shard buffers and prebuilt views of a conv block (``conv_block``).

Everything a shard needs to run a block on n images -- buffers, and every
strided view of every chunk and group -- is built once per (block, batch size,
mode) and reused step after step: building views costs Python time, which the
shards' threads contend for (the GIL).  Buffers come from ``workspace``
(cache-line aligned).  Names follow ``conv_block``: z conv output, u BatchNorm
output, y block output, ``dpooled`` the gradient at the pool's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy

from .. import config
from . import grouped_im2col
from .workspace import aligned_buffer, chunk_images, group_images

# Winograd blocks: images per chunk such that their transformed input and products fill about this
# much (captcha_crnn b64 on 2 processes, A/B in one process: 0.5, 1, 2 MiB ran 83.5, 78.4, 73.8 ms a
# step; 4 MiB slower than 2).
WINOGRAD_CHUNK_BYTES = 2 * 1024 * 1024

if TYPE_CHECKING:
    from .conv_block import ConvBlock


def buffer_key(a):
    """What identifies the memory an array view reads: (address, shape, strides, dtype)."""
    return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


@dataclass(slots=True)
class ChunkViews:
    """The views the matrix products of one chunk (images start:stop of the shard) read and write.

    Training fields are None in evaluation; of the two input-gradient sets, only
    the one the block uses is filled.
    """

    start: int
    stop: int
    im2col_src: numpy.ndarray     # forward im2col: the input's windows (a strided view)...
    im2col_dst: numpy.ndarray     # ...copied into this view of the im2col buffer, same shape
    col: numpy.ndarray            # the im2col matrix (rows, KH*KW*C) the product reads
    z: numpy.ndarray              # (rows, F): where the product writes the chunk's conv output
    z_local: numpy.ndarray | None = None  # (rows, F) in a group-sized buffer: z of a Gram-statistics step
    # training: im2col again, in backward's row order (the forward views when the orders agree)
    bwd_im2col_src: numpy.ndarray | None = None
    bwd_im2col_dst: numpy.ndarray | None = None
    bwd_col_t: numpy.ndarray | None = None       # (KH*KW*C, rows): the weight gradient's left factor
    dz: numpy.ndarray | None = None              # (rows, F)
    # input gradient as one product over the im2col of the zero-padded dz
    dz_padded_dst: numpy.ndarray | None = None   # the pooled area of the padded dz map, shaped like...
    dz_src: numpy.ndarray | None = None          # ...dz's rows seen in that order
    dz_col_src: numpy.ndarray | None = None      # windows of the padded dz...
    dz_col_dst: numpy.ndarray | None = None      # ...copied into this view of...
    dz_col: numpy.ndarray | None = None          # ...the matrix (images*H*W, KH*KW*F)
    dx_rows: numpy.ndarray | None = None         # (images*H*W, C): the chunk's dx
    # input gradient tap by tap
    dx_storage: numpy.ndarray | None = None      # the chunk's images of the padded dx buffer, in storage order
    tap_slabs: numpy.ndarray | None = None       # (rows, KH*KW*C): dz times every tap, side by side
    taps: list | None = None                     # per kernel tap: (its view of the padded dx, its slab)
    winograd: "WinogradChunk | None" = None      # the Winograd path's views (then no im2col views)


@dataclass(slots=True)
class WinogradChunk:
    """The views one chunk of a Winograd block (``winograd``) reads and writes: TH x TW tiles an image.

    Transformed arrays are indexed (4, 4, ...) by tile position; the ``_mat`` views
    are the same memory as the (16, rows, columns) stacks the products read.
    """

    phases: numpy.ndarray                        # (2, images, 2TH+2, TW+1, C) the padded input by column parity
    cols: numpy.ndarray                          # (4, images, 2TH+2, TW, C) scratch of the column pass
    v: numpy.ndarray                             # (4, 4, images, TH, TW, C) the transformed input (dV in backward)
    v_mat: numpy.ndarray                         # (16, images*TH*TW, C)
    m: numpy.ndarray                             # (4, 4, images, TH, TW, F) the products (dM in backward)
    m_mat: numpy.ndarray                         # (16, images*TH*TW, F)
    scratch_forward: numpy.ndarray               # (2, 4, images, TH, TW, F)
    z_blocks: list                               # [pi][pj] (images, TH, TW, F): z's rows of tile position (pi, pj)
    scratch_backward: numpy.ndarray | None = None  # (4, 2, images, TH, TW, F)
    dz_blocks: list | None = None                # the same views of dz
    dx_phases: numpy.ndarray | None = None       # (2, images, 2TH+2, TW+1, C) the padded dx by column parity
    dx: numpy.ndarray | None = None              # (images, H, W, C) the chunk's dx


@dataclass(slots=True)
class GroupViews:
    """Consecutive chunks whose element-wise work (pool, bias, ReLU, BatchNorm) runs as one set of calls.

    Row arrays are (images*rows, F) in im2col row order; block lists hold the K
    pool-position blocks of such an array, each (images, QH, QW, F).
    """

    y: numpy.ndarray                             # (images, QH, QW, F) the block output
    z: numpy.ndarray                             # conv output rows (with BatchNorm in training: kept for backward)
    chunks: list                                 # the ChunkViews items, in order
    winner_records: numpy.ndarray | None = None  # (K-1, images, QH, QW, F) bool: the pool's "beat the max"
    z_blocks: list | None = None                 # pool input (with BatchNorm in training: when pooled first)
    # BatchNorm in training
    z_pooled: numpy.ndarray | None = None        # (images, QH, QW, F) the pooled raw z, when pooled first
    u: numpy.ndarray | None = None               # z normalised (the pool input; y itself without a pool)
    u_blocks: list | None = None
    scratch: numpy.ndarray | None = None         # rows: centred z, then a term of dz
    z_local_blocks: list | None = None           # pool input of a Gram-statistics step: z in a group-sized buffer
    # training
    dpooled: numpy.ndarray | None = None         # (images, QH, QW, F)
    dz: numpy.ndarray | None = None
    dz_blocks: list | None = None                # where the pool routes dpooled (no BatchNorm)
    du: numpy.ndarray | None = None              # with BatchNorm
    du_blocks: list | None = None                # where the pool routes dpooled (BatchNorm)
    pool_scratch: tuple | None = None            # (later, mask, fmask) of ``pool_blocks_backward``


class ShardPlan:
    """Buffers and prebuilt views for one shard running the block on n images.

    ``forward_plain`` / ``backward_plain``: the im2col rows of that pass come in
    plain output order instead of grouped by pool window (``grouped_im2col``).
    """

    def __init__(self, blk: "ConvBlock", n: int, dt, train: bool, need_dx: bool):
        geom = blk.geom
        self.n, self.train, self.need_dx = n, train, need_dx
        pooled = blk.pool is not None
        bn_train = blk.bn is not None and train
        # Backward works in plain row order only for the tap-by-tap input gradient
        # (long runs for its additions); BatchNorm keeps z in backward's order.
        # (Winograd writes and reads whole pool windows: grouped order.)
        self.backward_plain = need_dx and not (blk.dx_by_im2col or blk.winograd)
        self.forward_plain = bn_train and self.backward_plain
        # with BatchNorm in training: (mean, inv_std, scale, values per channel, float64 mean, pooled first)
        self.bn_stats = None
        # A first block (no input gradient) with BatchNorm, a pool, no bias and short im2col rows
        # takes its statistics and its weight gradient's z-linear part from the Gram matrix of its
        # im2col rows, so z need not be kept (conv_block); col64 holds a chunk's rows in float64.
        self.gram_stats = (bn_train and pooled and not need_dx and not blk.conv.bias
                           and geom.kdim <= blk.GRAM_MAX_KDIM)
        self.col_gram = None  # (G, column sums) of the im2col rows, float64, when the forward formed them
        # Shard-wide buffers of training (None where the block does not need them):
        self.z_shard = self.du_shard = None         # (n*rows, F) with BatchNorm: z and du, kept whole
        self.z_pooled = None                        # (n, QH, QW, F) with BatchNorm and a pool: max of raw z
        self.dpooled = self.relu_positive = None    # (n, QH, QW, F): gradient, and the ReLU's y > 0
        self.dweight_matrix = self.dweight_chunk = None  # (KH*KW*C, F): the sum, one chunk's part
        self.dz_padded = self.dz_col = None         # input gradient by im2col: per chunk
        self.dx_buffer = self.dx_padded = self.tap_slabs = None
        empty, zeros = aligned_buffer, partial(aligned_buffer, zero=True)
        if blk.winograd:  # the padded input by column parity (winograd.split_columns); the border stays zero
            self.input_phases = zeros((2, n, geom.hp, geom.w // 2 + 1, geom.c), dt)
            self.input_buffer = self.padded_input = self.interior = None
        else:
            self.input_phases = None
            self.input_buffer, self.padded_input = padded_buffer(blk, n, dt, zeros)  # the padding border stays zero
            self.interior = self.padded_input[:, geom.ph:geom.ph + geom.h, geom.pw:geom.pw + geom.w]
        # A K-major im2col in grouped order is copied from phase planes: long runs
        # (grouped_im2col.phase_planes_view), when they fit the im2col budget.
        self.phase_planes = None
        if blk.kmajor and not (self.forward_plain or self.backward_plain):
            shape = grouped_im2col.phase_shape(n, geom)
            if int(numpy.prod(shape)) * numpy.dtype(dt).itemsize <= config.get_im2col_budget_bytes():
                self.phase_planes = empty(shape, dt)
        self.y = empty((n, geom.qh, geom.qw, geom.f), dt)
        self.winner_records = empty((geom.k - 1, n, geom.qh, geom.qw, geom.f), bool) if (pooled and train) else None
        itemsize = numpy.dtype(dt).itemsize
        # A chunk's im2col block, or its conv output where that is the larger (a first layer of
        # few input channels), stays near the core's cache: the element-wise passes then read it there.
        # Winograd: its transformed input and products (4*rows*(C + F) values an image).
        if blk.winograd:
            chunk = chunk_images(4 * geom.rows * (geom.c + geom.f) * itemsize, n, WINOGRAD_CHUNK_BYTES)
        else:
            chunk = chunk_images(geom.rows * max(geom.kdim, geom.f) * itemsize, n)
        group = group_images(chunk, geom.rows * geom.f * itemsize, n)
        chunk_rows, group_rows = chunk * geom.rows, group * geom.rows
        # Buffers every chunk (or group) reuses: the im2col block, and for the input
        # gradient its counterpart (and the zero-padded dz it is built from).
        self.col = None if blk.winograd else empty((geom.kdim, chunk_rows) if blk.kmajor
                                                   else (chunk_rows, geom.kdim), dt)
        self.winograd_buffers = self._winograd_buffers(blk, chunk, dt, need_dx) if blk.winograd else None
        self.winograd_du = self.winograd_du_chunk = None  # (16, C, F): dU summed over chunks, one chunk's part
        z = empty((group_rows, geom.f), dt) if (pooled and (not bn_train or self.gram_stats)) else None
        self.col64 = empty((geom.kdim, chunk_rows), numpy.float64) if self.gram_stats else None
        u = scratch = dz = pool_scratch = None
        if bn_train:
            self.z_shard = empty((n * geom.rows, geom.f), dt)
            self.z_pooled = empty((n, geom.qh, geom.qw, geom.f), dt) if pooled else None
            u = empty((group_rows, geom.f), dt) if pooled else None
            scratch = empty((group_rows, geom.f), dt)
        if train:
            self.dpooled = empty((n, geom.qh, geom.qw, geom.f), dt)
            self.relu_positive = empty(self.dpooled.shape, bool) if blk.relu is not None else None
            self.dweight_matrix = empty((geom.kdim, geom.f), dt)
            self.dweight_chunk = None if blk.winograd else empty((geom.kdim, geom.f), dt)
            dz = empty((group_rows, geom.f), dt) if (pooled or bn_train) else None
            if bn_train:
                self.du_shard = (empty((n * geom.rows, geom.f), dt) if pooled
                                 else self.dpooled.reshape(n * geom.rows, geom.f))
            if pooled:
                pool_scratch = (empty((group, geom.qh, geom.qw, geom.f), bool),
                                empty((group, geom.qh, geom.qw, geom.f), bool),
                                empty((group, geom.qh, geom.qw, geom.f), dt))
            if blk.winograd:
                self.winograd_du = empty((16, geom.c, geom.f), dt)
                self.winograd_du_chunk = empty((16, geom.c, geom.f), dt)
                if need_dx:
                    self.dx_buffer = empty((n, geom.h, geom.w, geom.c), dt)
            elif need_dx and blk.dx_by_im2col:
                dx_geom = blk.dx_geom
                # borders (and rows no pool reads) stay zero
                self.dz_padded = zeros((chunk, dx_geom.hp, dx_geom.wp, dx_geom.c), dt)
                self.dz_col = empty((chunk * dx_geom.rows, dx_geom.kdim), dt)
                self.dx_buffer = empty((n, geom.h, geom.w, geom.c), dt)
            elif need_dx:
                self.dx_buffer, self.dx_padded = padded_buffer(blk, n, dt, empty)
                self.tap_slabs = empty((chunk_rows, geom.kdim), dt)  # one (rows, C) slab per kernel tap
        buffers = (z, u, scratch, dz, pool_scratch)
        self.groups = [self._group(blk, start, min(n, start + group), chunk, bn_train, *buffers)
                       for start in range(0, n, group)]
        # Without padding, a block that is not the first can read its input where it
        # lies -- the previous stage's output, which nothing changes before the next
        # forward -- instead of copying it into padded_input, once the same buffer comes twice.
        self.may_read_input = blk.index > 0 and geom.ph == geom.pw == 0 and not blk.kmajor
        self.source_key = None if blk.winograd else buffer_key(self.padded_input)
        self.seen_key = None

    def _group(self, blk, start, stop, chunk, bn_train, z_buffer, u_buffer, scratch_buffer, dz_buffer,
               pool_scratch_buffers) -> GroupViews:
        """The group of images start:stop: its views of the plan's buffers (the group-sized ones
        passed in, reused by every group), and its chunks of ``chunk`` images."""
        geom, pooled = blk.geom, blk.pool is not None
        images, rows = stop - start, (stop - start) * geom.rows
        whole_rows = slice(start * geom.rows, stop * geom.rows)  # of the shard-wide row buffers

        def blocks(a, plain):  # the pool-position blocks of rows a, when there is a pool
            return grouped_im2col.grouped_blocks(a, geom, images, plain) if pooled else None

        y = self.y[start:stop]
        records = self.winner_records[:, start:stop] if self.winner_records is not None else None
        z_blocks = z_pooled = u = u_blocks = scratch = z_local = z_local_blocks = None
        if bn_train:
            if self.gram_stats:
                z_local = z_buffer[:rows]
                z_local_blocks = blocks(z_local, self.forward_plain)
            z = self.z_shard[whole_rows]  # the products go to z, kept whole
            z_blocks = blocks(z, self.forward_plain)
            z_pooled = self.z_pooled[start:stop] if pooled else None
            u = u_buffer[:rows] if pooled else y.reshape(rows, geom.f)
            u_blocks, scratch = blocks(u, self.forward_plain), scratch_buffer[:rows]
        else:
            z = z_buffer[:rows] if pooled else y.reshape(rows, geom.f)  # where the chunks' products go
            z_blocks = blocks(z, False)
        dpooled = dz = dz_blocks = du = du_blocks = pool_scratch = None
        if self.train:
            dpooled = self.dpooled[start:stop]
            dz = dz_buffer[:rows] if dz_buffer is not None else dpooled.reshape(rows, geom.f)
            dz_blocks = blocks(dz, self.backward_plain)
            if pooled:
                pool_scratch = tuple(a[:images] for a in pool_scratch_buffers)
            if bn_train:
                du = self.du_shard[whole_rows]
                du_blocks = blocks(du, self.backward_plain)
        chunks = [self._chunk(blk, z, dz, start, a, min(stop, a + chunk), z_local)
                  for a in range(start, stop, chunk)]
        return GroupViews(y=y, z=z, chunks=chunks, winner_records=records, z_blocks=z_blocks, z_pooled=z_pooled, u=u,
                          u_blocks=u_blocks, scratch=scratch, z_local_blocks=z_local_blocks, dpooled=dpooled, dz=dz,
                          dz_blocks=dz_blocks, du=du, du_blocks=du_blocks, pool_scratch=pool_scratch)

    def _chunk(self, blk, group_z, group_dz, group_start, start, stop, group_z_local=None) -> ChunkViews:
        """The views the products of chunk start:stop (in the group starting at group_start) read and write."""
        geom = blk.geom
        images, rows = stop - start, (stop - start) * geom.rows
        in_group = slice((start - group_start) * geom.rows, (stop - group_start) * geom.rows)
        if blk.winograd:
            z = group_z[in_group]
            dz = group_dz[in_group] if group_dz is not None else None
            views = self._winograd_chunk(blk, start, stop, z, dz)
            return ChunkViews(start, stop, None, None, None, z, dz=dz, winograd=views)
        if self.phase_planes is not None:
            part = self.col[:, :rows]
            src = grouped_im2col.phase_window_view(self.phase_planes[start:stop], geom)
            dst, col = part.reshape(src.shape), part.T
        else:
            src, dst, col = im2col_views(blk, self.padded_input[start:stop], self.col, rows, self.forward_plain)
        z = group_z[in_group]
        if group_dz is None:  # evaluation
            return ChunkViews(start, stop, src, dst, col, z)
        if self.backward_plain == self.forward_plain:
            bwd_src, bwd_dst, bwd_col = src, dst, col
        else:
            bwd_src, bwd_dst, bwd_col = im2col_views(blk, self.padded_input[start:stop], self.col, rows,
                                                     self.backward_plain)
        dz = group_dz[in_group]
        dz_padded_dst = dz_src = dz_col_src = dz_col_dst = dz_col = dx_rows = None
        dx_storage = tap_slabs = taps = None
        if self.need_dx and blk.dx_by_im2col:
            # dz (grouped rows) -> a zero-padded NHWC map -> im2col -> one product.
            dx_geom = blk.dx_geom
            pooled_area = self.dz_padded[:images, dx_geom.ph:dx_geom.ph + geom.qh * geom.pkh,
                                         dx_geom.pw:dx_geom.pw + geom.qw * geom.pkw]
            dz_padded_dst = (pooled_area.reshape(images, geom.qh, geom.pkh, geom.qw, geom.pkw, geom.f)
                             .transpose(0, 2, 4, 1, 3, 5))
            dz_src = dz.reshape(dz_padded_dst.shape)
            dx_row_count = images * dx_geom.rows
            dz_col_src = grouped_im2col.grouped_window_view(self.dz_padded[:images], dx_geom)
            dz_col = self.dz_col[:dx_row_count]
            dz_col_dst = dz_col.reshape(dz_col_src.shape)
            dx_rows = self.dx_buffer[start:stop].reshape(dx_row_count, geom.c)
        elif self.need_dx:
            views = grouped_im2col.tap_views(self.dx_padded[start:stop], geom)
            dx_storage = self.dx_buffer[start:stop]
            tap_slabs = self.tap_slabs[:rows]
            per_tap = tap_slabs.reshape(views[0].shape[:3] + (geom.kh * geom.kw, geom.c))
            taps = [(view, per_tap[:, :, :, t]) for t, view in enumerate(views)]
        z_local = group_z_local[in_group] if group_z_local is not None else None
        return ChunkViews(start, stop, src, dst, col, z, z_local=z_local, bwd_im2col_src=bwd_src,
                          bwd_im2col_dst=bwd_dst, bwd_col_t=bwd_col.T, dz=dz, dz_padded_dst=dz_padded_dst,
                          dz_src=dz_src, dz_col_src=dz_col_src, dz_col_dst=dz_col_dst, dz_col=dz_col, dx_rows=dx_rows,
                          dx_storage=dx_storage, tap_slabs=tap_slabs, taps=taps)

    @staticmethod
    def _winograd_buffers(blk, chunk, dt, need_dx):
        """Flat buffers every Winograd chunk reuses; a chunk takes the leading part of each, so that
        its views stay contiguous for any number of images."""
        geom = blk.geom
        tiles, phase = geom.rows // 4, geom.hp * (geom.w // 2 + 1) * geom.c
        sizes = {"cols": 4 * geom.hp * (geom.w // 2) * geom.c, "v": 16 * tiles * geom.c, "m": 16 * tiles * geom.f,
                 "scratch": 8 * tiles * geom.f}
        if need_dx:
            sizes["dx_phases"] = 2 * phase
        return {name: aligned_buffer(chunk * size, dt) for name, size in sizes.items()}

    def _winograd_chunk(self, blk, start, stop, z, dz) -> WinogradChunk:
        """Views of the Winograd buffers, z and dz (rows grouped by pool window) for images start:stop."""
        geom, images = blk.geom, stop - start
        th, tw, c, f = geom.h // 2, geom.w // 2, geom.c, geom.f
        pkh, pkw = geom.pkh, geom.pkw
        buffers = self.winograd_buffers

        def lead(name, *shape):
            return buffers[name][:int(numpy.prod(shape))].reshape(shape)

        def tile_positions(a):
            """Rows (images*rows, F) in pool-grouped order -> [pi][pj] (images, TH, TW, F): output
            (2i + pi, 2j + pj), which is pool position ((2i + pi) % PKH, (2j + pj) % PKW) of pooled
            cell ((2i + pi) // PKH, (2j + pj) // PKW)."""
            a = a.reshape(images, pkh, pkw, th, 2 // pkh, tw, 2 // pkw, f)
            return [[a[:, pi % pkh, pj % pkw, :, pi // pkh, :, pj // pkw] for pj in range(2)] for pi in range(2)]

        views = WinogradChunk(phases=self.input_phases[:, start:stop], cols=lead("cols", 4, images, geom.hp, tw, c),
                              v=lead("v", 4, 4, images, th, tw, c), v_mat=lead("v", 16, images * th * tw, c),
                              m=lead("m", 4, 4, images, th, tw, f), m_mat=lead("m", 16, images * th * tw, f),
                              scratch_forward=lead("scratch", 2, 4, images, th, tw, f),
                              z_blocks=tile_positions(z))
        if dz is not None:
            views.scratch_backward = lead("scratch", 4, 2, images, th, tw, f)
            views.dz_blocks = tile_positions(dz)
            if self.need_dx:
                views.dx_phases = lead("dx_phases", 2, images, geom.hp, tw + 1, c)
                views.dx = self.dx_buffer[start:stop]
        return views

    def read_from(self, blk, src):
        """Point the chunks' im2col sources at src (N, Hp, Wp, C): padded_input, or the input itself."""
        for group in self.groups:
            for chunk in group.chunks:
                same = chunk.bwd_im2col_src is chunk.im2col_src
                chunk.im2col_src = grouped_im2col.grouped_window_view(src[chunk.start:chunk.stop], blk.geom,
                                                                      self.forward_plain)
                if same:
                    chunk.bwd_im2col_src = chunk.im2col_src
                elif chunk.bwd_im2col_src is not None:
                    chunk.bwd_im2col_src = grouped_im2col.grouped_window_view(src[chunk.start:chunk.stop],
                                                                              blk.geom, self.backward_plain)
        self.source_key = buffer_key(src)


def padded_buffer(blk, n, dt, alloc):
    """A padded input-shaped buffer and its (N, Hp, Wp, C) view (NCHW storage when K-major)."""
    geom = blk.geom
    if blk.kmajor:
        buf = alloc((n, geom.c, geom.hp, geom.wp), dt)
        return buf, buf.transpose(0, 2, 3, 1)
    buf = alloc((n, geom.hp, geom.wp, geom.c), dt)
    return buf, buf


def im2col_views(blk, padded_chunk, col, rows, plain):
    """(source window view, destination view, (rows, KH*KW*C) matrix) of one chunk's im2col into col."""
    src = grouped_im2col.grouped_window_view(padded_chunk, blk.geom, plain)
    if blk.kmajor:
        part = col[:, :rows]
        dst = part.reshape(src.shape[5:] + src.shape[:5])
        return src.transpose(5, 6, 7, 0, 1, 2, 3, 4), dst, part.T
    part = col[:rows]
    return src, part.reshape(src.shape), part
