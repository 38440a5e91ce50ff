"""Test helpers used by xpnet's own tests and by users: one tolerance table,
finite-difference gradients, and the cross-backend parity report.

Tolerances are keyed by dtype and used everywhere two backends (or a fast and
a reference path) are compared, so a change of policy happens in one place.
"""

from __future__ import annotations

import numpy

from . import backend
from .errors import BackendError
from .nn.layers import Dropout

# CuPy vs NumPy (or fast path vs reference path) on identical inputs.  float32
# sums of a few thousand products differ by summation order: ~1e-6 relative
# per op, growing through a deep network, hence the looser model tolerance.
TOLERANCES = {
    "float64": {"op": dict(rtol=1e-10, atol=1e-12), "model": dict(rtol=1e-8, atol=1e-10)},
    "float32": {"op": dict(rtol=1e-4, atol=1e-5), "model": dict(rtol=2e-3, atol=2e-4)},
}

# Central finite differences, always in float64.
GRADCHECK = dict(eps=1e-6, rtol=1e-5, atol=1e-8)


def tolerance(dtype, kind: str = "op") -> dict:
    """rtol/atol for comparing arrays of ``dtype``; kind is "op" or "model"."""
    name = numpy.dtype(dtype).name
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {name}")
    return dict(TOLERANCES[name][kind])


def assert_allclose(actual, desired, kind: str = "op", dtype=None, err_msg: str = "") -> None:
    """Compare shape, dtype, then values with the table's tolerance (arrays of any backend)."""
    a = backend.to_numpy(actual)
    d = backend.to_numpy(desired)
    assert a.shape == d.shape, f"shape {a.shape} != {d.shape} {err_msg}"
    assert a.dtype == d.dtype, f"dtype {a.dtype} != {d.dtype} {err_msg}"
    numpy.testing.assert_allclose(a, d, err_msg=err_msg, **tolerance(dtype or d.dtype, kind))


def max_abs_diff(a, b) -> float:
    a, b = backend.to_numpy(a), backend.to_numpy(b)
    return float(numpy.max(numpy.abs(a.astype(numpy.float64) - b))) if a.size else 0.0


def rel_l2_diff(a, b) -> float:
    """||a - b|| / ||b||: the error of the whole array, robust to a few outliers."""
    a64 = backend.to_numpy(a).astype(numpy.float64)
    b64 = backend.to_numpy(b).astype(numpy.float64)
    norm = float(numpy.linalg.norm(b64))
    diff = float(numpy.linalg.norm(a64 - b64))
    return diff / norm if norm > 0 else diff


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the array's scale."""
    b_np = backend.to_numpy(b).astype(numpy.float64)
    scale = float(numpy.max(numpy.abs(b_np))) if b_np.size else 0.0
    return max_abs_diff(a, b) / scale if scale > 0 else max_abs_diff(a, b)


def numerical_gradient(f, x, eps: float = GRADCHECK["eps"]):
    """d f / d x by central differences, element by element.  x: float64 NumPy array (restored)."""
    if x.dtype != numpy.float64:
        raise TypeError("finite-difference checks need float64 arrays")
    grad = numpy.zeros_like(x)
    it = numpy.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * eps)
    return grad


def check_parity(model, x, targets=None, loss=None) -> list[dict]:
    """Largest difference per layer between NumPy and CuPy on the same weights and input.

    Runs ``model`` (any backend) as a NumPy copy and a CuPy copy: forward layer by
    layer (each backend propagates its own activations, as a user's run would),
    then, when ``targets`` are given, ``loss`` (default sigmoid + BCE) and backward,
    comparing every gradient.  Returns rows {"layer", "what", "max_abs", "max_rel", "rel_l2"};
    ``parity_verdict`` judges them.
    """
    if not backend.has_cupy_gpu:
        raise BackendError(f"check_parity needs CuPy and a CUDA device: {backend.device_reason()}.")
    from .ops import sigmoid_bce_with_logits

    loss = loss or sigmoid_bce_with_logits
    m_np, m_cp = model.clone("numpy"), model.clone("cupy")
    x_np = backend.to_numpy(x)
    x_cp = backend.cupy.asarray(x_np)
    train = targets is not None
    rows = []
    a_np, a_cp = x_np, x_cp
    m_np._check_batch(a_np)
    for l_np, l_cp in zip(m_np.layers, m_cp.layers):
        a_np = l_np.forward(a_np, train=train)
        if train and isinstance(l_np, Dropout) and not isinstance(l_np._cache, str):
            # The backends draw masks from different generators: give CuPy NumPy's mask.
            l_cp._cache = backend.cupy.asarray(l_np._cache)
            a_cp = a_cp * l_cp._cache
        else:
            a_cp = l_cp.forward(a_cp, train=train)
        rows.append(_row(l_np.name, "output", a_cp, a_np))
    if train:
        t_np = backend.to_numpy(targets).astype(a_np.dtype)
        loss_np, d_np = loss(a_np, t_np)
        loss_cp, d_cp = loss(a_cp, backend.cupy.asarray(t_np))
        rows.append(_row("loss", "value", loss_cp, loss_np))
        m_np.backward(d_np)
        m_cp.backward(d_cp)
        g_cp = m_cp.gradients()
        for name, g in m_np.gradients().items():
            rows.append(_row(name.split(".")[0], "grad " + name.split(".", 1)[1], g_cp[name], g))
    return rows


def _row(layer, what, actual, expected) -> dict:
    return {"layer": layer, "what": what, "max_abs": max_abs_diff(actual, expected),
            "max_rel": max_rel_diff(actual, expected), "rel_l2": rel_l2_diff(actual, expected)}


# A float32 gradient may legitimately differ in a few entries: when a ReLU input or a
# max-pool window's runner-up lies within rounding (~1e-6) of zero or of the maximum,
# the two backends can take different branches, and one upstream gradient entry goes
# elsewhere (seen on an H200: conv3 grad W off by 3.7e-3 relative, reproduced on the
# CPU by flipping one -3.8e-6 ReLU input).  Such a flip moves the array's L2 norm by
# well under 1e-2, while a real bug (wrong layout, index or formula) moves it by O(1).
FLOAT32_GRAD_REL_L2 = 1e-2


def parity_verdict(rows, dtype) -> tuple[bool, dict, str]:
    """(ok, worst row, rule) for check_parity rows computed in ``dtype``.

    float64: every row within the model tolerance (branch flips need ties within ~1e-16).
    float32: outputs and loss within the model tolerance; gradients and updated weights
    within FLOAT32_GRAD_REL_L2 in relative L2 norm (see the comment above).
    """
    tol = tolerance(dtype, "model")["rtol"]
    if numpy.dtype(dtype) == numpy.float64:
        worst = max(rows, key=lambda r: r["max_rel"])
        return worst["max_rel"] < tol, worst, f"max relative difference < {tol:.0e}"
    strict = [r for r in rows if r["what"] in ("output", "value")]
    loose = [r for r in rows if r["what"] not in ("output", "value")]
    bad = [r for r in strict if r["max_rel"] >= tol] + [r for r in loose if r["rel_l2"] >= FLOAT32_GRAD_REL_L2]
    worst = bad[0] if bad else max(rows, key=lambda r: r["max_rel"])
    return not bad, worst, (f"outputs/loss max relative difference < {tol:.0e}; gradients relative L2 "
                            f"< {FLOAT32_GRAD_REL_L2:.0e}")


def format_parity(rows) -> str:
    lines = [f"{'layer':<12}{'what':<26}{'max |diff|':>12}{'rel. to scale':>15}{'rel. L2':>12}"]
    for r in rows:
        l2 = r.get("rel_l2")
        lines.append(f"{r['layer']:<12}{r['what']:<26}{r['max_abs']:>12.3e}{r['max_rel']:>15.3e}"
                     + (f"{l2:>12.3e}" if l2 is not None else ""))
    return "\n".join(lines)
