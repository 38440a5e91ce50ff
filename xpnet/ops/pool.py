"""2-D max pooling, forward and backward.

Shapes: x (N, C, H, W) -> y (N, C, OH, OW) with
OH = floor((H + 2*pad - size) / stride) + 1 (rows the windows never reach are
ignored, as in every framework).  Padding counts as -inf, so a padded cell is
never the maximum.  Ties go to the first position in the window in row-major
order (deterministic on both backends).

Two paths, one contract:
* the general one builds the windows with the strided view of im2col
  (overlapping windows, padding, any stride);
* a fast one for the common non-overlapping case (stride == size, no
  padding): element-wise maxima of the kh*kw strided position views, with
  bool records of where each window's first maximum is.  Tests hold them equal.
"""

from __future__ import annotations

from ..backend import get_array_module
from ..errors import ShapeError
from .. import dispatch
from .im2col import pad_input, pool_geometry, window_view


def _take_max(windows):
    """windows (..., K) -> (max (...), argmax index (...)), first maximum wins."""
    return windows.max(axis=-1), windows.argmax(axis=-1)


@dispatch.op("max_pool2d_forward")
def max_pool2d_forward(x, size=2, stride=None, pad=0):
    """Returns (y (N, C, OH, OW), cache)."""
    if getattr(x, "ndim", None) != 4:
        raise ShapeError(f"max_pool2d needs x of shape (N, C, H, W), got {getattr(x, 'shape', None)}.")
    g = pool_geometry(x.shape, size, stride, pad)  # validates the window and its padding
    kh, kw, sh, sw, ph, pw = g.kh, g.kw, g.sh, g.sw, g.ph, g.pw
    if (sh, sw) == (kh, kw) and ph == 0 and pw == 0:
        return forward_reshape(x, (kh, kw))
    return forward_strided(x, (kh, kw), (sh, sw), (ph, pw))


def _position_views(a, kh, kw, oh, ow):
    """The kh*kw strided views a[:, :, i::kh, j::kw] (cropped to oh x ow), in window order."""
    return [a[:, :, i:i + kh * (oh - 1) + 1:kh, j:j + kw * (ow - 1) + 1:kw] for i in range(kh) for j in range(kw)]


def forward_reshape(x, size):
    """Non-overlapping windows (stride == size, no padding): element-wise maxima of the
    kh*kw strided position views, recording where each window's first maximum is
    (``pool_blocks_forward``) -- no copy of the windows, no arg-max over a tiny axis."""
    kh, kw = size
    n, c, h, w = x.shape
    oh, ow = h // kh, w // kw
    xp = get_array_module(x)
    y = xp.empty((n, c, oh, ow), dtype=x.dtype)
    gt = xp.empty((kh * kw - 1, n, c, oh, ow), dtype=bool)
    pool_blocks_forward(_position_views(x, kh, kw, oh, ow), y, gt)
    return y, (x.shape, x.dtype, gt, (kh, kw), (kh, kw), (0, 0), "reshape")


def forward_strided(x, size, stride, pad):
    """The general path: any stride and padding, windows from the im2col strided view."""
    (kh, kw), (ph, pw) = size, pad
    n, c = x.shape[:2]
    windows = window_view(pad_input(x, ph, pw, value=-float("inf")), kh, kw, *stride)  # (N, OH, OW, C, KH, KW)
    oh, ow = windows.shape[1], windows.shape[2]
    windows = windows.transpose(0, 3, 1, 2, 4, 5).reshape(n, c, oh, ow, kh * kw)
    return _finish(x, windows, size, stride, pad, "strided")


def _finish(x, windows, size, stride, pad, path):
    y, idx = _take_max(windows)
    y = get_array_module(x).ascontiguousarray(y)
    return y, (x.shape, x.dtype, idx, size, stride, pad, path)


def pool_blocks_forward(blocks, out, gt=None):
    """Max over K equally shaped arrays ``blocks`` into ``out``.

    ``gt`` (bool, shape (K-1,) + out.shape), when given, records for k >= 1
    whether block k was strictly greater than the maximum of the blocks before
    it -- enough for the backward pass to find the winner, ties going to the
    first block as in ``xpnet.ops.pool``.  2K-1 element-wise passes in all.
    """
    xp = get_array_module(out)
    if len(blocks) == 1:
        xp.copyto(out, blocks[0])
        return out
    if gt is not None:
        xp.greater(blocks[1], blocks[0], out=gt[0])
    xp.maximum(blocks[0], blocks[1], out=out)
    for k in range(2, len(blocks)):
        if gt is not None:
            xp.greater(blocks[k], out, out=gt[k - 1])
        xp.maximum(out, blocks[k], out=out)
    return out


def pool_blocks_backward(dy, gt, douts, later, mask, fmask, accumulate=False):
    """Route dy to each window's winning block: douts[k] = dy where block k won, else 0.

    Block k won when it beat the blocks before it (gt[k-1]; block 0 trivially)
    and no later block beat it.  ``later``/``mask`` (bool) and ``fmask`` (dy's
    dtype) are scratch arrays of dy's shape.  ``accumulate=True`` adds the routed
    gradient to what douts hold instead of overwriting it.
    """
    xp = get_array_module(dy)
    k_last = len(douts) - 1
    if k_last == 0:
        if accumulate:
            xp.add(douts[0], dy, out=douts[0])
        else:
            xp.copyto(douts[0], dy)
        return douts
    beaten = gt[k_last - 1]  # "a block after k beat the running max": a view until the first OR
    for k in range(k_last, -1, -1):
        if k == k_last:
            won = gt[k_last - 1]
        elif k > 0:
            won = xp.greater(gt[k - 1], beaten, out=mask)  # beat the earlier ones, no later one beat it
            beaten = xp.logical_or(beaten, gt[k - 1], out=later)
        else:
            won = xp.logical_not(beaten, out=mask)
        xp.copyto(fmask, won)  # bool -> float once; a mixed-type multiply is slower
        if accumulate:
            xp.multiply(dy, fmask, out=fmask)
            xp.add(douts[k], fmask, out=douts[k])
        else:
            xp.multiply(dy, fmask, out=douts[k])
    return douts


@dispatch.op("max_pool2d_backward")
def max_pool2d_backward(dy, cache):
    """dx (N, C, H, W): each dy goes to the position that held its window's maximum."""
    x_shape, dtype, idx, (kh, kw), (sh, sw), (ph, pw), path = cache
    n, c, h, w = x_shape
    oh, ow = (idx.shape[3], idx.shape[4]) if path == "reshape" else (idx.shape[2], idx.shape[3])
    if dy.shape != (n, c, oh, ow):
        raise ShapeError(f"max_pool2d_backward got dy of shape {dy.shape}, expected {(n, c, oh, ow)}.")
    xp = get_array_module(dy)
    if path == "reshape":  # idx holds the forward's winner records
        dx = xp.zeros(x_shape, dtype=dtype)  # rows and columns no window reads stay zero
        scratch = (xp.empty(dy.shape, dtype=bool), xp.empty(dy.shape, dtype=bool), xp.empty(dy.shape, dtype=dtype))
        pool_blocks_backward(dy, idx, _position_views(dx, kh, kw, oh, ow), *scratch)
        return dx
    # Scatter by comparison with the window positions (no put_along_axis needed).
    dwin = (idx[..., None] == xp.arange(kh * kw)) * dy[..., None]
    # General path: add each window offset back (windows may overlap).
    hp, wp = h + 2 * ph, w + 2 * pw
    canvas = xp.zeros((n, c, hp, wp), dtype=dtype)
    dwin = dwin.reshape(n, c, oh, ow, kh, kw)
    for i in range(kh):
        for j in range(kw):
            canvas[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += dwin[..., i, j]
    return xp.ascontiguousarray(canvas[:, :, ph:ph + h, pw:pw + w])
