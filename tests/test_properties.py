"""Property-based tests (Hypothesis): the ops against the naive float64 oracle
over random shapes, strides and paddings, degenerate 1x1 and kernel = input included."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpnet import ops

from . import oracles

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_case(draw):
    n = draw(st.integers(1, 2))
    c = draw(st.integers(1, 3))
    f = draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    # Input at least as large as the padded kernel needs (kernel = input size is allowed).
    h = draw(st.integers(max(1, kh - 2 * ph), 7))
    w = draw(st.integers(max(1, kw - 2 * pw), 7))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, c, h, w, f, kh, kw, (sh, sw), (ph, pw), seed


@SETTINGS
@given(conv_case())
def test_conv_matches_oracle_and_adjoint(case):
    n, c, h, w, f, kh, kw, stride, pad, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((f, c, kh, kw))
    b = rng.standard_normal(f)
    y, cache = ops.conv2d_forward(x, wt, b, stride, pad)
    np.testing.assert_allclose(y, oracles.conv2d(x, wt, b, stride, pad), rtol=1e-10, atol=1e-10)
    # Backward as the exact adjoint: <dy, J dx> identities, checked through dot products.
    dy = rng.standard_normal(y.shape)
    dx, dw, db = ops.conv2d_backward(dy, cache)
    vx = rng.standard_normal(x.shape)
    jvp = ops.conv2d_forward(vx, wt, None, stride, pad)[0]
    assert abs(float((dy * jvp).sum()) - float((dx * vx).sum())) < 1e-8 * max(1.0, abs(float((dx * vx).sum())))
    vw = rng.standard_normal(wt.shape)
    jvp_w = ops.conv2d_forward(x, vw, None, stride, pad)[0]
    assert abs(float((dy * jvp_w).sum()) - float((dw * vw).sum())) < 1e-8 * max(1.0, abs(float((dw * vw).sum())))
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)


@st.composite
def pool_case(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 8))
    w = draw(st.integers(max(1, kw - 2 * pw), 8))
    return n, c, h, w, (kh, kw), (sh, sw), (ph, pw), draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(pool_case())
def test_pool_matches_oracle(case):
    n, c, h, w, size, stride, pad, seed = case
    rng = np.random.default_rng(seed)
    x = rng.permutation(n * c * h * w).reshape(n, c, h, w).astype(np.float64)  # tie-free
    y, cache = ops.max_pool2d_forward(x, size, stride, pad)
    y_ref, arg = oracles.max_pool2d(x, size, stride, pad)
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_allclose(ops.max_pool2d_backward(dy, cache), oracles.max_pool2d_backward(dy, arg, x.shape),
                               rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.lists(st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False), min_size=1, max_size=24),
       st.integers(0, 2**31 - 1), st.sampled_from([np.float32, np.float64]))
def test_bce_finite_for_any_finite_logits(values, seed, dtype):
    x = np.asarray(values, dtype=dtype)[None, :]
    if not np.all(np.isfinite(x)):  # a float64 value beyond float32's range
        return
    t = np.random.default_rng(seed).random(x.shape).astype(dtype)
    loss, d = ops.sigmoid_bce_with_logits(x, t)
    assert np.isfinite(loss) and np.all(np.isfinite(d)) and float(loss) >= 0
    assert loss.dtype == dtype and d.dtype == dtype
    assert np.all(np.abs(d) <= 1.0 + 1e-6)
