"""Synthetic look-alikes of a labelled folder: text CAPTCHAs drawn with local fonts in the folder's
charset, lengths, aspect ratio and grey levels, to pretrain a reader before it sees a small real set.

A ``Style`` says how images are drawn (plain data, kept in ``run.json``)::

    style = style_of(folder_data)          # grey levels and aspect from the images
    data = lookalikes(20000, seed=0, charset=cs, preprocess=pp, style=style)

Each image is drawn by its own generator (``image_rng(seed, index)``), so a seed gives the
same images whatever else runs.  Per character: a font from ``style.fonts`` (the local
TrueType fonts, and the ``captcha`` package's own), a size, a rotation and a vertical
offset; the characters are spaced over the width with jitter and may touch.  Then, each with
its own probability: noise lines through the text, dots, a blur.  A share of the images
(``style.captcha_share``) comes from the ``captcha`` package's renderer instead, for variety.

Fonts are read from the machine (``local_fonts``): another machine with other fonts draws
other images from the same seed; ``run.json`` records the fonts a run used.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..errors import DataError, UsageError
from .folder import LabelledImages
from .images import Preprocess
from .labels import Charset

FONT_FOLDERS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")


def local_fonts() -> list[str]:
    """TrueType/OpenType fonts found on this machine (sorted), plus the ``captcha`` package's own.

    Symbol and emoji fonts are left out (they draw no letters).
    """
    found = []
    for folder in FONT_FOLDERS + (os.path.expanduser("~/.fonts"),):
        found += glob.glob(os.path.join(folder, "**", "*.[ot]tf"), recursive=True)
    found = [f for f in found if not any(w in os.path.basename(f).lower() for w in ("symbol", "emoji", "math",
                                                                                    "dingbat", "awesome"))]
    try:
        import captcha

        own = os.path.join(os.path.dirname(captcha.__file__), "data", "DroidSansMono.ttf")
        if os.path.isfile(own):
            found.append(own)
    except ImportError:
        pass
    return sorted(set(found))


@dataclasses.dataclass(frozen=True)
class Style:
    """How look-alikes are drawn.

    width, height   the drawing canvas (pixels): the folder's aspect ratio
    background      (low, high) grey level of the background, 0..255
    ink             (low, high) grey level of the characters
    fonts           font files; each character draws one
    size            (low, high) glyph height as a fraction of the canvas height
    rotation        largest rotation of a glyph, degrees
    spacing         (low, high) advance between glyphs as a fraction of their width (< 1: they touch)
    lines           (probability, most): noise lines through the text
    dots            (probability, density): noise dots, density = fraction of pixels
    blur            (probability, largest radius in pixels)
    captcha_share   fraction of images drawn by the ``captcha`` package instead
    """

    width: int = 160
    height: int = 60
    background: tuple = (200, 255)
    ink: tuple = (0, 90)
    fonts: tuple = ()
    size: tuple = (0.55, 0.85)
    rotation: float = 15.0
    spacing: tuple = (0.75, 1.05)
    lines: tuple = (0.5, 2)
    dots: tuple = (0.5, 0.02)
    blur: tuple = (0.3, 1.0)
    captcha_share: float = 0.2

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Style":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise UsageError(f"unknown look-alike style keys {unknown}: use {sorted(fields)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def style_of(data: LabelledImages, fonts=None, sample: int = 500) -> Style:
    """A ``Style`` matched to a folder's images: its aspect ratio and its background and ink grey levels.

    Grey levels come from the images as loaded (uint8 (N, C, H, W)): the background from the
    brighter half of each image's pixels (or the darker one for light text on dark), the ink
    from the 5th percentile on the other side.
    """
    if len(data) == 0:
        raise DataError("cannot match a style to no images.")
    fonts = tuple(local_fonts() if fonts is None else fonts)
    if not fonts:
        raise DataError("no TrueType font found on this machine to draw look-alikes: install a font package "
                        "(e.g. fonts-dejavu) or the captcha package.")
    x = data.images[:sample].astype(numpy.float64).mean(axis=1)  # (N, H, W) grey
    flat = x.reshape(len(x), -1)
    median = numpy.median(flat, axis=1)
    light_background = numpy.mean(median) >= 128
    if light_background:
        bg = numpy.percentile(flat, 75, axis=1)
        ink = numpy.percentile(flat, 3, axis=1)
    else:
        bg = numpy.percentile(flat, 25, axis=1)
        ink = numpy.percentile(flat, 97, axis=1)

    def spread(v):
        lo, hi = numpy.percentile(v, 5), numpy.percentile(v, 95)
        return (int(max(0, lo - 10)), int(min(255, hi + 10)))

    h, w = data.preprocess.height, data.preprocess.width
    scale = max(1.0, 64.0 / h)  # draw at a height of at least 64 pixels, then let the preprocessing shrink it
    return Style(width=int(round(w * scale)), height=int(round(h * scale)), background=spread(bg), ink=spread(ink),
                 fonts=fonts)


def draw(text: str, rng, style: Style) -> Image.Image:
    """One grey (mode L) look-alike of ``text`` drawn with the random generator ``rng``
    (a ``random.Random``), as ``style`` says."""
    if not style.fonts:
        raise DataError("the look-alike style has no fonts.")
    w, h = style.width, style.height
    bg = rng.randint(*style.background)
    ink_lo, ink_hi = style.ink
    canvas = Image.new("L", (w, h), bg)
    glyphs = []
    for c in text:
        font = ImageFont.truetype(style.fonts[rng.randrange(len(style.fonts))],
                                  max(8, int(h * rng.uniform(*style.size))))
        left, top, right, bottom = font.getbbox(c)
        gw, gh = max(1, right - left), max(1, bottom - top)
        mask = Image.new("L", (gw + 4, gh + 4), 0)
        ImageDraw.Draw(mask).text((2 - left, 2 - top), c, fill=255, font=font)
        mask = mask.rotate(rng.uniform(-style.rotation, style.rotation), resample=Image.BILINEAR, expand=True)
        glyphs.append(mask)
    advances = [g.width * rng.uniform(*style.spacing) for g in glyphs]
    total = sum(advances[:-1]) + glyphs[-1].width if glyphs else 0
    fit = min(1.0, (w * 0.92) / max(1.0, total))  # squeeze a long text into the canvas
    x = (w - total * fit) / 2 + rng.uniform(-0.04, 0.04) * w
    for g, adv in zip(glyphs, advances):
        if fit < 1.0:
            g = g.resize((max(1, int(g.width * fit)), max(1, int(g.height * fit))), Image.BILINEAR)
        y = (h - g.height) / 2 + rng.uniform(-0.12, 0.12) * h
        ink = Image.new("L", g.size, rng.randint(min(ink_lo, ink_hi), max(ink_lo, ink_hi)))
        canvas.paste(ink, (int(x), int(y)), g)
        x += adv * fit
    pen = ImageDraw.Draw(canvas)
    p_lines, most_lines = style.lines
    if most_lines and rng.random() < p_lines:
        for _ in range(rng.randint(1, int(most_lines))):
            points = [(rng.uniform(0, w * 0.3), rng.uniform(0.2, 0.8) * h),
                      (rng.uniform(w * 0.7, w), rng.uniform(0.2, 0.8) * h)]
            pen.line(points, fill=rng.randint(min(ink_lo, ink_hi), max(ink_lo, ink_hi)),
                     width=rng.randint(1, max(1, h // 25)))
    p_dots, density = style.dots
    if density and rng.random() < p_dots:
        for _ in range(int(w * h * density * rng.random())):
            pen.point((rng.randrange(w), rng.randrange(h)), fill=rng.randint(0, 255))
    p_blur, radius = style.blur
    if radius and rng.random() < p_blur:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, radius)))
    return canvas


def lookalikes(count: int, seed: int, charset: Charset, preprocess: Preprocess, style: Style,
               start: int = 0) -> LabelledImages:
    """Images ``start .. start+count-1`` of ``seed``: ``(N, C, H, W)`` uint8 under ``preprocess``.

    Texts draw their length uniformly from the charset's range and their characters
    uniformly from its characters, as ``xpnet.data.captcha`` does.
    """
    from .captcha import _SECRETS, _renderer, draw_text, image_rng

    count = int(count)
    if count < 1:
        raise UsageError(f"the number of look-alikes must be at least 1, got {count}.")
    images = numpy.empty((count,) + preprocess.shape, dtype=numpy.uint8)
    labels = []
    for j in range(count):
        rng = image_rng(seed, start + j)
        text = draw_text(rng, charset)
        if rng.random() < style.captcha_share:
            with _SECRETS.seeded(rng):
                image = _renderer().generate_image(text)
        else:
            image = draw(text, rng, style)
        images[j] = preprocess.to_array(image)
        labels.append(text)
    return LabelledImages(images=images, labels=labels, charset=charset, preprocess=preprocess,
                          paths=[""] * count, meta={"generator": "lookalike", "seed": int(seed),
                                                    "style": style.to_dict()})


__all__ = ["Style", "style_of", "draw", "lookalikes", "local_fonts"]
