"""Kernel-backed versions of xpnet's public ops, same signatures and results.

``xpnet.ops`` stays the reference.  These functions compute the same thing
with the custom kernels of ``xpnet.cuda.kernels`` (im2col, gather col2im,
max pooling, bias epilogue, ReLU backward, fused loss) and cuBLAS products.
Their caches are ``KernelCache`` objects, so a backward op can tell which
forward produced its cache::

    conv2d_forward(x, w, b=None, stride=1, pad=0)   -> (y (N, F, OH, OW), KernelCache)
                                                       (KernelOps(rt, conv_layout="cnhw"|"nhwc"))
    conv2d_backward(dy, cache, need_dx=True)        -> (dx or None, dw, db or None)
    max_pool2d_forward(x, size=2, stride=None, pad=0) -> (y (N, C, OH, OW), KernelCache)
    max_pool2d_backward(dy, cache)                  -> dx (N, C, H, W)
    relu_backward(dy, cache)                        -> dx     (cache: relu_forward's y)
    sigmoid_bce_with_logits(logits, targets)        -> (loss 0-d, dlogits)

Two ways to put them to work:

* hooks in ``xpnet.ops`` (one line at the top of each op, guarded by
  ``kernels.usable(...)`` / ``isinstance(cache, KernelCache)``); or
* ``install()`` / ``with installed():``, which wraps the public functions of
  the ``xpnet.ops`` package at run time (layers call ``ops.<name>`` so they
  follow).  The benchmark and the parity script use this to measure and check
  the kernels before the hooks exist.

``KernelOps(runtime)`` runs the same code on another runtime: the CPU
emulation of ``xpnet.cuda.emulate`` uses it to test whole models on NumPy.
"""

from __future__ import annotations

import contextlib

from ..errors import ShapeError
from . import kernels as K


class KernelCache:
    """What a kernel-backed forward keeps for its backward: ``kind`` and a tuple."""

    __slots__ = ("kind", "data")

    def __init__(self, kind: str, data: tuple):
        self.kind, self.data = kind, data


LAYOUTS = ("cnhw", "nhwc")


class KernelOps:
    """The ops on one runtime (``kernels.CupyRuntime()`` or an emulated one).

    ``conv_layout``: how the convolution lays out its im2col columns.
    "cnhw" (default): colT (C*KH*KW, N*OH*OW), built and folded back with
    coalesced memory access, one GEMM w @ colT, then a batch-first epilogue;
    "nhwc": xpnet.ops' own (N*OH*OW, C*KH*KW) layout, GEMM col @ w.T, then the
    NHWC->NCHW epilogue.  Same results; the benchmark times both.
    """

    def __init__(self, rt, conv_layout: str = "cnhw"):
        if conv_layout not in LAYOUTS:
            raise ShapeError(f"conv_layout must be one of {', '.join(LAYOUTS)}, got {conv_layout!r}.")
        self.rt = rt
        self.conv_layout = conv_layout

    # ------------------------------------------------------------ convolution
    def conv2d_forward(self, x, w, b=None, stride=1, pad=0):
        if getattr(x, "ndim", None) != 4 or getattr(w, "ndim", None) != 4:
            raise ShapeError(f"conv2d needs x (N, C, H, W) and w (F, C, KH, KW), got shapes "
                             f"{getattr(x, 'shape', None)} and {getattr(w, 'shape', None)}.")
        if x.shape[1] != w.shape[1]:
            raise ShapeError(f"conv2d input has {x.shape[1]} channels but the kernel expects {w.shape[1]}.")
        if x.dtype != w.dtype:
            raise ShapeError(f"conv2d input is {x.dtype} but the kernel is {w.dtype}: cast one of them "
                             "(xpnet never upcasts silently).")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ShapeError(f"conv2d bias must have shape ({w.shape[0]},), got {tuple(b.shape)}.")
        n = x.shape[0]
        f, c, kh, kw = w.shape
        w2 = w.reshape(f, c * kh * kw)
        if self.conv_layout == "cnhw":
            colT = K._im2col_cnhw(self.rt, x, (kh, kw), stride, pad)  # (C, KH, KW, N, OH, OW)
            oh, ow = colT.shape[4], colT.shape[5]
            yT = w2 @ colT.reshape(c * kh * kw, n * oh * ow)          # (F, N*OH*OW), one GEMM
            y = K._fnp_to_nfp(self.rt, yT, b, (n, f, oh, ow))          # batch first, + bias
            return y, KernelCache("conv_cnhw", (tuple(x.shape), colT, w, stride, pad, b is not None))
        col = K._im2col(self.rt, x, (kh, kw), stride, pad)       # (N, OH, OW, C, KH, KW)
        oh, ow = col.shape[1], col.shape[2]
        y2 = col.reshape(n * oh * ow, c * kh * kw) @ w2.T      # one GEMM, pixels x channels
        y = K._nhwc_to_nchw(self.rt, y2, b, (n, f, oh, ow))     # + bias, channels first, one pass
        return y, KernelCache("conv", (tuple(x.shape), col, w, stride, pad, b is not None))

    def conv2d_backward(self, dy, cache, need_dx=True):
        x_shape, col, w, stride, pad, has_bias = cache.data
        f, c, kh, kw = w.shape
        oh, ow = (col.shape[4], col.shape[5]) if cache.kind == "conv_cnhw" else (col.shape[1], col.shape[2])
        if tuple(dy.shape) != (x_shape[0], f, oh, ow):
            raise ShapeError(f"conv2d_backward got dy of shape {tuple(dy.shape)}, expected "
                             f"{(x_shape[0], f, oh, ow)}.")
        n = x_shape[0]
        xp = self.rt.xp
        if cache.kind == "conv_cnhw":
            dyT = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(f, n * oh * ow)
            colT = col.reshape(c * kh * kw, n * oh * ow)
            dw = (dyT @ colT.T).reshape(w.shape)
            db = dyT.sum(axis=1) if has_bias else None
            dx = None
            if need_dx:
                dcolT = (w.reshape(f, c * kh * kw).T @ dyT).reshape(col.shape)
                dx = K._col2im_cnhw(self.rt, dcolT, x_shape, (kh, kw), stride, pad)
            return dx, dw, db
        dy2 = xp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(n * oh * ow, f)
        col2 = col.reshape(n * oh * ow, c * kh * kw)
        dw = (dy2.T @ col2).reshape(w.shape)
        db = dy2.sum(axis=0) if has_bias else None
        dx = None
        if need_dx:
            dcol = (dy2 @ w.reshape(f, c * kh * kw)).reshape(col.shape)
            dx = K._col2im(self.rt, dcol, x_shape, (kh, kw), stride, pad)
        return dx, dw, db

    # ---------------------------------------------------------------- pooling
    def max_pool2d_forward(self, x, size=2, stride=None, pad=0):
        if getattr(x, "ndim", None) != 4:
            raise ShapeError(f"max_pool2d needs x of shape (N, C, H, W), got {getattr(x, 'shape', None)}.")
        y, idx = K._max_pool_forward(self.rt, x, size, stride, pad)
        return y, KernelCache("pool", (tuple(x.shape), idx, size, stride, pad))

    def max_pool2d_backward(self, dy, cache):
        x_shape, idx, size, stride, pad = cache.data
        return K._max_pool_backward(self.rt, dy, idx, x_shape, size, stride, pad)

    # ------------------------------------------------------- activation, loss
    def relu_backward(self, dy, cache):
        return K._relu_backward(self.rt, dy, cache)

    def sigmoid_bce_with_logits(self, logits, targets):
        return K._sigmoid_bce_with_logits(self.rt, logits, targets)


_CUPY_OPS = KernelOps(K._CUPY)


def conv2d_forward(x, w, b=None, stride=1, pad=0):
    """y = conv(x, w) + b with the im2col kernel, one GEMM and the NHWC->NCHW bias epilogue."""
    return _CUPY_OPS.conv2d_forward(x, w, b, stride, pad)


def conv2d_backward(dy, cache, need_dx=True):
    """(dx or None, dw, db or None) from a KernelCache; dx by the gather col2im kernel."""
    return _CUPY_OPS.conv2d_backward(dy, cache, need_dx)


def max_pool2d_forward(x, size=2, stride=None, pad=0):
    return _CUPY_OPS.max_pool2d_forward(x, size, stride, pad)


def max_pool2d_backward(dy, cache):
    return _CUPY_OPS.max_pool2d_backward(dy, cache)


def relu_backward(dy, cache):
    return _CUPY_OPS.relu_backward(dy, cache)


def sigmoid_bce_with_logits(logits, targets):
    return _CUPY_OPS.sigmoid_bce_with_logits(logits, targets)


# ------------------------------------------------------------ install / hooks

def _guarded(name, original, kops, applies):
    """A public-op replacement: the kernels when they apply, the original otherwise."""
    method = getattr(kops, name)
    if name in ("conv2d_backward", "max_pool2d_backward"):
        def op(dy, cache, *args, **kwargs):  # the cache says which forward ran
            fn = method if isinstance(cache, KernelCache) else original
            return fn(dy, cache, *args, **kwargs)
    elif name == "conv2d_forward":
        def op(x, w, b=None, *args, **kwargs):
            ok = applies(x, w) if b is None else applies(x, w, b)
            return (method if ok else original)(x, w, b, *args, **kwargs)
    elif name == "max_pool2d_forward":
        def op(x, *args, **kwargs):
            return (method if applies(x) else original)(x, *args, **kwargs)
    else:  # relu_backward(dy, y), sigmoid_bce_with_logits(logits, targets)
        def op(a, b):
            return (method if applies(a, b) else original)(a, b)
    op.__name__ = name
    op.__doc__ = original.__doc__
    op.__wrapped__ = original
    return op


PATCHED = ("conv2d_forward", "conv2d_backward", "max_pool2d_forward", "max_pool2d_backward",
           "relu_backward", "sigmoid_bce_with_logits")


def install(kops: KernelOps | None = None, applies=None) -> dict:
    """Route ``xpnet.ops.<op>`` through the kernels where ``applies(*arrays)`` (default
    ``kernels.usable``: CuPy float arrays with the kernels on).  Returns the originals
    for ``uninstall``.  Idempotent: installing twice keeps the first originals."""
    from .. import ops as public

    kops = kops or _CUPY_OPS
    applies = applies or K.usable
    originals = {}
    for name in PATCHED:
        current = getattr(public, name)
        original = getattr(current, "__wrapped__", current)
        originals[name] = original
        setattr(public, name, _guarded(name, original, kops, applies))
    return originals


def uninstall(originals: dict) -> None:
    from .. import ops as public

    for name, fn in originals.items():
        setattr(public, name, fn)


@contextlib.contextmanager
def installed(kops: KernelOps | None = None, applies=None):
    """``with installed():`` -- the kernels behind ``xpnet.ops`` for a block; afterwards
    ``xpnet.ops`` is as it was before (installed already on a GPU machine, or not)."""
    from .. import ops as public

    previous = {name: getattr(public, name) for name in PATCHED}
    install(kops, applies)
    try:
        yield
    finally:
        uninstall(previous)
