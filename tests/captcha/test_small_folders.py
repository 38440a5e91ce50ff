"""Small labelled folders: labels from a CSV (--labels), transfer (--init), k-fold (--folds), look-alike pretraining."""

import json
import os

import numpy as np
import pytest

from xpnet.captcha import job
from xpnet.captcha.config import TrainOptions, resolve_settings
from xpnet.data import write_captcha_pngs
from xpnet.data.folder import label_from_name
from xpnet.errors import UsageError


def test_a_folder_with_a_labels_file_trains_and_lists_what_it_skipped(tmp_path):
    made = tmp_path / "made"
    write_captcha_pngs(made, 60, seed=4, charset="ABCD", length=2, workers=0, progress=False)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = ["file,label"]
    for i, p in enumerate(sorted(made.glob("*.png"))):  # anonymous names, labels only in the CSV
        (imgs / f"{i:04d}.png").write_bytes(p.read_bytes())
        rows.append(f"{i:04d}.png,{label_from_name(p)}")
    rows[5] = rows[5].split(",")[0] + ","          # an empty label
    rows.append("0999.png,AB")                     # no such image
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    options = TrainOptions(data=str(imgs), labels=str(tmp_path / "labels.csv"), model="simple_convnet", epochs=1,
                           height=24, width=48, seed=0, pretrain=0)
    results = job.run(resolve_settings(options), tmp_path / "run", workers=0, progress=False, log=lambda m: None)
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_doc["data"]["images"] == 59 and run_doc["data"]["skipped"] == 3
    assert run_doc["data"]["labels"] == os.path.abspath(tmp_path / "labels.csv")
    skipped = (tmp_path / "run" / "skipped.txt").read_text()
    assert "labels.csv:6\tthe row gives 0004.png an empty label" in skipped
    assert "0004.png\tno usable label for it in labels.csv" in skipped
    assert "labels.csv:62\t0999.png is not an image file in" in skipped
    assert results["test"]["n"] == 12 and run_doc["settings"]["charset"] == "ABCD"


def test_a_folder_s_own_labels_csv_is_used_by_train_and_eval(tmp_path, capsys):
    """Numbered images with labels.csv beside them (the layout of most public sets) need no --labels."""
    from xpnet import cli

    made = tmp_path / "made"
    write_captcha_pngs(made, 40, seed=5, charset="ABCD", length=2, workers=0, progress=False)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = ["file,label"]
    for i, p in enumerate(sorted(made.glob("*.png"))):
        (imgs / f"{i:05d}.png").write_bytes(p.read_bytes())   # names of 5 digits: labels they are not
        rows.append(f"{i:05d}.png,{label_from_name(p)}")
    (imgs / "labels.csv").write_text("\n".join(rows) + "\n")
    settings = resolve_settings(TrainOptions(data=str(imgs), model="simple_convnet", epochs=1, height=24, width=48,
                                             seed=0, pretrain=0))
    assert settings.labels_file == str(imgs / "labels.csv")
    logged = []
    job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_doc["settings"]["charset"] == "ABCD" and run_doc["data"]["images"] == 40
    assert any("the folder's own" in m for m in logged)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run" / "model.npz"), str(imgs), "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 40 and "labels from" in err
    given = resolve_settings(TrainOptions(data=str(imgs), labels=str(tmp_path / "other.csv")))
    assert given.labels_file == str(tmp_path / "other.csv")   # a file given by --labels wins


def test_labels_need_a_folder():
    with pytest.raises(UsageError, match="--labels names the labels of a --data folder"):
        resolve_settings(TrainOptions(labels="labels.csv"))


@pytest.mark.parametrize("head", ["bce", "ctc"])
def test_eval_takes_labels_from_a_file(tmp_path, head):
    import xpnet
    from xpnet.captcha import Recognizer, metadata_for
    from xpnet.captcha.heads import ctc_metadata
    from xpnet.data import Charset, Preprocess

    pp = Preprocess(32, 48, channels=1)
    cs = Charset("ABCD", 2)
    xpnet.seed(0)
    if head == "ctc":
        model = xpnet.models.build("captcha_crnn", n_classes=4, input_shape=pp.shape, channels=(4, 4, 4), hidden=4)
        meta = ctc_metadata(cs, pp)
    else:
        model = xpnet.models.build("simple_convnet", n_classes=cs.n_outputs, input_shape=pp.shape)
        meta = metadata_for(cs, pp)
    reader = Recognizer(model, cs, pp, meta)
    made = tmp_path / "made"
    write_captcha_pngs(made, 6, seed=1, charset="ABCD", length=2, workers=0, progress=False)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    truth = {}
    for i, p in enumerate(sorted(made.glob("*.png"))):
        (imgs / f"{i}.png").write_bytes(p.read_bytes())
        truth[f"{i}.png"] = label_from_name(p)
    rows = [f"{f},{t}" for f, t in truth.items() if f != "5.png"] + ["7.png,AB"]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    result = reader.evaluate_folder(imgs, labels=tmp_path / "l.csv")
    assert result.n == 5
    reasons = {os.path.basename(p): r for p, r in result.skipped}
    assert reasons["5.png"] == "no usable label for it in l.csv" and reasons["l.csv:6"].startswith("7.png is not")
    by_name = reader.evaluate(*_read(reader, imgs, truth))
    assert result.string_accuracy == pytest.approx(by_name.string_accuracy)


def _read(reader, folder, truth):
    names = sorted(f for f in truth if f != "5.png")
    images = np.stack([reader.read_files([str(folder / f)])[0][0] for f in names])
    return images, [truth[f] for f in names]


def test_init_loads_the_layers_that_fit_and_keeps_a_new_output_layer(tmp_path):
    import xpnet
    from xpnet.nn import serialization as xio

    xpnet.seed(1)
    donor = xpnet.models.build("simple_convnet", n_classes=2 * 4, input_shape=(1, 24, 48))
    xio.save(donor, tmp_path / "donor.npz", {"task": "captcha"})
    imgs = tmp_path / "imgs"
    write_captcha_pngs(imgs, 40, seed=2, charset="ABCDE", length=2, workers=0, progress=False)
    options = TrainOptions(data=str(imgs), init=str(tmp_path / "donor.npz"), model="simple_convnet", epochs=1,
                           height=24, width=48, seed=0, lr=1e-9)
    logged = []
    job.run(resolve_settings(options), tmp_path / "run", workers=0, progress=False, log=logged.append)
    said = next(m for m in logged if m.startswith("started from"))
    model, _ = xio.load(tmp_path / "run" / "model.npz")
    params, old = model.parameters(), donor.parameters()
    out_layer = list(params)[-1].split(".")[0]     # 2 x 5 classes now, 2 x 4 in the donor: a new layer
    assert f"new: {out_layer}.W, {out_layer}.b (shapes differ)" in said
    for name, value in params.items():            # the rest starts from the donor (lr 1e-9: barely moved)
        if not name.startswith(out_layer):
            assert np.allclose(value, old[name], atol=1e-6), name
    with pytest.raises(UsageError, match="no such model file"):
        resolve_settings(TrainOptions(init=str(tmp_path / "none.npz")))
    xio.save(xpnet.models.build("simple_convnet", n_classes=3, input_shape=(3, 8, 8)), tmp_path / "other.npz")
    with pytest.raises(UsageError, match="none of the arrays of .*other.npz fits"):
        xio.load_matching(xpnet.models.build("captcha_crnn", n_classes=3), tmp_path / "other.npz")


def test_k_fold_tests_every_image_once_and_reports_mean_spread_and_pooled_interval(tmp_path):
    from xpnet.data import fold_indices

    parts = [fold_indices(23, k, 4, seed=3) for k in range(4)]
    assert sorted(np.concatenate([t for _, t in parts]).tolist()) == list(range(23))   # each item tested once
    assert all(len(np.intersect1d(r, t)) == 0 and len(r) + len(t) == 23 for r, t in parts)
    assert [len(t) for _, t in parts] == [6, 6, 6, 5]
    with pytest.raises(UsageError, match="2 or more folds"):
        fold_indices(10, 0, 1)

    imgs = tmp_path / "imgs"
    write_captcha_pngs(imgs, 45, seed=6, charset="ABC", length=2, workers=0, progress=False)
    options = TrainOptions(data=str(imgs), folds=3, model="simple_convnet", epochs=1, height=24, width=48, seed=0,
                           pretrain=0)
    logged = []
    summary = job.train(options, out=tmp_path / "cv", workers=0, progress=False, log=logged.append)
    assert summary["folds"] == 3 and summary["images"] == 45
    tested = []
    for k in (1, 2, 3):
        run_doc = json.loads((tmp_path / "cv" / f"fold-{k}" / "run.json").read_text())
        assert run_doc["data"]["fold"] == k and run_doc["data"]["test"] == 15
        tested.append(json.loads((tmp_path / "cv" / f"fold-{k}" / "results.json").read_text())["test"])
    acc = [t["string_accuracy"] for t in tested]
    assert summary["string_accuracy"]["per_fold"] == acc
    assert summary["string_accuracy"]["mean"] == pytest.approx(np.mean(acc))
    lo, hi = summary["pooled_interval_95"]
    assert lo <= summary["pooled_string_accuracy"] <= hi
    assert json.loads((tmp_path / "cv" / "folds.json").read_text())["images"] == 45
    assert any(m.startswith("3-fold cross-validation over 45 images") for m in logged)
    with pytest.raises(UsageError, match="--folds cross-validates a --data folder"):
        resolve_settings(TrainOptions(folds=3))
    with pytest.raises(UsageError, match="--folds must be at least 2"):
        resolve_settings(TrainOptions(data=str(imgs), folds=1))


def test_a_small_folder_pretrains_on_lookalikes_then_fine_tunes(tmp_path, monkeypatch):
    from xpnet.training.callbacks import StuckWatch

    imgs = tmp_path / "imgs"
    write_captcha_pngs(imgs, 40, seed=8, charset="ABCD", length=2, workers=0, progress=False)
    options = TrainOptions(data=str(imgs), model="simple_convnet", epochs=1, height=24, width=48, seed=0, pretrain=2)
    settings = resolve_settings(options)
    settings = settings.replace(pretrain={**settings.pretrain, "images": 64})
    distortions, watched = [], []   # per trainer: pretraining's, then fine-tuning's
    real_make = job._make_trainer

    def spy_make(model, opt, out, s, *args, **kwargs):
        distortions.append(s.distort)
        trainer = real_make(model, opt, out, s, *args, **kwargs)
        watched.append(any(isinstance(c, StuckWatch) for c in trainer.callbacks))
        return trainer

    monkeypatch.setattr(job, "_make_trainer", spy_make)
    logged = []
    job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    # the look-alikes are not distorted; the folder's images get the small-folder distortions
    assert distortions == [{}, settings.folder_small["distort"]] and distortions[1]
    # the look-alikes' trainer has no StuckWatch (it would judge them on the folder's images)
    assert watched == [False, True]
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    done = run_doc["data"]["pretrain"]
    assert done["images"] == 64 and done["steps"] >= 1 and 0 <= done["val_string_accuracy"] <= 1
    assert done["style"]["fonts"] and done["style"]["width"] / done["style"]["height"] == pytest.approx(2, rel=0.05)
    assert any(m.startswith("pretraining on 64 look-alikes") for m in logged)
    from xpnet.captcha import Recognizer

    # 2 s of pretraining may or may not read a validation image, depending on the machine's speed
    assert done["used"] == (done["val_string_accuracy"] > 0)
    if done["used"]:
        pre = Recognizer.load(tmp_path / "run" / "pretrained.npz")   # a reader, for --init elsewhere
        assert pre.charset.chars == "ABCD" and pre.metadata["pretrained_on"] == "lookalikes"
    else:  # weights that read nothing are dropped: fine-tuning starts from the fresh ones
        assert not (tmp_path / "run" / "pretrained.npz").exists()
        assert any("fine-tuning starts from fresh weights" in m for m in logged)
    # no pretraining for large folders, resumed runs, runs started from --init, or --pretrain 0
    from xpnet.captcha.pretrain import wants_pretraining
    from xpnet.captcha.plans import FolderPlan

    plan = FolderPlan(charset=None, preprocess=None, n_train=30, describe={}, val=(), test=(), test_name="",
                      learned={})
    assert wants_pretraining(settings, plan, resume=False)
    assert not wants_pretraining(settings, plan, resume=True)
    assert not wants_pretraining(settings.replace(init="x.npz"), plan, resume=False)
    assert not wants_pretraining(resolve_settings(TrainOptions(data=str(imgs), pretrain=0)), plan, resume=False)
    plan.n_train = 10_000
    assert not wants_pretraining(settings, plan, resume=False)


def test_a_folder_job_fits_its_time_budget_pretraining_included(tmp_path, monkeypatch, trainer_budgets):
    """Pretraining takes at most its share of the job's budget; fine-tuning gets what is left after it."""
    import types

    from xpnet.captcha.pretrain import pretrain_seconds

    imgs = tmp_path / "imgs"
    write_captcha_pngs(imgs, 40, seed=8, charset="ABCD", length=2, workers=0, progress=False)
    default = resolve_settings(TrainOptions(data=str(imgs)))
    assert default.time_budget == 870 and pretrain_seconds(default) == default.pretrain["seconds"] == 240
    assert pretrain_seconds(default.replace(time_budget=300)) == pytest.approx(90)   # 30% of a short budget
    assert pretrain_seconds(default.replace(time_budget=None)) == 240
    assert resolve_settings(TrainOptions(data=str(imgs), epochs=5)).time_budget is None

    clock = [1000.0]   # the job's clock: pretraining "takes" 100 s of it
    monkeypatch.setattr(job, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def fake_pretrain(model, settings, plan, out, make, log):
        clock[0] += 100.0
        return {"used": False, "seconds": 100.0}

    monkeypatch.setattr(job, "pretrain", fake_pretrain)
    settings = resolve_settings(TrainOptions(data=str(imgs), model="simple_convnet", steps=2, time_budget=400,
                                             height=24, width=48, seed=0))
    job.run(settings, tmp_path / "run", workers=0, progress=False, log=lambda m: None)
    assert trainer_budgets == [400 - 100 - settings.final_reserve]


def test_confidence_threshold_is_the_lowest_with_the_asked_precision():
    from xpnet.captcha.pseudo import confidence_threshold

    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.50, 0.40])
    right = np.array([True, True, True, True, False, True, False])
    assert confidence_threshold(conf, right, precision=1.0, min_count=2) == 0.96
    assert confidence_threshold(conf, right, precision=0.8, min_count=2) == 0.50   # 5 of 6 right
    assert confidence_threshold(conf, right, precision=1.0, min_count=5) is None


def test_unlabelled_images_add_pseudo_labels_in_rounds(tmp_path):
    imgs, extra = tmp_path / "imgs", tmp_path / "extra"
    write_captcha_pngs(imgs, 60, seed=11, charset="ABC", length=2, workers=0, progress=False)
    write_captcha_pngs(extra, 40, seed=12, charset="ABC", length=2, workers=0, progress=False)
    (extra / "broken.png").write_bytes(b"not a png")
    options = TrainOptions(data=str(imgs), unlabelled=str(extra), model="simple_convnet", epochs=8, height=24,
                           width=48, seed=0, pretrain=0, lr=1e-2)
    settings = resolve_settings(options)
    settings = settings.replace(pseudo={**settings.pseudo, "rounds": 2, "precision": 0.0, "min_count": 1,
                                        "epochs": 2})
    logged = []
    job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    rounds = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["pseudo_labels"]
    # precision 0: every reading that fits the task is taken (the mechanics; real runs ask 99%)
    assert rounds and rounds[0]["round"] == 1 and rounds[0]["unlabelled"] == 40 and 0 < rounds[0]["added"] <= 40
    assert all(r["kept"] == (r["val_after"] >= r["val_before"]) for r in rounds)
    assert any("could not be read" in m for m in logged) and any(m.startswith("pseudo-labels, round 1") for m in logged)
    with pytest.raises(UsageError, match="--unlabelled adds pseudo-labelled images to a --data folder"):
        resolve_settings(TrainOptions(unlabelled=str(extra)))
    with pytest.raises(UsageError, match="no such folder"):
        resolve_settings(TrainOptions(data=str(imgs), unlabelled=str(tmp_path / "nope")))


def test_lookalikes_learnt_but_read_at_chance_are_evidence_against_the_labels():
    from xpnet.captcha.pretrain import characters_read
    from xpnet.training.history import History

    def history(losses, key, values):
        return History([{"train_loss": a, key: b} for a, b in zip(losses, values)])

    # the pretraining of a 5-character development folder (19 classes) whose labels had been shuffled
    learnt = [15.41, 1.153, 0.397, 0.288]
    shuffled = characters_read(history(learnt, "val_char_error_rate", [0.9735, 0.959, 0.9639, 0.959]), 19)
    assert shuffled["at_chance"] and shuffled["val_char_error_rate"] == 0.959
    assert "training loss 15.4 -> 0.288" in shuffled["evidence"] and "error rate 0.96" in shuffled["evidence"]
    # with label smoothing the look-alikes' plain loss levels out higher, still under half its start
    smoothed = characters_read(history([13.53, 4.03, 3.60, 3.50], "val_char_error_rate", [0.959] * 4), 19)
    assert smoothed["at_chance"]
    assert not characters_read(history([17.0, 15.3, 15.2], "val_char_error_rate", [0.96] * 3), 19)["at_chance"]
    right = characters_read(history(learnt, "val_char_error_rate", [0.6, 0.3, 0.2, 0.25]), 19)
    assert right == {"val_char_error_rate": 0.2, "at_chance": False, "evidence": ""}
    # look-alikes not learnt either: nothing to say about the labels
    assert not characters_read(history([15.4, 14.9, 14.2], "val_char_error_rate", [1.0] * 3), 19)["at_chance"]
    bce = [3.0, 0.5, 0.2]
    assert characters_read(history(bce, "val_char_accuracy", [0.05, 0.07, 0.06]), 19)["at_chance"]
    assert not characters_read(history(bce, "val_char_accuracy", [0.05, 0.3, 0.5]), 19)["at_chance"]
    assert characters_read(History([{"train_loss": 1.0}]), 19) == {}


def test_a_stuck_folder_run_after_such_pretraining_is_told_to_check_its_labels(tmp_path, monkeypatch):
    from xpnet.training.callbacks import StuckWatch

    imgs = tmp_path / "imgs"
    write_captcha_pngs(imgs, 40, seed=8, charset="ABCD", length=2, workers=0, progress=False)
    monkeypatch.setattr(job, "pretrain", lambda *a, **k: {"used": False, "at_chance": True, "seconds": 0.0})
    original, advice = job._stuck_watch, []

    class StuckAtOnce(StuckWatch):
        def on_epoch_end(self, trainer, record):
            if not self.stuck:
                self.stuck = True
                trainer.request_stop("stopping: nothing is being learned (a test); " + self.advice)

    def watch(plan, hint=""):
        advice.append(original(plan, hint).advice)
        return StuckAtOnce(advice=advice[-1])

    monkeypatch.setattr(job, "_stuck_watch", watch)
    logged = []
    settings = resolve_settings(TrainOptions(data=str(imgs), model="simple_convnet", steps=2, height=24, width=48,
                                             seed=0))
    results = job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    assert results["stuck"] and len(advice) >= 2
    assert all(a.startswith("check that the labels belong to their images") and "else try" in a for a in advice)
    stopped = [m for m in logged if m.startswith("stopped: still nothing learned")]
    assert len(stopped) == 1 and "check that the labels belong" in stopped[0]
    assert stopped[0].endswith("or more labelled images")
    # without that evidence the advice is the usual one
    assert original(type("Plan", (), {"head": "ctc"})()).advice.startswith("try --head bce")
