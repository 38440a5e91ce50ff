"""load_folder: label rules, inference, every bad-input case, split, the .npz cache, and a fuzz test."""

import io
import os
import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xpnet.data import (
    Charset, LabelledImages, Preprocess, label_from_name, load_folder, load_npz, read_image, save_npz,
    split_indices,
)
from xpnet.errors import DataError, UsageError

REAL = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "really_simple_4char")
PP = Preprocess(8, 16)  # small: fast tests


def _png(path, size=(12, 6), colour=(200, 10, 10), mode="RGB"):
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def _skipped(result):
    return {os.path.basename(p): r for p, r in result.skipped}


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("name,label", [
    ("2A2X.png", "2A2X"), ("2A2X_17.png", "2A2X"), ("2A2X.1.png", "2A2X"), ("2A2X_a.b.jpg", "2A2X"),
    ("dir/AB.CD_3.gif", "AB"), ("ÄÖ漢.png", "ÄÖ漢"), ("_3.png", ""), ("abC", "abC"),
])
def test_label_from_name(name, label):
    assert label_from_name(name) == label


def test_real_subset_infers_charset_and_length():
    d = load_folder(REAL)
    assert len(d) == 40 and d.images.shape == (40, 3, 32, 80) and d.images.dtype == np.uint8
    assert d.charset == Charset("23456789ABCDEFGHJKLMNPQRSTUVWXYZ", 4)
    assert d.labels[0] == "222X" and all(label_from_name(p) == t for p, t in zip(d.paths, d.labels))
    assert d.skipped == [] and d.ignored == []
    assert d.targets().shape == (40, 128)
    # the same pixels as reading one file with the same preprocessing
    assert np.array_equal(d.images[3], read_image(d.paths[3], d.preprocess))


def test_given_charset_and_length_and_repeated_texts(tmp_path):
    for name in ("AB.png", "AB_2.png", "AB.3.png", "BA_x.png"):
        _png(tmp_path / name)
    d = load_folder(tmp_path, charset="ABC", length=2, preprocess=PP)
    assert d.labels == ["AB", "AB", "AB", "BA"] and d.charset == Charset("ABC", 2)
    d = load_folder(tmp_path, charset=Charset("BA", 2), preprocess=PP)
    assert d.charset.chars == "BA"
    with pytest.raises(UsageError, match="contradicts"):
        load_folder(tmp_path, charset=Charset("BA", 2), length=3)


# ---------------------------------------------------------------- bad input


def _bad_folder(tmp_path):
    _png(tmp_path / "GOOD.png")
    _png(tmp_path / "FINE_2.png", mode="L")
    (tmp_path / "ZERO.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    (tmp_path / "TRNC.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "TEXT.png").write_text("this is not an image\n")
    (tmp_path / "notes.txt").write_text("ignored\n")
    (tmp_path / "sub").mkdir()
    return tmp_path


def test_bad_files_are_reported_by_name_and_nothing_else_is_lost(tmp_path):
    d = load_folder(_bad_folder(tmp_path), preprocess=PP)
    assert sorted(d.labels) == ["FINE", "GOOD"]
    bad = _skipped(d)
    assert set(bad) == {"ZERO.png", "TRNC.png", "TEXT.png"}
    assert "empty (0 bytes)" in bad["ZERO.png"]
    assert "truncated" in bad["TRNC.png"]
    assert "not an image file" in bad["TEXT.png"]
    assert sorted(os.path.basename(p) for p in d.ignored) == ["notes.txt", "sub"]
    text = d.summary()
    assert "3 file(s) skipped" in text and "ZERO.png" in text and "notes.txt" in text


def test_on_error_raise_names_every_bad_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_folder(_bad_folder(tmp_path), preprocess=PP, on_error="raise")
    msg = str(err.value)
    assert msg.startswith("3 file(s) in ") and all(n in msg for n in ("ZERO.png", "TRNC.png", "TEXT.png"))
    with pytest.raises(UsageError, match="on_error must be"):
        load_folder(tmp_path, on_error="ignore")


def test_labels_outside_charset_and_wrong_length_are_listed(tmp_path):
    for name in ("AB12.png", "AB1.png", "ab12.png", "A-12.png"):
        _png(tmp_path / name)
    d = load_folder(tmp_path, charset="AB12", length=4, preprocess=PP)
    assert d.labels == ["AB12"]
    bad = _skipped(d)
    assert bad["AB1.png"] == "label 'AB1' has 3 characters, expected 4"
    assert bad["ab12.png"] == "label 'ab12' has characters 'ab' outside the charset 'AB12'"
    assert "'-'" in bad["A-12.png"]
    with pytest.raises(DataError, match="3 file\\(s\\).*A-12.png.*AB1.png.*ab12.png"):
        load_folder(tmp_path, charset="AB12", length=4, preprocess=PP, on_error="raise")


def test_mixed_lengths_give_a_range_of_lengths(tmp_path):
    for name in ("AB.png", "BA.png", "ABA.png", "ABBA.png"):
        _png(tmp_path / name)
    d = load_folder(tmp_path, preprocess=PP)  # no length: the shortest to the longest found
    assert (d.charset.min_length, d.charset.length, d.charset.lengths) == (2, 4, "2-4") and len(d) == 4
    with pytest.raises(UsageError, match="2-4 characters.*CTC head"):
        d.targets()  # one block per position cannot code them
    d = load_folder(tmp_path, length=2, preprocess=PP)
    assert d.labels == ["AB", "BA"] and d.charset.fixed
    assert _skipped(d)["ABA.png"] == "label 'ABA' has 3 characters, expected 2"
    d = load_folder(tmp_path, length="3-4", preprocess=PP)
    assert d.labels == ["ABA", "ABBA"] and _skipped(d)["AB.png"] == "label 'AB' has 2 characters, expected 3-4"
    with pytest.raises(UsageError, match="--length|label length must be"):
        load_folder(tmp_path, length="4-3", preprocess=PP)


def test_missing_empty_and_useless_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no image files"):
        load_folder(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no image files.*1 other entries ignored"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_folder(tmp_path / "readme.txt")
    (tmp_path / "AB.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 image file\\(s\\).*AB.png: the file is empty"):
        load_folder(tmp_path)


def _png_header_only(width, height):
    """A PNG whose header claims width x height pixels but whose data is a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(10000, 10000), (100000, 100000)])  # 1.1x and 110x the limit
def test_decompression_bomb_is_refused_without_decoding(tmp_path, monkeypatch, width, height):
    assert Image.MAX_IMAGE_PIXELS < width * height
    (tmp_path / "BOMB.png").write_bytes(_png_header_only(width, height))
    _png(tmp_path / "OKAY.png")
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self.size)
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        d = load_folder(tmp_path, preprocess=PP, workers=1)
        with pytest.raises(DataError, match="BOMB.png.*decompression bomb"):
            read_image(tmp_path / "BOMB.png")
    assert d.labels == ["OKAY"]
    assert "decompression bomb" in _skipped(d)["BOMB.png"]
    assert (12, 6) in decoded and (width, height) not in decoded  # the bomb was never decoded


def test_tiny_huge_aspect_and_non_ascii_names(tmp_path):
    Image.new("L", (1, 1), 0).save(tmp_path / "ÄB.png")
    Image.new("RGB", (5000, 20), (0, 0, 0)).save(tmp_path / "BÄ_1.bmp")
    Image.new("RGB", (30, 10), (0, 0, 0)).save(tmp_path / "漢字.jpg")
    d = load_folder(tmp_path, length=2)
    assert sorted(d.labels) == ["BÄ", "ÄB", "漢字"] and d.images.shape == (3, 3, 32, 80)
    assert d.charset.chars == "".join(sorted("ÄB漢字"))


def test_broken_link_is_reported(tmp_path):
    _png(tmp_path / "AB.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "BA.png")
    d = load_folder(tmp_path, preprocess=PP, charset="AB")
    assert "no such file, or a broken link" in _skipped(d)["BA.png"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their permissions; the broken-link test covers unreadable files")
def test_unreadable_file_is_reported(tmp_path):
    _png(tmp_path / "AB.png")
    locked = _png(tmp_path / "BA.png")
    os.chmod(locked, 0)
    try:
        d = load_folder(tmp_path, preprocess=PP, charset="AB")
    finally:
        os.chmod(locked, 0o644)
    assert "permission denied" in _skipped(d)["BA.png"]


# ---------------------------------------------------------------- split and cache


def test_split_is_deterministic_and_a_partition():
    tr, va = split_indices(103, 0.2, seed=5)
    tr2, va2 = split_indices(103, 0.2, seed=5)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 21 and sorted(np.concatenate([tr, va]).tolist()) == list(range(103))
    assert not np.array_equal(va, split_indices(103, 0.2, seed=6)[1])
    assert len(split_indices(3, 0.01)[1]) == 1 and len(split_indices(5, 0.0)[1]) == 0
    with pytest.raises(UsageError):
        split_indices(10, 1.0)
    d = load_folder(REAL)
    a, b = d.split(0.25, seed=1)
    assert len(a) == 30 and len(b) == 10 and not set(a.labels) & set(b.labels) - set(a.labels)
    assert set(a.paths).isdisjoint(b.paths) and np.array_equal(b.images[0], d.images[split_indices(40, .25, 1)[1][0]])


def test_npz_round_trip_without_pickle(tmp_path):
    d = load_folder(REAL, preprocess=Preprocess(24, 72, channels=1))
    d.meta = {"source": "test"}
    path = save_npz(tmp_path / "cache", d)
    assert path.endswith("cache.npz")
    with np.load(path, allow_pickle=False) as z:  # every field loads without pickle
        assert z["labels"].dtype.kind == "U" and z["images"].dtype == np.uint8
    e = load_npz(path)
    assert np.array_equal(e.images, d.images) and e.labels == d.labels
    assert e.charset == d.charset and e.preprocess == d.preprocess and e.meta == {"source": "test"}


def test_npz_damaged_or_hostile_files_are_refused(tmp_path):
    d = LabelledImages(np.zeros((2, 3, 32, 80), np.uint8), ["AB", "BA"], Charset("AB", 2), Preprocess())
    good = save_npz(tmp_path / "good.npz", d)
    raw = open(good, "rb").read()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="trunc.npz: not a readable"):
        load_npz(tmp_path / "trunc.npz")
    # a pickle renamed to .npz must be refused without running it
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match="evil.npz"):
        load_npz(tmp_path / "evil.npz")
    assert not marker.exists()
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="not an xpnet image cache"):
        load_npz(tmp_path / "other.npz")
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "absent.npz")


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    for i, name in enumerate(sorted(os.listdir(REAL))[:12]):
        shutil.copy(os.path.join(REAL, name), tmp_path / name)
    (tmp_path / "ZZZZ.png").write_bytes(b"junk")
    Image.new("L", (50, 50)).save(tmp_path / "YYYY.png")  # 2500 pixels: over the limit set below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # worker processes must follow the caller's limit
    import xpnet.data.folder as folder

    serial = load_folder(tmp_path, workers=1)
    old = folder._CHUNK
    folder._CHUNK = 4  # 13 files in 4 chunks over 2 processes
    try:
        par = load_folder(tmp_path, workers=2)
    finally:
        folder._CHUNK = old
    assert np.array_equal(serial.images, par.images) and serial.labels == par.labels
    assert serial.skipped == par.skipped and len(par.skipped) == 2
    assert "limit of 2000" in _skipped(par)["YYYY.png"] and len(par) == 12


# ---------------------------------------------------------------- fuzz


def _seeds():
    out = []
    for fmt, mode in (("PNG", "RGBA"), ("GIF", "P"), ("BMP", "RGB"), ("JPEG", "L")):
        buf = io.BytesIO()
        Image.new(mode, (9, 5)).save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seeds()


@st.composite
def hostile_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))  # a real image, then damaged
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blobs=st.lists(hostile_bytes(), min_size=1, max_size=4))
def test_fuzz_loader_raises_only_data_error(tmp_path_factory, blobs):
    folder = tmp_path_factory.mktemp("fuzz")
    for i, blob in enumerate(blobs):
        (folder / f"A{'B' * i}.png").write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            d = load_folder(folder, charset="AB", preprocess=PP, workers=1)
        except DataError:
            return
        assert len(d) + len(d.skipped) == len(blobs)
        assert d.images.shape == (len(d), 3, 8, 16) and d.images.dtype == np.uint8
        for path in d.paths:  # what was accepted reads back the same on its own
            assert read_image(path, PP).shape == (3, 8, 16)
