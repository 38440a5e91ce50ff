"""Kernel-backed public ops (``xpnet.cuda.ops``) against the generic ``xpnet.ops``:
op by op and as whole models (loss and every gradient), in the CPU emulation
and (``gpu`` marker) on CuPy, where the whole-model parity check runs with the
kernels registered behind ``xpnet.ops`` through ``xpnet.dispatch``."""

import numpy as np
import pytest

import xpnet
from xpnet import backend, dispatch, models, ops
from xpnet.cuda import emulate
from xpnet.cuda import kernels as K
from xpnet.cuda import ops as cuda_ops
from xpnet.testing import assert_allclose, check_parity, max_rel_diff, parity_verdict


@pytest.fixture(scope="module")
def emulated_rt():
    if emulate.find_cxx() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) for the CPU emulation of the CUDA kernels")
    return emulate.EmulatedRuntime()


@pytest.fixture(params=cuda_ops.LAYOUTS)
def emulated_ops(request, emulated_rt):
    """Kernel-backed ops on the emulation, with each conv column layout."""
    return cuda_ops.KernelOps(emulated_rt, conv_layout=request.param)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [((2, 3, 9, 11), (4, 3, 3, 3), 1, 0, True),
                                  ((3, 2, 8, 7), (5, 2, 4, 3), (2, 1), (1, 2), True),
                                  ((2, 3, 6, 5), (2, 3, 1, 1), 1, 0, False)])
def test_conv_matches_generic(emulated_ops, rng, dtype, case):
    xs, ws, stride, pad, with_bias = case
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype) if with_bias else None
    y, cache = ops.conv2d_forward(x, w, b, stride, pad)
    yk, ck = emulated_ops.conv2d_forward(x, w, b, stride, pad)
    assert isinstance(ck, cuda_ops.KernelCache) and yk.dtype == dtype
    assert_allclose(yk, y)
    dy = rng.standard_normal(y.shape).astype(dtype)
    for need_dx in (True, False):
        got = emulated_ops.conv2d_backward(dy, ck, need_dx)
        ref = ops.conv2d_backward(dy, cache, need_dx)
        for a, e in zip(got, ref):
            assert (a is None) == (e is None)
            if a is not None:
                assert_allclose(a, e)


def test_conv_errors_are_clear(emulated_ops):
    with pytest.raises(xpnet.errors.ShapeError, match="conv_layout"):
        cuda_ops.KernelOps(emulated_ops.rt, conv_layout="nchw")
    x = np.zeros((1, 3, 5, 5), np.float32)
    with pytest.raises(xpnet.errors.ShapeError, match="3 channels but the kernel expects 2"):
        emulated_ops.conv2d_forward(x, np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(xpnet.errors.ShapeError, match="never upcasts"):
        emulated_ops.conv2d_forward(x, np.zeros((4, 3, 3, 3), np.float64))


@pytest.mark.parametrize("build", [models.captcha_net, models.captcha_net_bn, models.simple_convnet])
def test_whole_model_step_with_kernels_installed_matches_generic(emulated_ops, rng, build):
    """Every layer of a real model through the emulated kernels: same loss and gradients (float64)."""
    model = build().astype(np.float64)
    twin = model.clone()
    x = rng.standard_normal((2,) + model.input_shape)
    t = (rng.random((2,) + model.output_shape) < 0.1).astype(np.float64)

    def step(m, kernels_expected):
        backend.seed(3)  # the same dropout masks
        logits = m.forward(x, train=True)
        # The kernels sit behind xpnet.ops, i.e. on the plain path (the fused CPU path is off here).
        assert isinstance(m.layers[0]._cache, cuda_ops.KernelCache) == kernels_expected
        loss, d = ops.sigmoid_bce_with_logits(logits, t)
        m.backward(d)
        return logits, loss, m.gradients()

    with dispatch.layer_by_layer():
        logits, loss, grads = step(model, False)
        with cuda_ops.registered(emulated_ops):
            assert dispatch.implementations("conv2d_forward", "numpy")[0].name == "emulated cuda kernels"
            logits_k, loss_k, grads_k = step(twin, True)
    assert all(i.name != "emulated cuda kernels" for op in dispatch.ops()
               for i in dispatch.implementations(op, "numpy"))  # removed again
    assert_allclose(logits_k, logits, kind="model")
    assert_allclose(loss_k, loss, kind="model")
    for name, g in grads.items():
        assert max_rel_diff(grads_k[name], g) < 1e-12, name


def test_registered_kernels_fall_back_for_arrays_the_kernels_do_not_take(rng):
    """Registered with the real guard (kernels.usable), NumPy arrays keep the generic path."""
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y, cache = ops.conv2d_forward(x, w)
    with cuda_ops.registered(cuda_ops.KernelOps(K.CupyRuntime()), usable=K.usable):
        y2, cache2 = ops.conv2d_forward(x, w)
        assert not isinstance(cache2, cuda_ops.KernelCache)
        assert np.array_equal(ops.conv2d_backward(y, cache2)[1], ops.conv2d_backward.reference(y, cache)[1])
    assert np.array_equal(y, y2)


def test_the_reference_switch_keeps_kernels_out_but_lets_their_caches_back(emulated_ops, rng):
    """Forced reference paths: a forward never takes the kernels; a backward whose cache a
    kernel forward made still goes to the kernels (the reference cannot read that cache)."""
    x = rng.standard_normal((2, 3, 6, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    with cuda_ops.registered(emulated_ops):
        y, kcache = ops.conv2d_forward(x, w)
        assert isinstance(kcache, cuda_ops.KernelCache)
        with xpnet.reference_paths():
            y_ref, cache = ops.conv2d_forward(x, w)
            assert not isinstance(cache, cuda_ops.KernelCache)
            dx_k, dw_k, _ = ops.conv2d_backward(y, kcache)
        dx, dw, _ = ops.conv2d_backward.reference(y, cache)
    assert_allclose(y, y_ref)
    assert_allclose(dw_k, dw) and assert_allclose(dx_k, dx)


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("build", [models.captcha_net, models.captcha_net_bn])
def test_whole_model_parity_with_kernels_installed(rng, build, dtype):
    """check_parity (NumPy vs CuPy, per layer) with the CuPy side running xpnet's kernels."""
    xpnet.set_dtype(dtype)
    model = build()
    x = rng.standard_normal((16, 3, 32, 80)).astype(dtype)
    t = np.zeros((16, 144), dtype)
    t[np.arange(16)[:, None], np.arange(4) * 36 + rng.integers(0, 36, (16, 4))] = 1
    assert dispatch.implementations("conv2d_forward", "cupy")[0].name == "cuda kernels"
    rows = check_parity(model, x, t)  # the kernels are registered for CuPy arrays
    ok, worst, rule = parity_verdict(rows, dtype)
    assert ok, f"{rule}: {worst}"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", cuda_ops.LAYOUTS)
def test_kernel_and_generic_cupy_training_steps_agree(rng, layout):
    """The same CuPy model, kernels on vs off: same loss and gradients, and kernels really ran."""
    xpnet.use("cupy")
    model = models.captcha_net().astype(np.float64)
    twin = model.clone()
    x = xpnet.asarray(rng.standard_normal((8, 3, 32, 80)))
    t = xpnet.asarray((rng.random((8, 144)) < 0.03).astype(np.float64))

    def step(m):
        logits = m.forward(x, train=True)
        loss, d = ops.sigmoid_bce_with_logits(logits, t)
        caches = [type(l._cache).__name__ for l in m.layers]
        m.backward(d)
        return loss, m.gradients(), caches

    with xpnet.reference_paths():
        loss, grads, _ = step(model)
    with cuda_ops.registered(cuda_ops.KernelOps(K.CupyRuntime(), conv_layout=layout), "cupy", usable=K.usable):
        loss_k, grads_k, caches = step(twin)
    assert "KernelCache" in caches
    assert abs(float(loss_k) - float(loss)) <= 1e-10 * abs(float(loss))
    for name, g in grads.items():
        assert max_rel_diff(grads_k[name], g) < 1e-9, name


def test_kernels_are_registered_for_cupy_and_said_unavailable_without_a_gpu():
    """xpnet registers its kernels for CuPy arrays on import; ``xpnet info`` says when they cannot run."""
    for op in ("conv2d_forward", "conv2d_backward", "max_pool2d_forward", "max_pool2d_backward",
               "relu_backward", "sigmoid_bce_with_logits"):
        impls = dispatch.implementations(op, "cupy")
        assert [i.name for i in impls] == ["cuda kernels"], op
        assert (impls[0].available() is None) == backend.has_cupy_gpu
        assert all(i.name != "cuda kernels" for i in dispatch.implementations(op, "numpy"))
    assert any("cuda kernels" in line and "cupy" in line for line in dispatch.describe())
