"""Batch augmentation, vectorised over the batch (no Python loop over samples), on either backend.

    x = random_shift(x, max_shift=2)      # x (N, C, H, W): each image moved by its own (dy, dx)

Random offsets are drawn on the host from ``xpnet.backend.rng()`` by default,
so the same seed gives the same augmentation on NumPy and CuPy, and a training
checkpoint (which saves that generator's state) resumes it exactly.
"""

from __future__ import annotations

import numpy

from .. import backend
from ..errors import ShapeError, UsageError


def random_shift(x, max_shift: int = 2, rng=None, fill=0):
    """Shift each image of x (N, C, H, W) by integers dy, dx drawn uniformly from [-max_shift, max_shift].

    Pixels shifted in are ``fill``.  Returns a new array of x's shape, dtype and
    backend.  Cost: one padded copy and one gather of N*C*H*W elements (the
    windows are a strided view of the padded batch).
    """
    if getattr(x, "ndim", None) != 4:
        raise ShapeError(f"random_shift needs images of shape (N, C, H, W), got {getattr(x, 'shape', None)}.")
    s = int(max_shift)
    if s < 0:
        raise UsageError(f"max_shift must be >= 0, got {max_shift}.")
    n, c, h, w = x.shape
    if s == 0 or n == 0:
        return x.copy()
    rng = rng if rng is not None else backend.rng()
    offsets = rng.integers(0, 2 * s + 1, size=(2, n))  # crop start in the padded image; s = no shift
    xp = backend.get_array_module(x)
    padded = xp.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), mode="constant", constant_values=fill)
    sn, sc, sh, sw = padded.strides
    # windows[n, c, i, j] is the H x W crop starting at row i, column j of the padded image.
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(n, c, 2 * s + 1, 2 * s + 1, h, w), strides=(sn, sc, sh, sw, sh, sw))
    if xp is not numpy:
        offsets = xp.asarray(offsets)
    rows = xp.arange(n)[:, None]
    chans = xp.arange(c)[None, :]
    # A crop starting at row i moves the content down by s - i rows (uniform in [-s, s]).
    return windows[rows, chans, offsets[0][:, None], offsets[1][:, None]]


__all__ = ["random_shift"]
