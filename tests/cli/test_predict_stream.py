"""`xpnet predict MODEL FOLDER --out readings.csv`: the CSV rows, the list of unreadable files, the refusal to
overwrite, Ctrl-C and crashes (never a complete-looking file), and the usage errors (exit 2)."""

import csv
import os

import numpy as np
import pytest

import xpnet
from xpnet import cli
from xpnet.captcha import streaming
from xpnet.captcha.recognizer import Recognizer, image_files, metadata_for
from xpnet.data import Charset, Preprocess, write_captcha_pngs


@pytest.fixture(scope="module")
def reader_files(tmp_path_factory):
    """A small untrained reader and a folder of 14 labelled images plus 2 unreadable ones."""
    tmp = tmp_path_factory.mktemp("predict_stream")
    cs, pp = Charset("ABCD", 2), Preprocess(height=24, width=48, channels=1)
    xpnet.backend.seed(5)
    model = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=cs.n_outputs, filters=4, hidden=16)
    xpnet.save(model, tmp / "reader.npz", metadata_for(cs, pp, model="simple_convnet"))
    good = tmp / "good"
    write_captcha_pngs(good, 14, seed=6, charset="ABCD", length=2, workers=0, progress=False)
    mixed = tmp / "mixed"
    mixed.mkdir()
    for f in good.iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "AB_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (mixed / "zz, quoted.png").write_bytes(b"")
    return tmp / "reader.npz", good, mixed


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def predict(*args):
    return cli.main(["predict", *map(str, args), "--no-progress"])


def no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_rows_equal_predict_files_in_name_order(reader_files, tmp_path, capsys):
    model, good, _ = reader_files
    out = tmp_path / "readings.csv"
    assert predict(model, good, "--out", out, "--batch-size", "4") == 0
    rows = read_csv(out)
    assert rows[0] == ["file", "text", "confidence"]
    want = Recognizer.load(model).predict_files(image_files(good))
    assert [r[0] for r in rows[1:]] == [os.path.basename(p) for p in want.paths]   # relative, sorted
    assert [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:])
    assert [r[1] for r in rows[1:]] == want.texts
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], want.confidences, rtol=1e-5)
    text = capsys.readouterr().out
    assert f"14 reading(s) of 14 image file(s) in {good} written to {out}" in text
    assert "accuracy on 14 labelled image(s)" in text
    assert not os.path.exists(tmp_path / "readings.skipped.csv") and no_temp_files(tmp_path)


def test_unreadable_files_are_listed_and_the_rest_read(reader_files, tmp_path, capsys):
    model, good, mixed = reader_files
    out = tmp_path / "r.csv"
    assert predict(model, mixed, "--out", out) == 1
    rows = read_csv(out)
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in good.iterdir())
    listed = read_csv(tmp_path / "r.skipped.csv")
    assert listed[0] == ["file", "reason"]
    assert [r[0] for r in listed[1:]] == ["AB_bad.png", "zz, quoted.png"] and "empty" in listed[2][1]
    err = capsys.readouterr().err
    assert "skipped" in err and "AB_bad.png" in err and "zz, quoted.png" in err
    assert f"2 image(s) could not be read and were skipped: listed in {tmp_path / 'r.skipped.csv'}" in err


def test_an_existing_output_is_refused_unless_overwrite(reader_files, tmp_path, capsys):
    model, good, mixed = reader_files
    out = tmp_path / "r.csv"
    assert predict(model, mixed, "--out", out) == 1              # writes r.csv and r.skipped.csv
    before = out.read_bytes()
    capsys.readouterr()
    assert predict(model, good, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.csv already exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == before
    out.unlink()                                                  # the old list of skipped files alone blocks too
    assert predict(model, good, "--out", out) == 2
    assert "r.skipped.csv already exists" in capsys.readouterr().err
    assert predict(model, good, "--out", out, "--overwrite") == 0
    assert len(read_csv(out)) == 15
    assert not (tmp_path / "r.skipped.csv").exists()             # the stale list went with the old run


def test_ctrl_c_keeps_the_rows_so_far_as_partial_and_says_how_many(reader_files, tmp_path, capsys, monkeypatch):
    model, _, mixed = reader_files
    real_iter = streaming.FolderStream.__iter__

    def two_batches_then_ctrl_c(self):
        for i, batch in enumerate(real_iter(self)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(streaming.FolderStream, "__iter__", two_batches_then_ctrl_c)
    out = tmp_path / "r.csv"
    assert predict(model, mixed, "--out", out, "--batch-size", "5") == 130
    assert not out.exists() and no_temp_files(tmp_path)
    rows = read_csv(tmp_path / "r.csv.partial")                  # the first 10 files: 9 images and AB_bad.png
    assert rows[0] == ["file", "text", "confidence"] and len(rows) == 1 + 9
    assert [r[0] for r in read_csv(tmp_path / "r.skipped.csv.partial")[1:]] == ["AB_bad.png"]
    err = capsys.readouterr().err
    assert "interrupted after 10 of 16 file(s): 9 row(s) written to" in err and "r.csv.partial" in err
    assert "1 unreadable file(s) listed in" in err and f"{out} was not written" in err


def test_a_crash_leaves_no_csv_and_no_temporary_file(reader_files, tmp_path, capsys, monkeypatch):
    model, good, _ = reader_files
    calls, real_predict = [], Recognizer.predict

    def failing_predict(self, images, paths=None):
        calls.append(len(images))
        if len(calls) == 2:
            raise xpnet.errors.DataError("the reader failed on purpose.")
        return real_predict(self, images, paths)

    monkeypatch.setattr(Recognizer, "predict", failing_predict)
    out = tmp_path / "r.csv"
    assert predict(model, good, "--out", out, "--batch-size", "4") == 1
    assert "failed on purpose" in capsys.readouterr().err and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # neither r.csv, a .partial nor a .tmp


@pytest.mark.parametrize("extra, needle", [
    (["--json"], "drop one of them"),
    (["EXTRA"], "--out reads one folder, got 2 paths"),
    (["--workers", "-1"], "--workers must be 0 or more"),
])
def test_usage_errors_exit_2(reader_files, tmp_path, capsys, extra, needle):
    model, good, _ = reader_files
    folders = [good, good] if extra == ["EXTRA"] else [good]
    assert predict(model, *folders, "--out", tmp_path / "r.csv", *[e for e in extra if e != "EXTRA"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_other_errors(reader_files, tmp_path, capsys):
    model, good, _ = reader_files
    one_file = next(good.iterdir())
    assert predict(model, one_file, "--out", tmp_path / "r.csv") == 2
    assert "is a file: give its folder" in capsys.readouterr().err
    assert predict(model, good, "--out", tmp_path) == 2
    assert "is a folder: give a file name" in capsys.readouterr().err
    assert predict(model, good, "--out", tmp_path / "nowhere" / "r.csv") == 1
    assert "does not exist; create it first" in capsys.readouterr().err
    assert predict(model, good, "--overwrite") == 2
    assert "--overwrite only applies with --out" in capsys.readouterr().err
    assert predict(model, tmp_path / "missing", "--out", tmp_path / "r.csv") == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_help_names_the_csv_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--out CSV", "file,text,confidence", "NAME.skipped.csv", "CSV.partial", "--overwrite",
                   "--workers W", "--no-progress"):
        assert needle in text, needle
