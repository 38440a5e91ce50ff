"""Shards in worker processes (xpnet.cpu.process_shards) against shards on threads.

The worker runs the same per-shard code on a replica of the model, so every step
must give the bitwise same outputs, gradients, input gradients and BatchNorm
statistics as the thread pool; errors must reach the caller, and a worker that
died or cannot start must not leave the model unusable.
"""

import os
import threading

import numpy as np
import pytest

import xpnet
from xpnet import config
from xpnet.captcha.heads import CTCLoss
from xpnet.cpu import process_shards
from xpnet.errors import UsageError
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from xpnet.nn.sequential import Sequential

from .test_fused_executor import _restore_settings  # noqa: F401  (autouse fixture)


@pytest.fixture
def processes():
    """Shards 1.. in worker processes, two shards (the settings come back after the test)."""
    config.set_shard_mode("processes")
    xpnet.set_num_threads(2)


def _crnn():
    return xpnet.models.captcha_crnn(n_classes=5, input_shape=(1, 16, 24), channels=(4, 6, 8), hidden=5,
                                     batchnorm=True)


def _conv_bn():
    return Sequential([Conv2D(4, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D(2),
                       Conv2D(6, 3, pad=1), BatchNorm(), ReLU(), Flatten(), Dense(5), BatchNorm(), Dense(3)],
                      input_shape=(2, 8, 10))


def _wide():  # a Winograd block (32 channels in) after a first im2col block
    return Sequential([Conv2D(32, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D(2),
                       Conv2D(8, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D((2, 1)),
                       Flatten(), Dense(3)], input_shape=(2, 8, 12))


def _steps(model, mode, x, steps=2):
    """Outputs, gradients, input gradient, state and evaluation outputs after Adam steps in one shard mode."""
    config.set_shard_mode(mode)
    model.compute_input_grad = True
    opt = xpnet.optim.Adam(model, lr=0.01)
    crnn = model.name == "captcha_crnn"
    labels = np.arange(x.shape[0] * 2).reshape(-1, 2) % 5 + 1
    targets = np.concatenate([np.full((x.shape[0], 1), 2), labels], axis=1)  # packed: length, then the labels
    for _ in range(steps):
        logits = model.forward(x, train=True)
        if crnn:
            _, d = CTCLoss()(logits, targets)
        else:
            d = np.tanh(logits)  # any gradient will do
        dx = model.backward(d)
        grads = {k: v.copy() for k, v in model.gradients().items()}
        opt.step()
    ev = model.forward(x, train=False)
    return logits, grads, dx, {k: v.copy() for k, v in model.state_dict().items()}, ev


def _twins(build, n, dtype=np.float32):
    """The same model twice (same weights: one for each shard mode) and a batch of n for it."""
    xpnet.seed(5)
    on_threads = build()
    x = np.random.default_rng(2).standard_normal((n,) + on_threads.input_shape).astype(dtype)
    return on_threads, on_threads.clone(), x


def _assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)
    np.testing.assert_array_equal(a[2], b[2])
    for k in a[3]:
        np.testing.assert_array_equal(a[3][k], b[3][k], err_msg=k)
    np.testing.assert_array_equal(a[4], b[4])


@pytest.mark.parametrize("build", [_crnn, _conv_bn, _wide], ids=["crnn", "conv_bn", "winograd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [2, 3])
def test_processes_give_the_bits_of_threads(build, dtype, threads):
    xpnet.set_dtype(dtype)
    xpnet.set_num_threads(threads)
    on_threads, on_processes, x = _twins(build, 13, dtype)
    want = _steps(on_threads, "threads", x)
    got = _steps(on_processes, "processes", x)
    assert len(on_processes.executor.shards) == 1  # shards 1.. ran elsewhere
    assert len(on_threads.executor.shards) == threads
    _assert_same(want, got)


def test_batch_sizes_that_grow_and_models_used_in_turn():
    xpnet.set_num_threads(2)
    xpnet.seed(1)
    a_threads, b_threads = _conv_bn(), _crnn()
    a_proc, b_proc = a_threads.clone(), b_threads.clone()
    rng = np.random.default_rng(3)
    for model_t, model_p, n in ((a_threads, a_proc, 9), (b_threads, b_proc, 12), (a_threads, a_proc, 30),
                                (b_threads, b_proc, 8), (a_threads, a_proc, 9)):
        x = rng.standard_normal((n,) + model_t.input_shape).astype(np.float32)
        _assert_same(_steps(model_t, "threads", x, steps=1), _steps(model_p, "processes", x, steps=1))


def test_a_layer_setting_changed_between_steps_reaches_the_workers():
    xpnet.set_num_threads(2)
    on_threads, on_processes, x = _twins(_conv_bn, 10)
    _assert_same(_steps(on_threads, "threads", x, steps=1), _steps(on_processes, "processes", x, steps=1))
    for m in (on_threads, on_processes):
        m.layers[1].eps = 0.5  # not a parameter: only the workers' replicas of the model know it
    _assert_same(_steps(on_threads, "threads", x, steps=1), _steps(on_processes, "processes", x, steps=1))


def test_an_error_in_a_worker_reaches_the_caller_and_the_next_step_works(processes):
    m = Sequential([Flatten(), Dense(3)], input_shape=(4,))
    x = np.zeros((8, 4), np.float32)
    x[-1] = 3e38  # only the last shard (a worker's) overflows
    m.layers[1].params["W"][...] = 10
    with np.errstate(over="ignore"):
        assert np.isinf(m.forward(x, train=False)[-1]).all()
    before = [w.proc.pid for w in process_shards._group.workers]
    with np.errstate(over="raise"), pytest.raises(FloatingPointError, match="overflow"):
        m.forward(x, train=False)  # the worker's error class, under the caller's error handling
    x[-1] = 1
    y = m.forward(x, train=False)
    np.testing.assert_array_equal(y[-1], x[-1] @ m.layers[1].params["W"] + m.layers[1].params["b"])
    assert [w.proc.pid for w in process_shards._group.workers] != before  # stopped on the error, started again


def test_a_worker_that_died_is_reported_and_replaced(processes):
    m = _conv_bn()
    x = np.random.default_rng(0).standard_normal((10,) + m.input_shape).astype(np.float32)
    want = m.forward(x, train=False)
    worker = process_shards._group.workers[0]
    worker.proc.kill()
    worker.proc.wait()
    with pytest.raises(process_shards.ShardWorkerError, match="ended unexpectedly"):
        m.forward(x, train=False)
    np.testing.assert_array_equal(m.forward(x, train=False), want)


def test_a_worker_error_of_a_class_the_caller_cannot_raise_names_it():
    exc = process_shards.worker_exception(
        {"type": None, "module": "somewhere", "name": "OddError", "message": "it broke"})
    assert isinstance(exc, process_shards.ShardWorkerError) and "OddError: it broke" in str(exc)
    exc = process_shards.worker_exception({"type": "ShapeError", "module": "xpnet.errors", "name": "ShapeError",
                                           "message": "bad shape"})
    assert type(exc).__name__ == "ShapeError" and str(exc) == "bad shape"


def test_all_reduce_contributions_in_another_order_are_refused():
    payload = process_shards.value_message((3, "bn"), np.arange(4.0))
    np.testing.assert_array_equal(process_shards.parse_value(payload, (3, "bn"), np.zeros(4)), np.arange(4.0))
    with pytest.raises(process_shards.ShardWorkerError, match="different orders"):
        process_shards.parse_value(payload, (4, "bn"), np.zeros(4))


def test_messages_larger_than_a_pipe_buffer_arrive_whole():
    r, w = os.pipe()
    payload = np.random.default_rng(0).bytes(3 << 20)
    writer = threading.Thread(target=process_shards.write_message, args=(w, b"V", payload))
    writer.start()
    try:
        assert process_shards.read_message(r) == (b"V", payload)
    finally:
        writer.join()
        os.close(r)
        os.close(w)


def test_dropout_masks_of_the_main_process_reach_the_workers():
    # The masks are drawn in the main process from xpnet's generator, as with threads: the same
    # seed gives the same bits (a worker drawing its own would give other masks to its shard).
    xpnet.set_num_threads(2)

    def build():
        return Sequential([Conv2D(4, 3, pad=1), ReLU(), Dropout(0.3), Flatten(), Dense(6), Dropout(0.5), Dense(3)],
                          input_shape=(2, 6, 8))

    on_threads, on_processes, x = _twins(build, 12)
    xpnet.seed(9)
    want = _steps(on_threads, "threads", x)
    xpnet.seed(9)
    got = _steps(on_processes, "processes", x)
    assert len(on_processes.executor.shards) == 1
    _assert_same(want, got)


def test_no_arena_file_is_left_behind(processes):
    m = _conv_bn()
    m.forward(np.ones((12,) + m.input_shape, np.float32), train=True)
    folder = process_shards._arena_folder()
    assert not [f for f in os.listdir(folder) if f.startswith(f"xpnet-shards-{os.getpid()}-")]


def test_workers_that_cannot_start_fall_back_to_threads_with_one_warning(monkeypatch, processes):

    def cannot_start(self):
        raise OSError("no such interpreter")

    monkeypatch.setattr(process_shards, "_group", None)
    monkeypatch.setattr(process_shards, "_failed", None)
    monkeypatch.setattr(process_shards.Worker, "__init__", cannot_start)
    m = _conv_bn()
    x = np.random.default_rng(0).standard_normal((10,) + m.input_shape).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="could not start .*no such interpreter.*using threads"):
        y = m.forward(x, train=False)
    assert len(m.executor.shards) == 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(m.forward(x, train=False), y)  # no second warning


def test_a_frozen_application_never_starts_itself_as_a_worker(monkeypatch, processes):
    m = _conv_bn()
    m.forward(np.ones((8,) + m.input_shape, np.float32), train=False)
    assert process_shards.usable(2)
    monkeypatch.setattr(process_shards.sys, "frozen", True, raising=False)
    assert not process_shards.usable(2)


def test_a_worker_stopped_in_the_middle_of_a_step_exits_without_a_traceback():
    # A worker waiting for an all-reduce total when the main process closes its pipes (an
    # interrupted step) ends quietly: status 0, nothing on its stderr.
    import json
    import subprocess
    import sys

    config.set_shard_mode("threads")
    xpnet.set_num_threads(2)
    m = _conv_bn()
    m.forward(np.ones((8,) + m.input_shape, np.float32), train=False)
    arena = process_shards.Arena(m.executor, 8, 1)
    for i, kind, name, arr in process_shards.state_arrays(m):
        np.copyto(arena.views[f"state/{i}/{kind}/{name}"], arr)
    proc = subprocess.Popen([sys.executable, "-m", "xpnet.cpu.shard_worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        send = lambda **cmd: process_shards.write_message(proc.stdin.fileno(), process_shards.COMMAND,
                                                          json.dumps(cmd).encode())
        receive = lambda: process_shards.read_message(proc.stdout.fileno())
        assert receive()[0] == process_shards.READY
        send(op="load", token=arena.token, drop=[], path=arena.path, regions=arena.regions, spec=m.spec(),
             dtype=np.dtype(m.dtype).str, winograd=True)
        assert receive()[0] == process_shards.DONE
        send(op="forward", token=arena.token, n=8, t=2, k=1, train=True, err=np.geterr(),
             input_grads=[layer.needs_input_grad for layer in m.layers], masks=[],
             settings=process_shards.worker_settings())
        assert receive()[0] == process_shards.VALUE  # the first BatchNorm's statistics: now it waits
        proc.stdin.close()  # as ProcessGroup.stop does: both pipes
        proc.stdout.close()
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == b""
    finally:
        arena.unlink()
        if proc.poll() is None:
            proc.kill()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def test_a_forked_child_starts_workers_of_its_own_and_leaves_the_parents_alone(processes):
    m = _conv_bn()
    x = np.random.default_rng(1).standard_normal((10,) + m.input_shape).astype(np.float32)
    want = m.forward(x, train=False)
    parents = [w.proc.pid for w in process_shards._group.workers]
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            same = np.array_equal(m.forward(x, train=False), want)
            own = [w.proc.pid for w in process_shards._group.workers]
            code = 0 if same and own and not set(own) & set(parents) else 1
            process_shards._group.stop()
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    np.testing.assert_array_equal(m.forward(x, train=False), want)
    assert [w.proc.pid for w in process_shards._group.workers] == parents


def test_a_backward_whose_workers_were_stopped_since_its_forward_is_refused(processes):
    # Another model's error stops the workers between this model's forward and backward: the
    # backward must not run shard 0 alone (wrong gradients), it says to run the forward again.
    m = _conv_bn()
    x = np.random.default_rng(0).standard_normal((10,) + m.input_shape).astype(np.float32)
    other = Sequential([Flatten(), Dense(3)], input_shape=(4,))
    big = np.zeros((8, 4), np.float32)
    big[-1] = 3e38
    other.layers[1].params["W"][...] = 10
    logits = m.forward(x, train=True)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        other.forward(big, train=False)
    with pytest.raises(process_shards.ShardWorkerError, match="run forward.*again"):
        m.backward(np.ones_like(logits))
    twin = m.clone()
    config.set_shard_mode("threads")
    want = _steps(twin, "threads", x, steps=1)
    _assert_same(want, _steps(m, "processes", x, steps=1))  # and the next step is right


def test_more_models_in_turn_than_the_workers_keep(processes):
    xpnet.seed(2)
    models = [Sequential([Flatten(), Dense(5), BatchNorm(), Dense(2)], input_shape=(3,))
              for _ in range(process_shards.MAX_REPLICAS + 3)]
    x = np.random.default_rng(3).standard_normal((9, 3)).astype(np.float32)
    want = []
    config.set_shard_mode("threads")
    for m in models:
        want.append(m.forward(x, train=False))
    config.set_shard_mode("processes")
    for _ in range(2):
        for m, w in zip(models, want):
            np.testing.assert_array_equal(m.forward(x, train=False), w)
    assert len(process_shards._group.arenas) <= process_shards.MAX_REPLICAS


def test_no_room_for_shared_memory_falls_back_to_threads(monkeypatch, processes):
    monkeypatch.setattr(process_shards, "_failed", None)

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(process_shards.os, "posix_fallocate", full)
    m = _conv_bn()
    x = np.random.default_rng(0).standard_normal((10,) + m.input_shape).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="no room for their shared memory.*No space left"):
        y = m.forward(x, train=False)
    assert len(m.executor.shards) == 2  # ran on threads
    folder = process_shards._arena_folder()
    assert not [f for f in os.listdir(folder) if f.startswith(f"xpnet-shards-{os.getpid()}-")]
    config.set_shard_mode("threads")
    np.testing.assert_array_equal(m.clone().forward(x, train=False), y)


def test_settings_changed_at_run_time_reach_the_workers():
    from xpnet.cpu import workspace

    xpnet.set_num_threads(2)
    on_threads, on_processes, x = _twins(_conv_bn, 12)
    config.set_im2col_budget(0.002)  # conv chunks of a few images: other sums than one chunk
    workspace.CHUNK_BYTES = 4096
    _assert_same(_steps(on_threads, "threads", x, steps=1), _steps(on_processes, "processes", x, steps=1))


@pytest.mark.parametrize("winograd", [True, False])
def test_the_winograd_choice_and_chunk_size_reach_the_workers(monkeypatch, winograd):
    from xpnet.cpu import conv_block, conv_plan

    monkeypatch.setattr(conv_block.ConvBlock, "USE_WINOGRAD", winograd)
    monkeypatch.setattr(conv_plan, "WINOGRAD_CHUNK_BYTES", 1)
    xpnet.set_num_threads(2)
    on_threads, on_processes, x = _twins(_wide, 12)
    other_way = on_threads.clone()
    want = _steps(on_threads, "threads", x, steps=1)
    _assert_same(want, _steps(on_processes, "processes", x, steps=1))
    assert [getattr(s, "winograd", None) for s in on_processes.executor.stages[:2]] == [False, winograd]
    # the two ways give other bits: a worker that took the other one would have been seen
    monkeypatch.setattr(conv_block.ConvBlock, "USE_WINOGRAD", not winograd)
    assert not np.array_equal(_steps(other_way, "threads", x, steps=1)[1]["conv2.W"], want[1]["conv2.W"])


def test_workers_keep_the_main_executors_conv_path_when_the_default_changes(monkeypatch):
    # Built with Winograd; the default switched off before a larger batch makes the workers load
    # the model again: they must still compute as the main executor does.
    from xpnet.cpu import conv_block

    xpnet.set_num_threads(2)
    on_threads, on_processes, x = _twins(_wide, 12)
    small = x[:6]
    first = (_steps(on_threads, "threads", small, steps=1), _steps(on_processes, "processes", small, steps=1))
    _assert_same(*first)
    monkeypatch.setattr(conv_block.ConvBlock, "USE_WINOGRAD", False)
    _assert_same(_steps(on_threads, "threads", x, steps=1), _steps(on_processes, "processes", x, steps=1))
    assert on_processes.executor.winograd and on_processes.executor.stages[1].winograd


def test_a_warning_in_a_workers_shard_reaches_the_callers_filters(processes):
    import warnings

    m = Sequential([Flatten(), Dense(3)], input_shape=(4,))
    x = np.zeros((8, 4), np.float32)
    x[-1] = 3e38  # only the worker's shard overflows
    m.layers[1].params["W"][...] = 10
    with np.errstate(over="warn"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m.forward(x, train=False)
    assert any(issubclass(w.category, RuntimeWarning) and "overflow" in str(w.message) for w in seen)
    with np.errstate(over="warn"), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="overflow"):
            m.forward(x, train=False)


def test_a_numpy_scalar_in_a_layer_setting_is_sent(processes):
    m = _conv_bn()
    m.layers[1].eps = np.float32(1e-3)
    x = np.random.default_rng(0).standard_normal((10,) + m.input_shape).astype(np.float32)
    got = m.forward(x, train=True)
    config.set_shard_mode("threads")
    np.testing.assert_array_equal(m.clone().forward(x, train=True), got)


def test_an_interpreter_that_never_answers_falls_back_to_threads(monkeypatch, tmp_path, processes):
    silent = tmp_path / "silent.sh"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    monkeypatch.setattr(process_shards, "_group", None)
    monkeypatch.setattr(process_shards, "_failed", None)
    monkeypatch.setattr(process_shards, "STARTUP_TIMEOUT_S", 0.5)
    monkeypatch.setattr(process_shards.sys, "executable", str(silent))
    m = _conv_bn()
    with pytest.warns(RuntimeWarning, match="did not start within 0.5 s"):
        m.forward(np.ones((10,) + m.input_shape, np.float32), train=False)
    assert len(m.executor.shards) == 2
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(silent).encode() in f.read():
                    left.append(pid)
        except OSError:
            pass
    assert left == []  # the silent "interpreter" was stopped, not left running


def test_a_forked_child_does_not_keep_the_workers_waiting(processes):
    # The child closes its copies of the worker pipes at once: stopping the workers in the parent
    # while the child lives ends them cleanly (not a 2-second wait and a kill: status -9).
    import time

    m = _conv_bn()
    m.forward(np.ones((10,) + m.input_shape, np.float32), train=False)
    procs = [w.proc for w in process_shards._group.workers]
    pid = os.fork()
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    try:
        process_shards._group.stop()
        assert [p.returncode for p in procs] == [0]  # ended by the closed pipe, not killed after 2 s
    finally:
        os.waitpid(pid, 0)


def test_stopped_workers_exit_cleanly():
    config.set_shard_mode("processes")
    xpnet.set_num_threads(3)
    m = _conv_bn()
    m.forward(np.ones((12,) + m.input_shape, np.float32), train=False)
    procs = [w.proc for w in process_shards._group.workers]
    assert len(procs) == 2
    process_shards._group.stop()
    assert [p.returncode for p in procs] == [0, 0]


def test_shard_mode_setting():
    assert config.set_shard_mode("threads") == "threads" == xpnet.get_shard_mode()
    with pytest.raises(UsageError, match="processes, threads"):
        config.set_shard_mode("forks")
