"""The CAPTCHA training job (xpnet.captcha.job, .plans, .network) and the Trainer's limits (time budget,
max_steps, out-of-memory guard) it relies on."""

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.captcha import job, network, plans
from xpnet.captcha.config import CONFIGS, Settings, derive_seed, get_config
from xpnet import memory as gpu_errors
from xpnet.data import generate_captchas, write_captcha_pngs
from xpnet.errors import UsageError
from xpnet.captcha.recognizer import Recognizer

from tests.system import _train_worker as W

# A tiny but real task: 2 characters over 4 classes (chance: 1/16 whole strings), small grey inputs and the
# cheap seed MNIST network, so that a few epochs run in seconds.
TINY = dict(config="default", data_dir=None, seed=0, model="simple_convnet", model_kwargs={}, charset="ABCD",
            length=2, height=24, width=48, channels=1, train_images=400, val_images=60, test_images=150,
            time_budget=None, epochs=5, batch_size=32, lr=1e-2, final_reserve=0, pretrain={}, head="bce")


def tiny_settings(**changes):
    return Settings.from_dict({**get_config("default"), **TINY, **changes})


def quiet(msg):
    pass


def test_a_short_synthetic_run_learns_and_writes_a_reader(tmp_path):
    results = job.run(tiny_settings(), tmp_path, workers=0, progress=False, log=quiet)
    test = results["test"]
    assert test["n"] == 150
    assert test["string_accuracy"] >= 0.25               # chance is 1/16 (seeds 0 and 1 gave 0.67 and 0.42)
    assert test["char_accuracy"] >= 0.5                  # chance is 1/4
    history = json.loads((tmp_path / "history.json").read_text())["epochs"]
    assert len(history) == 5 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_string_accuracy"] > history[0]["val_string_accuracy"]
    # the saved reader reads the test images as the run reported
    reader = Recognizer.load(tmp_path / "model.npz")
    meta = reader.metadata
    assert meta["charset"] == {"chars": "ABCD", "length": 2} and meta["preprocess"]["height"] == 24
    assert meta["model"] == "simple_convnet" and meta["config"] == "default"
    assert meta["results"]["test_string_accuracy"] == pytest.approx(test["string_accuracy"])
    test_set = generate_captchas(150, derive_seed(0, "test"), "ABCD", 2, preprocess=reader.preprocess, workers=0,
                                 progress=False)
    again = reader.evaluate(test_set.images, test_set.labels)
    assert again.string_accuracy == pytest.approx(test["string_accuracy"])


def test_budget_and_held_out_evaluation_wiring(tmp_path, monkeypatch, trainer_budgets):
    """The default configuration's shape with a tiny budget: training stops on the budget, then the test
    images -- from a seed of their own, never seen in training -- are evaluated, and everything is saved."""
    default = CONFIGS["default"]
    assert default["time_budget"] <= 15 * 60 - 30 and default["test_images"] == 2000   # 30 s for start-up and exit
    assert default["epochs"] is None and default["steps"] is None      # the budget decides
    assert CONFIGS["long"]["time_budget"] <= 60 * 60 - 60

    made, evaluated = [], []
    real_generate, real_evaluate = plans.generate_captchas, Recognizer.evaluate

    def spy_generate(count, seed, *args, **kwargs):
        data = real_generate(count, seed, *args, **kwargs)
        made.append((count, seed, data))
        return data

    def spy_evaluate(self, images, labels, *args, **kwargs):
        evaluated.append((np.array(images), list(labels)))
        return real_evaluate(self, images, labels, *args, **kwargs)

    monkeypatch.setattr(plans, "generate_captchas", spy_generate)
    monkeypatch.setattr(Recognizer, "evaluate", spy_evaluate)
    # The job's clock stands still while the data are made (however loaded this machine is), so the
    # trainer must get the whole budget less the final reserve; the trainer itself keeps the real clock.
    monkeypatch.setattr(job, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))
    settings = tiny_settings(epochs=None, time_budget=4.0, final_reserve=1, train_images=150, val_images=40,
                             test_images=60)
    results = job.run(settings, tmp_path, workers=0, progress=False, log=quiet)
    assert trainer_budgets == [3.0]

    seeds = {count: seed for count, seed, _ in made}
    train_seed, val_seed, test_seed = seeds[150], seeds[40], seeds[60]
    assert train_seed == 0 and len({train_seed, val_seed, test_seed}) == 3
    assert test_seed == derive_seed(0, "test") and val_seed == derive_seed(0, "validation")
    assert len(evaluated) == 1
    images, labels = evaluated[0]
    test_data = [d for count, _, d in made if count == 60][0]
    np.testing.assert_array_equal(images, test_data.images)
    assert labels == test_data.labels
    train_data = [d for count, _, d in made if count == 150][0]
    seen = {hashlib.sha1(im.tobytes()).digest() for im in train_data.images}
    assert not any(hashlib.sha1(im.tobytes()).digest() in seen for im in images)

    # stopped by the budget (no epoch or step limit was set), then evaluated and saved
    history = json.loads((tmp_path / "history.json").read_text())["epochs"]
    run_doc = json.loads((tmp_path / "run.json").read_text())
    assert run_doc["data"]["test_seed"] == test_seed and run_doc["settings"]["time_budget"] == 4.0
    assert run_doc["settings"]["epochs"] is None and run_doc["settings"]["steps"] is None
    assert history[-1]["elapsed"] >= 3.0 and results["train_seconds"] >= 3.0   # stopped by the budget
    for name in ("model.npz", "history.csv", "history.json", "history.png", "results.json", "run.json",
                 "best.npz"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test"]["n"] == 60 and str(test_seed) in saved["test_set"]


def test_folder_pipeline_splits_reports_and_holds_out_the_test_part(tmp_path):
    folder = tmp_path / "imgs"
    write_captcha_pngs(folder, 200, seed=4, charset="ABCD", length=2, workers=0, progress=False)
    (folder / "AB_999.png").write_bytes(b"")              # unreadable
    (folder / "ABCDE_1.png").write_bytes((next(folder.glob("*_0.png"))).read_bytes())  # label of another length
    (folder / "notes.txt").write_text("ignored")
    settings = tiny_settings(data_dir=str(folder), charset=None, length=2, width=None, epochs=2,
                             time_budget=None)
    logged = []
    results = job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    d = run_doc["data"]
    assert d["images"] == 200 and d["skipped"] == 2
    assert (d["test"], d["val"], d["train"]) == (40, 16, 144)        # 20% test, 10% of the rest validation
    assert run_doc["settings"]["charset"] == "ABCD" and run_doc["settings"]["length"] == 2
    assert run_doc["settings"]["width"] == 64        # 160x60 renders at height 24, rounded up to a multiple of 8
    skipped = (tmp_path / "run" / "skipped.txt").read_text()
    assert "AB_999.png" in skipped and "ABCDE_1.png" in skipped
    assert any("2 file(s) skipped" in m for m in logged)
    assert results["test"]["n"] == 40
    # the test part is exactly the seeded split's, and its images are not in the training part
    from xpnet.data import split_indices
    rest, test_idx = split_indices(200, 0.2, derive_seed(0, "split"))
    names = sorted(p.name for p in folder.glob("*.png") if p.name not in ("AB_999.png", "ABCDE_1.png"))
    test_names = {names[i] for i in test_idx}
    mistakes = {Path(p).name for p, *_ in results["test_mistakes"]}
    assert mistakes <= test_names


def test_stream_mode_trains_on_fresh_batches(tmp_path):
    logged = []
    results = job.run(tiny_settings(data="stream", stream_epoch_steps=3, epochs=2, val_images=30, test_images=30),
                     tmp_path, workers=0, progress=False, log=logged.append)
    history = json.loads((tmp_path / "history.json").read_text())["epochs"]
    assert [r["step"] for r in history] == [3, 6] and results["test"]["n"] == 30
    assert any("fresh images per epoch" in m for m in logged)
    assert json.loads((tmp_path / "run.json").read_text())["data"]["train_images"] == "stream"
    # the share of the training time spent waiting for batches, per epoch and for the run
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in history)
    assert 0.0 <= results["data_wait"] <= 1.0
    assert any("waiting for data" in m for m in logged)


def test_pregenerate_by_budget_makes_the_first_images_of_the_seed():
    from xpnet.data import Charset, Preprocess
    cs, pp = Charset("ABCD", 2), Preprocess(height=24, width=48, channels=1)
    said = []
    full = plans.pregenerate({"max": 40, "budget_fraction": 0.5}, 7, cs, pp, 0, False, 100.0, said.append, chunk=16)
    assert len(full) == 40 and "the limit" in said[-1]
    some = plans.pregenerate({"max": 10 ** 6, "budget_fraction": 1e-9}, 7, cs, pp, 0, False, 100.0, said.append,
                          chunk=16)
    assert 1 <= len(some) < 10 ** 6 and "of the budget" in said[-1]     # at least one chunk, then the time is up
    want = generate_captchas(len(some), 7, cs, preprocess=pp, workers=0, progress=False)
    np.testing.assert_array_equal(some.images, want.images)
    assert some.labels == want.labels


def test_prior_bias_starts_the_outputs_at_the_class_prior():
    from xpnet.data import Charset, Preprocess
    cs, pp = Charset("ABCD", 2), Preprocess(height=24, width=48, channels=1)
    model = network.build_model("captcha_net", cs, pp)
    network.set_prior_bias(model, cs)
    b = model.layers[-1].params["b"]
    assert b.shape == (8,) and b.dtype == np.float32
    np.testing.assert_allclose(1 / (1 + np.exp(-b.astype(np.float64))), 0.25, rtol=1e-6)


def test_folder_epochs_and_patience_scale_with_the_data():
    assert plans.folder_epochs(720) == 200 and plans.folder_epochs(7168) == 42 and plans.folder_epochs(72_000) == 10
    assert plans.folder_patience(200) == 50 and plans.folder_patience(42) == 15 and plans.folder_patience(10) == 15


@pytest.mark.parametrize("below, want_bn", [(5000, True), (10, False)])
def test_small_folders_get_batchnorm_and_stronger_augmentation(tmp_path, below, want_bn):
    folder = tmp_path / "imgs"
    write_captcha_pngs(folder, 60, seed=5, charset="ABCD", length=2, workers=0, progress=False)
    settings = tiny_settings(data_dir=str(folder), charset=None, length=None, width=None, epochs=1,
                             model="captcha_net", max_shift=2, max_scale=0.05,
                             folder_small={"below": below, "batchnorm": True, "max_shift": 3, "max_scale": 0.1})
    logged = []
    job.run(settings, tmp_path / "run", workers=0, progress=False, log=logged.append)
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_doc["settings"]["model_kwargs"] == ({"batchnorm": True} if want_bn else {})
    aug = (run_doc["settings"]["max_shift"], run_doc["settings"]["max_scale"])
    assert aug == ((3, 0.1) if want_bn else (2, 0.05))
    model, _ = xpnet.load(tmp_path / "run" / "model.npz")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("BatchNorm") == (3 if want_bn else 0) and kinds.count("Conv2D") == 3
    assert any("with BatchNorm" in m for m in logged) == want_bn


# -------------------------------------------------------------- the Trainer's limits


def test_max_steps_stops_mid_epoch_and_saves(tmp_path):
    model, opt = W.build(4)
    trainer = W.make_trainer(model, opt, tmp_path, max_steps=8)
    trainer.fit(W.make_data(), epochs=4, val=W.make_data(48, seed=6))
    h = trainer.history
    assert h[-1]["step"] == 8 and len(h) == 2      # 6 steps per epoch: the second epoch ends at step 8
    assert trainer.fraction_done() == 1.0
    assert (tmp_path / "model.npz").is_file()
    model2, opt2 = W.build(4)
    said = []
    again = W.make_trainer(model2, opt2, tmp_path, max_steps=8, log=said.append)
    again.fit(W.make_data(), epochs=4, val=W.make_data(48, seed=6), resume=True)
    assert any("nothing to do" in m and "max_steps" in m for m in said)


def test_time_budget_stops_cleanly_and_counts_over_resumes(tmp_path):
    model, opt = W.build(50)
    trainer = W.make_trainer(model, opt, tmp_path, slow=0.02, time_budget=0.3)
    trainer.fit(W.make_data(), epochs=50, val=W.make_data(48, seed=6))
    h = trainer.history
    assert 1 <= h[-1]["step"] < 50 * W.STEPS_PER_EPOCH
    assert h[-1]["elapsed"] >= 0.3 and trainer.elapsed() >= 0.3 and trainer.fraction_done() == 1.0
    assert (tmp_path / "model.npz").is_file()
    # a resumed run with a larger budget goes on from the time already spent (0.3 s more than the
    # first run took: a fixed 0.6 s left nothing to do when a busy machine stretched the first run)
    model2, opt2 = W.build(50)
    budget = trainer.elapsed() + 0.3
    more = W.make_trainer(model2, opt2, tmp_path, slow=0.02, time_budget=budget)
    more.fit(W.make_data(), epochs=50, val=W.make_data(48, seed=6), resume=True)
    assert more.history[-1]["step"] > h[-1]["step"] and more.elapsed() >= budget
    assert more.elapsed() - trainer.elapsed() < 2.0   # it did not start the budget from zero


@pytest.mark.parametrize("tie_break", [None, "val_loss"])
def test_tie_break_keeps_improving_while_the_accuracy_is_stuck(tie_break):
    model, opt = W.build(8)
    perfect = {"accuracy": lambda logits, y: 1.0}       # an accuracy stuck at 100% from the first epoch
    trainer = W.make_trainer(model, opt, None, metrics=perfect, patience=2, tie_break=tie_break)
    trainer.fit(W.make_data(), epochs=8, val=W.make_data(48, seed=6))
    h = trainer.history
    losses = [r["val_loss"] for r in h.epochs]
    if tie_break is None:
        assert len(h) == 3                               # stopped: nothing "improved" after epoch 1
    else:
        assert len(h) > 3 and min(losses) < losses[0]    # lower losses count as progress
        best = int(np.argmin(losses[:len(h)])) + 1
        assert trainer.best_epoch == best == trainer.state.best_epoch


def test_bad_limits_are_usage_errors():
    model, opt = W.build(1)
    with pytest.raises(UsageError, match="time_budget"):
        W.make_trainer(model, opt, None, time_budget=-1)
    with pytest.raises(UsageError, match="max_steps"):
        W.make_trainer(model, opt, None, max_steps=0)


def test_out_of_memory_in_a_step_becomes_one_sentence(monkeypatch):
    model, opt = W.build(1)
    trainer = W.make_trainer(model, opt, None)

    def no_memory(x, train=False):
        raise MemoryError("Unable to allocate 9.99 GiB")

    monkeypatch.setattr(model, "forward", no_memory)
    with pytest.raises(gpu_errors.OutOfMemoryError, match="batch"):
        trainer.fit(W.make_data(), epochs=1)


def test_a_stuck_run_starts_once_more_with_a_lower_rate_and_a_longer_warm_up(tmp_path, monkeypatch):
    # the first attempt's watch declares it stuck after its first epoch; the second attempt's never fires
    from xpnet.training.callbacks import StuckWatch

    class StuckAtOnce(StuckWatch):
        def on_epoch_end(self, trainer, record):
            if not self.stuck:
                self.stuck = True
                trainer.request_stop("stopping: nothing is being learned (a test)")

    watches = []

    def watch(plan, hint=""):
        watches.append(StuckAtOnce() if not watches else StuckWatch(min_steps=10 ** 9))
        return watches[-1]

    monkeypatch.setattr(job, "_stuck_watch", watch)
    logged = []
    settings = tiny_settings(epochs=3)
    results = job.run(settings, tmp_path, workers=0, progress=False, log=logged.append)
    assert len(watches) == 2 and not results["stuck"]
    aside = tmp_path / "stuck-1"
    assert (aside / "model.npz").is_file() and (aside / "checkpoints").is_dir()
    assert len(json.loads((aside / "history.json").read_text())["epochs"]) == 1  # the stuck attempt: one epoch
    assert len(json.loads((tmp_path / "history.json").read_text())["epochs"]) == 3  # the new one ran its course
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["settings"]["lr"] == pytest.approx(settings.lr * 0.25)
    assert run["settings"]["warmup_steps"] == 2 * settings.warmup_steps
    assert run["started_again"]["first_attempt"] == "stuck-1"
    assert any(m.startswith("starting once more with the peak learning rate 0.01 -> 0.0025") for m in logged)
    assert Recognizer.load(tmp_path / "model.npz").metadata["settings"]["lr"] == pytest.approx(0.0025)
    # configured off: the stuck attempt stands, nothing set aside
    watches.clear()
    off = job.run(tiny_settings(epochs=3, stuck_retry={}), tmp_path / "off", workers=0, progress=False, log=quiet)
    assert off["stuck"] and len(watches) == 1 and not (tmp_path / "off" / "stuck-1").exists()
