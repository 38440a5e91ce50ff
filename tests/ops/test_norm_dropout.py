"""The BatchNorm formulas of ops.norm and the dropout op that the layers and the fused CPU path
share: naive float64 loops, finite differences in float64, dtype in = dtype out, inputs kept."""

import math

import numpy as np
import pytest

from xpnet import ops
from xpnet.errors import ShapeError
from xpnet.ops import norm
from xpnet.testing import numerical_gradient


def snapshot(*arrays):
    return [a.copy() for a in arrays]


def assert_unchanged(before, *arrays):
    for old, new in zip(before, arrays):
        np.testing.assert_array_equal(new, old)


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.7])
def test_dropout_mask_matches_a_loop(rng, dtype, rate):
    u = rng.random((5, 7)).astype(dtype)
    u[0, :3] = [rate, 0.0, np.nextafter(dtype(rate), dtype(0))]  # the boundary is kept, just below dropped
    kept = snapshot(u)
    mask = ops.dropout_mask(u, rate)
    assert mask.dtype == dtype and mask.shape == u.shape
    for i in range(u.shape[0]):
        for j in range(u.shape[1]):
            want = 0.0 if u[i, j] < rate else 1.0 / (1.0 - rate)
            assert mask[i, j] == dtype(want), (i, j)
    assert_unchanged(kept, u)


def test_dropout_forward_and_backward_match_a_loop_and_finite_differences(rng):
    x = rng.standard_normal((3, 2, 4, 5))
    mask = ops.dropout_mask(rng.random(x.shape), 0.4)
    g = rng.standard_normal(x.shape)
    kept = snapshot(x, mask, g)
    y, cache = ops.dropout_forward(x, mask)
    want = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        want[idx] = x[idx] * mask[idx]
    np.testing.assert_array_equal(y, want)
    dx = ops.dropout_backward(g, cache)
    np.testing.assert_allclose(dx, numerical_gradient(lambda: float((ops.dropout_forward(x, mask)[0] * g).sum()), x),
                               rtol=1e-6, atol=1e-9)
    assert_unchanged(kept, x, mask, g)


def test_dropout_keeps_float32_and_takes_strided_views(rng):
    # The fused path applies an NCHW mask to NHWC views of both arrays.
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32).transpose(0, 2, 3, 1)
    mask = ops.dropout_mask(rng.random((4, 3, 5, 6), dtype=np.float32), 0.5).transpose(0, 2, 3, 1)
    y, cache = ops.dropout_forward(x, mask)
    dx = ops.dropout_backward(np.ones_like(x), cache)
    assert y.dtype == dx.dtype == np.float32
    np.testing.assert_array_equal(y, np.ascontiguousarray(x) * np.ascontiguousarray(mask))
    np.testing.assert_array_equal(dx, mask)


# --------------------------------------------------------------------------- BatchNorm formulas
def batchnorm_loop(x, gamma, beta, eps=1e-5):
    """Training-mode BatchNorm of x (M, C) in float64, column by column."""
    m, c = x.shape
    y = np.zeros((m, c))
    for j in range(c):
        mean = sum(x[i, j] for i in range(m)) / m
        var = sum((x[i, j] - mean) ** 2 for i in range(m)) / m
        for i in range(m):
            y[i, j] = (x[i, j] - mean) / math.sqrt(var + eps) * gamma[j] + beta[j]
    return y


def test_check_training_batch_needs_two_values_per_channel():
    with pytest.raises(ShapeError, match="more than one value per channel"):
        norm.check_training_batch(1)
    norm.check_training_batch(2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inverse_std_matches_a_loop_and_rounds_once(rng, dtype):
    var = rng.random(6) * 3
    kept = snapshot(var)
    got = norm.inverse_std(var, 1e-3, dtype)  # float64 statistics, as the fused path keeps them
    assert got.dtype == dtype
    for j in range(6):
        assert got[j] == dtype(1.0 / math.sqrt(var[j] + 1e-3))
    assert_unchanged(kept, var)
    var32 = var.astype(np.float32)
    assert norm.inverse_std(var32, 1e-3, np.float32).dtype == np.float32  # computed in var's own dtype


@pytest.mark.parametrize("buffer_dtype", [np.float64, np.float32])
def test_update_running_stats_is_the_unbiased_moving_average(rng, buffer_dtype):
    c, m, momentum = 5, 7, 0.3
    mean, var = rng.standard_normal(c), rng.random(c)  # float64 statistics
    rm, rv = rng.standard_normal(c).astype(buffer_dtype), rng.random(c).astype(buffer_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    norm.update_running_stats(rm, rv, mean, var, m, momentum)
    assert rm.dtype == rv.dtype == buffer_dtype
    t = np.dtype(buffer_dtype).type
    for j in range(c):
        # each increment rounded once to the buffer's dtype
        assert rm[j] == t(rm0[j] * t(1 - momentum)) + t(momentum * mean[j])
        assert rv[j] == t(rv0[j] * t(1 - momentum)) + t(momentum * m / (m - 1) * var[j])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normalise_and_its_affine_form_match_a_loop(rng, dtype):
    x = (rng.standard_normal((9, 4)) * 2 + 1).astype(dtype)
    gamma, beta = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
    kept = snapshot(x, gamma, beta)
    mean, var = x.mean(axis=0), x.var(axis=0)
    inv_std = norm.inverse_std(var, 1e-5, dtype)
    xhat, y = norm.normalise(x - mean, inv_std, gamma, beta)
    scale, shift = norm.scale_and_shift(mean, inv_std, gamma, beta)
    assert xhat.dtype == y.dtype == scale.dtype == shift.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    want = batchnorm_loop(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    np.testing.assert_allclose(y, want, **tol)
    np.testing.assert_allclose(x * scale + shift, want, **tol)
    np.testing.assert_allclose(xhat, (y - beta) / gamma, **tol)
    assert_unchanged(kept, x, gamma, beta)


def _training_terms(x, g, gamma, eps=1e-5):
    """(xhat, scale, dgamma, dbeta) of a training-mode BatchNorm on x (M, C) and upstream g."""
    mean, var = x.mean(axis=0), x.var(axis=0)
    inv_std = norm.inverse_std(var, eps, x.dtype)
    xhat, _ = norm.normalise(x - mean, inv_std, gamma, np.zeros_like(gamma))
    return mean, inv_std, xhat, gamma * inv_std, (g * xhat).sum(axis=0), g.sum(axis=0)


def test_input_grad_and_its_coefficient_form_are_the_gradient_of_training_batchnorm(rng):
    x = rng.standard_normal((6, 3)) * 2 + 1
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    g = rng.standard_normal(x.shape)
    mean, inv_std, xhat, scale, dgamma, dbeta = _training_terms(x, g, gamma)
    kept = snapshot(g, xhat, scale, dgamma, dbeta)
    dx = norm.input_grad(g, xhat, scale, dgamma, dbeta, x.shape[0])
    assert_unchanged(kept, g, xhat, scale, dgamma, dbeta)
    fd = numerical_gradient(lambda: float((batchnorm_loop(x, gamma, beta) * g).sum()), x)
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-7)
    c_x, c_0 = norm.input_grad_coefficients(scale, inv_std, mean, dgamma, dbeta, x.shape[0])
    assert c_x.shape == c_0.shape == (3,)
    np.testing.assert_allclose(g * scale + x * c_x + c_0, dx, rtol=1e-10, atol=1e-12)


def test_input_grad_formulas_keep_float32(rng):
    x = (rng.standard_normal((8, 4)) + 1).astype(np.float32)
    gamma = rng.standard_normal(4).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    mean, inv_std, xhat, scale, dgamma, dbeta = _training_terms(x, g, gamma)
    dx = norm.input_grad(g, xhat, scale, dgamma, dbeta, 8)
    c_x, c_0 = norm.input_grad_coefficients(scale, inv_std, mean, dgamma, dbeta, 8)
    assert dx.dtype == c_x.dtype == c_0.dtype == np.float32
    np.testing.assert_allclose(g * scale + x * c_x + c_0, dx, rtol=1e-4, atol=1e-5)
