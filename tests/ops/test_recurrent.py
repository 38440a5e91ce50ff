"""The GRU op against a per-sample, per-step float64 loop, finite differences and CuPy."""

import numpy as np
import pytest

from xpnet import backend, ops
from xpnet.errors import ShapeError
from xpnet.testing import GRADCHECK, assert_allclose, numerical_gradient, tolerance

from tests.conftest import gpu_param


def _gru_oracle(x, wx, wh, bx, bh, reverse):
    """One sample, one step at a time, in float64 (equations of xpnet.ops.recurrent)."""
    x, wx, wh, bx, bh = (np.asarray(a, np.float64) for a in (x, wx, wh, bx, bh))
    n, t_len, _ = x.shape
    h_size = wh.shape[0]
    y = np.zeros((n, t_len, h_size))
    for i in range(n):
        h = np.zeros(h_size)
        for t in (reversed(range(t_len)) if reverse else range(t_len)):
            gx = x[i, t] @ wx + bx
            gh = h @ wh + bh
            r = 1 / (1 + np.exp(-(gx[:h_size] + gh[:h_size])))
            z = 1 / (1 + np.exp(-(gx[h_size:2 * h_size] + gh[h_size:2 * h_size])))
            cand = np.tanh(gx[2 * h_size:] + r * gh[2 * h_size:])
            h = (1 - z) * cand + z * h
            y[i, t] = h
    return y


def _inputs(rng, n, t, f, h, dtype=np.float64, scale=0.6):
    x = rng.standard_normal((n, t, f)).astype(dtype)
    ws = [(rng.standard_normal(s) * scale).astype(dtype) for s in ((f, 3 * h), (h, 3 * h), (3 * h,), (3 * h,))]
    return [x] + ws


SHAPES = [(3, 5, 4, 3), (1, 1, 2, 1), (2, 7, 1, 4), (4, 3, 5, 2)]  # N, T, F, H


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_forward_matches_per_step_loop(rng, shape, reverse):
    args = _inputs(rng, *shape)
    y, _ = ops.gru_forward(*args, reverse=reverse)
    assert y.shape == shape[:2] + (shape[3],) and y.dtype == np.float64
    np.testing.assert_allclose(y, _gru_oracle(*args, reverse), rtol=1e-12, atol=1e-13)


def test_gru_directions_differ():
    rng = np.random.default_rng(3)
    args = _inputs(rng, 2, 4, 3, 2)
    assert not np.allclose(ops.gru_forward(*args)[0], ops.gru_forward(*args, reverse=True)[0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_backward_matches_finite_differences(rng, shape, reverse):
    args = _inputs(rng, *shape)
    y, cache = ops.gru_forward(*args, reverse=reverse)
    g = rng.standard_normal(y.shape)
    grads = ops.gru_backward(g, cache)

    def f():
        return float((ops.gru_forward(*args, reverse=reverse)[0] * g).sum())

    for name, analytic, arr in zip(("dx", "dwx", "dwh", "dbx", "dbh"), grads, args):
        assert analytic.shape == arr.shape, name
        np.testing.assert_allclose(analytic, numerical_gradient(f, arr), rtol=GRADCHECK["rtol"], atol=1e-8,
                                   err_msg=name)


def test_gru_backward_twice_from_one_cache_and_without_dx(rng):
    args = _inputs(rng, 3, 4, 3, 2)
    y, cache = ops.gru_forward(*args)
    g = rng.standard_normal(y.shape)
    first = ops.gru_backward(g, cache)
    second = ops.gru_backward(g, cache, need_dx=False)
    assert second[0] is None
    for a, b in zip(first[1:], second[1:]):
        assert np.array_equal(a, b)


def test_gru_float32_in_float32_out_close_to_float64(rng):
    args64 = _inputs(rng, 4, 6, 5, 3)
    args32 = [a.astype(np.float32) for a in args64]
    y32, c32 = ops.gru_forward(*args32, reverse=True)
    g = rng.standard_normal(y32.shape)
    grads32 = ops.gru_backward(g.astype(np.float32), c32)
    y64, c64 = ops.gru_forward(*args64, reverse=True)
    grads64 = ops.gru_backward(g, c64)
    assert y32.dtype == np.float32 and all(d.dtype == np.float32 for d in grads32)
    np.testing.assert_allclose(y32, y64, **tolerance(np.float32))
    for a, b in zip(grads32, grads64):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gru_saturated_gates_stay_finite(rng):
    args = _inputs(rng, 2, 6, 3, 4, np.float32, scale=200.0)
    y, cache = ops.gru_forward(*args)
    grads = ops.gru_backward(np.ones_like(y), cache)
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1)
    assert all(np.all(np.isfinite(d)) for d in grads)


def test_gru_does_not_mutate_and_takes_noncontiguous_inputs(rng):
    base = rng.standard_normal((6, 5, 8))
    x = base[::2, :, 1::2]  # (3, 5, 4), non-contiguous
    _, wx, wh, bx, bh = _inputs(rng, 3, 5, 4, 3)
    wh_t = np.asfortranarray(wh)
    copies = [a.copy() for a in (base, wx, wh, bx, bh)]
    y, cache = ops.gru_forward(x, wx, wh_t, bx, bh)
    dy_base = rng.standard_normal((3, 5, 6))
    dy = dy_base[:, :, ::2]  # non-contiguous upstream gradient
    grads = ops.gru_backward(dy, cache)
    y_c, cache_c = ops.gru_forward(np.ascontiguousarray(x), wx, wh, bx, bh)
    grads_c = ops.gru_backward(np.ascontiguousarray(dy), cache_c)
    np.testing.assert_allclose(y, y_c, rtol=1e-14, atol=1e-15)
    for a, b in zip(grads, grads_c):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    for a, c in zip((base, wx, wh, bx, bh), copies):
        assert np.array_equal(a, c)


def test_gru_bad_arguments_get_one_sentence(rng):
    x, wx, wh, bx, bh = _inputs(rng, 2, 3, 4, 5)
    with pytest.raises(ShapeError, match=r"x of shape \(N, T, F\)"):
        ops.gru_forward(x[0], wx, wh, bx, bh)
    with pytest.raises(ShapeError, match=r"wh of shape \(H, 3H\)"):
        ops.gru_forward(x, wx, wh[:, :9], bx, bh)
    with pytest.raises(ShapeError, match=r"4 features, so wx must have shape \(4, 15\)"):
        ops.gru_forward(x, wx[:3], wh, bx, bh)
    with pytest.raises(ShapeError, match=r"bh of shape \(15,\)"):
        ops.gru_forward(x, wx, wh, bx, bh[:4])
    with pytest.raises(ShapeError, match="never upcasts"):
        ops.gru_forward(x.astype(np.float32), wx, wh, bx, bh)
    with pytest.raises(ShapeError, match="at least one sample and one time step"):
        ops.gru_forward(x[:, :0], wx, wh, bx, bh)
    y, cache = ops.gru_forward(x, wx, wh, bx, bh)
    with pytest.raises(ShapeError, match=r"expected \(2, 3, 5\)"):
        ops.gru_backward(y[:, :2], cache)


@pytest.mark.parametrize("name", gpu_param())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_same_on_each_backend(rng, name, dtype, reverse):
    xp = backend.module_for(name)
    args = _inputs(rng, 5, 7, 6, 4, dtype)
    y, cache = ops.gru_forward(*args, reverse=reverse)
    g = rng.standard_normal(y.shape).astype(dtype)
    want = ops.gru_backward(g, cache)
    y_d, cache_d = ops.gru_forward(*[xp.asarray(a) for a in args], reverse=reverse)
    got = ops.gru_backward(xp.asarray(g), cache_d)
    assert backend.get_array_module(y_d, *got) is xp
    assert_allclose(y_d, y)
    for name_, a, b in zip(("dx", "dwx", "dwh", "dbx", "dbh"), got, want):
        assert_allclose(a, b, err_msg=name_)


def test_gru_ops_are_declared_for_dispatch():
    from xpnet import dispatch

    assert ops.gru_forward.op_name == "gru_forward" and ops.gru_backward.op_name == "gru_backward"
    assert {"gru_forward", "gru_backward", "ctc_loss"} <= set(dispatch.ops())
    assert any(line.startswith("gru_forward") and "reference" in line for line in dispatch.describe())
