"""2-D convolution (cross-correlation, as in every DL framework) via im2col.

Shapes: x (N, C, H, W), w (F, C, KH, KW), b (F,) or None -> y (N, F, OH, OW).
See ``xpnet.ops.im2col`` for the notation.  Forward is one im2col copy and
one matrix product (N*OH*OW, C*KH*KW) @ (C*KH*KW, F); backward is two
products and one col2im.

Memory: ``col`` takes ``im2col_nbytes(x.shape, ...)`` bytes.  When that exceeds
the im2col budget (``xpnet.set_im2col_budget``, ``XPNET_IM2COL_BUDGET_MB``,
default 512 MiB) the batch is processed in chunks that fit, and the cache
keeps a copy of x instead of col (backward rebuilds each chunk's col).  The
results are the same up to the order of the float additions in dw and db.
"""

from __future__ import annotations

from .. import config, dispatch
from ..backend import check_same_backend, get_array_module
from ..errors import ShapeError
from .im2col import col2im, im2col, im2col_nbytes, output_hw, pair


def check_conv_args(x, w, b):
    """Refuse arguments no conv2d implementation can take (shared by every path)."""
    if getattr(x, "ndim", None) != 4:
        raise ShapeError(f"conv2d needs x of shape (N, C, H, W), got shape {getattr(x, 'shape', None)}.")
    if getattr(w, "ndim", None) != 4:
        raise ShapeError(f"conv2d needs w of shape (F, C, KH, KW), got shape {getattr(w, 'shape', None)}.")
    if x.shape[1] != w.shape[1]:
        raise ShapeError(
            f"conv2d input has {x.shape[1]} channels but the kernel expects {w.shape[1]}."
        )
    if x.dtype != w.dtype:
        raise ShapeError(
            f"conv2d input is {x.dtype} but the kernel is {w.dtype}: cast one of them "
            "(xpnet never upcasts silently)."
        )
    check_same_backend(x, w, "conv2d")
    if b is not None and b.shape != (w.shape[0],):
        raise ShapeError(f"conv2d bias must have shape ({w.shape[0]},), got {b.shape}.")


def chunk_size(x_shape, kernel, stride, pad, itemsize: int, budget_bytes: int | None = None) -> int:
    """Images per chunk so that one chunk's im2col fits the budget (at least 1)."""
    budget = config.get_im2col_budget_bytes() if budget_bytes is None else int(budget_bytes)
    n = x_shape[0]
    per_image = im2col_nbytes((1,) + tuple(x_shape[1:]), kernel, stride, pad, itemsize)
    return max(1, min(n, budget // max(1, per_image)))


@dispatch.op("conv2d_forward")
def conv2d_forward(x, w, b=None, stride=1, pad=0):
    """y = conv(x, w) + b.  Returns (y (N, F, OH, OW), cache for backward)."""
    check_conv_args(x, w, b)
    xp = get_array_module(x)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    stride, pad = pair(stride, "stride"), pair(pad, "padding")
    oh, ow = output_hw(h, wd, (kh, kw), stride, pad)
    w2 = w.reshape(f, c * kh * kw)
    chunk = chunk_size(x.shape, (kh, kw), stride, pad, x.dtype.itemsize)
    if chunk >= n:
        col = im2col(x, (kh, kw), stride, pad).reshape(n * oh * ow, c * kh * kw)
        y2 = col @ w2.T  # (N*OH*OW, F)
        if b is not None:
            y2 += b
        y = xp.ascontiguousarray(y2.reshape(n, oh, ow, f).transpose(0, 3, 1, 2))
        return y, (x.shape, col, w, stride, pad, b is not None)
    # Over the im2col budget: one chunk of images at a time; keep x (small) for backward.
    y = xp.empty((n, f, oh, ow), dtype=x.dtype)
    for a in range(0, n, chunk):
        e = min(n, a + chunk)
        col = im2col(x[a:e], (kh, kw), stride, pad).reshape((e - a) * oh * ow, c * kh * kw)
        y2 = col @ w2.T
        if b is not None:
            y2 += b
        y[a:e] = y2.reshape(e - a, oh, ow, f).transpose(0, 3, 1, 2)
    return y, (x.shape, ("chunked", x.copy(), chunk), w, stride, pad, b is not None)


@dispatch.op("conv2d_backward")
def conv2d_backward(dy, cache, need_dx: bool = True):
    """Gradients (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,) or None)."""
    x_shape, col, w, stride, pad, has_bias = cache
    n, c, h, wd = x_shape
    f, _, kh, kw = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    if dy.shape[:2] != (n, f) or (oh, ow) != output_hw(h, wd, (kh, kw), stride, pad):
        raise ShapeError(f"conv2d_backward got dy of shape {dy.shape}, expected {(n, f) + output_hw(h, wd, (kh, kw), stride, pad)}.")
    w2 = w.reshape(f, c * kh * kw)
    if isinstance(col, tuple):  # chunked forward: rebuild each chunk's col
        _, x, chunk = col
        xp = get_array_module(dy)
        dw2 = xp.zeros((f, c * kh * kw), dtype=dy.dtype)
        db = xp.zeros(f, dtype=dy.dtype) if has_bias else None
        dx = xp.empty(x_shape, dtype=dy.dtype) if need_dx else None
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            m = e - a
            col_c = im2col(x[a:e], (kh, kw), stride, pad).reshape(m * oh * ow, c * kh * kw)
            dy2 = dy[a:e].transpose(0, 2, 3, 1).reshape(m * oh * ow, f)
            dw2 += dy2.T @ col_c
            if has_bias:
                db += dy2.sum(axis=0)
            if need_dx:
                dcol = (dy2 @ w2).reshape(m, oh, ow, c, kh, kw)
                dx[a:e] = col2im(dcol, (m, c, h, wd), (kh, kw), stride, pad)
        return dx, dw2.reshape(w.shape), db
    dy2 = dy.transpose(0, 2, 3, 1).reshape(n * oh * ow, f)
    dw = (dy2.T @ col).reshape(w.shape)
    db = dy2.sum(axis=0) if has_bias else None
    dx = None
    if need_dx:
        dcol = (dy2 @ w2).reshape(n, oh, ow, c, kh, kw)
        dx = col2im(dcol, x_shape, (kh, kw), stride, pad)
    return dx, dw, db
