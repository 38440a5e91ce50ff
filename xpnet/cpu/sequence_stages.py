"""Stages of the fused CPU path for sequence models (CRNN readers): Columns, GRU, TimeDense.

Each follows the per-shard contract of ``stages`` (forward(x, shard, step) /
backward(dy, shard, step, need_dx), caches in ``shard.cache``, per-shard partial
gradients as fresh arrays in ``shard.grads[(layer, name)]``).  These layers treat
every sample on its own, so a shard of the batch is a smaller batch of the same
computation.  The arithmetic is that of the reference ops (``xpnet.ops.recurrent``, here with
both directions in one loop (``stacked_gru``), and ``xpnet.ops.dense``); the layer objects are
never called from the shards, as they keep their cache on themselves.

Shapes (n: the shard's samples): Columns (n, C, H, W) -> (n, W, C*H) with feature
c*H + h; GRU (n, T, F) -> (n, T, 2H) (one-way: (n, T, H)); TimeDense (n, T, F) ->
(n, T, K).  3-D sequences travel in the "flat" layout (``convert`` leaves them as
they are).
"""

from __future__ import annotations

import numpy

from ..ops.dense import dense_backward, dense_forward
from .stacked_gru import stacked_gru_backward, stacked_gru_forward, time_major
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


class GRUStage(Stage):
    """A GRU layer with its directions stacked (``stacked_gru``): one loop over time for both.

    The shard's (n, T, F) input is copied time-major per direction, the reverse
    direction's reversed; outputs and input gradients are copied back.
    """

    accepts = (FLAT,)

    def prepare(self, step):
        # the directions' weights stacked (D, ...), once per step for every shard
        layer = self.layers[0]
        p = layer.params
        step.data[self.key("weights")] = tuple(numpy.stack([p[f"{name}_{d}"] for d in layer.directions])
                                               for name in ("Wx", "Wh", "bx", "bh"))

    def buffers(self, sh):
        """The work arrays of ``stacked_gru``, from the shard's reused buffers."""
        return lambda name, shape, dtype: sh.buffer((self.index, name), shape, dtype)

    def forward(self, x, sh, step):
        layer = self.layers[0]
        hid, d_count = layer.hidden_size, len(layer.directions)
        n, t_len, _ = x.shape
        buf = self.buffers(sh)
        states, cache = stacked_gru_forward(time_major(x, d_count, buf), *step.data[self.key("weights")], buf=buf)
        out = buf("out", (n, t_len, d_count * hid), x.dtype)
        out[:, :, :hid] = states[0, 1:].transpose(1, 0, 2)  # both directions side by side, as the layer does
        if d_count == 2:
            out[:, :, hid:] = states[1, 1:][::-1].transpose(1, 0, 2)  # back in time order
        if step.train:
            sh.cache[self.index] = cache
        return out

    def backward(self, dy, sh, step, need_dx):
        layer = self.layers[0]
        hid, dirs = layer.hidden_size, layer.directions
        cache = sh.cache.pop(self.index)
        n, t_len, _ = dy.shape
        buf = self.buffers(sh)
        dys = buf("dys", (len(dirs), t_len, n, hid), dy.dtype)
        dys[0] = dy[:, :, :hid].transpose(1, 0, 2)
        if len(dirs) == 2:
            dys[1] = dy[:, ::-1, hid:].transpose(1, 0, 2)  # in the reverse direction's reading order
        dxs, dwx, dwh, dbx, dbh = stacked_gru_backward(dys, cache, need_dx=need_dx, buf=buf)
        for i, d in enumerate(dirs):
            sh.grads[(layer, f"Wx_{d}")], sh.grads[(layer, f"Wh_{d}")] = dwx[i], dwh[i]
            sh.grads[(layer, f"bx_{d}")], sh.grads[(layer, f"bh_{d}")] = dbx[i], dbh[i]
        if dxs is None:
            return None
        dx = buf("dx", (n, t_len, dxs.shape[3]), dy.dtype)
        numpy.copyto(dx, dxs[0].transpose(1, 0, 2))
        if len(dirs) == 2:
            numpy.add(dx, dxs[1][::-1].transpose(1, 0, 2), out=dx)
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
