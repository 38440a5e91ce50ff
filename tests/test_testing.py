import numpy as np
import pytest

from xpnet import testing


def row(what, max_rel, rel_l2):
    return {"layer": "l", "what": what, "max_abs": max_rel, "max_rel": max_rel, "rel_l2": rel_l2}


def test_parity_verdict_float64_is_strict():
    assert testing.parity_verdict([row("output", 1e-12, 1e-12), row("grad W", 1e-9, 1e-9)], np.float64)[0]
    ok, worst, _ = testing.parity_verdict([row("output", 1e-12, 1e-12), row("grad W", 1e-6, 1e-9)], np.float64)
    assert not ok and worst["what"] == "grad W"


def test_parity_verdict_float32_tolerates_a_branch_flip_not_a_bug():
    flip = [row("output", 1e-6, 1e-7), row("value", 1e-7, 1e-7), row("grad W", 2.8e-2, 3.5e-3)]
    assert testing.parity_verdict(flip, np.float32)[0]
    bug = [row("output", 1e-6, 1e-7), row("grad W", 0.9, 0.7)]
    assert not testing.parity_verdict(bug, np.float32)[0]
    bad_forward = [row("output", 5e-2, 1e-3)]
    assert not testing.parity_verdict(bad_forward, np.float32)[0]


def test_diff_helpers():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([1.0, 2.0, 3.3])
    assert testing.max_abs_diff(a, b) == pytest.approx(0.3)
    assert testing.max_rel_diff(a, b) == pytest.approx(0.3 / 3.3)
    assert testing.rel_l2_diff(a, b) == pytest.approx(0.3 / np.linalg.norm(b))
    with pytest.raises(AssertionError):
        testing.assert_allclose(a.astype(np.float32), b.astype(np.float32))
    with pytest.raises(AssertionError, match="dtype"):
        testing.assert_allclose(a, a.astype(np.float32))


def test_numerical_gradient_needs_float64():
    x = np.array([1.0, -2.0])
    g = testing.numerical_gradient(lambda: float((x ** 3).sum()), x)
    np.testing.assert_allclose(g, 3 * x ** 2, rtol=1e-6)
    with pytest.raises(TypeError):
        testing.numerical_gradient(lambda: 0.0, x.astype(np.float32))
