"""Fully connected (affine) layer: y = x @ w + b.

Shapes: x (N, D_in), w (D_in, D_out), b (D_out,) or None -> y (N, D_out).
"""

from __future__ import annotations

from ..backend import check_same_backend
from ..errors import ShapeError


def dense_forward(x, w, b=None):
    """Returns (y (N, D_out), cache)."""
    if getattr(x, "ndim", None) != 2:
        raise ShapeError(f"dense needs x of shape (N, D), got {getattr(x, 'shape', None)}: flatten first.")
    if x.shape[1] != w.shape[0]:
        raise ShapeError(f"dense input has {x.shape[1]} features but the weights expect {w.shape[0]}.")
    if x.dtype != w.dtype:
        raise ShapeError(f"dense input is {x.dtype} but the weights are {w.dtype}: cast one of them.")
    check_same_backend(x, w, "dense")
    y = x @ w
    if b is not None:
        y += b
    return y, (x, w, b is not None)


def dense_backward(dy, cache, need_dx: bool = True):
    """Gradients (dx (N, D_in) or None, dw (D_in, D_out), db (D_out,) or None)."""
    x, w, has_bias = cache
    dw = x.T @ dy
    db = dy.sum(axis=0) if has_bias else None
    dx = dy @ w.T if need_dx else None
    return dx, dw, db
