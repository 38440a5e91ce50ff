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

``register()`` (run when xpnet is imported) puts them in ``xpnet.dispatch``
for the CuPy backend: a forward op takes the kernels when ``kernels.usable``
accepts its arrays, a backward op when its cache is a ``KernelCache``.
``with registered(kops):`` does the same for a block on another runtime.

``KernelOps(runtime)`` runs the same code on another runtime: the CPU
emulation of ``xpnet.cuda.emulate`` uses it to test whole models on NumPy.
"""

from __future__ import annotations

import contextlib

from .. import backend, dispatch
from ..errors import ShapeError
from ..ops.conv import check_conv_args
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
        check_conv_args(x, w, b)
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


# ----------------------------------------------------------- registration

def _conv_applies(usable):
    def applies(x, w, b=None, *args, **kwargs):
        return usable(x, w) if b is None else usable(x, w, b)
    return applies


def _by_cache(dy, cache, *args, **kwargs):
    return isinstance(cache, KernelCache)  # the forward that made the cache ran the kernels


def _entries(kops: KernelOps, usable):
    """(op, function, applies, follows_cache) for every op the kernels implement."""
    return [
        ("conv2d_forward", kops.conv2d_forward, _conv_applies(usable), False),
        ("conv2d_backward", kops.conv2d_backward, _by_cache, True),
        ("max_pool2d_forward", kops.max_pool2d_forward, lambda x, *a, **k: usable(x), False),
        ("max_pool2d_backward", kops.max_pool2d_backward, _by_cache, True),
        ("relu_backward", kops.relu_backward, lambda dy, y: usable(dy, y), False),
        ("sigmoid_bce_with_logits", kops.sigmoid_bce_with_logits, lambda x, t: usable(x, t), False),
    ]


def _no_device() -> str | None:
    return None if backend.has_cupy_gpu else backend.device_reason()


def register(kops: KernelOps | None = None, backend_name: str = "cupy", name: str = "cuda kernels",
             usable=None, available=None) -> list:
    """Register the kernel-backed ops with ``xpnet.dispatch`` (done for CuPy on import of xpnet).

    ``usable(*arrays)``: when a forward op takes the kernels (default ``kernels.usable``:
    CuPy float arrays of one dtype); backward ops follow their forward's cache.
    """
    kops = kops or _CUPY_OPS
    usable = usable or K.usable
    return [dispatch.register(op, backend_name, name, fn, applies, follows_cache=follows,
                              available=available or (_no_device if backend_name == "cupy" else None))
            for op, fn, applies, follows in _entries(kops, usable)]


@contextlib.contextmanager
def registered(kops: KernelOps, backend_name: str = "numpy", usable=None, name: str = "emulated cuda kernels"):
    """``with registered(KernelOps(EmulatedRuntime())):`` -- kernel-backed ops on another runtime
    for a block (the CPU emulation tests whole models on NumPy this way; on a GPU, another conv
    layout); they are tried before any other implementation and removed afterwards."""
    impls = register(kops, backend_name, name, usable or (lambda *arrays: True))
    for impl in impls:
        dispatch.prefer(impl)
    try:
        yield impls
    finally:
        for impl in impls:
            dispatch.unregister(impl)
