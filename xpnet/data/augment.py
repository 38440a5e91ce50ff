"""Vectorised data augmentation on a batch (N, C, H, W), NumPy or CuPy, uint8 or float.

Each image gets its own random translation (whole pixels, up to ``max_shift``
in each direction) and, optionally, its own scale factor in
``[1 - max_scale, 1 + max_scale]`` about the image centre.  The random numbers
come from a seeded NumPy ``Generator`` on the host (N draws per call, cheap), so
the same generator state gives the same batch on either backend.  There is no
Python loop over the batch: scaling is a nearest-neighbour gather of rows then
columns, and a shift-only call takes a faster path -- a strided view of the
padded batch indexed once per image.

Pixels that come from outside the image are filled by ``fill``: ``"edge"``
(default) repeats the border pixel -- for a CAPTCHA, its background -- and a
number fills with that value (e.g. 255 for white on a uint8 batch).

    aug = Augment(max_shift=3, max_scale=0.1)
    batch = aug(batch, rng)            # rng = numpy.random.default_rng(seed)
"""

from __future__ import annotations

import dataclasses

import numpy

from ..backend import get_array_module
from ..checks import integer
from ..errors import ShapeError, UsageError


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random per-image shifts (and scales); call it on a batch with a NumPy Generator."""

    max_shift: int = 2
    max_scale: float = 0.0
    fill: object = "edge"

    def __post_init__(self):
        integer(self.max_shift, "max_shift", 0, what="a non-negative integer")
        if not 0.0 <= float(self.max_scale) < 1.0:
            raise UsageError(f"max_scale must be in [0, 1), got {self.max_scale!r}.")
        if self.fill != "edge" and not isinstance(self.fill, (int, float, numpy.number)):
            raise UsageError(f"fill must be 'edge' or a number, got {self.fill!r}.")

    def __call__(self, batch, rng: numpy.random.Generator):
        return augment(batch, rng, self.max_shift, self.max_scale, self.fill)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def augment(batch, rng: numpy.random.Generator, max_shift: int = 2, max_scale: float = 0.0, fill="edge"):
    """(N, C, H, W) -> a new batch of the same shape, dtype and backend, randomly moved per image.

    Draws, in this order: dy (N,), dx (N,) integers in [-max_shift, max_shift],
    then (when ``max_scale > 0``) the scales (N,) uniform in [1 - max_scale, 1 + max_scale].
    """
    if getattr(batch, "ndim", None) != 4:
        raise ShapeError(f"augment expects a batch (N, C, H, W), got shape {getattr(batch, 'shape', None)}.")
    k = int(max_shift)
    n = batch.shape[0]
    dy = rng.integers(-k, k + 1, size=n) if k else numpy.zeros(n, numpy.int64)
    dx = rng.integers(-k, k + 1, size=n) if k else numpy.zeros(n, numpy.int64)
    if max_scale:
        scale = rng.uniform(1.0 - max_scale, 1.0 + max_scale, size=n)
        return warp(batch, dy, dx, scale, fill)
    return shift(batch, dy, dx, fill)


def shift(batch, dy, dx, fill="edge"):
    """Translate image n by (dy[n], dx[n]) whole pixels: out[n, c, i, j] = batch[n, c, i - dy, j - dx].

    Positive dy moves the content down, positive dx to the right.  Fast path:
    pad by the largest shift, take a strided (N, C, 2k+1, 2k+1, H, W) view of
    every window, and pick one window per image.
    """
    xp = get_array_module(batch)
    dy = numpy.asarray(dy, dtype=numpy.int64)
    dx = numpy.asarray(dx, dtype=numpy.int64)
    n, c, h, w = batch.shape
    k = int(max(numpy.abs(dy).max(initial=0), numpy.abs(dx).max(initial=0)))
    if k == 0:
        return batch.copy()
    if fill == "edge":
        padded = xp.pad(batch, ((0, 0), (0, 0), (k, k), (k, k)), mode="edge")
    else:
        padded = xp.pad(batch, ((0, 0), (0, 0), (k, k), (k, k)), mode="constant",
                        constant_values=_fill_value(fill, batch.dtype))
    s = padded.strides
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(n, c, 2 * k + 1, 2 * k + 1, h, w), strides=(s[0], s[1], s[2], s[3], s[2], s[3]))
    # window (a, b) starts at padded row a, i.e. original row a - k: content moved by k - a.
    rows = xp.asarray(k - dy)
    cols = xp.asarray(k - dx)
    return windows[xp.arange(n), :, rows, cols]


def warp(batch, dy, dx, scale, fill="edge"):
    """Scale image n by scale[n] about its centre, then translate by (dy[n], dx[n]); nearest neighbour.

    out[n, c, i, j] = batch[n, c, src_i, src_j] with
    src_i = round((i - dy - cy) / scale + cy), cy = (H - 1) / 2 (and likewise j);
    sources outside the image take ``fill``.  Two gathers (rows, then columns), no loop over the batch.
    """
    xp = get_array_module(batch)
    n, c, h, w = batch.shape
    dy = numpy.asarray(dy, dtype=numpy.float64)[:, None]
    dx = numpy.asarray(dx, dtype=numpy.float64)[:, None]
    scale = numpy.asarray(scale, dtype=numpy.float64)[:, None]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    src_r = numpy.floor((numpy.arange(h)[None, :] - dy - cy) / scale + cy + 0.5).astype(numpy.int64)  # (N, H)
    src_c = numpy.floor((numpy.arange(w)[None, :] - dx - cx) / scale + cx + 0.5).astype(numpy.int64)  # (N, W)
    in_r = (src_r >= 0) & (src_r < h)
    in_c = (src_c >= 0) & (src_c < w)
    rows = xp.asarray(numpy.clip(src_r, 0, h - 1))
    cols = xp.asarray(numpy.clip(src_c, 0, w - 1))
    first = xp.arange(n)[:, None]
    # Separable: gather whole rows (runs of W), then columns: far fewer index computations
    # than one 4-index gather.
    tmp = batch[first, :, rows]                          # (N, H, C, W)
    tmp = tmp.transpose(0, 3, 1, 2)[first, cols]         # (N, W, H, C)
    out = xp.ascontiguousarray(tmp.transpose(0, 3, 2, 1))  # (N, C, H, W)
    if fill != "edge" and not (in_r.all() and in_c.all()):
        inside = xp.asarray(in_r[:, None, :, None] & in_c[:, None, None, :])
        out = xp.where(inside, out, xp.asarray(_fill_value(fill, batch.dtype), dtype=batch.dtype))
    return out


def _fill_value(fill, dtype):
    value = float(fill)
    if numpy.dtype(dtype).kind in "iu":
        info = numpy.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise UsageError(f"fill {fill} does not fit the batch's dtype {numpy.dtype(dtype).name}.")
        return int(value)
    return value
