"""Model files and checkpoints: round trips, every kind of damaged file, atomic writes."""

import errno
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import xpnet
from xpnet import backend
from xpnet.nn import optim, serialization as xio
from xpnet.errors import ModelFileError, StorageError, UsageError
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from xpnet.nn.sequential import Sequential


def every_layer_model(dtype="float32"):
    xpnet.set_dtype(dtype)
    return Sequential([Conv2D(4, 3, pad=1), BatchNorm(), ReLU(), MaxPool2D(2), Conv2D(3, (2, 3), stride=(1, 2),
                       bias=False), ReLU(), MaxPool2D(2, stride=1), Flatten(), Dense(6), BatchNorm(), ReLU(),
                       Dropout(0.3), Dense(5)], input_shape=(2, 8, 10), name="every_layer")


def trained_a_little(model, rng):
    """Move the BatchNorm running statistics away from their initial values."""
    x = rng.standard_normal((6,) + model.input_shape).astype(model.dtype)
    for _ in range(3):
        model.forward(x, train=True)
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_every_layer_type_gives_identical_outputs(tmp_path, rng, dtype):
    model = trained_a_little(every_layer_model(dtype), rng)
    x = rng.standard_normal((4, 2, 8, 10)).astype(dtype)
    meta = {"charset": {"chars": "0123456789", "length": 1}, "input_shape": [2, 8, 10],
            "preprocessing": {"scale": [-1, 1]}}
    path = xpnet.save(model, tmp_path / "m.npz", metadata=meta)
    state = backend.get_rng_state()
    loaded, got_meta = xpnet.load(path)
    assert backend.get_rng_state() == state, "loading must not consume the user's random generator"
    assert got_meta == meta
    assert loaded.spec() == model.spec()
    assert loaded.dtype == np.dtype(dtype)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v, err_msg=k)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_load_weights_into_an_existing_model(tmp_path, rng):
    model = trained_a_little(every_layer_model(), rng)
    xpnet.save(model, tmp_path / "m.npz", metadata={"a": 1})
    other = every_layer_model()
    assert xio.load_weights(other, tmp_path / "m.npz") == {"a": 1}
    x = rng.standard_normal((2, 2, 8, 10)).astype(np.float32)
    np.testing.assert_array_equal(other.predict(x), model.predict(x))


def test_another_architecture_is_refused_naming_the_difference(tmp_path):
    xpnet.save(xpnet.models.simple_convnet(), tmp_path / "m.npz")
    wider = xpnet.models.simple_convnet(hidden=64)
    with pytest.raises(ModelFileError, match=r"different architecture.*layer 4 is Dense 'dense1'"):
        xio.load_weights(wider, tmp_path / "m.npz")
    with pytest.raises(ModelFileError, match="input shape"):
        xio.load_weights(xpnet.models.simple_convnet(input_shape=(1, 32, 32)), tmp_path / "m.npz")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        xpnet.load(tmp_path / "nope.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        xpnet.load(tmp_path / "empty.npz")
    with pytest.raises(ModelFileError, match="not a file"):
        xpnet.load(tmp_path)


def good_file(tmp_path, name="m.npz"):
    xpnet.seed(3)
    return xpnet.save(xpnet.models.simple_convnet(), tmp_path / name, metadata={"k": "v"})


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, keep):
    path = good_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        xpnet.load(path)


def test_flipped_bytes_inside_the_weights_are_caught_by_the_crc(tmp_path):
    path = good_file(tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        xpnet.load(path)


class _CreatesAFile:
    """Unpickling this runs open(marker, "w"): proof that a loader executed the payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_renamed_to_npz_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"weights": _CreatesAFile(marker)}))
    with pytest.raises(ModelFileError, match="pickle"):
        xpnet.load(path)
    assert not marker.exists()
    # Control: the payload really would create the file if unpickled.
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_an_npz_with_a_pickled_object_array_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    good = good_file(tmp_path)
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    obj = np.empty(1, dtype=object)
    obj[0] = _CreatesAFile(marker)
    arrays["state/conv1.W"] = obj
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(ModelFileError, match="pickle"):
        xpnet.load(tmp_path / "evil.npz")
    assert not marker.exists()


def rewrite_header(path, change):
    """Rewrite the JSON document of an xpnet file with ``change(doc)`` (arrays kept)."""
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    doc = json.loads(arrays[xio.HEADER_KEY].tobytes())
    change(doc)
    arrays[xio.HEADER_KEY] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_unknown_layer_type_is_refused(tmp_path):
    path = good_file(tmp_path)
    rewrite_header(path, lambda d: d["architecture"]["layers"][1].update(type="EvalEverything"))
    with pytest.raises(ModelFileError, match="unknown layer type 'EvalEverything'"):
        xpnet.load(path)


def test_future_format_version_asks_for_an_upgrade(tmp_path):
    path = good_file(tmp_path)
    rewrite_header(path, lambda d: d.update(format_version=xio.FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="newer than this xpnet.*upgrade xpnet"):
        xpnet.load(path)


def rewrite_header_text(path, spot, text):
    """Put raw JSON ``text`` (``Infinity``, ``1e400``...) at ``spot`` (a key path) in the header of ``path``."""
    def change(doc):
        target = doc
        for key in spot[:-1]:
            target = target[key]
        target[spot[-1]] = "@@"
    rewrite_header(path, change)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    raw = arrays[xio.HEADER_KEY].tobytes().decode().replace('"@@"', text)
    arrays[xio.HEADER_KEY] = np.frombuffer(raw.encode(), dtype=np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize("spot,text,message", [
    # The draws that crashed with OverflowError in Sequential.from_spec, before the header was checked.
    (("architecture", "spec_version"), "Infinity", r"architecture.spec_version is Infinity, not a non-negative"),
    (("architecture", "input_shape", 0), "-Infinity", r"architecture.input_shape\[0\] is -Infinity, not an integer"),
    (("architecture", "input_shape", 1), "1e400", r"architecture.input_shape\[1\] is Infinity"),
    (("architecture", "layers", 0, "config", "out_channels"), "NaN", r"layers\[0\].config.out_channels is NaN"),
    (("architecture", "layers", 0, "config", "kernel_size", 1), "1" * 40, r"config.kernel_size\[1\] is 1111"),
    (("architecture", "layers", 11, "config", "rate"), "1" * 400, r"config.rate is 1111.*not a finite number"),
    (("architecture", "layers", 1, "config", "eps"), "Infinity", r"config.eps is Infinity, not a finite number"),
    (("architecture", "layers", 0, "config", "stride"), "[1, 2, 3]", r"config.stride is \[1, 2, 3\]"),
    (("architecture", "layers", 0, "config", "bias"), "1", r"config.bias is 1, not true or false"),
    (("architecture", "layers", 0, "config", "init"), "-Infinity", r"config.init is -Infinity"),
    (("architecture", "layers", 0, "name"), "[1]", r"layers\[0\].name is \[1\], not a string"),
    (("architecture", "layers", 0, "config"), "[]", r"layers\[0\].config is \[\], not a JSON object"),
    (("architecture", "layers"), "[]", r"architecture.layers is \[\], not a list of layers"),
    (("architecture", "name"), "7", r"architecture.name is 7, not a string"),
    (("architecture", "spec_version"), "99", r"spec version 99, newer than this xpnet.*upgrade xpnet"),
    (("format_version",), "1.0", r"format_version is 1.0, not a positive integer"),
    (("kind",), '"weights"', r"kind is 'weights', not 'model' or 'checkpoint'"),
    (("dtype",), '"float16"', r"has dtype 'float16': xpnet reads float32 or float64"),
    (("metadata",), "[1]", r"metadata is \[1\], not a JSON object"),
    (("arrays", "state/conv1.W", "shape", 0), "Infinity", r"arrays.state/conv1.W.shape\[0\] is Infinity"),
    (("arrays", "state/conv1.W", "dtype"), "4", r"arrays.state/conv1.W.dtype is 4, not a string"),
    (("arrays",), "[]", r"malformed header \(no valid 'arrays' table\)"),
    (("architecture", "input_shape", 2), "1" * 5000, r"damaged header \(not valid JSON\)"),  # over 4300 digits
    (("architecture", "input_shape"), "[" * 5000 + "]" * 5000, r"damaged header \(not valid JSON\)"),  # too deep
])
def test_every_header_field_is_checked_before_anything_is_built(tmp_path, spot, text, message):
    path = xpnet.save(every_layer_model(), tmp_path / "m.npz")
    rewrite_header_text(path, spot, text)
    for attempt in (lambda: xpnet.load(path), lambda: xio.load_weights(every_layer_model(), path),
                    lambda: xio.read_header(path)):
        with pytest.raises(ModelFileError, match=f"model file {path} .*{message}") as info:
            attempt()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("spot,text,message", [
    (("optimizer", "step_count"), "Infinity", r"optimizer.step_count is Infinity, not a non-negative integer"),
    (("optimizer", "config", "lr", "max_lr"), "NaN", r"optimizer.config.lr.max_lr is NaN, not a finite number"),
    (("optimizer", "type"), "null", r"optimizer.type is None, not a string"),
    (("optimizer", "slots"), "[1]", r"optimizer.slots is \[1\], not a list of names"),
    (("train_state", "step"), "1e400", r"train_state.step is Infinity, not an integer"),
    (("train_state", "step"), '"3"', r"train_state.step is '3', not an integer"),
    (("train_state",), "[]", r"train_state is \[\], not a JSON object"),
])
def test_the_checkpoint_sections_are_checked_too(tmp_path, spot, text, message):
    model = xpnet.models.simple_convnet()
    opt = optim.AdamW(model, lr=optim.OneCycle(0.05, total_steps=10))
    path = checkpoint(tmp_path, 3, model, opt)
    rewrite_header_text(path, spot, text)
    with pytest.raises(ModelFileError, match=f"model file {path} .*{message}"):
        xpnet.load_checkpoint(path, optimizer=optim.AdamW(xpnet.models.simple_convnet()))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert xio.latest_checkpoint(tmp_path) is None


def test_nan_in_the_callers_metadata_and_training_state_stays_readable(tmp_path):
    """Only metadata and train_state may hold NaN/Infinity: they are stored as given (a training history
    records a NaN validation loss on purpose), while the sections xpnet builds from hold finite numbers."""
    model = xpnet.models.simple_convnet()
    history = {"epochs": [{"epoch": 1, "val_loss": float("nan")}], "steps": [[1, 0.5]]}
    path = xio.save_checkpoint(tmp_path / "c.npz", model, optim.SGD(model, lr=0.1),
                               train_state={"step": 1, "history": history}, metadata={"best": float("inf")})
    ck = xpnet.load_checkpoint(path)
    assert ck.step == 1 and ck.metadata == {"best": float("inf")}
    assert np.isnan(ck.train_state["history"]["epochs"][0]["val_loss"])
    negative = xio.save_checkpoint(tmp_path / "n.npz", model, train_state={"step": -1})
    assert xpnet.load_checkpoint(negative).step == -1  # the Trainer refuses it, naming its training state


def test_storage_helpers_are_still_reached_through_serialization():
    from xpnet import storage

    for name in ("atomic_write", "check_writable", "remove_stale_temp_files"):
        assert getattr(xio, name) is getattr(storage, name)


def test_nan_weights_are_refused_on_load_and_on_save(tmp_path):
    path = good_file(tmp_path)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["state/dense2.W"] = arrays["state/dense2.W"].copy()
    arrays["state/dense2.W"][0, 0] = np.nan
    np.savez(path, **arrays)
    with pytest.raises(ModelFileError, match="NaN or infinite values in 'state/dense2.W'"):
        xpnet.load(path)
    model = xpnet.models.simple_convnet()
    model.parameters()["dense1.b"][3] = np.inf
    with pytest.raises(ModelFileError, match="refusing to save.*dense1.b"):
        xpnet.save(model, tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


def test_foreign_npz_and_other_files(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.ones(3))
    with pytest.raises(ModelFileError, match="not an xpnet model file"):
        xpnet.load(tmp_path / "plain.npz")
    np.save(tmp_path / "one.npy", np.ones(3))
    with pytest.raises(ModelFileError, match="single .npy array"):
        xpnet.load(tmp_path / "one.npy")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ModelFileError, match="not an xpnet model file"):
        xpnet.load(tmp_path / "text.npz")
    path = good_file(tmp_path)
    with zipfile.ZipFile(path) as z:  # a member listed in the header but absent
        members = {n: z.read(n) for n in z.namelist() if n != "state/dense2.b.npy"}
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(ModelFileError, match="incomplete.*dense2.b"):
        xpnet.load(path)


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = good_file(tmp_path)
    before = path.read_bytes()

    def full_disk(f, arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(xio, "_write_npz", full_disk)
    xpnet.seed(4)
    with pytest.raises(StorageError, match="disk is full.*previous m.npz is intact"):
        xpnet.save(xpnet.models.simple_convnet(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    xpnet.load(path)


def test_unwritable_folder_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot be written"):
        xio.check_writable(blocker / "sub")
    with pytest.raises(StorageError, match="does not exist"):
        xpnet.save(xpnet.models.simple_convnet(), tmp_path / "missing" / "m.npz")


def checkpoint(tmp_path, step, model, opt):
    return xio.save_checkpoint(tmp_path / xio.checkpoint_name(step), model, opt,
                               train_state={"step": step, "rng": backend.get_rng_state()}, metadata={"run": 1})


def test_checkpoint_round_trip_restores_model_optimizer_and_state(tmp_path, rng):
    model = every_layer_model()
    opt = optim.AdamW(model, lr=optim.Cosine(0.01, 100, 5))
    x = rng.standard_normal((4, 2, 8, 10)).astype(np.float32)
    for _ in range(2):
        out = model.forward(x, train=True)
        model.backward(xpnet.ops.sigmoid_bce_with_logits(out, np.zeros_like(out))[1])
        opt.step()
    saved_rng = backend.get_rng_state()
    path = checkpoint(tmp_path, 2, model, opt)
    twin = every_layer_model()
    twin_opt = optim.AdamW(twin, lr=optim.Cosine(0.01, 100, 5))
    ck = xpnet.load_checkpoint(path, model=twin, optimizer=twin_opt)
    assert ck.step == 2 and ck.metadata == {"run": 1}
    assert ck.train_state["rng"] == saved_rng
    assert twin_opt.step_count == 2
    for name, slots in opt.state.items():
        for s, v in slots.items():
            np.testing.assert_array_equal(twin_opt.state[name][s], v)
    np.testing.assert_array_equal(twin.predict(x), model.predict(x))
    loaded, meta = xpnet.load(path)  # a checkpoint is also a model file
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    with pytest.raises(ModelFileError, match="not a training checkpoint"):
        xpnet.load_checkpoint(xpnet.save(model, tmp_path / "model.npz"))


def test_latest_checkpoint_skips_damaged_and_half_written_files(tmp_path):
    model = xpnet.models.simple_convnet()
    opt = optim.SGD(model, lr=0.1)
    for step in (1, 2, 3):
        checkpoint(tmp_path, step, model, opt)
    newest = tmp_path / xio.checkpoint_name(3)
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged after the fact (e.g. a disk error)
    # A temporary file left by a killed writer, with a higher step in its name.
    (tmp_path / f".{xio.checkpoint_name(9)}.123.abcd.tmp").write_bytes(b"PK\x03\x04")
    assert [p.name for p in xio.list_checkpoints(tmp_path)] == [xio.checkpoint_name(s) for s in (3, 2, 1)]
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert xio.latest_checkpoint(tmp_path) == tmp_path / xio.checkpoint_name(2)
    assert xio.latest_checkpoint(tmp_path / "none") is None


def test_checkpoint_names_sort_like_steps_and_refuse_what_is_not_a_step():
    assert xio.checkpoint_name(np.int64(12)) == "ckpt-000000012.npz"
    assert xio.CHECKPOINT_RE.match(xio.checkpoint_name(0))
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(UsageError, match="step must be an integer >= 0"):
            xio.checkpoint_name(bad)


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = good_file(tmp_path)
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


@pytest.mark.gpu
@pytest.mark.parametrize("to", ["numpy", "cupy"])
def test_a_model_saved_from_cupy_loads_on_either_backend(tmp_path, rng, to):
    from xpnet.testing import tolerance

    model = trained_a_little(every_layer_model(), rng)
    x = rng.standard_normal((3, 2, 8, 10)).astype(np.float32)
    want = model.predict(x)
    model.to("cupy")
    xpnet.save(model, tmp_path / "m.npz")
    loaded, _ = xpnet.load(tmp_path / "m.npz", to=to)
    assert loaded.backend == to
    xb = backend.module_for(to).asarray(x)
    np.testing.assert_allclose(backend.to_numpy(loaded.predict(xb)), want, **tolerance(np.float32, "model"))
