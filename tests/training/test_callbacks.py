"""Each callback of the training loop on its own (a stand-in trainer), then the hooks in a real run."""

import inspect
import json
import types
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.errors import TrainingError, UsageError
from xpnet.nn import serialization as xio
from xpnet.training import (Callback, Checkpointer, EarlyStopping, History, HistoryFiles, Limits, NanGuard,
                            ProgressBar, ProgressLog, TrainState, Trainer)

from tests.system import _train_worker as W


class StandIn:
    """What a callback sees of the trainer: the state, the messages and the stop requests."""

    def __init__(self, **state):
        self.state = TrainState(**state)
        self.said, self.stops = [], []
        self.last_checkpoint, self.best_path, self.seconds = None, None, 0.0
        self.model, self.lr, self.console = types.SimpleNamespace(name="m"), 0.01, None
        self.stopping = self.interrupted = False

    @property
    def history(self):
        return self.state.history

    def say(self, msg):
        self.said.append(msg)

    def request_stop(self, message=None):
        self.stopping = True
        self.stops.append(message)

    def elapsed(self):
        return self.seconds


# ---------------------------------------------------------------- NanGuard

def test_nan_guard_names_the_first_bad_step_and_the_last_good_checkpoint():
    t = StandIn(epoch=2)
    NanGuard().on_losses(t, 7, np.array([0.5, 0.25]))     # finite: nothing happens
    with pytest.raises(TrainingError, match=r"loss became inf at step 9 \(epoch 3\); no checkpoint had been "
                                            r"written yet -- lower the learning rate"):
        NanGuard().on_losses(t, 7, np.array([0.5, 0.25, np.inf, np.nan]))
    t.last_checkpoint = Path("run/ckpt-000000006.npz")
    with pytest.raises(TrainingError, match=r"loss became nan at step 8 .*last good checkpoint is "
                                            r"run/ckpt-000000006\.npz"):
        NanGuard().on_losses(t, 7, np.array([0.5, np.nan]))
    t.state.step = 12
    err = NanGuard.weights_error(t, "bn1.running_var")
    assert isinstance(err, TrainingError) and str(err).startswith(
        "the weights became NaN or infinite by step 12 (first in 'bn1.running_var'); the last good checkpoint is ")


# ---------------------------------------------------------------- Limits

def test_limits_stop_after_the_step_that_reaches_them_and_report_the_fraction_done():
    t = StandIn(step=3, epoch=1, epochs_planned=4, steps_per_epoch=10)
    limits = Limits(time_budget=100, max_steps=5)
    limits.on_step_end(t)
    assert t.stops == [] and limits.fraction_done(t) == pytest.approx(3 / 5)
    t.seconds = 80.0
    assert limits.fraction_done(t) == pytest.approx(0.8)   # the largest of steps and time
    t.state.step = 5
    limits.on_step_end(t)
    assert t.stops == ["stopping: reached max_steps (5) at step 5 (epoch 2 ends here)"]
    assert limits.fraction_done(t) == 1.0
    t2 = StandIn(step=1, epochs_planned=1, steps_per_epoch=100)
    t2.seconds = 30.0
    assert Limits(time_budget=30).reached(t2) == "reached the time budget (30 s)"
    assert Limits().reached(t2) is None and Limits().fraction_done(t2) == 0.01
    assert Limits().fraction_done(types.SimpleNamespace(state=None)) == 0.0
    for bad in ({"time_budget": 0}, {"time_budget": float("inf")}, {"max_steps": 0}, {"max_steps": 2.5}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            Limits(**bad)


# ---------------------------------------------------------------- EarlyStopping

def judge(stopper, values, monitor="val_acc", mode="max", tie=None):
    """Feed one value per epoch; returns the trainer stand-in."""
    t = StandIn(monitor=monitor, mode=mode)
    for i, v in enumerate(values):
        t.state.epoch = i + 1
        record = {monitor: v} if tie is None else {monitor: v, "val_loss": tie[i]}
        stopper.on_epoch_end(t, record)
        if t.stopping:
            break
    return t


def test_early_stopping_counts_epochs_without_progress_beyond_min_delta():
    t = judge(EarlyStopping(patience=2, min_delta=0.05), [0.5, 0.7, 0.74, 0.6, 0.9])
    s = t.state
    assert (s.best_epoch, s.best_value, s.bad_epochs, s.stopped_early, s.epoch) == (2, 0.7, 2, True, 4)
    assert t.stops == ["early stop: val_acc did not improve for 2 epoch(s); best 0.7000 at epoch 2"]
    t = judge(EarlyStopping(patience=2), [3.0, 2.0, float("nan"), 1.5], monitor="val_loss", mode="min")
    assert t.state.best_epoch == 4 and not t.stopping      # a NaN never improves, lower is better
    t = judge(EarlyStopping(patience=1), [float("nan")])
    assert t.stops == ["early stop: val_acc did not improve for 1 epoch(s); it was never a number"]


def test_tie_break_turns_an_equal_value_with_a_lower_loss_into_progress():
    t = judge(EarlyStopping(patience=2), [1.0, 1.0, 1.0], tie=[0.5, 0.4, 0.3])
    assert t.state.best_epoch == 1 and t.stopping
    t = judge(EarlyStopping(patience=2, tie_break="val_loss"), [1.0, 1.0, 1.0, 1.0], tie=[0.5, 0.4, 0.45, 0.3])
    assert t.state.best_epoch == 4 and t.state.best_tie == 0.3 and not t.stopping


def test_early_stopping_resolves_its_monitor_and_refuses_bad_settings():
    metrics = {"accuracy": None}
    assert EarlyStopping().resolve(True, metrics) == ("val_accuracy", "max")
    assert EarlyStopping().resolve(True, {}) == ("val_loss", "min")
    assert EarlyStopping(mode="max").resolve(False, metrics) == (None, None)
    assert EarlyStopping("train_loss").resolve(False, {}) == ("train_loss", "min")
    with pytest.raises(UsageError, match="names no metric"):
        EarlyStopping("val_f1").resolve(True, metrics)
    with pytest.raises(UsageError, match="patience.*needs validation"):
        EarlyStopping(patience=3).resolve(False, metrics)
    with pytest.raises(UsageError, match="mode must be 'min' or 'max'"):
        EarlyStopping(mode="up")
    with pytest.raises(UsageError, match="patience must be a positive integer"):
        EarlyStopping(patience=0)
    with pytest.raises(UsageError, match="monitor 'val_x' is not among the recorded values"):
        EarlyStopping().on_epoch_end(StandIn(monitor="val_x", epoch=1), {"val_loss": 1.0})


def test_restore_best_loads_the_best_weights_only_when_they_are_older(tmp_path):
    model, opt = W.build(1)
    xio.save(model, tmp_path / "best.npz")
    best = {k: np.array(v) for k, v in model.state_dict().items()}
    for v in model.state_dict().values():
        v += 1
    t = StandIn(epoch=3, best_epoch=3, best_value=0.5, monitor="val_acc")
    t.model, t.best_path = model, tmp_path / "best.npz"
    EarlyStopping().on_fit_end(t)
    assert t.said == []                                   # the last epoch is the best: nothing to restore
    EarlyStopping(restore_best=False).on_fit_end(t)
    t.state.best_epoch = 2
    EarlyStopping().on_fit_end(t)
    assert t.said == ["restored the best weights (epoch 2, val_acc 0.5000)"]
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, best[k])


# ---------------------------------------------------------------- Checkpointer

def test_checkpointer_settings_and_when_a_checkpoint_is_due(monkeypatch):
    with pytest.raises(UsageError, match="checkpoint_every"):
        Checkpointer("run", every=0)
    with pytest.raises(UsageError, match="keep_checkpoints"):
        Checkpointer("run", keep=0)
    with pytest.raises(UsageError, match="checkpoint_seconds"):
        Checkpointer("run", seconds=-1)
    c = Checkpointer("run", every=3, seconds=None)
    assert (c.folder, c.best_path) == (Path("run/checkpoints"), Path("run/best.npz"))
    t = StandIn(step=5)
    assert not c._due(t)
    t.state.step = 6
    assert c._due(t) and not Checkpointer(None, every=3)._due(t)
    clock = {"now": 100.0}
    monkeypatch.setattr("xpnet.training.callbacks.checkpoints.time.monotonic", lambda: clock["now"])
    c = Checkpointer("run", seconds=60)
    c.on_fit_start(t)
    clock["now"] = 159.0
    assert not c._due(t)
    clock["now"] = 160.0
    assert c._due(t)


def test_checkpointer_keeps_the_newest_n_and_writes_none_without_out_dir(tmp_path):
    model, opt = W.build(1)
    c = Checkpointer(tmp_path, keep=2)
    c.prepare()
    t = StandIn(step=0)
    t.model, t.optimizer, t.metadata, t.flush = model, opt, {"run": 1}, lambda: None
    t.checkpoint_state = lambda: t.state.to_dict()
    for step in (1, 2, 3):
        t.state.step = step
        assert c.save(t) == c.last == tmp_path / "checkpoints" / xio.checkpoint_name(step)
    assert [p.name for p in xio.list_checkpoints(c.folder)] == [xio.checkpoint_name(3), xio.checkpoint_name(2)]
    assert xpnet.load_checkpoint(c.last).train_state["step"] == 3
    nothing = Checkpointer(None)
    assert nothing.save(t) is None
    nothing.on_interrupt(t, saved=False)
    assert t.said == ["interrupted at step 3 (no out_dir, nothing saved)"]


# ---------------------------------------------------------------- HistoryFiles

def test_history_files_throttle_the_plot(tmp_path, monkeypatch):
    clock, plotted = {"now": 0.0}, []
    monkeypatch.setattr("xpnet.training.callbacks.history_files.time.monotonic", lambda: clock["now"])
    monkeypatch.setattr(History, "plot", lambda self, path, title="": plotted.append((len(self), title)))
    files = HistoryFiles(tmp_path, plot=60.0)
    t = StandIn()
    files.on_fit_start(t)
    for epoch, now in ((1, 10.0), (2, 70.0), (3, 100.0)):
        clock["now"] = now
        t.history.epochs.append({"epoch": epoch, "train_loss": 1.0 / epoch})
        files.on_epoch_end(t, t.history[-1])
    assert plotted == [(2, "m")]                          # only once 60 s had passed
    files.on_fit_end(t)
    assert plotted == [(2, "m"), (3, "m")]                # and once more at the end
    files.on_fit_end(t)
    assert len(plotted) == 2                              # not again for the same epochs
    assert [r["epoch"] for r in json.loads((tmp_path / "history.json").read_text())["epochs"]] == [1, 2, 3]
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == "epoch,train_loss"
    every = HistoryFiles(tmp_path, plot=True)
    every.on_epoch_end(t, t.history[-1])
    every.on_fit_end(t)
    HistoryFiles(tmp_path, plot=False).on_epoch_end(t, t.history[-1])
    assert len(plotted) == 3                              # after the epoch only, never with plot=False
    with pytest.raises(UsageError, match="plot"):
        HistoryFiles(tmp_path, plot=-5)


# ---------------------------------------------------------------- progress

def test_progress_log_line_and_the_bar_lends_its_writer(capsys):
    log = ProgressLog(time_budget=None)
    record = {"epoch": 2, "step": 12, "train_loss": 0.5, "val_loss": 0.25, "val_acc": 1.0, "val_n": 3,
              "images_per_s": 1234.5, "seconds": 1.26, "elapsed": 9.0}
    assert log.line(record, 5, True) == ("epoch 2/5  step 12  train loss 0.5000  val loss 0.2500  val acc 1.0000"
                                         "  1,234 img/s  1.3s  *")
    budget = ProgressLog(time_budget=60).line(dict(record, train_loss=None, images_per_s=None), 10 ** 6, False)
    assert budget == "epoch 2  step 12  val loss 0.2500  val acc 1.0000  1.3s  (9/60s of the budget)"
    t = StandIn(epochs_planned=2, steps_per_epoch=3)
    bar = ProgressBar(time_budget=60)
    bar.on_fit_start(t)
    assert t.console == bar.bar.write
    bar.on_epoch_start(t)
    t.state.epoch_images = 32
    bar.on_losses(t, 1, np.array([0.5, 0.25]))
    bar.on_step_end(t)
    bar.on_close(t)
    assert t.console is None and bar.bar is None
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "loss 0.375" in err and "60s left" in err


# ---------------------------------------------------------------- in a real run

class Recorder(Callback):
    def __init__(self, stop_at_epoch=None):
        self.calls, self.stop_at_epoch = [], stop_at_epoch

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_epoch_start(self, trainer):
        self.calls.append(f"epoch_start {trainer.state.epoch + 1}")

    def on_losses(self, trainer, first_step, values):
        self.calls.append(f"losses {first_step}-{first_step + len(values) - 1}")

    def on_step_end(self, trainer):
        self.calls.append(f"step {trainer.state.step}")

    def on_epoch_end(self, trainer, record):
        assert trainer.history[-1] is record
        self.calls.append(f"epoch_end {record['epoch']}")
        if record["epoch"] == self.stop_at_epoch:
            trainer.request_stop("enough")

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")

    def on_close(self, trainer):
        self.calls.append("close")


def test_user_callbacks_see_every_point_of_the_loop_and_can_stop_it(tmp_path):
    model, opt = W.build(3)
    rec, said = Recorder(stop_at_epoch=2), []
    trainer = W.make_trainer(model, opt, tmp_path, callbacks=[rec], log_every=4, checkpoint_every=None,
                             log=said.append)
    trainer.fit(W.make_data(), epochs=3, val=W.make_data(48, seed=6))
    assert rec.calls == ["fit_start",
                         "epoch_start 1", "step 1", "step 2", "step 3", "losses 1-4", "step 4", "step 5", "step 6",
                         "losses 5-6", "epoch_end 1",
                         "epoch_start 2", "step 7", "step 8", "step 9", "losses 7-10", "step 10", "step 11",
                         "step 12", "losses 11-12", "epoch_end 2",
                         "fit_end", "close"]
    assert said[said.index("enough") - 1].startswith("epoch 2/3  step 12")   # said after the epoch's line
    assert len(trainer.history) == 2 and (tmp_path / "model.npz").is_file()
    with pytest.raises(UsageError, match="callbacks must be"):
        Trainer(model, opt, callbacks=[print])


def test_the_trainer_stays_small():
    lines, _ = inspect.getsourcelines(Trainer)
    assert len(lines) <= 300


def test_the_keyword_arguments_build_the_default_callbacks(tmp_path):
    model, opt = W.build(1)
    t = Trainer(model, opt, out_dir=tmp_path, monitor="val_loss", mode="min", patience=3, min_delta=0.1,
                tie_break="val_x", restore_best=False, checkpoint_every=5, checkpoint_seconds=None,
                keep_checkpoints=4, progress=False, plot=30, time_budget=90, max_steps=1000)
    es, ck, lim = t.early_stopping, t.checkpoints, t.limits
    assert (es.monitor, es.mode, es.patience, es.min_delta, es.tie_break, es.restore_best) == \
        ("val_loss", "min", 3, 0.1, "val_x", False)
    assert (ck.every, ck.seconds, ck.keep, ck.folder) == (5, None, 4, tmp_path / "checkpoints")
    assert (lim.time_budget, lim.max_steps) == (90.0, 1000)
    assert [type(c).__name__ for c in t.callbacks] == ["NanGuard", "Limits", "EarlyStopping", "Checkpointer",
                                                       "HistoryFiles", "ProgressLog"]
    assert t.callbacks[4].plot_seconds == 30.0
    mine = Callback()
    with_bar = Trainer(model, opt, callbacks=[mine])
    assert [type(c).__name__ for c in with_bar.callbacks][1] == "ProgressBar" and with_bar.callbacks[-1] is mine
    assert (with_bar.checkpoint_dir, with_bar.best_path, with_bar.last_checkpoint) == (None, None, None)
    assert (with_bar.elapsed(), with_bar.fraction_done(), with_bar.best_epoch, len(with_bar.history)) == (0, 0, None, 0)


# ---------------------------------------------------------------- StuckWatch


def _stuck_run(targets_from_inputs, seed=0):
    """A small dense model on 2-feature data: targets that follow the inputs (learnable) or random ones."""
    from xpnet.training.callbacks import StuckWatch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512, 2)).astype(np.float32)
    y = ((x[:, :1] > 0) if targets_from_inputs else (rng.random((512, 1)) > 0.5)).astype(np.float32)
    xpnet.seed(seed)
    model = xpnet.Sequential([xpnet.Dense(16), xpnet.ReLU(), xpnet.Dense(1)],
                             input_shape=(2,))
    watch = StuckWatch(monitor="val_right", floor=0.65, min_steps=40, window=16, min_fraction=0.0,
                       advice="try another learning rate")
    t = Trainer(model, xpnet.Adam(model, lr=1e-2), batch_size=32, progress=False, plot=False, log=None,
                metrics={"right": lambda logits, yy: float(((np.asarray(logits) > 0) == (np.asarray(yy) > 0.5)).mean())},
                callbacks=[watch])
    t.fit((x[:384], y[:384]), epochs=30, val=(x[384:], y[384:]))
    return t, watch


def test_stuck_watch_stops_a_run_that_learns_nothing_and_leaves_a_learning_one_alone():
    t, watch = _stuck_run(targets_from_inputs=False)     # random labels: flat loss, chance on validation
    assert watch.stuck and len(t.history) < 30
    t, watch = _stuck_run(targets_from_inputs=True)      # a learnable task runs to the end
    assert not watch.stuck and len(t.history) == 30


def test_stuck_watch_message_names_what_it_saw_and_the_advice():
    from xpnet.training.callbacks import StuckWatch

    trainer = StandIn(step=500)
    trainer.fraction_done = lambda: 0.5
    trainer.history.epochs.append({"val_string_accuracy": 0.0})
    watch = StuckWatch(window=2, advice="try --head ctc")
    watch.on_losses(trainer, 1, np.array([9.0, 5.0, 3.0, 3.0]))   # from the initial weights to the prior ...
    watch.on_losses(trainer, 400, np.array([2.9, 2.95, 2.9, 2.95]))  # ... then flat
    watch.on_epoch_end(trainer, {})
    assert watch.stuck and trainer.stops == [
        "stopping: nothing is being learned after 500 steps (training loss 2.925, 3 half-way; best val "
        "string accuracy 0); try --head ctc"]
    trainer2 = StandIn(step=500)
    trainer2.fraction_done = lambda: 0.5
    trainer2.history.epochs.append({"val_string_accuracy": 0.2})      # something is read: not stuck
    watch2 = StuckWatch(window=2)
    watch2.on_losses(trainer2, 1, np.array([3.0, 3.0, 3.0, 3.0]))
    watch2.on_epoch_end(trainer2, {})
    assert not watch2.stuck and trainer2.stops == []
