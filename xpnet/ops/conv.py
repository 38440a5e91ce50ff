"""2-D convolution (cross-correlation, as in every DL framework) via im2col.

Shapes: x (N, C, H, W), w (F, C, KH, KW), b (F,) or None -> y (N, F, OH, OW).
See ``xpnet.ops.im2col`` for the notation.  Forward is one im2col copy and
one matrix product (N*OH*OW, C*KH*KW) @ (C*KH*KW, F); backward is two
products and one col2im.
"""

from __future__ import annotations

from ..backend import check_same_backend, get_array_module
from ..errors import ShapeError
from .im2col import col2im, im2col, output_hw, pair


def _check_conv_args(x, w, b):
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


def conv2d_forward(x, w, b=None, stride=1, pad=0):
    """y = conv(x, w) + b.  Returns (y (N, F, OH, OW), cache for backward)."""
    _check_conv_args(x, w, b)
    xp = get_array_module(x)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    stride, pad = pair(stride, "stride"), pair(pad, "padding")
    oh, ow = output_hw(h, wd, (kh, kw), stride, pad)
    col = im2col(x, (kh, kw), stride, pad).reshape(n * oh * ow, c * kh * kw)
    w2 = w.reshape(f, c * kh * kw)
    y2 = col @ w2.T  # (N*OH*OW, F)
    if b is not None:
        y2 += b
    y = xp.ascontiguousarray(y2.reshape(n, oh, ow, f).transpose(0, 3, 1, 2))
    cache = (x.shape, col, w, stride, pad, b is not None)
    return y, cache


def conv2d_backward(dy, cache, need_dx: bool = True):
    """Gradients (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,) or None)."""
    x_shape, col, w, stride, pad, has_bias = cache
    n, c, h, wd = x_shape
    f, _, kh, kw = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    if dy.shape != (n, f, oh, ow) or col.shape[0] != n * oh * ow:
        raise ShapeError(f"conv2d_backward got dy of shape {dy.shape}, expected {(n, f, oh, ow)}.")
    dy2 = dy.transpose(0, 2, 3, 1).reshape(n * oh * ow, f)
    dw = (dy2.T @ col).reshape(w.shape)
    db = dy2.sum(axis=0) if has_bias else None
    dx = None
    if need_dx:
        dcol = (dy2 @ w.reshape(f, c * kh * kw)).reshape(n, oh, ow, c, kh, kw)
        dx = col2im(dcol, x_shape, (kh, kw), stride, pad)
    return dx, dw, db
