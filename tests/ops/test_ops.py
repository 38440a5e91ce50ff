"""Ops against naive float64 loops (oracles.py) and against finite differences."""

import numpy as np
import pytest

from xpnet import ops
from xpnet.errors import ShapeError
from xpnet.testing import GRADCHECK, numerical_gradient

from tests import oracles

CONV_CASES = [
    # N, C, H, W, F, KH, KW, stride, pad
    (2, 3, 7, 9, 4, 3, 3, (1, 1), (0, 0)),
    (1, 2, 8, 7, 3, 3, 2, (2, 2), (1, 1)),
    (3, 1, 5, 5, 2, 5, 5, (1, 1), (0, 0)),      # kernel = input size
    (2, 2, 6, 5, 3, 1, 1, (1, 1), (0, 0)),      # 1x1 kernel
    (2, 3, 9, 11, 2, 4, 3, (2, 3), (1, 2)),     # rectangular everything
    (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0)),      # degenerate
    (2, 2, 4, 4, 2, 3, 3, (3, 3), (2, 2)),      # stride > 1 with big padding
]


def _conv_inputs(rng, case, dtype=np.float64):
    n, c, h, w, f, kh, kw, stride, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    return x, wt, b, stride, pad


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_matches_naive(rng, case):
    x, w, b, stride, pad = _conv_inputs(rng, case)
    y, _ = ops.conv2d_forward(x, w, b, stride, pad)
    np.testing.assert_allclose(y, oracles.conv2d(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_backward_matches_finite_differences(rng, case):
    x, w, b, stride, pad = _conv_inputs(rng, case)
    y, cache = ops.conv2d_forward(x, w, b, stride, pad)
    g = rng.standard_normal(y.shape)
    dx, dw, db = ops.conv2d_backward(g, cache)

    def f():
        return float((ops.conv2d_forward(x, w, b, stride, pad)[0] * g).sum())

    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(analytic, numerical_gradient(f, arr), rtol=GRADCHECK["rtol"], atol=1e-7)


def test_conv_float32_in_float32_out_and_close_to_float64(rng):
    x, w, b, stride, pad = _conv_inputs(rng, CONV_CASES[4], np.float32)
    y, cache = ops.conv2d_forward(x, w, b, stride, pad)
    dx, dw, db = ops.conv2d_backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == np.float32
    np.testing.assert_allclose(y, oracles.conv2d(x, w, b, stride, pad), rtol=1e-4, atol=1e-5)


def test_conv_does_not_mutate_and_takes_noncontiguous(rng):
    base = rng.standard_normal((2, 5, 9, 12))
    x = base[:, ::2, :, ::2]  # non-contiguous view, (2, 3, 9, 6)
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    copies = [a.copy() for a in (base, w, b)]
    y, cache = ops.conv2d_forward(x, w, b, 1, 1)
    ops.conv2d_backward(np.ones_like(y), cache)
    np.testing.assert_allclose(y, oracles.conv2d(np.ascontiguousarray(x), w, b, (1, 1), (1, 1)), rtol=1e-12, atol=1e-12)
    for a, c in zip((base, w, b), copies):
        assert np.array_equal(a, c)


def test_conv_bad_shapes_give_clear_errors(rng):
    x = rng.standard_normal((1, 3, 4, 4))
    with pytest.raises(ShapeError, match="3 channels but the kernel expects 2"):
        ops.conv2d_forward(x, rng.standard_normal((2, 2, 3, 3)))
    with pytest.raises(ShapeError, match="does not fit"):
        ops.conv2d_forward(x, rng.standard_normal((2, 3, 5, 5)))
    with pytest.raises(ShapeError, match="never upcasts"):
        ops.conv2d_forward(x.astype(np.float32), rng.standard_normal((2, 3, 3, 3)))


def test_im2col_col2im_adjoint(rng):
    # <im2col(x), c> == <x, col2im(c)> for every stride/padding: col2im is the exact transpose.
    for (n, c, h, w, f, kh, kw, stride, pad) in CONV_CASES:
        x = rng.standard_normal((n, c, h, w))
        col = ops.im2col(x, (kh, kw), stride, pad)
        cc = rng.standard_normal(col.shape)
        lhs = float((col * cc).sum())
        rhs = float((x * ops.col2im(cc, x.shape, (kh, kw), stride, pad)).sum())
        assert abs(lhs - rhs) < 1e-9 * max(1.0, abs(lhs))


def test_im2col_nbytes_matches_the_array(rng):
    x = rng.standard_normal((3, 2, 9, 11)).astype(np.float32)
    col = ops.im2col(x, (4, 3), (2, 3), (1, 2))
    assert ops.im2col_nbytes(x.shape, (4, 3), (2, 3), (1, 2), itemsize=4) == col.nbytes


POOL_CASES = [
    # N, C, H, W, size, stride, pad
    (2, 3, 8, 8, (2, 2), (2, 2), (0, 0)),   # fast path
    (2, 2, 7, 9, (2, 2), (2, 2), (0, 0)),   # fast path, odd sizes (remainder dropped)
    (1, 2, 7, 7, (3, 3), (2, 2), (0, 0)),   # overlapping
    (2, 1, 6, 5, (3, 3), (2, 2), (1, 1)),   # padded
    (1, 2, 5, 8, (2, 3), (1, 2), (1, 1)),   # rectangular
    (1, 1, 4, 4, (4, 4), (4, 4), (0, 0)),   # window = input
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0)),   # degenerate
]


def _tie_free(rng, shape):
    # A permutation: every value distinct, so the argmax is unique and finite differences are valid.
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 + 0.05).astype(np.float64)


@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_forward_backward_match_naive(rng, case):
    n, c, h, w, size, stride, pad = case
    x = _tie_free(rng, (n, c, h, w))
    y, cache = ops.max_pool2d_forward(x, size, stride, pad)
    y_ref, arg = oracles.max_pool2d(x, size, stride, pad)
    np.testing.assert_array_equal(y, y_ref)
    g = rng.standard_normal(y.shape)
    dx = ops.max_pool2d_backward(g, cache)
    np.testing.assert_allclose(dx, oracles.max_pool2d_backward(g, arg, x.shape), rtol=1e-12, atol=1e-12)

    def f():
        return float((ops.max_pool2d_forward(x, size, stride, pad)[0] * g).sum())

    np.testing.assert_allclose(dx, numerical_gradient(f, x, eps=1e-4), rtol=1e-6, atol=1e-8)


def test_pool_fast_and_general_paths_agree(rng):
    from xpnet.ops import pool

    x = _tie_free(rng, (2, 3, 9, 7))
    y_fast, c_fast = pool.forward_reshape(x, (2, 2))
    y_gen, c_gen = pool.forward_strided(x, (2, 2), (2, 2), (0, 0))
    assert (c_fast[-1], c_gen[-1]) == ("reshape", "strided")
    np.testing.assert_array_equal(y_fast, y_gen)
    g = rng.standard_normal(y_fast.shape)
    np.testing.assert_array_equal(pool.max_pool2d_backward(g, c_fast), pool.max_pool2d_backward(g, c_gen))


def test_pool_ties_go_to_first_position():
    x = np.ones((1, 1, 4, 4), np.float32)
    for stride in (2, 1):
        y, cache = ops.max_pool2d_forward(x, 2, stride)
        dx = ops.max_pool2d_backward(np.ones_like(y), cache)
        assert dx.dtype == np.float32
        expected = np.zeros((4, 4), np.float32)
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                expected[i * stride, j * stride] += 1
        np.testing.assert_array_equal(dx[0, 0], expected)


def test_pool_dtype_noncontiguous_no_mutation(rng):
    base = _tie_free(rng, (2, 6, 8, 10)).astype(np.float32)
    x = base[:, 1::2, :, 1:]  # non-contiguous (2, 3, 8, 9)
    keep = base.copy()
    y, cache = ops.max_pool2d_forward(x, 3, 2, 1)
    dx = ops.max_pool2d_backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == np.float32 and dx.shape == x.shape
    np.testing.assert_array_equal(y, oracles.max_pool2d(np.ascontiguousarray(x), (3, 3), (2, 2), (1, 1))[0])
    assert np.array_equal(base, keep)


def test_pool_bad_padding():
    with pytest.raises(ShapeError, match="at most half"):
        ops.max_pool2d_forward(np.zeros((1, 1, 4, 4)), 2, 2, 2)


# ---------------------------------------------------------------- losses

def test_bce_matches_naive_and_gradient(rng):
    x = rng.standard_normal((5, 12)) * 3
    t = (rng.random((5, 12)) < 0.3).astype(np.float64)
    t[0] = rng.random(12)  # soft targets allowed
    loss, d = ops.sigmoid_bce_with_logits(x, t)
    assert abs(float(loss) - oracles.bce_with_logits(x, t)) < 1e-10
    num = numerical_gradient(lambda: float(ops.sigmoid_bce_with_logits(x, t)[0]), x)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_is_finite_for_extreme_logits(dtype):
    x = np.array([[1e4, -1e4, 0.0, 88.0, -104.0, 3e38 if dtype == np.float32 else 1e300]], dtype)
    t = np.array([[0, 1, 1, 0, 1, 0]], dtype)
    loss, d = ops.sigmoid_bce_with_logits(x, t)
    assert loss.dtype == dtype and d.dtype == dtype
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    # Confidently wrong costs about |x|; the gradient saturates at +-1.
    assert float(loss) > 2e4
    np.testing.assert_allclose(d[0, :2], [1.0, -1.0])
    assert float(ops.sigmoid_bce_with_logits(np.array([[1e4, -1e4]], dtype), np.array([[1, 0]], dtype))[0]) == 0.0


def test_bce_shape_mismatch():
    with pytest.raises(ShapeError, match="multi-hot"):
        ops.sigmoid_bce_with_logits(np.zeros((2, 4)), np.zeros((2, 3)))


def test_bce_does_not_mutate(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    t = (rng.random((3, 4)) > 0.5).astype(np.float32)
    xc, tc = x.copy(), t.copy()
    ops.sigmoid_bce_with_logits(x, t)
    assert np.array_equal(x, xc) and np.array_equal(t, tc)


def test_softmax_ce_matches_naive_and_gradient(rng):
    x = rng.standard_normal((6, 5)) * 4
    labels = rng.integers(0, 5, 6)
    loss, d = ops.softmax_cross_entropy(x, labels)
    assert abs(float(loss) - oracles.softmax_ce(x, labels)) < 1e-10
    num = numerical_gradient(lambda: float(ops.softmax_cross_entropy(x, labels)[0]), x)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)
    onehot = np.eye(5)[labels]
    loss2, d2 = ops.softmax_cross_entropy(x, onehot)
    assert abs(float(loss2) - float(loss)) < 1e-12 and np.allclose(d, d2)


def test_softmax_ce_extreme_and_bad_labels():
    x = np.array([[1e4, -1e4, 0.0]], np.float32)
    loss, d = ops.softmax_cross_entropy(x, np.array([1]))
    assert loss.dtype == np.float32 and np.isfinite(loss) and np.all(np.isfinite(d))
    assert float(loss) == pytest.approx(2e4, rel=1e-6)
    with pytest.raises(ShapeError, match=r"\[0, 3\)"):
        ops.softmax_cross_entropy(x, np.array([3]))


# ---------------------------------------------------------------- dense, relu, batch norm

def test_dense_matches_naive_and_gradient(rng):
    x, w, b = rng.standard_normal((4, 7)), rng.standard_normal((7, 3)), rng.standard_normal(3)
    y, cache = ops.dense_forward(x, w, b)
    ref = np.array([[sum(x[n, i] * w[i, j] for i in range(7)) + b[j] for j in range(3)] for n in range(4)])
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    g = rng.standard_normal(y.shape)
    dx, dw, db = ops.dense_backward(g, cache)
    f = lambda: float((ops.dense_forward(x, w, b)[0] * g).sum())
    for a, arr in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(a, numerical_gradient(f, arr), rtol=1e-6, atol=1e-9)


def test_relu(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    x[np.abs(x) < 1e-3] = 0.5
    y, cache = ops.relu_forward(x)
    assert y.dtype == np.float32 and np.array_equal(y, np.where(x > 0, x, 0))
    g = rng.standard_normal(x.shape).astype(np.float32)
    assert np.array_equal(ops.relu_backward(g, cache), np.where(x > 0, g, 0))


@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (8, 5)])
def test_batchnorm_train_gradient_and_stats(rng, shape):
    x = rng.standard_normal(shape) * 2 + 1
    c = shape[1]
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = np.zeros(c), np.ones(c)
    y, cache = ops.batchnorm_forward(x, gamma, beta, rm, rv, train=True)
    axes = (0, 2, 3) if len(shape) == 4 else (0,)
    bshape = (1, c, 1, 1) if len(shape) == 4 else (1, c)
    ref = (x - x.mean(axes).reshape(bshape)) / np.sqrt(x.var(axes).reshape(bshape) + 1e-5) * gamma.reshape(bshape) + beta.reshape(bshape)
    np.testing.assert_allclose(y, ref, rtol=1e-10)
    m = x.size // c
    np.testing.assert_allclose(rm, 0.1 * x.mean(axes))
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x.var(axes) * m / (m - 1))
    g = rng.standard_normal(shape)
    dx, dgamma, dbeta = ops.batchnorm_backward(g, cache)

    def f():
        return float((ops.batchnorm_forward(x, gamma, beta, np.zeros(c), np.ones(c), train=True)[0] * g).sum())

    for a, arr in ((dx, x), (dgamma, gamma), (dbeta, beta)):
        np.testing.assert_allclose(a, numerical_gradient(f, arr), rtol=1e-5, atol=1e-7)


def test_batchnorm_eval_uses_running_stats_and_gradient(rng):
    x = rng.standard_normal((4, 3, 2, 2))
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.random(3) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, cache = ops.batchnorm_forward(x, gamma, beta, rm, rv, train=False)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)  # eval never updates
    ref = (x - rm.reshape(1, 3, 1, 1)) / np.sqrt(rv.reshape(1, 3, 1, 1) + 1e-5) * gamma.reshape(1, 3, 1, 1) + beta.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    g = rng.standard_normal(x.shape)
    dx, _, _ = ops.batchnorm_backward(g, cache)
    f = lambda: float((ops.batchnorm_forward(x, gamma, beta, rm, rv, train=False)[0] * g).sum())
    np.testing.assert_allclose(dx, numerical_gradient(f, x), rtol=1e-6, atol=1e-9)
