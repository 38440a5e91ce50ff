"""Labelled CAPTCHA folders in styles xpnet's own generators never draw, for honest small-folder figures.

Only one real labelled set is at hand (really_simple_4char: plain serif text on white).  These folders
stand in for the harder public sets users bring, each modelled on a published description, and drawn
with fonts that neither the ``captcha`` package nor the look-alike pretraining (which reads the fonts
installed under /usr/share/fonts) ever use: give them a folder of such fonts with ``--fonts``, for
example the Debian packages fonts-urw-base35, fonts-freefont-ttf and fonts-comic-neue unpacked with
``dpkg -x`` into a folder of their own (not installed, so the look-alikes cannot see them).

Styles (``--style``):

  lines5    5 characters of 19 (``2345678bcdefgmnpwxy``), 200x50 RGBA, one bold serif font, the glyphs
            close together and bobbing, a thick curved stroke through the text in the ink's grey, blur
  loops4    4 digits, 240x80 palette PNG, a cursive font with a heavy stroke, glyphs overlapping and
            tilted, one wavy line through them in the ink's colour; numbered files plus ``labels.csv``
            (``file,label``), the layout of most public sets
  mixed46   4 to 6 characters of upper-case letters and digits, 180x60 JPEG (quality 70), a font per
            glyph from a sans, a geometric and a typewriter face, colour gradients, arcs and dots

Every image is a function of (style, seed, index), so a folder is remade exactly from its command::

    python benchmarks/style_folders.py --fonts FONTS --style lines5 --count 1040 --seed 1 --out DIR

The folders are meant to be split 80/20 by ``xpnet train --data`` (its own seeded test split).
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import random
import sys

from PIL import Image, ImageDraw, ImageFilter, ImageFont

STYLES = ("lines5", "loops4", "mixed46")

# (font file names, tried in order; the first found is used) per role
FONT_ROLES = {
    "serif_bold": ("P052-Bold.otf", "C059-Bold.otf", "FreeSerifBold.ttf"),
    "cursive": ("Z003-MediumItalic.otf", "ComicNeue-BoldItalic.otf", "FreeSerifBoldItalic.ttf"),
    "sans": ("FreeSansBold.ttf", "NimbusSans-Bold.otf"),
    "geometric": ("URWGothic-Demi.otf", "NimbusSansNarrow-Bold.otf"),
    "typewriter": ("NimbusMonoPS-Bold.otf", "FreeMonoBold.ttf"),
}


def find_fonts(folder: str) -> dict[str, str]:
    """Role -> font path found under ``folder`` (recursively); exits with one sentence if a role has none."""
    files = {os.path.basename(p): p for p in glob.glob(os.path.join(folder, "**", "*.[ot]tf"), recursive=True)}
    fonts = {}
    for role, names in FONT_ROLES.items():
        hit = next((files[n] for n in names if n in files), None)
        if hit is None:
            sys.exit(f"style_folders: no font for '{role}' under {folder} (wanted one of {', '.join(names)}).")
        fonts[role] = hit
    return fonts


def glyph_mask(char: str, font: ImageFont.FreeTypeFont, angle: float, stroke: int = 0) -> Image.Image:
    """A mode-L mask of one character, rotated by ``angle`` degrees, cropped to its ink."""
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    mask = Image.new("L", (right - left + 6, bottom - top + 6), 0)
    ImageDraw.Draw(mask).text((3 - left, 3 - top), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    mask = mask.rotate(angle, resample=Image.BICUBIC, expand=True)
    return mask.crop(mask.getbbox() or (0, 0, 1, 1))


def place(canvas: Image.Image, masks: list, ink, rng: random.Random, advance: tuple, bob: float) -> list:
    """Paste ``masks`` left to right in ``ink`` (a colour or one per glyph), each advanced by a fraction of
    its width drawn from ``advance`` (< 1: glyphs overlap), centred with a vertical bob of +-``bob`` of
    the height.  Returns the glyph centres (x, y)."""
    w, h = canvas.size
    steps = [m.width * rng.uniform(*advance) for m in masks]
    total = sum(steps[:-1]) + masks[-1].width
    x = (w - total) / 2 + rng.uniform(-0.03, 0.03) * w
    centres = []
    for i, (m, step) in enumerate(zip(masks, steps)):
        y = (h - m.height) / 2 + rng.uniform(-bob, bob) * h
        colour = ink[i] if isinstance(ink, list) else ink
        canvas.paste(Image.new(canvas.mode, m.size, colour), (int(x), int(y)), m)
        centres.append((x + m.width / 2, y + m.height / 2))
        x += step
    return centres


def wave(w: int, h: int, rng: random.Random, amplitude: float, through: float = 0.5) -> list:
    """Points of a sine-like curve across the width at about ``through`` of the height."""
    phase, cycles = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.2)
    mid, slope = through * h + rng.uniform(-0.08, 0.08) * h, rng.uniform(-0.15, 0.15) * h
    return [(x, mid + slope * (x / w - 0.5) + amplitude * h * math.sin(phase + 2 * math.pi * cycles * x / w))
            for x in range(-4, w + 5, 4)]


def lines5(text: str, rng: random.Random, fonts: dict) -> Image.Image:
    w, h = 200, 50
    bg = rng.randint(225, 250)
    ink = rng.randint(70, 115)
    canvas = Image.new("L", (w, h), bg)
    font = ImageFont.truetype(fonts["serif_bold"], rng.randint(34, 40))
    masks = [glyph_mask(c, font, rng.uniform(-8, 8)) for c in text]
    place(canvas, masks, ink, rng, advance=(0.78, 0.98), bob=0.08)
    ImageDraw.Draw(canvas).line(wave(w, h, rng, 0.08, through=rng.uniform(0.45, 0.6)), fill=ink,
                                width=rng.randint(2, 3))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.1)))
    alpha = Image.new("L", (w, h), 255)
    return Image.merge("RGBA", (canvas, canvas, canvas, alpha))


def loops4(text: str, rng: random.Random, fonts: dict) -> Image.Image:
    w, h = 240, 80
    bg = tuple(rng.randint(190, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 110) for _ in range(3))
    canvas = Image.new("RGB", (w, h), bg)
    font = ImageFont.truetype(fonts["cursive"], rng.randint(58, 68))
    masks = [glyph_mask(c, font, rng.uniform(-20, 20), stroke=rng.randint(1, 2)) for c in text]
    place(canvas, masks, ink, rng, advance=(0.62, 0.82), bob=0.1)
    ImageDraw.Draw(canvas).line(wave(w, h, rng, 0.12), fill=ink, width=rng.randint(2, 4))
    return canvas.quantize(colors=16)


def mixed46(text: str, rng: random.Random, fonts: dict) -> Image.Image:
    w, h = 180, 60
    top = [rng.randint(170, 255) for _ in range(3)]
    bottom = [rng.randint(170, 255) for _ in range(3)]
    canvas = Image.new("RGB", (w, h))
    pen = ImageDraw.Draw(canvas)
    for y in range(h):  # vertical colour gradient
        t = y / (h - 1)
        pen.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(2, 4)):  # arcs behind the text
        x0, y0 = rng.uniform(-40, w - 20), rng.uniform(-30, h - 10)
        pen.arc([x0, y0, x0 + rng.uniform(40, 120), y0 + rng.uniform(30, 70)], rng.uniform(0, 360),
                rng.uniform(0, 360), fill=tuple(rng.randint(60, 200) for _ in range(3)), width=2)
    roles = ("sans", "geometric", "typewriter")
    size = rng.randint(30, 36) if len(text) < 6 else rng.randint(26, 31)
    masks = [glyph_mask(c, ImageFont.truetype(fonts[rng.choice(roles)], size), rng.uniform(-15, 15)) for c in text]
    inks = [tuple(rng.randint(0, 120) for _ in range(3)) for _ in text]
    place(canvas, masks, inks, rng, advance=(0.85, 1.05), bob=0.12)
    for _ in range(int(w * h * 0.03)):  # coloured dots over everything
        pen.point((rng.randrange(w), rng.randrange(h)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return canvas


DRAW = {"lines5": lines5, "loops4": loops4, "mixed46": mixed46}
CHARSETS = {"lines5": "2345678bcdefgmnpwxy", "loops4": "0123456789",
            "mixed46": "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"}
LENGTHS = {"lines5": (5, 5), "loops4": (4, 4), "mixed46": (4, 6)}


def write_folder(style: str, count: int, seed: int, out: str, fonts: dict) -> None:
    """Write ``count`` images of ``style`` into ``out`` (which must not hold images already)."""
    os.makedirs(out, exist_ok=True)
    if any(n.lower().endswith((".png", ".jpg")) for n in os.listdir(out)):
        sys.exit(f"style_folders: {out} already holds images: choose an empty folder.")
    chars, (lo, hi) = CHARSETS[style], LENGTHS[style]
    rows = []
    for i in range(count):
        rng = random.Random(f"{style}/{seed}/{i}")  # str seeds hash with SHA-512: the same on every machine
        text = "".join(rng.choice(chars) for _ in range(rng.randint(lo, hi)))
        image = DRAW[style](text, rng, fonts)
        if style == "loops4":
            name = f"{i:05d}.png"
            rows.append(f"{name},{text}")
        elif style == "mixed46":
            name = f"{text}_{i}.jpg"
        else:
            name = f"{text}_{i}.png"
        if style == "mixed46":
            image.save(os.path.join(out, name), quality=70)
        else:
            image.save(os.path.join(out, name))
        if (i + 1) % 500 == 0 or i + 1 == count:
            print(f"\r{style}: {i + 1}/{count} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if rows:
        with open(os.path.join(out, "labels.csv"), "w", encoding="utf-8") as f:
            f.write("file,label\n" + "\n".join(rows) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fonts", required=True, metavar="DIR", help="folder holding the fonts (see the module text)")
    p.add_argument("--style", required=True, choices=STYLES)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, metavar="DIR")
    a = p.parse_args(argv)
    if a.count < 1:
        p.error("--count must be at least 1")
    write_folder(a.style, a.count, a.seed, a.out, find_fonts(a.fonts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
