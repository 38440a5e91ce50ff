"""Preprocessing: every Pillow mode, the resize policies, padding colour, normalisation."""

import json

import numpy as np
import pytest
from PIL import Image

from xpnet import backend
from xpnet.data import Preprocess, normalize, read_image, to_mode
from xpnet.errors import DataError, UsageError
from tests.conftest import gpu_param


def _save(tmp_path, name, image, **kw):
    p = tmp_path / name
    image.save(p, **kw)
    return p


# ---------------------------------------------------------------- the description


def test_preprocess_json_round_trip_and_validation():
    pp = Preprocess(height=24, width=72, channels=1, resize="height", pad="white", resample="nearest",
                    normalize="zero_one")
    text = json.dumps(pp.to_dict())
    assert Preprocess.from_dict(json.loads(text)) == pp
    assert Preprocess.from_json(pp.to_json()) == pp
    assert pp.shape == (1, 24, 72)
    with pytest.raises(UsageError, match="channels must be 1"):
        Preprocess(channels=2)
    with pytest.raises(UsageError, match="height must be a positive integer"):
        Preprocess(height=0)
    with pytest.raises(UsageError, match="resize must be one of fit, height, stretch"):
        Preprocess(resize="crop")
    with pytest.raises(DataError, match="unknown keys \\['colour'\\]"):
        Preprocess.from_dict({"height": 32, "colour": 1})
    with pytest.raises(DataError, match="malformed preprocessing"):
        Preprocess.from_dict({"height": -3})
    with pytest.raises(DataError, match="not JSON"):
        Preprocess.from_json("{height")


# ---------------------------------------------------------------- colour modes


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., 0] = 200                      # red 200 ...
    a[:, :3, 3] = 0                      # left half fully transparent -> white
    a[:, 3:, 3] = 255                    # right half opaque -> (200, 0, 0)
    a[0, 0, 3] = 128                     # half transparent: 255 + (200 - 255) * 128/255
    p = _save(tmp_path, "rgba.png", Image.fromarray(a, "RGBA"))
    x = read_image(p, Preprocess(height=4, width=6))
    assert x.shape == (3, 4, 6) and x.dtype == np.uint8
    assert (x[:, 1:, :3] == 255).all()
    assert (x[:, :, 3:] == np.array([200, 0, 0])[:, None, None]).all()
    assert x[0, 0, 0] == pytest.approx(255 + (200 - 255) * 128 / 255, abs=1)
    assert x[1, 0, 0] == pytest.approx(255 * 127 / 255, abs=1)


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    im = Image.new("P", (5, 3), 1)
    im.putpalette([10, 20, 30, 0, 0, 0, 250, 0, 0] + [0] * (256 * 3 - 9))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 2)
    im.info["transparency"] = 1          # palette index 1 is transparent
    p = _save(tmp_path, "p.png", im, transparency=1)
    assert Image.open(p).mode == "P" and "transparency" in Image.open(p).info
    x = read_image(p, Preprocess(height=3, width=5))
    assert tuple(x[:, 0, 0]) == (10, 20, 30)
    assert tuple(x[:, 0, 1]) == (250, 0, 0)
    assert (x[:, 1:, :] == 255).all()    # the transparent index became white, not black
    g = read_image(p, Preprocess(height=3, width=5, channels=1))
    assert g.shape == (1, 3, 5) and g[0, 2, 2] == 255


def test_gif_with_transparency(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putpixel((3, 1), 1)
    p = _save(tmp_path, "t.gif", im, transparency=0)
    x = read_image(p, Preprocess(height=2, width=4))
    assert (x[:, 0, 0] == 255).all() and tuple(x[:, 1, 3]) == (0, 0, 255)


def test_la_and_mode_1_and_grey_and_rgb(tmp_path):
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 0] = 40
    la[0, :, 1] = 255
    x = read_image(_save(tmp_path, "la.png", Image.fromarray(la, "LA")), Preprocess(2, 2, 1))
    assert x[0].tolist() == [[40, 40], [255, 255]]

    bits = Image.new("1", (3, 2), 0)
    bits.putpixel((1, 0), 1)
    x = read_image(_save(tmp_path, "one.png", bits), Preprocess(2, 3, 1))
    assert x[0].tolist() == [[0, 255, 0], [0, 0, 0]]
    x = read_image(_save(tmp_path, "one.bmp", bits), Preprocess(2, 3, 3))
    assert x.shape == (3, 2, 3) and (x[:, 0, 1] == 255).all() and (x[:, 1] == 0).all()

    grey = Image.fromarray(np.array([[7, 9]], np.uint8), "L")
    x = read_image(_save(tmp_path, "g.png", grey), Preprocess(1, 2, 3))
    assert x.tolist() == [[[7, 9]]] * 3  # grey repeated into R, G, B

    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8), "RGB")
    x = read_image(_save(tmp_path, "c.png", rgb), Preprocess(1, 2, 1))
    assert x[0].tolist() == [[76, 29]]   # ITU-R 601-2 luma: 0.299 R, 0.114 B


def test_high_depth_modes(tmp_path):
    i16 = Image.fromarray(np.array([[0, 65535, 257 * 100]], np.uint16))
    p = _save(tmp_path, "i16.png", i16)
    assert Image.open(p).mode.startswith("I")
    assert read_image(p, Preprocess(1, 3, 1))[0].tolist() == [[0, 255, 100]]
    small_i = Image.fromarray(np.array([[3, 200]], np.int32), "I")
    assert to_mode(small_i, "L").getpixel((1, 0)) == 200
    f01 = Image.fromarray(np.array([[0.0, 1.0, 0.5]], np.float32), "F")
    assert np.asarray(to_mode(f01, "L")).ravel().tolist() == [0, 255, 128]
    f255 = Image.fromarray(np.array([[-5.0, 300.0, 17.0]], np.float32), "F")
    assert np.asarray(to_mode(f255, "L")).ravel().tolist() == [0, 255, 17]


def test_cmyk_jpeg_and_rgb_jpeg(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    x = read_image(_save(tmp_path, "c.jpg", im, quality=95), Preprocess(8, 8))
    assert x.min() >= 250
    im = Image.new("RGB", (16, 8), (30, 200, 90))
    x = read_image(_save(tmp_path, "r.jpeg", im, quality=95), Preprocess(8, 16))
    assert np.abs(x.astype(int) - np.array([30, 200, 90])[:, None, None]).max() <= 3


# ---------------------------------------------------------------- resizing


def test_fit_letterboxes_with_the_border_colour(tmp_path):
    a = np.full((10, 40, 3), (240, 230, 220), np.uint8)  # 4:1, background (240, 230, 220)
    a[3:7, 5:35] = 0
    x = read_image(_save(tmp_path, "w.png", Image.fromarray(a)), Preprocess(8, 16, resize="fit",
                                                                             resample="nearest"))
    # scale = min(8/10, 16/40) = 0.4 -> 16 x 4, pasted at rows 2..5; rows 0-1 and 6-7 are padding
    assert x.shape == (3, 8, 16)
    assert (x[:, :2] == np.array([240, 230, 220])[:, None, None]).all()
    assert (x[:, 6:] == np.array([240, 230, 220])[:, None, None]).all()
    assert x[:, 2:6].min() == 0           # the dark bar is kept, nothing cropped
    assert (x[:, 2:6, 2:14] == 0).any()


def test_height_policy_crops_wide_and_pads_narrow(tmp_path):
    wide = np.zeros((4, 16), np.uint8)
    wide[:, :2] = 255                     # a white stripe on the left edge
    wide[:, 6:10] = 100
    x = read_image(_save(tmp_path, "wide.png", Image.fromarray(wide)),
                   Preprocess(4, 8, 1, resize="height", resample="nearest"))
    assert x[0].tolist() == [[0, 0, 100, 100, 100, 100, 0, 0]] * 4  # centre crop: cols 4..11
    narrow = np.full((4, 2), 9, np.uint8)
    x = read_image(_save(tmp_path, "narrow.png", Image.fromarray(narrow)),
                   Preprocess(8, 8, 1, resize="height", pad="white", resample="nearest"))
    # 2x4 -> height 8 -> 4 wide, centred in 8 with white on both sides
    assert x[0, :, :2].tolist() == [[255, 255]] * 8 and x[0, :, 2:6].tolist() == [[9] * 4] * 8
    assert x[0, :, 6:].tolist() == [[255, 255]] * 8


def test_stretch_and_extreme_sizes(tmp_path):
    one = _save(tmp_path, "one.png", Image.new("RGB", (1, 1), (5, 6, 7)))
    x = read_image(one, Preprocess(32, 80))
    assert x.shape == (3, 32, 80) and (x == np.array([5, 6, 7])[:, None, None]).all()
    strip = np.zeros((20, 5000), np.uint8)
    x = read_image(_save(tmp_path, "strip.png", Image.fromarray(strip)), Preprocess(32, 80))
    assert x.shape == (3, 32, 80)
    x = read_image(_save(tmp_path, "s.png", Image.new("L", (7, 3), 50)), Preprocess(32, 80, resize="stretch"))
    assert x.shape == (3, 32, 80) and (x == 50).all()


def test_real_image_default_and_suggested_size():
    from xpnet.data import suggest_preprocess

    folder = "tests/fixtures/really_simple_4char"
    pp = suggest_preprocess(folder)
    assert (pp.height, pp.width, pp.channels) == (32, 96, 3)  # 72x24 -> 3:1 -> 96
    x = read_image(f"{folder}/66RW.png", pp)                   # one of the RGB files
    y = read_image(f"{folder}/222X.png", pp)                   # mode L
    assert x.shape == y.shape == (3, 32, 96)


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("name", gpu_param())
def test_normalize_range_dtype_backend(name):
    xp = backend.module_for(name)
    b = xp.asarray(np.array([[[[0, 255, 51]]]], np.uint8))
    out = normalize(b)
    assert backend.get_array_module(out) is xp and out.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(out), [[[[-1.0, 1.0, 51 * 2 / 255 - 1]]]], rtol=1e-6)
    out = normalize(b, "zero_one", dtype=np.float64)
    assert out.dtype == np.float64
    np.testing.assert_allclose(backend.to_numpy(out), [[[[0.0, 1.0, 0.2]]]])
    assert Preprocess().normalize_batch(b).dtype == np.float32
    with pytest.raises(DataError, match="expects a uint8 batch"):
        normalize(xp.zeros((1, 1, 1, 1), np.float32))
