"""Custom CUDA kernels for xpnet's hot ops on CuPy, drop-in beside the generic path.

Each public function has the semantics of the generic op in ``xpnet.ops`` that
it replaces (same layouts, dtypes, tie-breaking and padding rules; see
``xpnet.ops.im2col`` for the notation), takes and returns CuPy arrays, and is
deterministic: every output element is computed by one thread in a fixed
order (col2im and max-pool backward *gather*; no atomics), so two runs are
bitwise equal.  Nothing here reads a device value on the host: a training
step that uses these functions never synchronises.

    im2col(x, kernel, stride=1, pad=0, out=None)        -> col (N, OH, OW, C, KH, KW)
    col2im(col, x_shape, kernel, stride=1, pad=0)        -> dx (N, C, H, W)
    max_pool_forward(x, size, stride=None, pad=0)        -> (y (N, C, OH, OW), idx int32)
    max_pool_backward(dy, idx, x_shape, size, stride=None, pad=0, relu_y=None) -> dx
    nhwc_to_nchw(y2, b, out_shape, relu=False)          -> (N, F, OH, OW)
    im2col_cnhw / col2im_cnhw / fnp_to_nfp              -> the same with col as (C, KH, KW, N, OH, OW)
    relu_backward(dy, y)                                 -> dy * (y > 0)
    sigmoid_bce_with_logits(logits, targets)             -> (loss 0-d, dlogits)

``xpnet.cuda.ops`` registers them with ``xpnet.dispatch`` behind one guard,
``usable(*arrays)``: True only for CuPy float32/float64 arrays of one dtype.
``XPNET_REFERENCE=1`` (or ``with xpnet.reference_paths():``) runs the generic
``xp`` code instead, the reference the tests hold these kernels to.

Kernels are compiled lazily, once per (dtype, index width, device), by CuPy's
``RawModule`` (CuPy also caches the binary on disk).  This module imports
without CuPy: it gets CuPy only through ``xpnet.backend``.

The argument marshalling below is shared with the CPU emulation in
``xpnet.cuda.emulate`` (a "runtime" object launches a named kernel with typed
arguments), so the CPU tests exercise the very wrappers the GPU runs.
"""

from __future__ import annotations

import numpy

from .. import backend
from ..errors import ShapeError
from ..ops.im2col import conv_geometry, pool_geometry
from .source import module_source

BLOCK = 256                # threads per block
MAX_GRID = 1 << 16         # blocks per launch; the grid-stride loop covers the rest
# Indices are 32-bit unless an array (plus one grid stride) could pass 2**31 - 1.
_INT32_LIMIT = (1 << 31) - 1 - BLOCK * MAX_GRID

_FLOAT_CHARS = ("f", "d")


# ---------------------------------------------------------------------- guard

def usable(*arrays) -> bool:
    """The dispatch guard: every array a CuPy float32/float64 array of one dtype.

    Cheap (type and dtype checks only), so an op can ask it on every call.
    """
    cupy = backend.cupy
    if cupy is None or not arrays or not isinstance(arrays[0], cupy.ndarray):
        return False
    char = arrays[0].dtype.char
    if char not in _FLOAT_CHARS:
        return False
    return all(isinstance(a, cupy.ndarray) and a.dtype.char == char for a in arrays[1:])


# -------------------------------------------------------------------- runtimes

def _is_wide(*sizes) -> bool:
    return max(sizes) > _INT32_LIMIT


def _launch_shape(total: int) -> tuple[int, int]:
    return max(1, min(MAX_GRID, -(-total // BLOCK))), BLOCK


class CupyRuntime:
    """Launches the kernels on the current CUDA device through CuPy's RawModule."""

    name = "cupy"

    def __init__(self):
        self._functions = {}

    @property
    def xp(self):
        return backend.cupy

    def function(self, name: str, dtype_char: str, wide: bool):
        cupy = backend.cupy
        key = (name, dtype_char, wide, cupy.cuda.runtime.getDevice())
        fn = self._functions.get(key)
        if fn is None:
            module = _compiled_module(dtype_char, wide, key[3])
            fn = self._functions[key] = module.get_function(name)
        return fn

    def launch(self, name: str, dtype, wide: bool, total: int, args) -> None:
        if total == 0:
            return
        dtype = numpy.dtype(dtype)
        index = numpy.int64 if wide else numpy.int32
        converted = []
        for kind, value in args:
            if kind == "p":
                converted.append(value)
            elif kind == "I":
                converted.append(index(value))
            elif kind == "i":
                converted.append(numpy.int32(value))
            else:  # "T": a scalar of the element type
                converted.append(dtype.type(value))
        grid, block = _launch_shape(total)
        self.function(name, dtype.char, wide)((grid,), (block,), tuple(converted))


_module_cache: dict = {}


def _compiled_module(dtype_char: str, wide: bool, device: int):
    """One RawModule per (dtype, index width, device); compiled at its first get_function."""
    key = (dtype_char, wide, device)
    module = _module_cache.get(key)
    if module is None:
        module = backend.cupy.RawModule(code=module_source(dtype_char, wide, "cuda"))
        _module_cache[key] = module
    return module


_CUPY = CupyRuntime()


# ------------------------------------------------------------------- checking

def _float_dtype(a, what: str):
    if a.dtype.char not in _FLOAT_CHARS:
        raise ShapeError(f"{what} must be float32 or float64 for the CUDA kernels, got {a.dtype}.")
    return a.dtype


def _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw):
    return [("I", v) for v in (c, h, w, oh, ow, kh, kw, sh, sw, ph, pw)]


# ------------------------------------------------------ the ops, any runtime
# Each ``_name(rt, ...)`` works on the arrays of ``rt.xp`` (CuPy on a GPU,
# NumPy in the emulation); the public functions below pass the CuPy runtime.

def _im2col(rt, x, kernel, stride=1, pad=0, out=None):
    xp = rt.xp
    dtype = _float_dtype(x, "im2col input")
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = conv_geometry(x.shape, kernel, stride, pad)
    shape = (n, oh, ow, c, kh, kw)
    if out is None:
        out = xp.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ShapeError(f"im2col out buffer has shape {out.shape} and dtype {out.dtype}, needs a "
                         f"C-contiguous {shape} {dtype}.")
    x = xp.ascontiguousarray(x)
    total = out.size
    rt.launch("xpnet_im2col", dtype, _is_wide(total, x.size), total,
              [("p", x), ("p", out), ("I", total)] + _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    return out


def _col2im(rt, col, x_shape, kernel, stride=1, pad=0):
    xp = rt.xp
    dtype = _float_dtype(col, "col2im input")
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = conv_geometry(x_shape, kernel, stride, pad)
    if tuple(col.shape) != (n, oh, ow, c, kh, kw):
        raise ShapeError(f"col has shape {tuple(col.shape)}, expected {(n, oh, ow, c, kh, kw)}.")
    col = xp.ascontiguousarray(col)
    dx = xp.empty((n, c, h, w), dtype=dtype)
    total = dx.size
    rt.launch("xpnet_col2im", dtype, _is_wide(total, col.size), total,
              [("p", col), ("p", dx), ("I", total)] + _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    return dx


def _max_pool_forward(rt, x, size=2, stride=None, pad=0):
    xp = rt.xp
    dtype = _float_dtype(x, "max_pool2d input")
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = pool_geometry(x.shape, size, stride, pad)
    x = xp.ascontiguousarray(x)
    y = xp.empty((n, c, oh, ow), dtype=dtype)
    idx = xp.empty((n, c, oh, ow), dtype=numpy.int32)
    total = y.size
    rt.launch("xpnet_maxpool_fwd", dtype, _is_wide(total, x.size), total,
              [("p", x), ("p", y), ("p", idx), ("I", total)]
              + _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    return y, idx


def _max_pool_backward(rt, dy, idx, x_shape, size=2, stride=None, pad=0, relu_y=None):
    xp = rt.xp
    dtype = _float_dtype(dy, "max_pool2d_backward dy")
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = pool_geometry(x_shape, size, stride, pad)
    expected = (n, c, oh, ow)
    for name, a in (("dy", dy), ("idx", idx), ("relu_y", relu_y)):
        if a is not None and tuple(a.shape) != expected:
            raise ShapeError(f"max_pool2d_backward got {name} of shape {tuple(a.shape)}, expected {expected}.")
    if relu_y is not None and relu_y.dtype != dtype:
        raise ShapeError(f"max_pool2d_backward got relu_y of dtype {relu_y.dtype}, expected {dtype}.")
    dy = xp.ascontiguousarray(dy)
    idx = xp.ascontiguousarray(idx, dtype=numpy.int32)
    y = dy if relu_y is None else xp.ascontiguousarray(relu_y)
    dx = xp.empty((n, c, h, w), dtype=dtype)
    total = dx.size
    rt.launch("xpnet_maxpool_bwd", dtype, _is_wide(total, dy.size), total,
              [("p", dy), ("p", idx), ("p", y), ("p", dx), ("I", total), ("i", relu_y is not None)]
              + _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    return dx


def _nhwc_to_nchw(rt, y2, b, out_shape, relu=False):
    xp = rt.xp
    dtype = _float_dtype(y2, "nhwc_to_nchw input")
    n, f, oh, ow = (int(s) for s in out_shape)
    if tuple(y2.shape) != (n * oh * ow, f) and tuple(y2.shape) != (n, oh, ow, f):
        raise ShapeError(f"nhwc_to_nchw needs y2 of shape {(n * oh * ow, f)}, got {tuple(y2.shape)}.")
    if b is not None and (tuple(b.shape) != (f,) or b.dtype != dtype):
        raise ShapeError(f"nhwc_to_nchw needs a {dtype} bias of shape ({f},), got {tuple(b.shape)} {b.dtype}.")
    y2 = xp.ascontiguousarray(y2)
    out = xp.empty((n, f, oh, ow), dtype=dtype)
    total = out.size
    bias = y2 if b is None else xp.ascontiguousarray(b)  # any valid pointer when unused
    rt.launch("xpnet_nhwc_to_nchw", dtype, _is_wide(total), total,
              [("p", y2), ("p", bias), ("p", out), ("I", total), ("I", f), ("I", oh * ow),
               ("i", b is not None), ("i", bool(relu))])
    return out


def _im2col_cnhw(rt, x, kernel, stride=1, pad=0):
    """colT (C, KH, KW, N, OH, OW): im2col with the channel-and-offset axes outermost."""
    xp = rt.xp
    dtype = _float_dtype(x, "im2col input")
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = conv_geometry(x.shape, kernel, stride, pad)
    x = xp.ascontiguousarray(x)
    out = xp.empty((c, kh, kw, n, oh, ow), dtype=dtype)
    total = out.size
    rt.launch("xpnet_im2col_cnhw", dtype, _is_wide(total, x.size), total,
              [("p", x), ("p", out), ("I", total), ("I", n)]
              + _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    return out


def _col2im_cnhw(rt, colT, x_shape, kernel, stride=1, pad=0):
    xp = rt.xp
    dtype = _float_dtype(colT, "col2im input")
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = conv_geometry(x_shape, kernel, stride, pad)
    if tuple(colT.shape) != (c, kh, kw, n, oh, ow):
        raise ShapeError(f"colT has shape {tuple(colT.shape)}, expected {(c, kh, kw, n, oh, ow)}.")
    colT = xp.ascontiguousarray(colT)
    dx = xp.empty((n, c, h, w), dtype=dtype)
    total = dx.size
    rt.launch("xpnet_col2im_cnhw", dtype, _is_wide(total, colT.size), total,
              [("p", colT), ("p", dx), ("I", total), ("I", n)]
              + _window_args(c, h, w, oh, ow, kh, kw, sh, sw, ph, pw))
    return dx


def _fnp_to_nfp(rt, yT, b, out_shape, relu=False):
    xp = rt.xp
    dtype = _float_dtype(yT, "fnp_to_nfp input")
    n, f = int(out_shape[0]), int(out_shape[1])
    p = int(numpy.prod(out_shape[2:], dtype=numpy.int64))
    if yT.size != n * f * p or yT.shape[0] != f:
        raise ShapeError(f"fnp_to_nfp needs yT of shape ({f}, {n * p}), got {tuple(yT.shape)}.")
    if b is not None and (tuple(b.shape) != (f,) or b.dtype != dtype):
        raise ShapeError(f"fnp_to_nfp needs a {dtype} bias of shape ({f},), got {tuple(b.shape)} {b.dtype}.")
    yT = xp.ascontiguousarray(yT)
    out = xp.empty(tuple(int(s) for s in out_shape), dtype=dtype)
    bias = yT if b is None else xp.ascontiguousarray(b)
    total = out.size
    rt.launch("xpnet_fnp_to_nfp", dtype, _is_wide(total), total,
              [("p", yT), ("p", bias), ("p", out), ("I", total), ("I", n), ("I", f), ("I", p),
               ("i", b is not None), ("i", bool(relu))])
    return out


def _relu_backward(rt, dy, y):
    xp = rt.xp
    dtype = _float_dtype(dy, "relu_backward dy")
    if dy.shape != y.shape or y.dtype != dtype:
        raise ShapeError(f"relu_backward got dy {tuple(dy.shape)} {dtype} and y {tuple(y.shape)} {y.dtype}.")
    dy, y = xp.ascontiguousarray(dy), xp.ascontiguousarray(y)
    dx = xp.empty(dy.shape, dtype=dtype)
    rt.launch("xpnet_relu_bwd", dtype, _is_wide(dx.size), dx.size,
              [("p", dy), ("p", y), ("p", dx), ("I", dx.size)])
    return dx


def _bce_terms(rt, logits, targets):
    """(terms, dlogits): per-unit loss terms and the gradient, one kernel pass."""
    xp = rt.xp
    dtype = _float_dtype(logits, "logits")
    if logits.ndim < 1 or targets.shape != logits.shape:
        raise ShapeError(f"targets have shape {tuple(targets.shape)} but logits have shape "
                         f"{tuple(logits.shape)}: encode labels as multi-hot rows of the same width.")
    x = xp.ascontiguousarray(logits)
    t = xp.ascontiguousarray(targets.astype(dtype, copy=False))
    dx = xp.empty(x.shape, dtype=dtype)
    terms = xp.empty(x.shape, dtype=dtype)
    rt.launch("xpnet_bce_logits", dtype, _is_wide(x.size), x.size,
              [("p", x), ("p", t), ("p", dx), ("p", terms), ("I", x.size), ("T", x.shape[0])])
    return terms, dx


def _sigmoid_bce_with_logits(rt, logits, targets):
    terms, dx = _bce_terms(rt, logits, targets)
    # CuPy's sum is a fixed-order tree reduction: deterministic, no host sync.
    loss = terms.sum(dtype=logits.dtype) / logits.dtype.type(logits.shape[0])
    return loss, dx


# ------------------------------------------------------ public (CuPy) functions

def im2col(x, kernel, stride=1, pad=0, out=None):
    """Unfold x (N, C, H, W) into col (N, OH, OW, C, KH, KW); zero padding.  ``out``: reusable buffer."""
    return _im2col(_CUPY, x, kernel, stride, pad, out)


def col2im(col, x_shape, kernel, stride=1, pad=0):
    """Adjoint of im2col: dx (N, C, H, W) = sum of every col entry copied from each pixel (gather)."""
    return _col2im(_CUPY, col, x_shape, kernel, stride, pad)


def max_pool_forward(x, size=2, stride=None, pad=0):
    """(y (N, C, OH, OW), idx int32 (N, C, OH, OW)): window maximum and its row-major position.

    Padding counts as -inf; ties go to the first position; stride defaults to size.
    """
    return _max_pool_forward(_CUPY, x, size, stride, pad)


def max_pool_backward(dy, idx, x_shape, size=2, stride=None, pad=0, relu_y=None):
    """dx (N, C, H, W): each dy (N, C, OH, OW) added to its window's argmax (gather, deterministic).

    ``relu_y``: the pool's output y when the pool follows a ReLU; then dx is also
    that ReLU's backward (dy counts only where y > 0), in the same pass.
    """
    return _max_pool_backward(_CUPY, dy, idx, x_shape, size, stride, pad, relu_y)


def nhwc_to_nchw(y2, b, out_shape, relu=False):
    """Conv output: y2 (N*OH*OW, F) -> (N, F, OH, OW), adding bias b (F,) or None, then ReLU if asked."""
    return _nhwc_to_nchw(_CUPY, y2, b, out_shape, relu)


def im2col_cnhw(x, kernel, stride=1, pad=0):
    """colT (C, KH, KW, N, OH, OW) = im2col(x).transpose(3, 4, 5, 0, 1, 2), built directly (coalesced)."""
    return _im2col_cnhw(_CUPY, x, kernel, stride, pad)


def col2im_cnhw(colT, x_shape, kernel, stride=1, pad=0):
    """Adjoint of im2col_cnhw: dx (N, C, H, W) by gathering, deterministic."""
    return _col2im_cnhw(_CUPY, colT, x_shape, kernel, stride, pad)


def fnp_to_nfp(yT, b, out_shape, relu=False):
    """(N, F, ...) from yT (F, N*...): swap the first two axes, add bias b (F,) or None, ReLU if asked."""
    return _fnp_to_nfp(_CUPY, yT, b, out_shape, relu)


def relu_backward(dy, y):
    """dx = dy where y > 0 else 0 (one kernel instead of a compare and a multiply)."""
    return _relu_backward(_CUPY, dy, y)


def sigmoid_bce_with_logits(logits, targets):
    """Fused sigmoid + BCE on logits (N, K): (loss 0-d on the device, dlogits (N, K)).

    Same definition as ``xpnet.ops.sigmoid_bce_with_logits``: summed over units,
    averaged over the batch; gradient (sigmoid(x) - t) / N.
    """
    return _sigmoid_bce_with_logits(_CUPY, logits, targets)


__all__ = [
    "usable",
    "im2col", "col2im", "im2col_cnhw", "col2im_cnhw", "fnp_to_nfp", "max_pool_forward", "max_pool_backward", "nhwc_to_nchw",
    "relu_backward", "sigmoid_bce_with_logits", "CupyRuntime",
]
