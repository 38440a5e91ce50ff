"""The training job with a CTC head: ranges of lengths, mixed-length folders, what cannot be read."""

import json

import numpy as np
import pytest

from xpnet.captcha import job
from xpnet.captcha.config import Settings, TrainOptions, derive_seed, get_config, resolve_settings
from xpnet.captcha.recognizer import Recognizer
from xpnet.data import generate_captchas, write_captcha_pngs
from xpnet.errors import UsageError

# A tiny CTC task: 2 to 3 characters over 4 classes, a narrow CRNN on 32x48 grey inputs (12 columns).
SMALL_CRNN = {"channels": [8, 16, 16], "hidden": 16, "batchnorm": True}
TINY = dict(config="default", data_dir=None, seed=0, charset="ABCD", length=3, min_length=2, head="ctc",
            model="captcha_crnn", model_kwargs=SMALL_CRNN, prior_bias=False, height=32, width=48, channels=1,
            train_images=600, val_images=60, test_images=120, time_budget=None, epochs=10, batch_size=32, lr=5e-3,
            final_reserve=0, pretrain={})


def tiny_settings(**changes):
    return Settings.from_dict({**get_config("default"), **TINY, **changes})


def quiet(msg):
    pass


def test_a_range_of_lengths_trains_a_ctc_reader(tmp_path):
    results = job.run(tiny_settings(), tmp_path, workers=0, progress=False, log=quiet)
    test = results["test"]
    assert results["stuck"] is False
    # chance reads whole strings of 2-3 characters over 4 classes at under 5% (seeds 0, 1, 2 gave 0.70, 0.53, 0.57)
    assert test["n"] == 120 and test["string_accuracy"] >= 0.3 and test["char_error_rate"] < 0.4
    assert 0 <= test["length_accuracy"] <= 1
    history = json.loads((tmp_path / "history.json").read_text())["epochs"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and "val_char_error_rate" in history[0]
    reader = Recognizer.load(tmp_path / "model.npz")
    assert reader.head == "ctc" and reader.charset.lengths == "2-3" and reader.metadata["head"] == "ctc"
    assert reader.metadata["lengths"] == [2, 3] and reader.lengths == (2, 3)  # readings of 2 or 3 characters
    test_set = generate_captchas(120, derive_seed(0, "test"), "ABCD", "2-3", preprocess=reader.preprocess,
                                 workers=0, progress=False)
    assert {len(t) for t in test_set.labels} == {2, 3}
    again = reader.evaluate(test_set.images, test_set.labels)
    assert again.string_accuracy == pytest.approx(test["string_accuracy"])


def test_label_smoothing_logs_the_plain_loss_and_breaks_ties_by_the_smoothed_one(tmp_path, monkeypatch):
    from xpnet.captcha.heads import CTCLoss

    made, original = [], job._make_trainer

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(job, "_make_trainer", spy)
    job.run(tiny_settings(epochs=2, label_smoothing=0.1), tmp_path, workers=0, progress=False, log=quiet)
    trainer = made[-1]
    assert isinstance(trainer.loss, CTCLoss) and trainer.loss.smoothing == 0.1
    assert trainer.early_stopping.tie_break == "val_smoothed_loss"
    record = json.loads((tmp_path / "history.json").read_text())["epochs"][-1]
    val = trainer.history.epochs[-1]
    assert record["val_smoothed_loss"] == val["val_smoothed_loss"] != val["val_loss"]
    unsmoothed = job.run(tiny_settings(epochs=2), tmp_path / "plain", workers=0, progress=False, log=quiet)
    assert made[-1].early_stopping.tie_break == "val_loss" and made[-1].loss.smoothing == 0.0
    assert "val_smoothed_loss" not in made[-1].history.epochs[-1] and unsmoothed["epochs"] == 2


def test_stream_mode_codes_ctc_targets(tmp_path):
    results = job.run(tiny_settings(data="stream", stream_epoch_steps=3, epochs=2, val_images=30, test_images=30),
                      tmp_path, workers=0, progress=False, log=quiet)
    assert results["steps"] == 6 and results["test"]["n"] == 30 and "char_error_rate" in results["test"]


def test_a_mixed_length_folder_trains_ctc_and_lists_what_it_cannot_read(tmp_path):
    folder = tmp_path / "imgs"
    write_captcha_pngs(folder, 120, seed=4, charset="ABCD", length="2-3", workers=0, progress=False)
    some = next(folder.glob("*_0.png")).read_bytes()
    (folder / "AAAAAAA_1.png").write_bytes(some)   # needs 13 columns (6 blanks between repeats): 12 are read
    (folder / "_2.png").write_bytes(some)           # an empty label
    (folder / "ABXD_3.png").write_bytes(some)       # X is outside --charset
    settings = resolve_settings(TrainOptions(data=str(folder), charset="ABCD", epochs=1, seed=0, pretrain=0))
    settings = settings.replace(**{k: TINY[k] for k in ("model_kwargs", "height", "width", "channels",
                                                        "batch_size")})
    logged = []
    results = job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    s = run_doc["settings"]
    assert (s["head"], s["model"], s["min_length"], s["length"]) == ("ctc", "captcha_crnn", 2, 3)
    assert run_doc["data"]["images"] == 120 and run_doc["data"]["skipped"] == 3
    skipped = dict(line.split("\t") for line in (tmp_path / "run" / "skipped.txt").read_text().splitlines())
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in skipped.items()}
    assert reasons["AAAAAAA_1.png"].startswith("label 'AAAAAAA' needs 13 columns but captcha_crnn reads 12")
    assert "empty label" in reasons["_2.png"] and "outside the charset" in reasons["ABXD_3.png"]
    assert results["test"]["n"] == 24 and Recognizer.load(tmp_path / "run" / "model.npz").head == "ctc"
    assert any("3 file(s) skipped" in m for m in logged)


def test_labels_too_long_for_the_columns_are_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="up to 7 characters can need 13 columns.*reads 12 at input width 48"):
        job.run(tiny_settings(length=7), tmp_path, workers=0, progress=False, log=quiet)
    assert not (tmp_path / "run.json").exists()


def test_a_folder_of_one_length_takes_the_folder_default_head_unless_told(tmp_path):
    from xpnet.captcha.config import CONFIGS

    folder = tmp_path / "imgs"
    write_captcha_pngs(folder, 30, seed=5, charset="ABCD", length=2, workers=0, progress=False)
    settings = resolve_settings(TrainOptions(data=str(folder), epochs=1, seed=0, model="simple_convnet"))
    assert settings.head == "bce"  # the model says so
    auto = resolve_settings(TrainOptions(data=str(folder), epochs=1, seed=0, pretrain=0)).replace(
        height=32, width=48)
    results = job.run(auto, tmp_path / "run", workers=0, progress=False, log=quiet)
    want = CONFIGS["default"]["folder"]["fixed_length_head"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["head"] == want
    assert (results["test"]["char_error_rate"] is None) == (want == "bce")
    assert np.isfinite(results["test"]["string_accuracy"])
