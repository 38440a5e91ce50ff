"""Stages of the fused CPU path for sequence models (CRNN readers): Columns, GRU, TimeDense.

Each follows the per-shard contract of ``stages`` (forward(x, shard, step) /
backward(dy, shard, step, need_dx), caches in ``shard.cache``, per-shard partial
gradients as fresh arrays in ``shard.grads[(layer, name)]``).  These layers treat
every sample on its own, so a shard of the batch is a smaller batch of the same
computation.  The arithmetic is that of the reference ops (``xpnet.ops.recurrent``,
``xpnet.ops.dense``); the layer objects are never called from the shards' threads,
as they keep their cache on themselves.

Shapes (n: the shard's samples): Columns (n, C, H, W) -> (n, W, C*H) with feature
c*H + h; GRU (n, T, F) -> (n, T, 2H) (one-way: (n, T, H)); TimeDense (n, T, F) ->
(n, T, K).  3-D sequences travel in the "flat" layout (``convert`` leaves them as
they are).
"""

from __future__ import annotations

import numpy

from ..ops.dense import dense_backward, dense_forward
from ..ops.recurrent import gru_backward, gru_forward
from .stages import FLAT, NCHW, NHWC, Stage, convert


class ColumnsStage(Stage):
    """(n, C, H, W) -> (n, W, C*H): one copy forward; backward hands back a strided view."""

    # NHWC first: a conv block's output is channel-last, and either is a free view.
    accepts = (NHWC, NCHW)

    def out_layout(self, in_layout):
        return FLAT

    def forward(self, x, sh, step):
        x = convert(x, step.layouts[self.index], NCHW)  # (n, C, H, W) view
        n, c, h, w = x.shape
        # out[n, w, c*H + h] = x[n, c, h, w]; the copy makes the sequence contiguous
        # for the GRU's input product.
        return numpy.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(n, w, c * h)

    def backward(self, dy, sh, step, need_dx):
        if not need_dx:
            return None
        n, w, _ = dy.shape
        c, h = self.layers[0].input_shape[:2]
        # dx[n, c, h, w] = dy[n, w, c*H + h], as a view: the stage before reads it
        # once (a conv block's backward multiplies it into its own buffer).
        dx = dy.reshape(n, w, c, h).transpose(0, 2, 3, 1)
        return convert(dx, NCHW, step.layouts[self.index])


def gru_weights(layer, d):
    """(Wx, Wh, bx, bh) of direction ``d`` ("fw" or "bw") of a GRU layer."""
    p = layer.params
    return p[f"Wx_{d}"], p[f"Wh_{d}"], p[f"bx_{d}"], p[f"bh_{d}"]


class GRUStage(Stage):
    """A GRU layer, one ``gru_forward``/``gru_backward`` per direction on the shard's samples."""

    accepts = (FLAT,)

    def forward(self, x, sh, step):
        layer = self.layers[0]
        dirs = layer.directions
        hid = layer.hidden_size
        n, t_len, _ = x.shape
        out = numpy.empty((n, t_len, len(dirs) * hid), dtype=x.dtype)
        caches = []
        for i, d in enumerate(dirs):
            y, cache = gru_forward(x, *gru_weights(layer, d), reverse=(d == "bw"))
            out[:, :, i * hid:(i + 1) * hid] = y  # both directions side by side, as the layer does
            caches.append(cache)
        if step.train:
            sh.cache[self.index] = caches
        return out

    def backward(self, dy, sh, step, need_dx):
        layer = self.layers[0]
        hid = layer.hidden_size
        caches = sh.cache.pop(self.index)
        dx = None
        for i, (d, cache) in enumerate(zip(layer.directions, caches)):
            dxd, dwx, dwh, dbx, dbh = gru_backward(dy[:, :, i * hid:(i + 1) * hid], cache, need_dx=need_dx)
            sh.grads[(layer, f"Wx_{d}")], sh.grads[(layer, f"Wh_{d}")] = dwx, dwh
            sh.grads[(layer, f"bx_{d}")], sh.grads[(layer, f"bh_{d}")] = dbx, dbh
            if dxd is not None:
                if dx is None:
                    dx = dxd
                else:
                    dx += dxd  # dxd is the op's fresh array: add in place
        return dx


class TimeDenseStage(Stage):
    """The same Dense at every step: one (n*T, F) @ (F, K) product on the shard's samples."""

    accepts = (FLAT,)

    def forward(self, x, sh, step):
        layer = self.layers[0]
        n, t_len, f = x.shape
        y, cache = dense_forward(x.reshape(n * t_len, f), layer.params["W"], layer.params.get("b"))
        if step.train:
            sh.cache[self.index] = (cache, x.shape)
        return y.reshape(n, t_len, -1)

    def backward(self, dy, sh, step, need_dx):
        layer = self.layers[0]
        cache, shape = sh.cache.pop(self.index)
        n, t_len, _ = shape
        dx, dw, db = dense_backward(dy.reshape(n * t_len, dy.shape[2]), cache, need_dx=need_dx)
        sh.grads[(layer, "W")] = dw
        if db is not None:
            sh.grads[(layer, "b")] = db
        return dx.reshape(shape) if dx is not None else None
