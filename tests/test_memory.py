"""Errors a user understands: out of memory with a batch size that fits, and a
CuPy/driver mismatch that names the wheel.  The memory estimate is checked
against NumPy's traced allocations; the GPU test that the suggested batch size
really fits under a memory-pool limit is in tests/cuda/test_memory_paths.py."""

import tracemalloc

import numpy as np
import pytest

import xpnet

from xpnet import memory, models, ops
from xpnet.cuda.driver import DriverMismatchError, driver_mismatch_message
from xpnet.errors import BackendError, XpnetError
from xpnet.memory import (OutOfMemoryError, classify, oom_guard, out_of_memory_message, step_memory,
                          suggest_batch_size)

MiB = 1024 ** 2


def _traced_peak(model, n, train):
    x = np.random.default_rng(0).standard_normal((n,) + model.input_shape).astype(np.float32)
    t = np.zeros((n,) + model.output_shape, np.float32)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        if train:
            logits = model.forward(x, train=True)
            _, d = ops.sigmoid_bce_with_logits(logits, t)
            model.backward(d)
            del logits, d
        else:
            model.forward(x)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("build,train", [(models.captcha_net, True), (models.captcha_net, False),
                                         (models.simple_convnet, True)])
def test_per_sample_estimate_matches_measured_numpy_memory(build, train):
    """The analytic estimate is within [1x, 1.6x] of the measured growth per sample:
    never much below (the suggestion must fit), not wastefully above."""
    model = build()
    # The estimate describes the plain path (the one CuPy runs); the CPU fast path
    # works in cache-sized chunks and needs far less per sample.
    with xpnet.fast_paths(False):
        _traced_peak(model, 2, train)  # warm caches, grads
        slope = (_traced_peak(model, 10, train) - _traced_peak(model, 4, train)) / 6
    est = step_memory(model, train)["per_sample"]
    assert 0.95 * slope <= est <= 1.6 * slope, (est / MiB, slope / MiB)


def test_estimate_breakdown_and_fixed_bytes():
    model = models.captcha_net()
    est = step_memory(model, train=True)
    params = sum(p.nbytes for p in model.parameters().values())
    assert est["fixed"] == 4 * params
    assert [name for name, _ in est["layers"]] == [l.name for l in model.layers]
    # conv1's im2col columns alone: 30*78 windows of 3*3*3 float32 values.
    assert dict(est["layers"])["conv1"] >= 30 * 78 * 27 * 4
    assert step_memory(model, train=False)["per_sample"] < est["per_sample"]


def test_suggested_batch_is_the_largest_that_fits_the_budget():
    model = models.captcha_net()
    model.forward(np.zeros((2, 3, 32, 80), np.float32), train=True)
    model.backward(np.zeros((2, 144), np.float32))  # gradients exist now
    per = step_memory(model)["per_sample"]
    for free in (200 * MiB, 1024 * MiB, 5000 * MiB):
        n = suggest_batch_size(model, free)
        budget = free * memory.SAFETY - memory.RESERVE_BYTES
        assert n * per <= budget < (n + 1) * per
    assert suggest_batch_size(model, 10 * MiB) == 0


def test_guard_turns_memory_error_into_one_sentence_with_a_batch_size(monkeypatch):
    model = models.captcha_net()
    monkeypatch.setattr(memory, "free_memory", lambda where: (300 * MiB, "the host"))
    expected = suggest_batch_size(model, 300 * MiB)
    assert 1 <= expected < 500
    x = np.zeros((4, 3, 32, 80), np.float32)
    with pytest.raises(OutOfMemoryError) as info:
        with oom_guard(model, batch_size=500):
            model.forward(x, train=True)
            raise MemoryError("Unable to allocate 3.1 GiB")
    msg = str(info.value)
    assert f"use a batch size of {expected} or less." in msg
    assert "model 'captcha_net' at batch size 500" in msg and "training step" in msg
    assert "\n" not in msg and msg.count(". ") == 0  # one sentence
    assert isinstance(info.value, MemoryError) and isinstance(info.value, BackendError)
    assert isinstance(info.value.__cause__, MemoryError)
    assert all(l._cache is None for l in model.layers)  # the failed step's caches are released


def test_guard_when_nothing_fits_or_when_memory_is_held_elsewhere(monkeypatch):
    model = models.captcha_net()
    assert "not even a batch of 1 fits" in out_of_memory_message(model, 8, 20 * MiB, "GPU 0 (X)")
    msg = out_of_memory_message(model, 8, 8000 * MiB, "GPU 0 (X)", what="prediction", train=False)
    assert "other arrays or processes hold the memory" in msg and "prediction" in msg


class CUDARuntimeError(RuntimeError):
    """Stands in for cupy_backends' error class (matched by name and text)."""


class CUDADriverError(RuntimeError):
    pass


def test_classify():
    assert classify(MemoryError()) == "memory"
    assert classify(CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")) == "memory"
    assert classify(CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient "
                                     "for CUDA runtime version")) == "driver"
    assert classify(CUDADriverError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled "
                                    "with an unsupported toolchain.")) == "driver"
    assert classify(CUDARuntimeError("cudaErrorIllegalAddress")) is None
    assert classify(ValueError("out of memory")) is None  # not a CUDA error type
    assert classify(OutOfMemoryError("already translated")) is None


def test_guard_translates_driver_errors_and_passes_others(monkeypatch):
    model = models.captcha_net()
    monkeypatch.setattr(memory, "current_driver_mismatch_message", lambda: "install cupy-cuda12x.")
    with pytest.raises(DriverMismatchError, match="install cupy-cuda12x"):
        with oom_guard(model, 4):
            raise CUDADriverError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
    with pytest.raises(ValueError, match="unrelated"):
        with oom_guard(model, 4):
            raise ValueError("unrelated")
    with pytest.raises(CUDARuntimeError):
        with oom_guard(model, 4):
            raise CUDARuntimeError("cudaErrorIllegalAddress")


def test_driver_mismatch_messages_name_the_wheel():
    msg = driver_mismatch_message(12040, 13000, "cupy-cuda13x 14.2.0")
    assert "cupy-cuda13x 14.2.0 is built for CUDA 13.0" in msg and "CUDA 12.4" in msg
    assert "pip install cupy-cuda12x" in msg and "xpnet[cuda12]" in msg
    msg = driver_mismatch_message(13000, 13000, "cupy-cuda13x 14.2.0", compiler_version=13020)
    assert 'nvidia-cuda-nvrtc==13.0.*' in msg and "CUDA 13.2" in msg
    assert "No NVIDIA driver" in driver_mismatch_message(0, 13000)
    assert "cupy-cuda11x" in driver_mismatch_message(11080, 12000)
    assert "XPNET_REFERENCE=1" in driver_mismatch_message(13000, 13000, "cupy-cuda13x 14.2.0", 13000)
    for m in (driver_mismatch_message(12040, 13000), driver_mismatch_message(13000, 13000, None, 13020)):
        assert "\n" not in m and m.endswith(".")


def test_errors_are_xpnet_errors():
    assert issubclass(OutOfMemoryError, XpnetError) and issubclass(DriverMismatchError, BackendError)


def test_max_batch_size_on_the_host():
    assert memory.max_batch_size(models.simple_convnet(), train=True) >= 1
