"""Stronger augmentation for small labelled folders, on a batch (N, C, H, W), NumPy or CuPy.

Geometric, one gather per batch: each image gets its own rotation (degrees,
uniform in +-``rotate``), horizontal shear (uniform in +-``shear``: a row moves
by shear * its distance from the centre) and elastic warp (a coarse 3x5 grid of
offsets drawn N(0, ``elastic``) pixels, interpolated bilinearly over the image),
sampled nearest-neighbour with the border pixel (the background) outside.
Photometric, in float: contrast (a factor uniform in 1 +- ``contrast`` about the
image's mean), Gaussian noise (its standard deviation uniform in [0, ``noise``],
in the batch's units: 0-255 for uint8), and a 3x3 binomial blur of each image
with probability ``blur``.  The result has the batch's dtype (uint8 rounded and
clipped to 0-255).

Random numbers come from the host Generator (a few per image, and the noise
field), so a generator state gives the same batch on either backend; the index
grids and pixel work run on the batch's device.  No loop over the batch.

    d = Distort(rotate=5, shear=0.2, elastic=1.0, noise=8, blur=0.3, contrast=0.3)
    batch = d(batch, rng)
"""

from __future__ import annotations

import dataclasses
import math

import numpy

from ..backend import get_array_module
from ..errors import ShapeError, UsageError

ELASTIC_GRID = (3, 5)  # coarse offsets per image (rows, columns): smooth warps of glyph-sized features


@dataclasses.dataclass(frozen=True)
class Distort:
    """Random per-image geometric and photometric distortions; call it on a batch with a Generator."""

    rotate: float = 0.0
    shear: float = 0.0
    elastic: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        for name in ("rotate", "shear", "elastic", "noise", "contrast"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise UsageError(f"distort {name} must be a number >= 0, got {value!r}.")
        if not 0.0 <= float(self.blur) <= 1.0:
            raise UsageError(f"distort blur is a probability in [0, 1], got {self.blur!r}.")
        if self.contrast >= 1.0:
            raise UsageError(f"distort contrast must be below 1 (a factor in 1 +- contrast), got {self.contrast!r}.")

    @classmethod
    def from_dict(cls, values: dict | None) -> "Distort":
        """From settings' ``distort`` dict; unknown keys are refused with the known ones named."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown distort setting(s) {', '.join(unknown)}: use {', '.join(sorted(known))}.")
        return cls(**values)

    @property
    def active(self) -> bool:
        return any(dataclasses.astuple(self))

    def __call__(self, batch, rng: numpy.random.Generator):
        return distort(batch, rng, **dataclasses.asdict(self))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def distort(batch, rng: numpy.random.Generator, rotate=0.0, shear=0.0, elastic=0.0, noise=0.0, blur=0.0,
            contrast=0.0):
    """(N, C, H, W) -> a new batch of the same shape, dtype and backend (see the module docstring).

    Draws, in this order and each only when its setting is above zero: angles (N,),
    shears (N,), elastic offsets (N, 2, 3, 5), contrast factors (N,), noise levels (N,)
    and the noise field (N, C, H, W), blur choices (N,).
    """
    if getattr(batch, "ndim", None) != 4:
        raise ShapeError(f"distort expects a batch (N, C, H, W), got shape {getattr(batch, 'shape', None)}.")
    n, c, h, w = batch.shape
    angle = numpy.radians(rng.uniform(-rotate, rotate, n)) if rotate else None
    shears = rng.uniform(-shear, shear, n) if shear else None
    offsets = rng.normal(0.0, elastic, (n, 2) + ELASTIC_GRID) if elastic else None
    factors = rng.uniform(1.0 - contrast, 1.0 + contrast, n) if contrast else None
    field = None
    if noise:
        levels = rng.uniform(0.0, noise, n)
        field = rng.standard_normal((n, c, h, w), dtype=numpy.float32) * levels[:, None, None, None].astype(
            numpy.float32)
    blurred = rng.random(n) < blur if blur else None
    out = batch
    if angle is not None or shears is not None or offsets is not None:
        out = resample(out, angle, shears, offsets)
    if factors is not None or field is not None or blurred is not None:
        out = photometric(out, factors, field, blurred)
    return out.copy() if out is batch else out


def resample(batch, angle=None, shears=None, offsets=None):
    """Each output pixel p of image n reads the source pixel nearest to q(p), border pixels outside.

    With (i, j) the pixel's offset from the image centre: rotate by -angle[n], undo the
    shear (j -= shears[n] * i), add the elastic offsets interpolated at the pixel.
    angle, shears (N,) or None; offsets (N, 2, gh, gw) pixels (row, column) or None.
    """
    xp = get_array_module(batch)
    n, c, h, w = batch.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    i = xp.arange(h, dtype=xp.float64)[None, :, None] - cy  # (1, H, 1)
    j = xp.arange(w, dtype=xp.float64)[None, None, :] - cx  # (1, 1, W)
    if angle is not None:
        cos = xp.asarray(numpy.cos(angle))[:, None, None]
        sin = xp.asarray(numpy.sin(angle))[:, None, None]
        src_i, src_j = cos * i + sin * j, cos * j - sin * i  # (N, H, W)
    else:
        src_i, src_j = xp.broadcast_to(i, (n, h, w)), xp.broadcast_to(j, (n, h, w))
    if shears is not None:
        src_j = src_j - xp.asarray(shears)[:, None, None] * src_i
    if offsets is not None:
        ry, rx = _interpolation(h, offsets.shape[2]), _interpolation(w, offsets.shape[3])
        disp = xp.einsum("hy,ndyx,wx->ndhw", xp.asarray(ry), xp.asarray(offsets), xp.asarray(rx))
        src_i, src_j = src_i + disp[:, 0], src_j + disp[:, 1]
    rows = xp.clip(xp.floor(src_i + cy + 0.5), 0, h - 1).astype(xp.int32)
    cols = xp.clip(xp.floor(src_j + cx + 0.5), 0, w - 1).astype(xp.int32)
    first = xp.arange(n, dtype=xp.int32)[:, None, None]
    picked = batch.transpose(0, 2, 3, 1)[first, rows, cols]  # (N, H, W, C)
    return xp.ascontiguousarray(picked.transpose(0, 3, 1, 2))


def _interpolation(size: int, points: int):
    """(size, points) linear-interpolation weights from ``points`` evenly spaced knots to ``size`` pixels."""
    pos = numpy.linspace(0.0, points - 1.0, size)
    lo = numpy.minimum(numpy.floor(pos).astype(numpy.int64), points - 2) if points > 1 else numpy.zeros(size, int)
    frac = pos - lo
    m = numpy.zeros((size, points))
    m[numpy.arange(size), lo] = 1.0 - frac if points > 1 else 1.0
    if points > 1:
        m[numpy.arange(size), lo + 1] = frac
    return m


def photometric(batch, factors=None, field=None, blurred=None):
    """Contrast about each image's mean (factors (N,)), then + field (N, C, H, W), then a 3x3
    binomial blur where blurred (N,) bool; computed in float32 (float64 batches in float64)."""
    xp = get_array_module(batch)
    kind = batch.dtype.kind
    work = batch.dtype if kind == "f" else numpy.dtype(numpy.float32)
    x = batch.astype(work)
    if factors is not None:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * xp.asarray(factors.astype(work))[:, None, None, None] + mean
    if field is not None:
        x = x + xp.asarray(field.astype(work, copy=False))
    if blurred is not None and blurred.any():
        x = xp.where(xp.asarray(blurred)[:, None, None, None], _binomial_blur(x), x)
    if kind == "f":
        return x
    info = numpy.iinfo(batch.dtype)
    return xp.clip(xp.rint(x), info.min, info.max).astype(batch.dtype)


def _binomial_blur(x):
    """(N, C, H, W) blurred by [1, 2, 1] / 4 along each axis, edges repeated."""
    xp = get_array_module(x)
    p = xp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
    x = (p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]) * 0.25
    p = xp.pad(x, ((0, 0), (0, 0), (0, 0), (1, 1)), mode="edge")
    return (p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]) * 0.25


def parse_distort(text: str, option: str = "--distort") -> dict:
    """``"rotate=4,shear=0.2"`` -> {"rotate": 4.0, "shear": 0.2}; ``"none"`` -> {} (checked: UsageError)."""
    text = str(text).strip()
    if text.lower() in ("none", "off", "0", ""):
        return {}
    values = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            values[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"{option} takes name=value pairs separated by commas (e.g. rotate=4,noise=6) "
                             f"or none, got {text!r}.") from None
    Distort.from_dict(values)  # names and ranges
    return values
