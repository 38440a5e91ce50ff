"""Synthetic look-alikes of a folder (xpnet.data.lookalike)."""

import numpy as np
import pytest

from xpnet.data import Charset, LabelledImages, Preprocess
from xpnet.data.lookalike import Style, draw, local_fonts, lookalikes, style_of
from xpnet.errors import DataError, UsageError

FONTS = tuple(local_fonts())
needs_fonts = pytest.mark.skipif(not FONTS, reason="no TrueType font on this machine (nor the captcha package's)")


@needs_fonts
def test_lookalikes_are_reproducible_and_follow_the_charset_and_lengths():
    cs = Charset("AB34", 5, min_length=3)
    pp = Preprocess(32, 96, channels=1)
    style = Style(width=192, height=64, fonts=FONTS[:3])
    a = lookalikes(40, 7, cs, pp, style)
    b = lookalikes(10, 7, cs, pp, style, start=30)
    assert a.images.shape == (40, 1, 32, 96) and a.images.dtype == np.uint8
    assert {len(t) for t in a.labels} == {3, 4, 5} and set("".join(a.labels)) <= set("AB34")
    assert a.labels[30:] == b.labels and np.array_equal(a.images[30:], b.images)   # per-image generators
    assert not np.array_equal(lookalikes(5, 8, cs, pp, style).images, a.images[:5])
    assert a.meta["style"]["fonts"] == list(FONTS[:3])


@needs_fonts
def test_style_follows_the_folders_grey_levels_and_aspect():
    rng = np.random.default_rng(0)
    images = np.full((20, 1, 24, 72), 230, np.uint8)
    images[:, :, 8:16, 10:60] = rng.integers(20, 40, (20, 1, 8, 50))  # dark ink on a light background
    data = LabelledImages(images=images, labels=["AB"] * 20, charset=Charset("AB", 2),
                          preprocess=Preprocess(24, 72, channels=1))
    style = style_of(data)
    assert style.width / style.height == pytest.approx(3) and style.height >= 64
    assert 215 <= style.background[0] <= 230 <= style.background[1] and style.ink[1] <= 60
    image = np.asarray(draw("AB", __import__("random").Random(1), style))
    assert image.shape == (style.height, style.width) and image.min() < 100 and np.median(image) >= 200
    assert Style.from_dict(style.to_dict()) == style


def test_bad_styles_and_no_fonts():
    with pytest.raises(UsageError, match="unknown look-alike style keys"):
        Style.from_dict({"colour": 1})
    data = LabelledImages(images=np.zeros((2, 1, 8, 8), np.uint8), labels=["AB", "BA"], charset=Charset("AB", 2),
                          preprocess=Preprocess(8, 8, channels=1))
    with pytest.raises(DataError, match="no TrueType font"):
        style_of(data, fonts=[])
    with pytest.raises(DataError, match="no fonts"):
        draw("AB", __import__("random").Random(0), Style())
