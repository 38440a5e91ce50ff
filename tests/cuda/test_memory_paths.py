"""The out-of-memory message's batch size comes from the path that actually runs.

``memory.active_path`` asks the dispatch what a step would take (the fused CPU path, xpnet's
CUDA kernels, the generic ops); ``step_memory`` estimates that path.  On the CPU the kernels
run through the g++ emulation registered behind ``xpnet.ops``: the caches each path leaves for
backward are measured against its estimate, and an allocation failure inside the emulated
kernels is turned into a message whose batch size is the kernels' estimate, not the generic one.
On a GPU the same is checked with CuPy's kernels and a memory-pool limit.
"""

import numpy as np
import pytest

import xpnet
from xpnet import backend, dispatch, memory, models, ops
from xpnet.cuda import emulate
from xpnet.cuda import ops as cuda_ops
from xpnet.memory import OutOfMemoryError, oom_guard, step_memory, suggest_batch_size
from xpnet.nn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from xpnet.nn.sequential import Sequential

MiB = 1024 ** 2


@pytest.fixture(scope="module")
def emulated_ops():
    if emulate.find_cxx() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) for the CPU emulation of the CUDA kernels")
    return cuda_ops.KernelOps(emulate.EmulatedRuntime())


def _padded_net():
    """Padding, an odd pooled size and overlapping pool windows: where the paths' memory differs most."""
    return Sequential([Conv2D(6, 3, pad=1), ReLU(), MaxPool2D(3, stride=2), Conv2D(5, 3, pad=2), ReLU(),
                       MaxPool2D(2), Flatten(), Dense(4)], input_shape=(2, 11, 13), name="padded")


def _arrays(obj, seen=None):
    """Every distinct NumPy array reachable from a layer's cache (tuples, lists, KernelCache)."""
    seen = {} if seen is None else seen
    if isinstance(obj, np.ndarray):
        seen[id(obj)] = obj
    elif isinstance(obj, cuda_ops.KernelCache):
        _arrays(obj.data, seen)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _arrays(item, seen)
    return seen


def _cache_bytes(layer):
    params = {id(p) for p in layer.params.values()}
    return sum(a.nbytes for i, a in _arrays(layer._cache).items() if i not in params)


def test_active_path_is_what_the_dispatch_would_run(emulated_ops):
    model = models.captcha_net()
    assert memory.active_path(model) == "fused"  # NumPy: the fused executor takes the whole model
    with dispatch.layer_by_layer():
        assert memory.active_path(model) == "generic"
        with cuda_ops.registered(emulated_ops):
            assert memory.active_path(model) == "kernels"
            with xpnet.reference_paths():
                assert memory.active_path(model) == "generic"
            assert memory.active_path(model.astype(np.float64)) == "kernels"
        # Registered with the real guard, the CUDA kernels do not take NumPy arrays.
        with cuda_ops.registered(emulated_ops, usable=cuda_ops.K.usable):
            assert memory.active_path(model) == "generic"
    assert memory.active_path(Sequential([Dense(3)], input_shape=(5,))) in ("fused", "generic")


@pytest.mark.parametrize("path", ["generic", "kernels"])
@pytest.mark.parametrize("build", [models.captcha_net, _padded_net])
def test_each_path_keeps_what_its_estimate_says(emulated_ops, rng, path, build):
    """Conv and pool caches after a training forward, per sample, equal the estimate of the path that ran
    (im2col columns for conv; int64 argmax for the generic pool, int32 indices for the kernels)."""
    model = build()
    n = 3
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    with dispatch.layer_by_layer():
        if path == "kernels":
            with cuda_ops.registered(emulated_ops):
                assert memory.active_path(model) == "kernels"
                est = step_memory(model, train=True)
                model.forward(x, train=True)
        else:
            assert memory.active_path(model) == "generic"
            est = step_memory(model, train=True)
            model.forward(x, train=True)
    assert est["path"] == path
    kept = dict(est["kept"])
    checked = 0
    for layer in model.layers:
        if type(layer).__name__ in ("Conv2D", "MaxPool2D"):
            assert isinstance(layer._cache, cuda_ops.KernelCache) == (path == "kernels")
            assert _cache_bytes(layer) == n * kept[layer.name], (layer.name, _cache_bytes(layer), n * kept[layer.name])
            checked += 1
    assert checked >= 4


def test_the_kernels_need_less_than_the_generic_ops():
    for build in (models.captcha_net, _padded_net):
        model = build()
        g, k = step_memory(model, path="generic"), step_memory(model, path="kernels")
        assert k["per_sample"] < g["per_sample"]
        assert k["fixed"] == g["fixed"]
    with pytest.raises(ValueError, match="path must be one of"):
        step_memory(models.captcha_net(), path="cudnn")


class _DeviceFull:
    """An emulated runtime on a device of ``capacity`` bytes: a launch whose arrays exceed it fails the
    way CuPy's allocator does (a MemoryError)."""

    def __init__(self, rt, capacity):
        self.rt, self.capacity, self.xp, self.name = rt, capacity, rt.xp, rt.name

    def launch(self, name, dtype, wide, total, args):
        need = sum(v.nbytes for kind, v in args if kind == "p")
        if need > self.capacity:
            raise MemoryError(f"Out of memory allocating {need:,} bytes (allocated so far: 0 bytes).")
        return self.rt.launch(name, dtype, wide, total, args)


def test_out_of_memory_in_the_kernels_suggests_the_kernels_batch_size(emulated_ops, rng, monkeypatch):
    """Provoked: a batch of 500 through the emulated kernels on a 'device' too small for its columns."""
    model = models.captcha_net()
    free = 1000 * MiB  # 354 by the kernels' estimate, 347 by the generic one
    monkeypatch.setattr(memory, "free_memory", lambda where: (free, "the host"))
    small = cuda_ops.KernelOps(_DeviceFull(emulated_ops.rt, capacity=4 * MiB))
    n = 500
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    t = np.zeros((n,) + model.output_shape, np.float32)
    with dispatch.layer_by_layer(), cuda_ops.registered(small):
        want = suggest_batch_size(model, free, path="kernels")
        generic = suggest_batch_size(model, free, path="generic")
        assert want != generic  # the test can tell the two estimates apart
        with pytest.raises(OutOfMemoryError) as info:
            with oom_guard(model, n):
                logits = model.forward(x, train=True)
                _, d = ops.sigmoid_bce_with_logits(logits, t)
                model.backward(d)
    msg = str(info.value)
    assert f"use a batch size of {want} or less." in msg, msg
    assert "with xpnet's CUDA kernels" in msg and f"at batch size {n}" in msg
    assert isinstance(info.value.__cause__, MemoryError)
    assert all(layer._cache is None for layer in model.layers)  # released for the measurement


def test_out_of_memory_on_the_generic_path_says_so(rng, monkeypatch):
    model = models.captcha_net()
    monkeypatch.setattr(memory, "free_memory", lambda where: (150 * MiB, "the host"))
    with dispatch.layer_by_layer(), pytest.raises(OutOfMemoryError) as info:
        with oom_guard(model, 64):
            raise MemoryError("Unable to allocate 1.2 GiB")
    msg = str(info.value)
    assert "with the generic ops" in msg
    assert f"use a batch size of {suggest_batch_size(model, 150 * MiB, path='generic')} or less." in msg


@pytest.mark.gpu
def test_on_cupy_the_kernels_path_is_estimated_and_its_suggestion_fits(rng):
    """CuPy with the kernels: the message names the kernels and its batch size runs under the same limit."""
    cp = backend.cupy
    xpnet.use("cupy")
    model = models.captcha_net()
    assert memory.active_path(model) == "kernels"
    with xpnet.reference_paths():
        assert memory.active_path(model) == "generic"
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    old_limit = pool.get_limit()

    def step(n):
        x = cp.asarray(rng.standard_normal((n, 3, 32, 80)).astype(np.float32))
        t = cp.zeros((n, 144), np.float32)
        with oom_guard(model, n):
            logits = model.forward(x, train=True)
            _, d = ops.sigmoid_bce_with_logits(logits, t)
            model.backward(d)
        cp.cuda.get_current_stream().synchronize()

    pool.set_limit(size=pool.used_bytes() + 384 * MiB)
    try:
        with pytest.raises(OutOfMemoryError, match=r"use a batch size of \d+ or less") as info:
            step(1000)
        assert "with xpnet's CUDA kernels" in str(info.value)
        n = int(str(info.value).rsplit("batch size of ", 1)[1].split()[0])
        assert 8 <= n < 1000
        step(n)
    finally:
        pool.set_limit(size=old_limit)
        pool.free_all_blocks()
