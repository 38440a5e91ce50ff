"""The input pipeline: batches fetched ahead in a background thread come out in order, unchanged,
overlap the training step, surface the source's errors at the right batch, and are released only
after the next one is taken; the trainer records the share of time it waited for data.  The CuPy
hand-over (a copy on a stream of its own) is checked on a GPU only."""

import threading
import time

import numpy as np
import pytest

import xpnet
from xpnet import backend
from xpnet.errors import DataError
from xpnet.nn import optim
from xpnet.nn.layers import Dense, ReLU
from xpnet.nn.sequential import Sequential
from xpnet.training.prefetch import HostHandover, Prefetcher
from xpnet.training.sources import ArraySource, IterSource

from tests.system import _train_worker as W


def _arrays(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 2, (n, 3)).astype(np.uint8)


def _batches(source, first, stop, ahead, **kw):
    with Prefetcher(source, first, stop, np, ahead, **kw) as it:
        return [next(it) for _ in range(first, stop)]


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_array_source_batches_are_the_plain_ones_in_order(ahead):
    x, y = _arrays()
    plain, pre = ArraySource(x, y, 8, np, 0), ArraySource(x, y, 8, np, 0)
    plain.start_epoch(np.random.default_rng(5))
    pre.start_epoch(np.random.default_rng(5))
    want = [plain.batch(b) for b in range(1, plain.steps_per_epoch)]
    got = _batches(pre, 1, pre.steps_per_epoch, ahead)  # resumed at batch 1
    assert len(got) == len(want) == 4
    for (gx, gy), (wx, wy) in zip(got, want):
        assert gx.dtype == np.float32 and gy.dtype == np.uint8  # nothing converted
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)


def test_generator_is_pulled_at_most_ahead_batches_beyond_the_consumer():
    pulled = []

    def gen():
        for i in range(100):
            pulled.append(i)
            yield np.full((2, 2), i, np.float32), np.zeros((2, 1), np.float32)

    src = IterSource(gen(), steps_per_epoch=50)
    src.start_epoch(None)
    with Prefetcher(src, 0, 50, np, ahead=2) as it:
        for i in range(5):
            x, _ = next(it)
            assert x[0, 0] == i
        time.sleep(0.2)  # let the worker run as far ahead as it may
        # 5 taken, 2 waiting in the queue, 1 fetched and waiting for room
        assert 5 <= len(pulled) <= 5 + 2 + 1
        t = it._thread
    assert not t.is_alive()  # closed with the block, worker joined
    with pytest.raises(StopIteration):
        next(it)


def test_fetching_overlaps_the_step_and_the_wait_is_measured():
    """A source taking 40 ms per batch and a step taking 40 ms: in the loop they add up, ahead they overlap."""
    class Slow:
        def batch(self, b):
            time.sleep(0.04)
            return np.full((1,), b, np.float32), np.zeros((1,), np.float32)

    def run(ahead):
        t0 = time.monotonic()
        with Prefetcher(Slow(), 0, 12, np, ahead) as it:
            for _ in range(12):
                next(it)
                time.sleep(0.04)  # the training step
            return time.monotonic() - t0, it.wait_seconds

    plain_s, plain_wait = run(0)
    ahead_s, ahead_wait = run(2)
    assert plain_s >= 12 * 0.08 * 0.95 and plain_wait >= 12 * 0.04 * 0.95
    # overlapped: one fetch of latency, then the step time dominates (sleeps need no CPU)
    assert ahead_s < 0.8 * plain_s, (ahead_s, plain_s)
    assert ahead_wait < 0.5 * plain_wait, (ahead_wait, plain_wait)


def test_an_error_of_the_source_is_raised_at_its_batch():
    class Failing:
        def batch(self, b):
            if b == 3:
                raise DataError("batch 3 is broken")
            return np.full((1,), b, np.float32), np.zeros((1,), np.float32)

    with Prefetcher(Failing(), 0, 6, np, ahead=2) as it:
        got = [float(next(it)[0][0]) for _ in range(3)]
        assert got == [0.0, 1.0, 2.0]
        with pytest.raises(DataError, match="batch 3 is broken"):
            next(it)
        assert not it._thread.is_alive()


def test_the_iterator_ran_out_error_keeps_its_message():
    src = IterSource(iter([(np.zeros((1, 1)), np.zeros((1, 1)))] * 2), steps_per_epoch=4)
    src.start_epoch(None)
    with Prefetcher(src, 0, 4, np, ahead=2) as it:
        next(it), next(it)
        with pytest.raises(DataError, match="ran out before the planned number of steps"):
            next(it)


class RecordingDevice(HostHandover):
    """A hand-over that logs the protocol: marks are numbered, releases say which mark they waited for."""

    def __init__(self):
        self.log, self.marks, self.lock = [], 0, threading.Lock()

    def copy(self, a):
        return a, ("ticket", int(np.asarray(a).ravel()[0]))

    def accept(self, ticket):
        with self.lock:
            self.log.append(("accept", ticket[1]))

    def mark(self):
        with self.lock:
            self.marks += 1
            self.log.append(("mark", self.marks))
            return self.marks

    def release(self, mark):
        with self.lock:
            self.log.append(("release", mark))


def test_a_batch_is_released_only_after_the_next_one_is_taken():
    class Src:
        def batch(self, b):
            return np.full((1,), b, np.float32), np.full((1,), b, np.float32)

    dev = RecordingDevice()
    with Prefetcher(Src(), 0, 5, np, ahead=2, device=dev) as it:
        for b in range(5):
            next(it)
            accepted = [e for e in dev.log if e[0] == "accept"]
            assert accepted[-2:] == [("accept", b), ("accept", b)]  # x and y, before use
            assert dev.marks == b  # batch b-1 retired when b was taken
    # after close: every batch handed out was retired with a mark and each mark released once
    assert dev.marks == 5
    releases = [e[1] for e in dev.log if e[0] == "release"]
    assert sorted(releases) == [1, 2, 3, 4, 5]
    for m in releases:  # released after its mark was recorded
        assert dev.log.index(("mark", m)) < dev.log.index(("release", m))


def _mlp():
    xpnet.backend.seed(0)
    return Sequential([Dense(16), ReLU(), Dense(3)], input_shape=(6,), name="mlp")


def _fit(tmp_path, train, prefetch, steps_per_epoch=None, epochs=2):
    model = _mlp()
    trainer = xpnet.Trainer(model, optim.Adam(model, lr=1e-2), batch_size=8, progress=False, log=None,
                            out_dir=tmp_path, plot=False, prefetch=prefetch, log_every=1)
    trainer.fit(train, epochs=epochs, steps_per_epoch=steps_per_epoch)
    return model, trainer


def test_training_with_prefetching_is_the_training_without_it(tmp_path):
    """The tiny run with shuffling, augmentation, dropout and BatchNorm: bit for bit the same."""
    m0, t0 = W.run(tmp_path / "a", epochs=2, prefetch=0)
    m2, t2 = W.run(tmp_path / "b", epochs=2, prefetch=2)
    for k, v in m0.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(m2.state_dict()[k]), err_msg=k)
    assert t0.history.steps == t2.history.steps
    for r in t2.history.epochs:
        assert 0.0 <= r["data_wait"] <= 1.0


def test_the_epoch_record_says_how_long_the_loop_waited_for_data(tmp_path):
    """A generator taking 30 ms per batch: fetched in the loop most of the epoch is waiting; ahead, the
    wait shrinks by the overlap with the (slowed) step."""
    x, y = _arrays(8)
    y = y.astype(np.float32)

    def slow():
        while True:
            time.sleep(0.03)
            yield x, y

    _, plain = _fit(tmp_path / "a", slow(), prefetch=0, steps_per_epoch=10, epochs=1)
    wait = plain.history[-1]["data_wait"]
    assert wait > 0.5, plain.history[-1]

    class SlowStep(xpnet.training.Callback):
        def on_step_end(self, trainer):
            time.sleep(0.04)  # a step slower than the source: the worker keeps the queue full

    model = _mlp()
    t = xpnet.Trainer(model, optim.Adam(model, lr=1e-2), batch_size=8, progress=False, log=None, plot=False,
                      prefetch=2, callbacks=[SlowStep()])
    t.fit(slow(), epochs=1, steps_per_epoch=10)
    assert t.history[-1]["data_wait"] < 0.5 * wait, (t.history[-1], wait)


def test_a_bad_prefetch_value_is_a_usage_error():
    model = _mlp()
    with pytest.raises(xpnet.errors.UsageError, match="prefetch"):
        xpnet.Trainer(model, optim.Adam(model), prefetch=-1)


@pytest.mark.gpu
def test_cupy_batches_are_copied_on_a_side_stream_and_equal_the_host_batches():
    cp = backend.cupy
    x, y = _arrays(40)
    src = ArraySource(x, y, 8, cp, device_data_bytes=0)  # data stays on the host
    src.start_epoch(np.random.default_rng(3))
    want = [src.batch(b) for b in range(5)]
    with Prefetcher(src, 0, 5, cp, ahead=2) as it:
        got = [next(it) for _ in range(5)]
        stream = it.device.stream
    assert stream.ptr != cp.cuda.get_current_stream().ptr
    for (gx, gy), (wx, wy) in zip(got, want):
        assert isinstance(gx, cp.ndarray) and gx.dtype == np.float32 and gy.dtype == np.uint8
        np.testing.assert_array_equal(gx.get(), wx)
        np.testing.assert_array_equal(gy.get(), wy)


@pytest.mark.gpu
def test_training_on_cupy_with_prefetching_is_the_training_without_it(tmp_path):
    xpnet.use("cupy")
    x, y = _arrays(48)
    y = y.astype(np.float32)

    def run(prefetch, folder):
        model = _mlp()
        trainer = xpnet.Trainer(model, optim.Adam(model, lr=1e-2), batch_size=8, progress=False, log=None,
                                out_dir=folder, plot=False, prefetch=prefetch, device_data_bytes=0)
        trainer.fit((x, y), epochs=2)
        return {k: backend.to_numpy(v) for k, v in model.state_dict().items()}

    a, b = run(0, tmp_path / "a"), run(2, tmp_path / "b")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
