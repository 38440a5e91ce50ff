"""Columns and TimeDense: naive float64 oracles, finite differences, dtypes kept, model files through
the layer registry, the CRNN built from them, CuPy parity."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet import backend
from xpnet.errors import ShapeError, UsageError
from xpnet.nn.sequence import Columns, TimeDense
from xpnet.testing import GRADCHECK, assert_allclose, numerical_gradient

from tests.conftest import gpu_param

ROOT = Path(__file__).resolve().parents[2]


def _columns_oracle(x):
    """out[n, w, c*H + h] = x[n, c, h, w], element by element."""
    n, c, h, w = x.shape
    out = np.zeros((n, w, c * h), x.dtype)
    for i in range(n):
        for j in range(w):
            for k in range(c):
                for r in range(h):
                    out[i, j, k * h + r] = x[i, k, r, j]
    return out


def _time_dense_oracle(x, w, b):
    """y[n, t] = x[n, t] @ w + b, step by step."""
    out = np.zeros(x.shape[:2] + (w.shape[1],), x.dtype)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[i, t] = x[i, t] @ w + b
    return out


def _time_dense(f=5, k=3, t=4, dtype=np.float64, bias=True):
    layer = TimeDense(k, bias=bias, name="td")
    layer.build((t, f), np.dtype(dtype))
    return layer


def test_columns_shape_forward_and_backward_match_the_oracle(rng):
    layer = Columns(name="cols")
    layer.build((3, 2, 5), np.float64)
    assert layer.output_shape == (5, 6) and layer.config() == {} and not layer.params
    x = rng.standard_normal((2, 3, 2, 5))
    y = layer.forward(x, train=True)
    np.testing.assert_array_equal(y, _columns_oracle(x))
    g = rng.standard_normal(y.shape)
    dx = layer.backward(g)
    assert dx.shape == x.shape and dx.flags.c_contiguous
    # Columns only moves values: its gradient is the same permutation backwards, so <y, g> = <x, dx>.
    np.testing.assert_allclose((y * g).sum(), (x * dx).sum(), rtol=1e-12)
    np.testing.assert_allclose(dx, numerical_gradient(lambda: float((layer.forward(x) * g).sum()), x),
                               rtol=GRADCHECK["rtol"], atol=GRADCHECK["atol"])


def test_time_dense_matches_the_oracle_and_finite_differences(rng):
    layer = _time_dense()
    layer.params["b"] = rng.standard_normal(3)
    assert layer.output_shape == (4, 3) and layer.params["W"].shape == (5, 3)
    assert layer.config() == {"out_features": 3, "in_features": 5, "bias": True, "init": "glorot"}
    x = rng.standard_normal((2, 4, 5))
    y = layer.forward(x, train=True)
    np.testing.assert_allclose(y, _time_dense_oracle(x, layer.params["W"], layer.params["b"]), rtol=1e-12)
    g = rng.standard_normal(y.shape)
    dx = layer.backward(g)

    def f():
        return float((layer.forward(x) * g).sum())

    np.testing.assert_allclose(dx, numerical_gradient(f, x), rtol=GRADCHECK["rtol"], atol=GRADCHECK["atol"])
    for k, p in layer.params.items():
        np.testing.assert_allclose(layer.grads[k], numerical_gradient(f, p), rtol=GRADCHECK["rtol"],
                                   atol=GRADCHECK["atol"], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_in_is_dtype_out(rng, dtype):
    td = _time_dense(dtype=dtype, bias=False)
    assert "b" not in td.params
    x = rng.standard_normal((3, 4, 5)).astype(dtype)
    y = td.forward(x, train=True)
    dx = td.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == td.grads["W"].dtype == dtype
    cols = Columns()
    cols.build((2, 3, 4), np.dtype(dtype))
    img = rng.standard_normal((2, 2, 3, 4)).astype(dtype)
    out = cols.forward(img, train=True)
    assert out.dtype == cols.backward(out).dtype == dtype
    td.needs_input_grad = cols.needs_input_grad = False
    td.forward(x, train=True)
    cols.forward(img, train=True)
    assert td.backward(np.ones_like(y)) is None and cols.backward(out) is None and td.grads["W"].shape == (5, 3)


def test_bad_use_gets_one_sentence(rng):
    with pytest.raises(UsageError, match="TimeDense needs out_features >= 1"):
        TimeDense(0)
    with pytest.raises(ShapeError, match=r"Columns 'c' needs \(C, H, W\) inputs"):
        Columns(name="c").build((4, 5), np.float32)
    with pytest.raises(ShapeError, match=r"TimeDense 'td' needs \(T, F\) sequences"):
        TimeDense(3, name="td").build((2, 3, 4), np.float32)
    with pytest.raises(ShapeError, match="expects 6 features per step, got 5"):
        TimeDense(3, in_features=6, name="td").build((4, 5), np.float32)
    td = _time_dense(dtype=np.float32)
    with pytest.raises(ShapeError, match="float32 parameters but was given a float64 array"):
        td.forward(rng.standard_normal((2, 4, 5)))
    with pytest.raises(ShapeError, match=r"needs a batch of shape \(N, T, 5\)"):
        td.forward(np.zeros((2, 20), np.float32))
    with pytest.raises(UsageError, match="backward called without a forward"):
        td.backward(np.zeros((2, 4, 3), np.float32))


def test_in_a_crnn_model_file_round_trip(tmp_path, rng):
    from xpnet.nn.layers import LAYER_TYPES

    assert LAYER_TYPES["Columns"] is Columns and LAYER_TYPES["TimeDense"] is TimeDense
    xpnet.seed(3)
    model = xpnet.models.build("captcha_crnn", n_classes=5, input_shape=(1, 16, 24), channels=(2, 3, 4), hidden=3)
    assert [type(l).__name__ for l in model.layers][-3:] == ["Columns", "GRU", "TimeDense"]
    assert model.output_shape == (6, 6)  # 24 columns / 4; 5 classes + the blank
    x = rng.standard_normal((2, 1, 16, 24)).astype(np.float32)
    xpnet.save(model, tmp_path / "m.npz")
    loaded, _ = xpnet.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))


@pytest.mark.parametrize("first", ["xpnet.nn.sequence", "xpnet.nn.layers", "xpnet.nn.serialization"])
def test_registered_whichever_module_is_imported_first(first):
    code = (f"import {first}\n"
            "from xpnet.nn.layers import LAYER_TYPES\n"
            "from xpnet.nn.sequence import Columns, TimeDense\n"
            "assert LAYER_TYPES['Columns'] is Columns and LAYER_TYPES['TimeDense'] is TimeDense, LAYER_TYPES\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", gpu_param())
def test_layers_same_on_each_backend(rng, name):
    xp = backend.module_for(name)
    td = _time_dense(dtype=np.float32)
    cols = Columns()
    cols.build((2, 3, 4), np.float32)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    img = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    y, dx = td.forward(x, train=True), None
    dx = td.backward(np.ones_like(y))
    dw = td.grads["W"].copy()
    c = cols.forward(img, train=True)
    dc = cols.backward(c)
    td.params = {k: xp.asarray(v) for k, v in td.params.items()}
    y_d = td.forward(xp.asarray(x), train=True)
    assert_allclose(y_d, y)
    assert_allclose(td.backward(xp.ones_like(y_d)), dx)
    assert_allclose(td.grads["W"], dw)
    c_d = cols.forward(xp.asarray(img), train=True)
    assert_allclose(c_d, c)
    assert_allclose(cols.backward(c_d), dc)
