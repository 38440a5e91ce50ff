"""TrainState: the round trip through a checkpoint, checkpoints in the existing format, damaged states."""

import numpy as np
import pytest

import xpnet
from xpnet.errors import ModelFileError
from xpnet.nn import serialization as xio
from xpnet.training import History, TrainState

from tests.system import _train_worker as W


def a_state():
    rng = np.random.default_rng(3)
    return TrainState(step=14, epoch=2, batch_in_epoch=2, epochs_planned=5, steps_per_epoch=6,
                      epoch_rng_state=rng.bit_generator.state, data_rng_state=rng.bit_generator.state,
                      xpnet_rng_state=xpnet.backend.get_rng_state(), epoch_loss_sum=1.5, epoch_loss_count=2,
                      epoch_images=32, epoch_seconds=0.25, best_value=0.75, best_epoch=2, bad_epochs=0,
                      best_tie=0.5, monitor="val_accuracy", mode="max", stopped_early=False, batch_size=16, seed=11,
                      history=History([{"epoch": 1, "step": 6, "train_loss": 1.0}], [[3, 1.25], [6, 0.75]]),
                      elapsed=12.5)


def test_a_state_survives_a_checkpoint_unchanged(tmp_path):
    model, opt = W.build(1)
    state = a_state()
    path = xio.save_checkpoint(tmp_path / "ckpt.npz", model, opt, train_state=state.to_dict())
    back = TrainState.from_dict(xio.read_header(path)["train_state"], path)
    assert back == state                              # every field, the history included
    assert back.to_dict() == state.to_dict()
    assert isinstance(back.history, History) and back.history.steps == [[3, 1.25], [6, 0.75]]


def test_the_dict_keeps_the_checkpoint_format():
    d = a_state().to_dict(elapsed=20.12345)
    assert list(d) == ["step", "epoch", "batch_in_epoch", "epochs_planned", "steps_per_epoch", "epoch_rng_state",
                       "data_rng_state", "xpnet_rng_state", "epoch_loss_sum", "epoch_loss_count", "epoch_images",
                       "epoch_seconds", "best_value", "best_epoch", "bad_epochs", "best_tie", "monitor", "mode",
                       "stopped_early", "batch_size", "seed", "history", "elapsed", "epoch_data_wait"]
    assert d["elapsed"] == 20.123 and d["history"] == {"epochs": [{"epoch": 1, "step": 6, "train_loss": 1.0}],
                                                       "steps": [[3, 1.25], [6, 0.75]]}


def test_a_train_state_of_an_earlier_version_loads():
    """Checkpoints written before best_tie and elapsed existed (and without the history) still resume."""
    rng = np.random.default_rng(0)
    old = {"step": 6, "epoch": 1, "batch_in_epoch": 0, "epochs_planned": 4, "steps_per_epoch": 6,
           "epoch_rng_state": rng.bit_generator.state, "data_rng_state": rng.bit_generator.state,
           "xpnet_rng_state": rng.bit_generator.state, "epoch_loss_sum": 3.0, "epoch_loss_count": 2,
           "epoch_images": 96, "epoch_seconds": 1.0, "best_value": None, "best_epoch": None, "bad_epochs": 1,
           "monitor": None, "mode": None, "stopped_early": False, "batch_size": 16, "seed": 11}
    s = TrainState.from_dict(old, "ckpt.npz")
    assert (s.step, s.epoch, s.bad_epochs, s.best_tie, s.elapsed, len(s.history)) == (6, 1, 1, None, 0.0, 0)


@pytest.mark.parametrize("key,value,said", [
    ("step", -1, "step is -1"), ("epoch", 1.5, "epoch is 1.5"), ("bad_epochs", True, "bad_epochs is True"),
    ("epoch_loss_sum", "x", "epoch_loss_sum is 'x'"), ("best_epoch", "2", "best_epoch is '2'"),
    ("data_rng_state", "x", "data_rng_state: "), ("epoch_rng_state", {"a": 1}, "epoch_rng_state: "),
    ("history", [1], "history is not a list"), ("history", {"epochs": [1]}, "history is not a list"),
    ("elapsed", "soon", "elapsed is 'soon'"), ("best_tie", [0], "best_tie is [0]"),
])
def test_a_damaged_value_is_one_model_file_error(key, value, said):
    d = a_state().to_dict()
    d[key] = value
    with pytest.raises(ModelFileError, match=r"checkpoint c\.npz has a damaged training state \(" + said.replace(
            "[", r"\[").replace("]", r"\]").replace("(", r"\(")) as info:
        TrainState.from_dict(d, "c.npz")
    assert str(info.value).endswith("resume from an earlier checkpoint or start a new run.")


def test_a_missing_key_says_the_file_is_not_a_trainer_checkpoint():
    d = a_state().to_dict()
    del d["bad_epochs"]
    with pytest.raises(ModelFileError, match=r"checkpoint c\.npz was not written by xpnet's Trainer \(no "
                                             r"'bad_epochs' in it\)"):
        TrainState.from_dict(d, "c.npz")


def test_continuing_under_another_monitor_forgets_the_best():
    saved = a_state()
    same = saved.continued(TrainState(epochs_planned=9, monitor="val_accuracy", mode="max"))
    assert (same.epochs_planned, same.best_value, same.best_epoch, same.step) == (9, 0.75, 2, 14)
    other = saved.continued(TrainState(epochs_planned=9, monitor="val_loss", mode="min"))
    assert (other.monitor, other.mode, other.best_value, other.best_epoch, other.bad_epochs) == \
        ("val_loss", "min", None, None, 0)
    assert saved.monitor == "val_accuracy"           # the saved state itself is not changed


def test_improved_means_the_epoch_just_ended_is_the_best():
    s = TrainState(epoch=3, best_epoch=3)
    assert s.improved
    s.epoch += 1
    assert not s.improved and not TrainState(epoch=0).improved
