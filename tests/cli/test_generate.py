"""``xpnet generate``: exit codes, messages, files, and that unsafe charsets write nothing anywhere."""

import os
import subprocess
import sys

import numpy as np
import pytest

from xpnet.data import Charset, generate_captchas, label_from_name, load_folder, load_npz

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def xpnet(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "xpnet", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _all_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_help_explains_every_option_with_its_default():
    r = xpnet("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for opt in ("--count N", "--out DIR", "--length L", "--charset CS", "--seed S", "--workers W",
                "--format", "--height H", "--width W", "--channels", "--resize", "--force"):
        assert opt in text, opt
    assert text.count("(default:") >= 10 and text.count("(required") == 2
    assert "(default: 4)" in text and "(default: png)" in text and "a fresh random seed" in text


def test_png_output_reproducible_and_loadable(tmp_path):
    r = xpnet("generate", "--count", "12", "--out", str(tmp_path / "a"), "--seed", "3", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "wrote 12 images" in r.stdout and "seed 3" in r.stdout
    names = sorted(os.listdir(tmp_path / "a"))
    want = generate_captchas(12, seed=3, workers=0, progress=False).labels
    assert sorted(f"{t}_{i}.png" for i, t in enumerate(want)) == names
    d = load_folder(tmp_path / "a", charset="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", length=4)
    assert len(d) == 12 and d.skipped == []
    assert sorted(d.labels) == sorted(label_from_name(n) for n in names)
    # a second run into the same folder is refused (nothing is overwritten) unless --force
    r = xpnet("generate", "--count", "2", "--out", str(tmp_path / "a"), "--seed", "4")
    assert r.returncode == 2 and "already holds 12 PNG file(s)" in r.stderr and "--force" in r.stderr
    assert sorted(os.listdir(tmp_path / "a")) == names
    r = xpnet("generate", "--count", "2", "--out", str(tmp_path / "a"), "--seed", "4", "--force",
              "--workers", "0")
    assert r.returncode == 0 and len(os.listdir(tmp_path / "a")) == 14


def test_npz_output_with_sizes(tmp_path):
    r = xpnet("generate", "--count", "5", "--out", str(tmp_path), "--format", "npz", "--seed", "9",
              "--height", "24", "--width", "64", "--channels", "1", "--charset", "AB.C/", "--length", "3",
              "--workers", "0")
    assert r.returncode == 0, r.stderr
    d = load_npz(tmp_path / "captchas.npz")
    assert d.images.shape == (5, 1, 24, 64) and d.charset == Charset("AB.C/", 3)  # no file names: any charset
    assert d.meta["seed"] == 9 and d.labels == generate_captchas(5, 9, "AB.C/", 3, workers=0).labels
    assert os.listdir(tmp_path) == ["captchas.npz"]


def test_a_range_of_lengths(tmp_path):
    r = xpnet("generate", "--count", "30", "--out", str(tmp_path), "--length", "4-6", "--seed", "2",
              "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "4-6 characters" in r.stdout
    d = load_folder(tmp_path)  # no length: the range is read from the names
    assert {len(t) for t in d.labels} == {4, 5, 6} and d.charset.lengths == "4-6"
    assert sorted(d.labels) == sorted(generate_captchas(30, 2, length="4-6", workers=0).labels)
    r = xpnet("generate", "--count", "3", "--out", str(tmp_path / "x"), "--length", "6-4")
    assert r.returncode == 2 and "--length must be a number of characters such as 4, or a range" in r.stderr


def test_usage_errors_in_a_subprocess_are_one_sentence_exit_2(tmp_path):
    for args, message in ((["--count", "0"], "--count must be a positive number of images, got 0."),
                          (["--count", "3", "--length", "0"], "--length must be a number of characters such as 4, or a range "
                                                              "such as 4-6 (at least 1, the smaller first), got '0'.")):
        r = xpnet("generate", "--out", str(tmp_path / "out"), *args)
        assert r.returncode == 2
        assert r.stderr == f"xpnet: error: {message}\n"  # one line, no traceback
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--count", "-5"], "--count must be a positive number of images, got -5."),
    (["--count", "3", "--seed", "-1"], "--seed must be a non-negative integer, got -1."),
    (["--count", "3", "--workers", "-2"], "--workers must be 0 or more, got -2."),
    (["--count", "3", "--charset", "AAB"], "charset 'AAB' repeats characters 'A'."),
    (["--count", "3", "--height", "0", "--format", "npz"], "--height must be a positive number of pixels, got 0."),
])
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    from xpnet.cli import main

    assert main(["generate", "--out", str(tmp_path / "out"), *args]) == 2
    assert capsys.readouterr().err == f"xpnet: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_unsafe_charset_in_a_subprocess_writes_nothing_anywhere(tmp_path):
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    before = _all_files(tmp_path)
    r = xpnet("generate", "--count", "20", "--out", "out", "--charset", "./AB", "--length", "2", "--seed", "0",
              "--workers", "0", cwd=work / "inner")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("xpnet: error: charset './AB' has characters './'") and r.stderr.count("\n") == 1
    assert _all_files(tmp_path) == before  # not even the output folder was made


@pytest.mark.parametrize("charset", ["AB/", "AB\\", ".AB", "../AB", "/AB", "AB_", "A B", "AB\t", "AB:"])
def test_unsafe_charset_writes_nothing_anywhere(tmp_path, capsys, monkeypatch, charset):
    from xpnet.cli import main

    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    monkeypatch.chdir(work / "inner")
    before = _all_files(tmp_path)
    assert main(["generate", "--count", "20", "--out", "out", "--charset", charset, "--length", "2",
                 "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xpnet: error: charset ") and err.count("\n") == 1
    assert _all_files(tmp_path) == before


def test_npz_cache_matches_in_memory_generation(tmp_path):
    r = xpnet("generate", "--count", "6", "--out", str(tmp_path), "--format", "both", "--seed", "1",
              "--workers", "0")
    assert r.returncode == 0, r.stderr
    d = load_npz(tmp_path / "captchas.npz")
    ref = generate_captchas(6, seed=1, workers=0)
    assert np.array_equal(d.images, ref.images) and d.labels == ref.labels
    assert sorted(f"{t}_{i}.png" for i, t in enumerate(ref.labels)) == sorted(
        n for n in os.listdir(tmp_path) if n.endswith(".png"))
