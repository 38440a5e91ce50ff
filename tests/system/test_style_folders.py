"""benchmarks/style_folders.py: every style writes a folder xpnet reads with the labels it drew, the same
bytes from the same seed, and a folder that already holds images is refused.

The real evaluation folders use fonts that are not installed (see the script); here each font role is a
link to the ``captcha`` package's own font, which is wherever xpnet is installed.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from xpnet.data import load_folder
from xpnet.data.images import Preprocess
from xpnet.data.lookalike import local_fonts

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "style_folders.py"
SIZES = {"lines5": ((200, 50), "RGBA"), "loops4": ((240, 80), "P"), "mixed46": ((180, 60), "RGB")}


@pytest.fixture(scope="module")
def fonts(tmp_path_factory):
    own = [f for f in local_fonts() if f.endswith("DroidSansMono.ttf")]
    if not own:
        pytest.skip("the captcha package's font is not installed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import style_folders

    folder = tmp_path_factory.mktemp("fonts")
    for names in style_folders.FONT_ROLES.values():
        os.symlink(own[0], folder / names[0])
    return folder


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def _digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("style", sorted(SIZES))
def test_each_style_writes_a_readable_labelled_folder_reproducibly(style, fonts, tmp_path):
    import style_folders

    r = _run("--fonts", fonts, "--style", style, "--count", 12, "--seed", 3, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    images = [p for p in (tmp_path / "a").iterdir() if p.suffix in (".png", ".jpg")]
    assert len(images) == 12
    size, mode = SIZES[style]
    with Image.open(images[0]) as im:
        assert im.size == size and im.mode == mode
    labels = tmp_path / "a" / "labels.csv"
    assert labels.exists() == (style == "loops4")
    data = load_folder(tmp_path / "a", preprocess=Preprocess(32, 96, channels=1),
                       labels=labels if labels.exists() else None, on_error="raise", workers=1, progress=False)
    lo, hi = style_folders.LENGTHS[style]
    assert len(data) == 12 and all(lo <= len(t) <= hi for t in data.labels)
    assert set("".join(data.labels)) <= set(style_folders.CHARSETS[style])

    assert _run("--fonts", fonts, "--style", style, "--count", 12, "--seed", 3, "--out", tmp_path / "b").returncode == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _run("--fonts", fonts, "--style", style, "--count", 12, "--seed", 4, "--out",
                tmp_path / "c").returncode == 0
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_a_folder_with_images_and_missing_fonts_are_refused_in_one_sentence(fonts, tmp_path):
    assert _run("--fonts", fonts, "--style", "lines5", "--count", 2, "--out", tmp_path / "a").returncode == 0
    before = _digest(tmp_path / "a")
    r = _run("--fonts", fonts, "--style", "lines5", "--count", 2, "--out", tmp_path / "a")
    assert r.returncode == 1 and "already holds images" in r.stderr and _digest(tmp_path / "a") == before
    (tmp_path / "empty").mkdir()
    r = _run("--fonts", tmp_path / "empty", "--style", "lines5", "--count", 2, "--out", tmp_path / "b")
    assert r.returncode == 1 and "no font for 'serif_bold'" in r.stderr and not (tmp_path / "b").exists()
