"""MNIST IDX reading (synthetic files), splits, the shift augmentation, and a smoke-level
learning check on the real test set in ../shared/data/mnist (skipped when absent)."""

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet import metrics
from xpnet.nn import optim
from xpnet.data.mnist import load_mnist, read_idx
from xpnet.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _example():
    """examples/train_mnist.py as a module (its random_shift helper is tested here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_mnist_example", ROOT / "examples" / "train_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


random_shift = _example().random_shift
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason=f"the MNIST test set is not at {MNIST_DIR} (only developer machines and CI "
                                        "have ../shared/data)")


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def write_pair(folder, split, n, gz, rng, dotted=False):
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    sep = "." if dotted else "-"
    for kind, idx, arr in (("images", "idx3", images), ("labels", "idx1", labels)):
        name = f"{split}-{kind}{sep}{idx}-ubyte" + (".gz" if gz else "")
        data = idx_bytes(arr)
        (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_plain_and_gzipped(tmp_path, rng, gz):
    a = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    p = tmp_path / "x.idx"
    p.write_bytes(gzip.compress(idx_bytes(a)) if gz else idx_bytes(a))  # the name says nothing about gzip
    out = read_idx(p)
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, a)


def test_damaged_idx_files_are_data_errors(tmp_path, rng):
    good = idx_bytes(rng.integers(0, 256, size=(4, 28, 28)))
    (tmp_path / "short").write_bytes(good[:-10])
    with pytest.raises(DataError, match="truncated or damaged"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "badgz").write_bytes(gzip.compress(good)[:40])
    with pytest.raises(DataError, match="damaged gzip"):
        read_idx(tmp_path / "badgz")


def test_t10k_only_folder_gives_first_9000_last_1000(tmp_path, rng):
    images, labels = write_pair(tmp_path, "t10k", 50, True, rng)
    data = load_mnist(tmp_path, t10k_train=40)
    assert data.x_train.shape == (40, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(data.x_test[:, 0], images[40:])
    np.testing.assert_array_equal(data.y_train, labels[:40])
    assert data.y_train.dtype == np.int64
    assert "t10k-only split: the first 40 images" in data.split and "last 10" in data.split


def test_four_files_give_the_standard_split(tmp_path, rng):
    train_images, _ = write_pair(tmp_path, "train", 30, False, rng, dotted=True)
    write_pair(tmp_path, "t10k", 12, True, rng)
    data = load_mnist(tmp_path)
    assert len(data.x_train) == 30 and len(data.x_test) == 12
    np.testing.assert_array_equal(data.x_train[:, 0], train_images)
    assert data.split.startswith("standard split: 30 training images")


def test_missing_or_mismatched_files(tmp_path, rng):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nope")
    with pytest.raises(DataError, match="no t10k-images"):
        load_mnist(tmp_path)
    write_pair(tmp_path, "t10k", 5, False, rng)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no matching t10k labels"):
        load_mnist(tmp_path)


def naive_shift(img, dy, dx):
    """The reference: move one (C, H, W) image by (dy, dx), zeros shifted in, with explicit loops."""
    c, h, w = img.shape
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            si, sj = i - dy, j - dx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


@pytest.mark.parametrize("shape,s", [((7, 1, 5, 6), 2), ((3, 3, 4, 4), 1), ((2, 2, 3, 9), 3)])
def test_random_shift_matches_a_per_image_loop(rng, shape, s):
    x = rng.integers(1, 255, size=shape).astype(np.uint8)
    out = random_shift(x, s, rng=np.random.default_rng(42))
    offsets = np.random.default_rng(42).integers(0, 2 * s + 1, size=(2, shape[0]))
    assert out.dtype == x.dtype and out.shape == x.shape
    for n in range(shape[0]):
        np.testing.assert_array_equal(out[n], naive_shift(x[n], s - offsets[0, n], s - offsets[1, n]))


def test_random_shift_covers_every_offset_and_leaves_the_input_alone(rng):
    x = np.zeros((400, 1, 5, 5), dtype=np.float32)
    x[:, 0, 2, 2] = 1.0
    keep = x.copy()
    out = random_shift(x, 2, rng=rng)
    np.testing.assert_array_equal(x, keep)
    rows, cols = np.nonzero(out[:, 0].sum(axis=0))
    assert len(rows) == 25  # the single bright pixel landed on all 5 x 5 offsets
    np.testing.assert_array_equal(random_shift(x, 0), x)


@pytest.mark.gpu
def test_random_shift_on_cupy_matches_numpy(rng):
    from xpnet import backend

    x = rng.integers(0, 255, size=(9, 2, 7, 8)).astype(np.uint8)
    want = random_shift(x, 2, rng=np.random.default_rng(3))
    got = random_shift(backend.module_for("cupy").asarray(x), 2, rng=np.random.default_rng(3))
    assert backend.is_cupy_array(got)
    np.testing.assert_array_equal(backend.to_numpy(got), want)


@needs_mnist
def test_real_mnist_files_load_with_the_documented_split():
    data = load_mnist(MNIST_DIR)
    assert data.x_train.shape == (9000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    counts = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # from the README


@needs_mnist
def test_simple_convnet_learns_mnist_well_above_chance():
    """Smoke level: 600 training images, 2 epochs, 300 test images; chance is 10%."""
    data = load_mnist(MNIST_DIR)
    cs = xpnet.data.Charset("0123456789", 1)
    xtr, ttr = data.x_train[:600], cs.one_hot(data.y_train[:600, None], np.uint8)
    xte, tte = data.x_test[:300], cs.one_hot(data.y_test[:300, None], np.uint8)

    def to_float(x, t):
        return x.astype(np.float32) / np.float32(255), t.astype(np.float32)

    xpnet.seed(0)
    model = xpnet.models.simple_convnet()
    opt = optim.AdamW(model, lr=optim.OneCycle(3e-3, total_steps=2 * 10))
    trainer = xpnet.Trainer(model, opt, batch_size=64, transform=to_float, eval_transform=to_float,
                            metrics={"accuracy": metrics.accuracy}, progress=False, log=None)
    trainer.fit((xtr, ttr), epochs=2, val=(xte, tte))
    assert trainer.history[-1]["val_accuracy"] > 0.6


@needs_mnist
def test_the_example_script_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_mnist.py"), "--data", str(MNIST_DIR), "--out",
         str(tmp_path / "run"), "--epochs", "1", "--train-limit", "256", "--no-progress"],
        capture_output=True, text=True, timeout=300, env={"XPNET_BACKEND": "numpy", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "t10k-only split" in out.stdout and "test accuracy" in out.stdout
    model, meta = xpnet.load(tmp_path / "run" / "model.npz")
    assert meta["charset"] == {"chars": "0123456789", "length": 1}
