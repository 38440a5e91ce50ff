"""`xpnet train`, `xpnet eval`, `xpnet predict` and examples/train.py, predict.py: options, output, exit codes
and one-sentence errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.captcha import config
from xpnet import cli
from xpnet.cli import train as train_command
from xpnet.data import Charset, Preprocess, write_captcha_pngs
from xpnet.captcha import Recognizer, metadata_for

ROOT = Path(__file__).resolve().parents[2]
CHARS = "ABCD"


def run(*args, script=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XPNET_BACKEND="numpy")
    cmd = [sys.executable, str(ROOT / script)] if script else [sys.executable, "-m", "xpnet"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def one_sentence(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def reader_files(tmp_path_factory):
    """A small (untrained) reader file and a folder of labelled images for it."""
    tmp = tmp_path_factory.mktemp("reader")
    cs, pp = Charset(CHARS, 2), Preprocess(height=24, width=48, channels=1)
    xpnet.backend.seed(1)
    model = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=cs.n_outputs, filters=4, hidden=16)
    xpnet.save(model, tmp / "reader.npz", metadata_for(cs, pp, model="simple_convnet"))
    write_captcha_pngs(tmp / "imgs", 12, seed=2, charset=CHARS, length=2, workers=0, progress=False)
    return tmp / "reader.npz", tmp / "imgs"


def option_names(help_text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", help_text))


def test_train_script_and_subcommand_have_the_same_options_each_with_its_default():
    a = run("--help", script="examples/train.py")
    b = run("train", "--help")
    assert a.returncode == b.returncode == 0
    opts = option_names(a.stdout)
    assert opts == option_names(b.stdout)
    assert {"--data", "--out", "--epochs", "--steps", "--time-budget", "--batch-size", "--lr", "--model", "--config",
            "--charset", "--length", "--height", "--width", "--channels", "--seed", "--resume", "--workers",
            "--no-progress", "--debug"} <= opts
    # every option's help states its default
    for action in train_command.build_train_parser()._actions:
        if action.dest != "help":
            assert "(default" in action.help, action.option_strings
    text = " ".join(b.stdout.split())
    for name in config.CONFIGS:
        assert name in text
    for name in xpnet.models.MODELS:
        assert name in text


@pytest.mark.parametrize("command, needles", [
    ("eval", ("--top K", "(default: 10)", "--workers W", "--batch-size B", "--json", "--no-progress")),
    ("predict", ("--skip-bad", "--batch-size B", "(default: 256)", "--json", "confidence")),
])
def test_eval_and_predict_help(command, needles):
    r = run(command, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for n in needles:
        assert n in text, n


def test_predict_prints_text_and_confidence_and_the_accuracy_of_labelled_names(reader_files, tmp_path):
    model_path, folder = reader_files
    files = sorted(folder.glob("*.png"))
    (tmp_path / "unlabelled.png").write_bytes(files[0].read_bytes())
    r = run("predict", model_path, files[0], files[1], tmp_path / "unlabelled.png", folder)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    rows = [ln.split("\t") for ln in lines[:-1]]
    assert len(rows) == 3 + len(files)
    pred = Recognizer.load(model_path).predict_files([files[0], files[1], tmp_path / "unlabelled.png"] + files)
    assert [row[1] for row in rows] == pred.texts
    np.testing.assert_allclose([float(row[2]) for row in rows], pred.confidences, atol=5e-5)
    assert len(rows[2]) == 3                              # no label in "unlabelled.png": no verdict
    labelled = [row for i, row in enumerate(rows) if i != 2]
    assert all(row[3] == "right" or row[3].startswith("WRONG (label ") for row in labelled)
    n_right = sum(row[3] == "right" for row in labelled)
    assert lines[-1].startswith(f"accuracy on {len(labelled)} labelled image(s): whole-string "
                                f"{100 * n_right / len(labelled):.2f}%")
    j = run("predict", model_path, files[0], "--json")
    doc = json.loads(j.stdout)
    assert doc["text"] == pred.texts[0] and doc["label"] == files[0].name.split("_")[0]
    assert doc["right"] == (doc["text"] == doc["label"])


def test_predict_takes_labels_from_a_folders_own_labels_file(reader_files, tmp_path):
    # Numbered names that happen to fit the reader ("AB" from AB_x?) must not count as labels when the
    # folder has its own labels.csv: the file's labels are checked, in the lines and in --out.
    model_path, folder = reader_files
    files = sorted(folder.glob("*.png"))[:6]
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    rows = ["file,label"]
    for i, f in enumerate(files):
        name = f"{'ABCD'[i % 4]}{'ABCD'[(i + 1) % 4]}_{i}.png"  # a name that reads as a (wrong) label
        (numbered / name).write_bytes(f.read_bytes())
        if i < 5:  # the last image is not in the labels file: no verdict for it
            rows.append(f"{name},{f.name.split('_')[0]}")
    rows.append("missing.png,AB")  # a row naming no image is harmless here
    rows.append(f"{sorted(numbered.glob('*.png'))[0].name},ABCDE")  # a second, conflicting label: row not used
    (numbered / "labels.csv").write_text("\n".join(rows) + "\n")
    pred = Recognizer.load(model_path).predict_files(files)
    truth = [f.name.split("_")[0] for f in files]
    r = run("predict", model_path, numbered)
    assert r.returncode == 0, r.stderr
    assert "labels from" in r.stderr and "labels.csv (the folder's own)" in r.stderr
    assert "row(s) of" in r.stderr and "not used" in r.stderr
    lines = r.stdout.strip().splitlines()
    by_name = {Path(ln.split("\t")[0]).name: ln.split("\t") for ln in lines[:-1]}
    conflicting = sorted(numbered.glob("*.png"))[0].name
    expected_right = 0
    for i, f in enumerate(files):
        name = f"{'ABCD'[i % 4]}{'ABCD'[(i + 1) % 4]}_{i}.png"
        row = by_name[name]
        assert row[1] == pred.texts[i]
        if i == 5 or name == conflicting:
            assert len(row) == 3, row  # no label for it
        else:
            verdict = "right" if pred.texts[i] == truth[i] else f"WRONG (label {truth[i]})"
            assert row[3] == verdict
            expected_right += pred.texts[i] == truth[i]
    n_labelled = 5 - (conflicting in {f"{'ABCD'[i % 4]}{'ABCD'[(i + 1) % 4]}_{i}.png" for i in range(5)})
    assert lines[-1].startswith(f"accuracy on {n_labelled} labelled image(s): whole-string "
                                f"{100 * expected_right / n_labelled:.2f}% ({expected_right} right)")
    out = run("predict", model_path, numbered, "--out", tmp_path / "readings.csv", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert f"accuracy on {n_labelled} labelled image(s): whole-string {100 * expected_right / n_labelled:.2f}%" \
        in out.stdout


def test_predict_script_is_the_predict_command(reader_files):
    model_path, folder = reader_files
    a = run(model_path, folder, script="examples/predict.py")
    b = run("predict", model_path, folder)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_eval_reports_accuracy_and_confusions(reader_files):
    model_path, folder = reader_files
    r = run("eval", model_path, folder, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ev = Recognizer.load(model_path).evaluate_folder(folder)
    assert doc["n"] == 12 and doc["string_accuracy"] == pytest.approx(ev.string_accuracy)
    assert doc["char_accuracy"] == pytest.approx(ev.char_accuracy)
    assert [tuple(c) for c in doc["confused"]] == ev.confused
    text = run("eval", model_path, folder).stdout
    assert "12 images: whole-string accuracy" in text and "per-character accuracy" in text
    assert ("most confused (true -> read: count):" in text) == bool(ev.confused)


# ------------------------------------------------------------------------ errors


def test_model_file_errors(reader_files, tmp_path):
    model_path, folder = reader_files
    one_sentence(run("predict", tmp_path / "nothere.npz", folder), 1, "nothere.npz", "does not exist")
    data = model_path.read_bytes()
    (tmp_path / "damaged.npz").write_bytes(data[:len(data) // 3])
    one_sentence(run("eval", tmp_path / "damaged.npz", folder), 1, "damaged.npz")
    (tmp_path / "text.npz").write_text("hello")
    one_sentence(run("predict", tmp_path / "text.npz", folder), 1, "text.npz", "not an xpnet model file")


def test_image_and_folder_errors(reader_files, tmp_path):
    model_path, folder = reader_files
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    one_sentence(run("predict", model_path, tmp_path / "bad.png"), 1, "bad.png")
    one_sentence(run("predict", model_path, tmp_path / "missing.png"), 1, "missing.png", "no such file")
    r = run("predict", model_path, tmp_path / "bad.png", next(folder.glob("*.png")), "--skip-bad")
    assert r.returncode == 1 and "skipped" in r.stderr and "bad.png" in r.stderr
    assert len(r.stdout.strip().splitlines()) == 2        # the good image was read, plus the accuracy line
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    one_sentence(run("eval", model_path, empty), 1, "no image files")
    one_sentence(run("predict", model_path, empty), 1, "no image files")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "XYZ.png").write_bytes(next(folder.glob("*.png")).read_bytes())   # label does not fit the model
    one_sentence(run("eval", model_path, odd), 1, "none of the 1 image file(s)")


def test_train_usage_errors_exit_2(tmp_path):
    one_sentence(run("train", "--model", "nope", "--out", tmp_path / "a"), 2, "unknown model 'nope'", "captcha_net")
    one_sentence(run("train", "--config", "nope", "--out", tmp_path / "a"), 2, "unknown configuration 'nope'")
    one_sentence(run("train", "--resume", "--out", tmp_path / "none"), 2, "no run to resume", "drop --resume")
    one_sentence(run("train", "--resume"), 2, "--resume needs --out")
    one_sentence(run("train", "--batch-size", "0", "--out", tmp_path / "a"), 2, "--batch-size")
    one_sentence(run("train", "--charset", "A", "--out", tmp_path / "a"), 2, "at least 2 characters")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    one_sentence(run("train", "--out", busy), 2, "already holds files", "--resume")
    r = run("--model", "nope", script="examples/train.py")
    assert r.returncode == 2 and r.stderr.startswith("train.py: error: unknown model")
    assert not (tmp_path / "a").exists()        # nothing was created for a refused run


def test_train_runtime_errors_exit_1_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    one_sentence(run("train", "--out", tmp_path / "file" / "sub"), 1, "cannot be written")
    one_sentence(run("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "b"), 1, "does not exist")
    r = run("--debug", "predict", tmp_path / "nothere.npz", tmp_path / "x.png")
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = run("train", "--debug", "--model", "nope")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_cli_train_runs_resumes_and_never_overwrites(tmp_path, monkeypatch, capsys):
    tiny = config.get_config("default")
    tiny.update(model="simple_convnet", charset="ABC", length=2, height=24, width=48, channels=1, train_images=96,
                val_images=32, test_images=40, time_budget=None, epochs=2, batch_size=32, final_reserve=0,
                description="a tiny configuration for this test")
    monkeypatch.setitem(config.CONFIGS, "tiny", tiny)
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--out", str(out), "--workers", "0", "--no-progress"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert text.count(f"output folder: {out}") == 2          # at the start and at the end
    assert "whole-string accuracy" in text and "40 held-out generated images" in text
    assert {"model.npz", "history.csv", "history.json", "history.png", "run.json", "results.json"} <= \
        set(os.listdir(out))
    assert cli.main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert cli.main(args + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(args + ["--resume", "--lr", "0.5"]) == 2
    assert "--lr 0.5 differs from the run's" in capsys.readouterr().err


def test_cli_trains_a_range_of_lengths_with_a_ctc_head_and_eval_reads_it(tmp_path, monkeypatch, capsys):
    tiny = config.get_config("default")
    tiny.update(charset="ABC", height=32, width=48, channels=1, train_images=96, val_images=32, test_images=40,
                time_budget=None, epochs=1, batch_size=32, final_reserve=0, description="a tiny configuration")
    tiny["ctc"] = {**tiny["ctc"], "model_kwargs": {"channels": [4, 8, 8], "hidden": 8}}
    monkeypatch.setitem(config.CONFIGS, "tiny", tiny)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", "tiny", "--length", "2-3", "--out", str(out), "--workers", "0",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "2-3-character CAPTCHAs" in text and "ctc head" in text and "character error rate" in text
    assert cli.main(["train", "--config", "tiny", "--length", "2-3", "--head", "bce", "--out", str(tmp_path / "b")]) == 2
    assert "a range of lengths, which the bce head cannot read" in capsys.readouterr().err
    folder = tmp_path / "imgs"
    write_captcha_pngs(folder, 12, seed=1, charset="ABC", length="2-3", workers=0, progress=False)
    assert cli.main(["eval", str(out / "model.npz"), str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 12 and report["char_error_rate"] is not None and report["length_accuracy"] is not None


def test_the_example_script_shares_the_cli_error_policy(capsys):
    """examples/train.py runs under xpnet.cli.run_guarded: an error no command caught is still one
    sentence with the script's name and exit code 1, never a traceback."""
    import argparse

    from xpnet.cli import run_guarded

    def disk_full(args):
        raise OSError(28, "No space left on device", "/data/model.npz")

    assert run_guarded(disk_full, argparse.Namespace(debug=False), prog="train.py") == 1
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: No space left on device (/data/model.npz)") and err.count("\n") == 1
    assert "Traceback" not in err
