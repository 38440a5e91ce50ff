"""Decode, resize and normalise images: the one policy shared by training and prediction.

A ``Preprocess`` describes how any image file becomes the model's input.  It is
JSON-serialisable (``to_dict``/``from_dict``) so training stores it in the
model file and prediction applies exactly the same steps.

The policy, step by step (``to_array``):

1. **Decode** the first frame.  The pixel count in the header is checked
   against Pillow's ``Image.MAX_IMAGE_PIXELS`` *before* any pixel is decoded:
   a decompression bomb is refused with a ``DataError`` naming the file.
2. **Colour**: every mode becomes RGB (``channels=3``) or L (``channels=1``).
   Transparency is composited onto **white**: RGBA, LA, PA, premultiplied
   RGBa/La, and P or L/RGB images with a ``transparency`` entry.  Mode 1 maps
   to 0/255.  16-bit ``I;16*`` is scaled by 1/257; ``I`` (32-bit integers) is
   taken as 8-bit when its maximum is <= 255 and as 16-bit otherwise (clipped
   to 0..65535, scaled by 1/257); ``F`` (float) is taken as [0, 1] when its
   maximum is <= 1 and as [0, 255] otherwise (clipped).  RGB -> L uses
   Pillow's ITU-R 601-2 luma; L -> RGB repeats the grey channel.  EXIF
   orientation is ignored.
3. **Resize** (``resize``):

   - ``"fit"`` (default): scale by ``min(H/h, W/w)`` keeping the aspect
     ratio, so the whole image fits the (H, W) box, then pad to (H, W),
     centred.  Nothing is ever cropped, so no glyph is lost.  When the image
     has the box's aspect ratio this is exactly "resize to the target height".
   - ``"height"``: scale to the target height keeping the aspect ratio, then
     pad (narrower images) or centre-crop (wider images) to the target width.
     This is the seed's rule; a wide image loses its left and right edges.
   - ``"stretch"``: resize to (H, W) ignoring the aspect ratio.

   Padding uses ``pad``: ``"border"`` (default) is the per-channel median of
   the resized image's outermost ring of pixels -- the background colour of a
   CAPTCHA -- so padding adds no artificial edge; ``"white"`` pads with 255.
   ``resample`` is Pillow's filter (``"bilinear"`` default: antialiased when
   shrinking; the seed used ``"nearest"``).
4. **Array**: uint8, channels first: one image is (C, H, W), a batch
   (N, C, H, W).
5. **Normalise** (``normalize``, a separate step on a batch, on the batch's
   backend): ``"minus_one_one"`` (default, the seed's) maps 0..255 to [-1, 1]
   as ``x * 2/255 - 1``; ``"zero_one"`` maps to [0, 1].  The float dtype is
   xpnet's default (float32) unless given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy
from PIL import Image

from ..backend import get_dtype
from ..checks import integer
from ..errors import DataError, UsageError

RESIZE_POLICIES = ("fit", "height", "stretch")
PAD_MODES = ("border", "white")
NORMALIZATIONS = ("minus_one_one", "zero_one")
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes a (C, H, W) uint8 array and then a float input.

    ``Preprocess()`` is the seed's input: 3 x 32 x 80, values in [-1, 1].
    See the module docstring for the exact policy of each field.
    """

    height: int = 32
    width: int = 80
    channels: int = 3
    resize: str = "fit"
    pad: str = "border"
    resample: str = "bilinear"
    normalize: str = "minus_one_one"

    def __post_init__(self):
        for name in ("height", "width"):
            v = getattr(self, name)
            object.__setattr__(self, name, integer(v, f"preprocess {name}"))
        if self.channels not in (1, 3):
            raise UsageError(f"preprocess channels must be 1 (grey) or 3 (RGB), got {self.channels!r}.")
        object.__setattr__(self, "channels", int(self.channels))
        for name, allowed in (("resize", RESIZE_POLICIES), ("pad", PAD_MODES),
                              ("resample", tuple(RESAMPLE)), ("normalize", NORMALIZATIONS)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"preprocess {name} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model's input shape (C, H, W)."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> "Preprocess":
        """Rebuild from ``to_dict()``; unknown keys or bad values raise a DataError."""
        if not isinstance(d, dict):
            raise DataError(f"a preprocessing description must be a JSON object, got {type(d).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"preprocessing description has unknown keys {unknown}: this file may come "
                            f"from a newer xpnet.")
        try:
            return cls(**d)
        except UsageError as exc:
            raise DataError(f"malformed preprocessing description: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        try:
            d = json.loads(text)
        except (TypeError, ValueError):
            raise DataError(f"malformed preprocessing description {text!r}: not JSON.") from None
        return cls.from_dict(d)

    # -- the steps -----------------------------------------------------------

    def to_array(self, image: Image.Image) -> numpy.ndarray:
        """A decoded PIL image -> (C, H, W) uint8, following the policy above."""
        image = to_mode(image, "RGB" if self.channels == 3 else "L")
        image = self._resize(image)
        arr = numpy.asarray(image, dtype=numpy.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return numpy.ascontiguousarray(arr)

    def _resize(self, image: Image.Image) -> Image.Image:
        H, W = self.height, self.width
        w, h = image.size
        filt = RESAMPLE[self.resample]
        if self.resize == "stretch" or (w, h) == (W, H):
            return image if (w, h) == (W, H) else image.resize((W, H), filt)
        if self.resize == "height":
            scale = H / h
        else:  # fit
            scale = min(H / h, W / w)
        nw = min(max(1, round(w * scale)), W) if self.resize == "fit" else max(1, round(w * scale))
        nh = min(max(1, round(h * scale)), H)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), filt)
        if nw > W:  # only "height": centre-crop
            left = (nw - W) // 2
            image = image.crop((left, 0, left + W, nh))
            nw = W
        if (nw, nh) == (W, H):
            return image
        fill = self._pad_colour(image)
        canvas = Image.new(image.mode, (W, H), fill)
        canvas.paste(image, ((W - nw) // 2, (H - nh) // 2))
        return canvas

    def _pad_colour(self, image: Image.Image):
        if self.pad == "white":
            return 255 if image.mode == "L" else (255, 255, 255)
        a = numpy.asarray(image)
        if a.ndim == 2:
            a = a[..., None]
        ring = numpy.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)  # (k, C)
        med = numpy.median(ring, axis=0).round().astype(int)
        return int(med[0]) if image.mode == "L" else tuple(int(v) for v in med)

    def normalize_batch(self, batch, dtype=None):
        """(N, C, H, W) uint8 -> float (xpnet's dtype unless given), on the batch's backend."""
        return normalize(batch, self.normalize, dtype)


def normalize(batch, how: str = "minus_one_one", dtype=None):
    """A uint8 batch (N, C, H, W) -> floats on the same backend (NumPy or CuPy).

    ``"minus_one_one"``: ``x * 2/255 - 1`` in [-1, 1] (the seed's);
    ``"zero_one"``: ``x / 255``.  ``dtype`` defaults to xpnet's float dtype
    (float32) and is kept: no upcast.
    """
    if getattr(batch, "dtype", None) != numpy.uint8:
        raise DataError(f"normalize expects a uint8 batch, got dtype {getattr(batch, 'dtype', type(batch))}: "
                        f"normalise images once, straight after loading.")
    if how not in NORMALIZATIONS:
        raise UsageError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {how!r}.")
    dtype = numpy.dtype(dtype) if dtype is not None else get_dtype()
    out = batch.astype(dtype)
    if how == "minus_one_one":
        out *= dtype.type(2.0 / 255.0)
        out -= dtype.type(1.0)
    else:
        out *= dtype.type(1.0 / 255.0)
    return out


# --------------------------------------------------------------------------
# Colour conversion


def to_mode(image: Image.Image, target: str) -> Image.Image:
    """Any Pillow mode -> ``"RGB"`` or ``"L"``; transparency composited onto white."""
    if target not in ("RGB", "L"):
        raise UsageError(f"target mode must be 'RGB' or 'L', got {target!r}.")
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
        mode = "L"
    if mode == "La":  # Pillow converts premultiplied La only to LA (not to RGBA, RGB or L)
        image, mode = image.convert("LA"), "LA"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
        mode = "RGB"
    if mode == target:
        return image
    if mode == "1":
        image = image.convert("L")
        return image if target == "L" else image.convert("RGB")
    if mode not in ("RGB", "L"):  # P, CMYK, YCbCr, LAB, HSV, ...
        image = image.convert("RGB")
    return image.convert(target)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    a = numpy.asarray(image)
    mode = image.mode
    if mode == "F":
        a = a.astype(numpy.float64)
        finite = a[numpy.isfinite(a)]
        top = finite.max() if finite.size else 0.0
        a = numpy.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if top <= 1.0:
            a = a * 255.0
        a = numpy.clip(a, 0, 255).round()
    else:
        a = a.astype(numpy.int64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = (numpy.clip(a, 0, 65535) + 128) // 257
        else:
            a = numpy.clip(a, 0, 255)
    return Image.fromarray(a.astype(numpy.uint8), "L")


# --------------------------------------------------------------------------
# Reading files


class ImageProblem(Exception):
    """Why one file cannot be used (internal: callers see a DataError or a report line)."""


def open_image(path) -> Image.Image:
    """Open and fully decode an image file, refusing decompression bombs.

    Any failure (missing, unreadable, zero bytes, not an image, truncated,
    bomb, or whatever a broken decoder raises) becomes a ``DataError``
    naming the file and the reason.  Returns the first frame, decoded.
    """
    try:
        return _decode(os.fspath(path))
    except ImageProblem as exc:
        raise DataError(f"{os.fspath(path)}: {exc}.") from None


def read_image(path, preprocess: Preprocess | None = None) -> numpy.ndarray:
    """One image file -> (C, H, W) uint8 under ``preprocess``; DataError naming the file."""
    try:
        return decode_to_array(os.fspath(path), preprocess or Preprocess())
    except ImageProblem as exc:
        raise DataError(f"{os.fspath(path)}: {exc}.") from None


def read_images(paths, preprocess: Preprocess | None = None) -> numpy.ndarray:
    """Image files -> (N, C, H, W) uint8; the first bad file raises a DataError naming it."""
    pp = preprocess or Preprocess()
    paths = list(paths)
    out = numpy.empty((len(paths),) + pp.shape, dtype=numpy.uint8)
    for n, p in enumerate(paths):
        out[n] = read_image(p, pp)
    return out


def images_to_batch(images, preprocess: Preprocess | None = None) -> numpy.ndarray:
    """PIL images -> (N, C, H, W) uint8 under ``preprocess``."""
    pp = preprocess or Preprocess()
    out = numpy.empty((len(images),) + pp.shape, dtype=numpy.uint8)
    for n, im in enumerate(images):
        out[n] = pp.to_array(im)
    return out


def decode_to_array(name: str, pp: Preprocess) -> numpy.ndarray:
    """Decode + preprocess one file; raises ImageProblem(reason) on any failure."""
    image = _decode(name)
    try:
        return pp.to_array(image)
    except Exception as exc:  # noqa: BLE001 -- a decoded but exotic image
        raise ImageProblem(f"cannot convert the image ({_reason(exc)})") from None


def _decode(name: str) -> Image.Image:
    try:
        size = os.path.getsize(name)
    except OSError as exc:
        raise ImageProblem(f"cannot read the file ({_reason(exc)})") from None
    if size == 0:
        raise ImageProblem("the file is empty (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        fh = open(name, "rb")
    except OSError as exc:  # permissions, a folder, a vanished file: the bytes were never seen
        raise ImageProblem(f"cannot read the file ({_reason(exc)})") from None
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we refuse
            # at the limit ourselves, before decoding, so its warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with fh:
                image = Image.open(fh)
                w, h = image.size
                if limit is not None and w * h > limit:
                    raise ImageProblem(
                        f"refused, {w}x{h} = {w * h} pixels is more than Pillow's limit of {limit} "
                        f"(a possible decompression bomb); raise PIL.Image.MAX_IMAGE_PIXELS if the image "
                        f"is genuine")
                if w < 1 or h < 1:
                    raise ImageProblem(f"the image has no pixels ({w}x{h})")
                image.seek(0)
                image.load()
                return image
    except ImageProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageProblem(f"refused as a possible decompression bomb ({exc})") from None
    except MemoryError:
        raise ImageProblem("not enough memory to decode this image") from None
    except Exception as exc:  # noqa: BLE001 -- decoders of hostile bytes raise anything
        raise ImageProblem(f"cannot decode the image ({_reason(exc)})") from None


def image_size(name: str) -> tuple[int, int] | None:
    """(width, height) from the header only (nothing decoded), or None when unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(name) as image:
                return image.size
    except Exception:  # noqa: BLE001 -- reported later, when the file is decoded
        return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError) or "cannot identify image file" in str(exc):
        return "not an image file Pillow can read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "no such file, or a broken link"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(exc, OSError) and "truncated" in str(exc):
        return "the file is truncated"
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"
