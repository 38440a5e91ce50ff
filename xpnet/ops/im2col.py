"""im2col / col2im: unfold sliding windows into rows, and fold them back.

Notation (used throughout xpnet.ops)::

    N   batch size            C   input channels         F  output channels
    H,W input height/width    KH,KW kernel height/width
    SH,SW stride              PH,PW zero padding per side
    OH = (H + 2*PH - KH) // SH + 1,   OW = (W + 2*PW - KW) // SW + 1

``im2col`` returns ``col`` of shape (N, OH, OW, C, KH, KW): row ``(n, i, j)``
holds the window under output pixel (i, j), flattened in the same
(C, KH, KW) order as a weight ``w.reshape(F, C*KH*KW)``.  It is one strided
view (``lib.stride_tricks.as_strided``, present in NumPy and CuPy) and one
copy -- no Python loop over the batch or the pixels.

``col2im`` is its adjoint: it sums each window's values back onto the pixels
they came from with KH*KW slice additions (one per kernel offset), which is
deterministic (no atomics, fixed order).

``col`` has N*OH*OW*C*KH*KW elements: ``im2col_nbytes`` tells how many bytes
that is before allocating it.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module
from ..errors import ShapeError


def pair(v, name: str) -> tuple[int, int]:
    """Normalise an int or a 2-sequence to (vertical, horizontal)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ShapeError(f"{name} must be an int or a pair (vertical, horizontal), got {v!r}.")
        a, b = v
    else:
        a = b = v
    try:
        a, b = int(a), int(b)
    except (TypeError, ValueError):
        raise ShapeError(f"{name} must be an int or a pair of ints, got {v!r}.") from None
    return a, b


def conv_output_size(size: int, k: int, stride: int, pad: int, what: str = "input") -> int:
    """floor((size + 2*pad - k) / stride) + 1, refusing windows that do not fit."""
    if k < 1 or stride < 1 or pad < 0:
        raise ShapeError(
            f"kernel {k}, stride {stride} and padding {pad} are invalid: kernel and stride "
            "must be >= 1 and padding >= 0."
        )
    out = (size + 2 * pad - k) // stride + 1
    if out < 1:
        raise ShapeError(
            f"a {k}-wide window with padding {pad} does not fit in an {what} of size {size}: "
            "use a smaller kernel, more padding or a larger input."
        )
    return out


def output_hw(h: int, w: int, kernel, stride, pad) -> tuple[int, int]:
    kh, kw = pair(kernel, "kernel size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(pad, "padding")
    return (conv_output_size(h, kh, sh, ph, "input height"),
            conv_output_size(w, kw, sw, pw, "input width"))


class Geometry(NamedTuple):
    """Every size of one sliding-window op on an (N, C, H, W) input (see the notation above)."""

    n: int
    c: int
    h: int
    w: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int


def conv_geometry(x_shape, kernel, stride=1, pad=0) -> Geometry:
    """The geometry of a convolution (or any window op) on an input of shape (N, C, H, W)."""
    if len(x_shape) != 4:
        raise ShapeError(f"expected an (N, C, H, W) shape, got {tuple(x_shape)}.")
    n, c, h, w = (int(s) for s in x_shape)
    kh, kw = pair(kernel, "kernel size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(pad, "padding")
    oh, ow = output_hw(h, w, (kh, kw), (sh, sw), (ph, pw))
    return Geometry(n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw)


def pool_geometry(x_shape, size=2, stride=None, pad=0) -> Geometry:
    """The geometry of a max pool: stride defaults to the window, padding at most half of it."""
    kh, kw = pair(size, "pool size")
    ph, pw = pair(pad, "pool padding")
    if ph > kh // 2 or pw > kw // 2:
        raise ShapeError(f"pool padding {pad} must be at most half the window {size}.")
    sh, sw = pair(stride if stride is not None else (kh, kw), "pool stride")
    return conv_geometry(x_shape, (kh, kw), (sh, sw), (ph, pw))


def im2col_nbytes(x_shape, kernel, stride=1, pad=0, itemsize: int = 4) -> int:
    """Bytes of the ``col`` array that im2col builds for an input of ``x_shape``."""
    n, c, h, w = x_shape
    kh, kw = pair(kernel, "kernel size")
    oh, ow = output_hw(h, w, kernel, stride, pad)
    return n * oh * ow * c * kh * kw * itemsize


def pad_input(x, ph: int, pw: int, value=0):
    """Pad the two spatial axes of (N, C, H, W); returns x itself when no padding."""
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode="constant", constant_values=value)


def window_view(x, kh: int, kw: int, sh: int, sw: int):
    """A read-only strided view (N, OH, OW, C, KH, KW) of the windows of an already padded x."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    oh = (h - kh) // sh + 1
    ow = (w - kw) // sw + 1
    s_n, s_c, s_h, s_w = x.strides
    return xp.lib.stride_tricks.as_strided(
        x,
        shape=(n, oh, ow, c, kh, kw),
        strides=(s_n, s_h * sh, s_w * sw, s_c, s_h, s_w),
    )


def im2col(x, kernel, stride=1, pad=0, out=None):
    """Unfold (N, C, H, W) into col (N, OH, OW, C, KH, KW), one strided copy.

    ``out``, when given, is a reusable C-contiguous buffer of that shape and dtype.
    """
    kh, kw = pair(kernel, "kernel size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(pad, "padding")
    output_hw(x.shape[2], x.shape[3], (kh, kw), (sh, sw), (ph, pw))  # validates
    xp = get_array_module(x)
    view = window_view(pad_input(x, ph, pw), kh, kw, sh, sw)
    if out is None:
        return xp.ascontiguousarray(view)
    if out.shape != view.shape or out.dtype != x.dtype:
        raise ShapeError(f"im2col out buffer has shape {out.shape}, needs {view.shape}.")
    xp.copyto(out, view)
    return out


def col2im(col, x_shape, kernel, stride=1, pad=0):
    """Adjoint of im2col: sum col (N, OH, OW, C, KH, KW) back into (N, C, H, W).

    Accumulates one kernel offset at a time (KH*KW slice additions, fixed order).
    """
    xp = get_array_module(col)
    n, c, h, w = x_shape
    kh, kw = pair(kernel, "kernel size")
    sh, sw = pair(stride, "stride")
    ph, pw = pair(pad, "padding")
    oh, ow = output_hw(h, w, (kh, kw), (sh, sw), (ph, pw))
    if col.shape != (n, oh, ow, c, kh, kw):
        raise ShapeError(f"col has shape {col.shape}, expected {(n, oh, ow, c, kh, kw)}.")
    # Padded canvas; rows/columns the windows never reach stay zero.
    hp, wp = h + 2 * ph, w + 2 * pw
    canvas = xp.zeros((n, c, hp, wp), dtype=col.dtype)
    # (N, C, KH, KW, OH, OW) so each offset's slab is a plain 4-D slice.
    col_t = col.transpose(0, 3, 4, 5, 1, 2)
    for i in range(kh):
        i_end = i + sh * (oh - 1) + 1
        for j in range(kw):
            j_end = j + sw * (ow - 1) + 1
            canvas[:, :, i:i_end:sh, j:j_end:sw] += col_t[:, :, i, j]
    if ph == 0 and pw == 0:
        return canvas
    return xp.ascontiguousarray(canvas[:, :, ph:ph + h, pw:pw + w])
