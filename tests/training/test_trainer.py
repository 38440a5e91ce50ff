"""The training loop: learning, resume equivalence (in-process and after kill -9), NaN handling,
Ctrl-C, early stopping, history files, data sources and usage errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.nn import serialization as xio
from xpnet.nn import optim
from xpnet.errors import DataError, StorageError, TrainingError, UsageError
from xpnet.ops import softmax_cross_entropy

from tests.system import _train_worker as W

ROOT = Path(__file__).resolve().parents[2]


def weights(model):
    return {k: np.array(v) for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_the_tiny_task_is_learnt_and_files_are_written(tmp_path):
    model, trainer = W.run(tmp_path, epochs=4, plot=True)
    h = trainer.history
    assert len(h) == 4 and h[-1]["step"] == 4 * W.STEPS_PER_EPOCH
    assert h[-1]["val_accuracy"] >= 0.75 > 1 / 3, h.epochs   # chance is 1/3
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert len(rows) == 5 and {"epoch", "train_loss", "val_loss", "val_accuracy", "lr"} <= set(rows[0].split(","))
    data = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in data["epochs"]] == [1, 2, 3, 4]
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "history.png").stat().st_size > 5000
    ckpts = xio.list_checkpoints(tmp_path / "checkpoints")
    assert len(ckpts) == 2 and ckpts[0].name == xio.checkpoint_name(24)   # keep_checkpoints=2
    loaded, meta = xpnet.load(tmp_path / "model.npz")
    x = W.to_float(*W.make_data(8, seed=9))[0]
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert (tmp_path / "best.npz").exists()


def test_loss_is_read_back_only_every_k_steps(tmp_path):
    model, opt = W.build(1)
    trainer = W.make_trainer(model, opt, None, log_every=4)
    trainer.fit(W.make_data(), epochs=1)
    # 6 steps, read at step 4 and at the end of the epoch: two device synchronisations.
    assert [s for s, _ in trainer.history.steps] == [4, 6]


def test_interrupt_with_sigint_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    reference, _ = W.run(tmp_path / "ref", epochs=3)

    calls = {"n": 0}
    model, opt = W.build(3)
    trainer = W.make_trainer(model, opt, tmp_path / "run", checkpoint_every=None, checkpoint_seconds=None)
    inner = trainer.transform

    def ctrl_c_at_step_8(x, t):
        calls["n"] += 1
        if calls["n"] == 8:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 8
        return inner(x, t)

    trainer.transform = ctrl_c_at_step_8
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(W.make_data(), epochs=3, val=W.make_data(48, seed=6))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    # The step in progress finished, then a checkpoint was written (mid-epoch 2).
    assert trainer.last_checkpoint.name == xio.checkpoint_name(8)
    assert not (tmp_path / "run" / "model.npz").exists()

    resumed, trainer2 = W.run(tmp_path / "run", epochs=3, resume=True)
    assert trainer2.optimizer.step_count == 18
    assert_same_weights(weights(resumed), weights(reference))
    assert [r["epoch"] for r in trainer2.history.epochs] == [1, 2, 3]


def test_resuming_a_finished_run_does_nothing(tmp_path):
    W.run(tmp_path, epochs=2)
    before = (tmp_path / "model.npz").read_bytes()
    model, trainer = W.run(tmp_path, epochs=2, resume=True)
    assert len(trainer.history) == 2
    assert (tmp_path / "model.npz").read_bytes() == before


def test_kill_minus_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XPNET_BACKEND="numpy", XPNET_DTYPE="float32")
    worker = [sys.executable, str(ROOT / "tests" / "system" / "_train_worker.py")]
    ref = subprocess.run(worker + [str(tmp_path / "ref")], env=env, capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr

    run_dir = tmp_path / "run"
    victim = subprocess.Popen(worker + [str(run_dir), "--slow", "0.05"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while True:
            ckpts = xio.list_checkpoints(run_dir / "checkpoints")
            if ckpts and int(xio.CHECKPOINT_RE.match(ckpts[0].name).group(1)) >= 9:
                break
            assert victim.poll() is None, "the training process ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
    finally:
        victim.kill()  # SIGKILL: no handler, no cleanup
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (run_dir / "model.npz").exists(), "the run finished before the kill"

    resumed = subprocess.run(worker + [str(run_dir), "--resume"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "finished at step 24" in resumed.stdout
    step = int(resumed.stdout.split("(step ")[1].split(",")[0])
    assert 9 <= step < 24
    a, _ = xpnet.load(tmp_path / "ref" / "model.npz")
    b, _ = xpnet.load(run_dir / "model.npz")
    assert_same_weights(weights(a), weights(b))


def test_nan_in_the_data_stops_at_the_exact_step_and_keeps_the_last_good_checkpoint(tmp_path):
    x, t = W.to_float(*W.make_data())
    batches = [(x[i:i + 16].copy(), t[i:i + 16]) for i in range(0, 96, 16)]
    batches[4][0][3, 0, 2, 2] = np.nan  # the 5th batch: step 5
    model, opt = W.build(1)
    trainer = xpnet.Trainer(model, opt, out_dir=tmp_path, batch_size=16, progress=False, log=None,
                            checkpoint_every=3, log_every=10)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 \(epoch 1\).*ckpt-000000003\.npz"):
        trainer.fit(batches, epochs=1)
    assert [p.name for p in xio.list_checkpoints(tmp_path / "checkpoints")] == [xio.checkpoint_name(3)]
    ck = xpnet.load_checkpoint(tmp_path / "checkpoints" / xio.checkpoint_name(3))  # finite, loadable
    assert ck.step == 3


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_a_diverging_learning_rate_stops_with_the_step_and_a_good_checkpoint(tmp_path):
    model, _ = W.build(3)
    opt = optim.SGD(model, lr=1e12)
    trainer = W.make_trainer(model, opt, tmp_path)
    with pytest.raises(TrainingError, match=r"(at|by) step (\d+)") as info:
        trainer.fit(W.make_data(), epochs=3)
    step = int(re.search(r"(?:at|by) step (\d+)", str(info.value)).group(1))
    assert 2 <= step <= 18
    good = xio.latest_checkpoint(tmp_path / "checkpoints")  # finite and loadable, older than the failure
    assert good is not None and xpnet.load_checkpoint(good).step == step - 1
    assert str(good) in str(info.value)


def test_early_stopping_keeps_and_restores_the_best_epoch(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    model, opt = W.build(6)
    trainer = W.make_trainer(model, opt, tmp_path, metrics={"score": lambda z, y: next(scores)}, patience=2)
    trainer.fit(W.make_data(), epochs=6, val=W.make_data(48, seed=6))
    assert [r["epoch"] for r in trainer.history.epochs] == [1, 2, 3, 4]   # no improvement in 3 and 4
    best = xpnet.load_checkpoint(tmp_path / "best.npz")
    assert best.train_state["best_epoch"] == 2 and best.step == 2 * W.STEPS_PER_EPOCH
    assert_same_weights(weights(model), weights(best.model))               # restore_best
    final, _ = xpnet.load(tmp_path / "model.npz")
    assert_same_weights(weights(final), weights(best.model))


def test_an_endless_generator_with_steps_per_epoch(tmp_path):
    def stream():
        while True:  # fresh "images" every step, drawn from xpnet's generator
            x = xpnet.backend.rng().random((8, 1, 6, 6), dtype=np.float32)
            labels = (x[:, 0, :, :3].mean(axis=(1, 2)) > x[:, 0, :, 3:].mean(axis=(1, 2))).astype(int)
            yield x, np.eye(3, dtype=np.float32)[labels]

    model, opt = W.build(2)
    trainer = xpnet.Trainer(model, opt, out_dir=tmp_path, progress=False, log=None, plot=False)
    trainer.fit(stream(), epochs=2, steps_per_epoch=5)
    assert opt.step_count == 10 and [r["step"] for r in trainer.history.epochs] == [5, 10]
    # what the trainer says it writes is what is in its folder (no plot, no validation: no best.npz)
    assert {p.name for p in trainer.output_files if p.exists()} == {p.name for p in tmp_path.iterdir()} == {
        "checkpoints", "model.npz", "history.json", "history.csv"}
    assert {p.name for p in trainer.output_files} >= {"best.npz", "history.png"}
    assert xpnet.Trainer(model, opt, progress=False, log=None).output_files == []
    with pytest.raises(UsageError, match="needs steps_per_epoch"):
        xpnet.Trainer(model, opt, progress=False, log=None).fit(stream(), epochs=1)
    with pytest.raises(DataError, match="ran out"):
        xpnet.Trainer(model, opt, progress=False, log=None).fit(iter([next(stream())] * 3), 1, steps_per_epoch=5)


def test_a_list_of_batches_is_one_pass_per_epoch_and_the_loss_is_a_parameter():
    x, t = W.to_float(*W.make_data())
    labels = t.argmax(axis=1)
    batches = [(x[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    model, opt = W.build(8)
    trainer = xpnet.Trainer(model, opt, loss=softmax_cross_entropy, progress=False, log=None)
    trainer.fit(batches, epochs=8)
    assert opt.step_count == 24
    first, last = trainer.history.steps[0][1], trainer.history.steps[-1][1]
    assert last < first


def test_progress_bar_shows_loss_throughput_and_epoch(capsys):
    model, opt = W.build(1)
    trainer = W.make_trainer(model, opt, None, progress=True, log=print, log_every=2)
    trainer.fit(W.make_data(), epochs=1)
    captured = capsys.readouterr()
    assert "img/s" in captured.err and "epoch 1/1" in captured.err and "loss" in captured.err
    assert "epoch 1/1  step 6  train loss" in captured.out


def test_usage_errors_come_before_any_training(tmp_path):
    model, opt = W.build(1)
    before = weights(model)
    with pytest.raises(UsageError, match="batch_size 200 is larger than the training set \\(96"):
        W.make_trainer(model, opt, None, batch_size=200).fit(W.make_data(), epochs=1)
    with pytest.raises(UsageError, match="epochs must be a positive integer"):
        W.make_trainer(model, opt, None).fit(W.make_data(), epochs=0)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot be written"):
        W.make_trainer(model, opt, blocker / "out").fit(W.make_data(), epochs=1)
    with pytest.raises(UsageError, match="patience.*needs validation"):
        W.make_trainer(model, opt, None, patience=2).fit(W.make_data(), epochs=1)
    assert opt.step_count == 0
    assert_same_weights(weights(model), before)
    W.run(tmp_path / "done", epochs=1)
    with pytest.raises(UsageError, match="already holds checkpoints.*resume=True"):
        W.run(tmp_path / "done", epochs=1)


def test_resume_with_other_settings_is_refused(tmp_path):
    W.run(tmp_path, epochs=1)
    model, opt = W.build(2)
    with pytest.raises(UsageError, match="batch_size 16 and seed 11.*8 and 11"):
        W.make_trainer(model, opt, tmp_path, batch_size=8).fit(W.make_data(), epochs=2, resume=True)


@pytest.mark.gpu
def test_training_on_cupy_matches_numpy(tmp_path):
    """Same seed, same data, SGD: the CuPy run ends with the NumPy run's weights (float32 model tolerance).

    No Dropout here: on the GPU its masks come from CuPy's generator."""
    from xpnet.testing import tolerance

    def sgd(m):
        return optim.SGD(m, lr=0.05, momentum=0.9)

    ref, _ = W.run(tmp_path / "np", epochs=2, make_opt=sgd, dropout=0.0)
    with xpnet.using("cupy"):
        model, trainer = W.run(tmp_path / "cp", epochs=2, make_opt=sgd, dropout=0.0)
    assert model.backend == "cupy"
    for k, v in weights(ref).items():
        np.testing.assert_allclose(xpnet.to_numpy(model.state_dict()[k]), v, err_msg=k,
                                   **tolerance(np.float32, "model"))
    loaded, _ = xpnet.load(tmp_path / "cp" / "model.npz")  # written from CuPy, read on NumPy
    assert loaded.backend == "numpy"


@pytest.mark.gpu
def test_resume_on_cupy_matches_an_uninterrupted_cupy_run(tmp_path):
    with xpnet.using("cupy"):
        reference, _ = W.run(tmp_path / "ref", epochs=2, dropout=0.0)
        model, opt = W.build(2, dropout=0.0)
        trainer = W.make_trainer(model, opt, tmp_path / "run", checkpoint_every=None, checkpoint_seconds=None)
        inner, calls = trainer.transform, {"n": 0}

        def ctrl_c_at_step_5(x, t):
            calls["n"] += 1
            if calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGINT)
            return inner(x, t)

        trainer.transform = ctrl_c_at_step_5
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(W.make_data(), epochs=2, val=W.make_data(48, seed=6))
        resumed, _ = W.run(tmp_path / "run", epochs=2, resume=True, dropout=0.0)
    assert_same_weights({k: xpnet.to_numpy(v) for k, v in resumed.state_dict().items()},
                        {k: xpnet.to_numpy(v) for k, v in reference.state_dict().items()})


def test_a_full_disk_during_training_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    real_write, calls = xio._write_npz, {"n": 0}

    def fails_on_the_fourth_write(f, arrays):
        calls["n"] += 1
        if calls["n"] == 4:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, arrays)

    monkeypatch.setattr(xio, "_write_npz", fails_on_the_fourth_write)
    model, opt = W.build(2)
    with pytest.raises(StorageError, match="disk is full"):
        W.make_trainer(model, opt, tmp_path).fit(W.make_data(), epochs=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [xio.checkpoint_name(2), xio.checkpoint_name(3)]  # no temporary file left behind
    assert xpnet.load_checkpoint(tmp_path / "checkpoints" / xio.checkpoint_name(3)).step == 3


def test_a_list_of_batches_resumes_inside_an_epoch(tmp_path):
    x, t = W.to_float(*W.make_data())
    batches = [(x[i:i + 16], t[i:i + 16]) for i in range(0, 96, 16)]

    def trainer_for(model, opt, **kw):
        return xpnet.Trainer(model, opt, out_dir=tmp_path / kw.pop("name"), progress=False, log=None, plot=False,
                             **kw)

    model, opt = W.build(2)
    trainer_for(model, opt, name="ref").fit(batches, epochs=2)
    reference = weights(model)

    model, opt = W.build(2)
    trainer = trainer_for(model, opt, name="run")
    seen = {"n": 0}

    def ctrl_c_at_step_4(x, t):
        seen["n"] += 1
        if seen["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return x, t

    trainer.transform = ctrl_c_at_step_4
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(batches, epochs=2)
    model, opt = W.build(2)
    trainer_for(model, opt, name="run").fit(batches, epochs=2, resume=True)
    assert opt.step_count == 12
    assert_same_weights(weights(model), reference)
