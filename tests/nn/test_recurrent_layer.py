"""The GRU layer: shapes, parameters, the per-step oracle, finite differences, use in a
Sequential, model files through the layer registry, CuPy parity and a toy CTC reader trained
end to end."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xpnet import dispatch
from xpnet import backend, ops
from xpnet.errors import ShapeError, UsageError
from xpnet.nn.optim import Adam
from xpnet.nn.recurrent import GRU
from xpnet.nn.sequential import Sequential
from xpnet.testing import GRADCHECK, assert_allclose, numerical_gradient

from tests.conftest import gpu_param
from tests.ops.test_recurrent import _gru_oracle

ROOT = Path(__file__).resolve().parents[2]


def _built(hidden=3, t=5, f=4, bidirectional=True, dtype=np.float64):
    layer = GRU(hidden, bidirectional=bidirectional, name="gru")
    layer.build((t, f), np.dtype(dtype))
    return layer


def test_shapes_parameters_and_config():
    layer = _built(hidden=6, t=7, f=5)
    assert layer.output_shape == (7, 12)
    assert sorted(layer.params) == sorted(f"{p}_{d}" for p in ("Wx", "Wh", "bx", "bh") for d in ("fw", "bw"))
    assert layer.params["Wx_fw"].shape == (5, 18) and layer.params["Wh_bw"].shape == (6, 18)
    assert layer.params["bx_fw"].shape == (18,) and not layer.params["bh_bw"].any()
    assert layer.param_count() == 2 * (5 * 18 + 6 * 18 + 2 * 18)
    assert layer.config() == {"hidden_size": 6, "bidirectional": True, "in_features": 5, "init": "glorot"}
    again = GRU(**layer.config())
    again.build((7, 5), np.float64)
    assert {k: v.shape for k, v in again.params.items()} == {k: v.shape for k, v in layer.params.items()}
    one_way = _built(hidden=6, t=7, f=5, bidirectional=False)
    assert one_way.output_shape == (7, 6) and sorted(one_way.params) == ["Wh_fw", "Wx_fw", "bh_fw", "bx_fw"]


def test_recurrent_weights_are_orthogonal_per_gate_and_seeded():
    layer = _built(hidden=5)
    for d in ("fw", "bw"):
        wh = layer.params[f"Wh_{d}"]
        for g in range(3):
            block = wh[:, g * 5:(g + 1) * 5]
            np.testing.assert_allclose(block.T @ block, np.eye(5), atol=1e-12)
    backend.seed(11)
    a = _built(hidden=4)
    backend.seed(11)
    b = _built(hidden=4)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["Wh_fw"], a.params["Wh_bw"])


def test_forward_is_both_directions_side_by_side(rng):
    layer = _built(hidden=3, t=6, f=4)
    for k, v in layer.params.items():  # non-zero biases, so that every parameter matters
        layer.params[k] = v + rng.standard_normal(v.shape) * 0.3
    x = rng.standard_normal((2, 6, 4))
    y = layer.forward(x)
    p = layer.params
    fw = _gru_oracle(x, p["Wx_fw"], p["Wh_fw"], p["bx_fw"], p["bh_fw"], reverse=False)
    bw = _gru_oracle(x, p["Wx_bw"], p["Wh_bw"], p["bx_bw"], p["bh_bw"], reverse=True)
    assert y.shape == (2, 6, 6) and y.flags.c_contiguous
    np.testing.assert_allclose(y, np.concatenate([fw, bw], axis=2), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_layer_gradients_match_finite_differences(rng, bidirectional):
    layer = _built(hidden=3, t=4, f=3, bidirectional=bidirectional)
    for k, v in layer.params.items():
        layer.params[k] = v + rng.standard_normal(v.shape) * 0.3
    x = rng.standard_normal((2, 4, 3))
    y = layer.forward(x, train=True)
    g = rng.standard_normal(y.shape)
    dx = layer.backward(g)

    def f():
        return float((layer.forward(x) * g).sum())

    np.testing.assert_allclose(dx, numerical_gradient(f, x), rtol=GRADCHECK["rtol"], atol=1e-8)
    for k, p in layer.params.items():
        np.testing.assert_allclose(layer.grads[k], numerical_gradient(f, p), rtol=GRADCHECK["rtol"], atol=1e-8,
                                   err_msg=k)


def test_float32_layer_keeps_float32_and_skips_dx_when_not_needed(rng):
    layer = _built(hidden=4, t=5, f=3, dtype=np.float32)
    x = rng.standard_normal((3, 5, 3)).astype(np.float32)
    x_copy = x.copy()
    y = layer.forward(x, train=True)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32 and all(g.dtype == np.float32 for g in layer.grads.values())
    assert np.array_equal(x, x_copy)
    layer.needs_input_grad = False
    layer.forward(x, train=True)
    assert layer.backward(np.ones_like(y)) is None
    assert set(layer.grads) == set(layer.params)


def test_noncontiguous_batch(rng):
    layer = _built(hidden=3, t=5, f=4)
    base = rng.standard_normal((4, 5, 8))
    x = base[::2, :, ::2]
    y = layer.forward(x, train=True)
    dx = layer.backward(np.ones_like(y))
    y_c = layer.forward(np.ascontiguousarray(x), train=True)
    dx_c = layer.backward(np.ones_like(y))
    np.testing.assert_allclose(y, y_c, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dx, dx_c, rtol=1e-13, atol=1e-14)


def test_bad_use_gets_one_sentence(rng):
    with pytest.raises(UsageError, match="hidden_size >= 1"):
        GRU(0)
    with pytest.raises(ShapeError, match=r"needs \(T, F\) sequences"):
        GRU(3, name="g").build((3, 4, 5), np.float32)
    with pytest.raises(ShapeError, match="expects 6 features per step, got 4"):
        GRU(3, in_features=6, name="g").build((5, 4), np.float32)
    layer = _built(hidden=3, t=5, f=4, dtype=np.float32)
    with pytest.raises(ShapeError, match="never upcasts"):
        layer.forward(rng.standard_normal((2, 5, 4)))
    with pytest.raises(ShapeError, match=r"batch of shape \(N, T, 4\)"):
        layer.forward(rng.standard_normal((2, 5, 3)).astype(np.float32))
    with pytest.raises(UsageError, match="backward called without a forward"):
        layer.backward(np.zeros((2, 5, 6), np.float32))


def test_in_a_sequential_forward_backward_and_parameter_names(rng):
    model = Sequential([GRU(4, name="rnn")], input_shape=(6, 3))
    x = rng.standard_normal((5, 6, 3)).astype(np.float32)
    y = model.forward(x, train=True)
    assert y.shape == (5, 6, 8)
    model.backward(np.ones_like(y))
    assert list(model.gradients()) == list(model.parameters())
    with dispatch.layer_by_layer():  # the plain path gives the same output and gradients
        assert np.allclose(model.forward(x, train=True), y, atol=1e-6) and model.executor is None
        fused = {k: g.copy() for k, g in model.gradients().items()}
        model.backward(np.ones_like(y))
    assert all(np.allclose(g, fused[k], atol=1e-5) for k, g in model.gradients().items())
    assert "rnn.Wh_bw" in model.parameters()


def test_model_file_round_trip(tmp_path, rng):
    """The registry rebuilds the layer from config() and the parameters exactly."""
    import xpnet
    from xpnet.nn.layers import LAYER_TYPES

    assert LAYER_TYPES["GRU"] is GRU is xpnet.GRU
    model = Sequential([GRU(3, name="rnn"), GRU(2, bidirectional=False, init="he", name="rnn2")],
                       input_shape=(5, 4), name="rnns")
    path = xpnet.save(model, tmp_path / "m.npz")
    loaded, _ = xpnet.load(path)
    assert loaded.spec() == model.spec()
    assert [type(layer) for layer in loaded.layers] == [GRU, GRU] and not loaded.layers[1].bidirectional
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


@pytest.mark.parametrize("first", ["xpnet.nn.recurrent", "xpnet.nn.layers", "xpnet.nn.serialization"])
def test_registered_whichever_module_is_imported_first(first):
    """layers.py imports GRU at its end (recurrent.py builds on Layer): a fresh process finds GRU
    registered whichever of these modules it imports first."""
    code = (f"import {first}\n"
            "from xpnet.nn.layers import LAYER_TYPES\n"
            "from xpnet.nn.recurrent import GRU\n"
            "assert LAYER_TYPES['GRU'] is GRU, LAYER_TYPES\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr


def _toy(rng, n, t=12, k=4):
    """One-hot symbol pulses 2 steps wide on a 'nothing' channel, with noise; label = the symbols."""
    x = np.zeros((n, t, k), np.float32)
    x[:, :, 0] = 1
    labels = np.zeros((n, 3), np.int64)
    lengths = rng.integers(1, 4, n)
    for i in range(n):  # building the data set, not a hot path
        syms = rng.integers(1, k, lengths[i])
        labels[i, :lengths[i]] = syms
        for s, c in zip(np.sort(rng.choice(np.arange(0, t - 1, 3), lengths[i], replace=False)), syms):
            x[i, s:s + 2] = np.eye(k, dtype=np.float32)[c]
    x += rng.normal(0, 0.2, x.shape).astype(np.float32)
    return x, labels, lengths


def test_toy_ctc_reader_learns_with_adam():
    """GRU + per-step linear head + CTC: the loss falls, greedy decoding reads fresh sequences."""
    rng = np.random.default_rng(0)
    x, labels, lengths = _toy(rng, 48)
    gru = _built(hidden=12, t=12, f=4, dtype=np.float32)
    head = {"w": (rng.standard_normal((24, 4)) * 0.2).astype(np.float32), "b": np.zeros(4, np.float32)}
    params = {**gru.params, **head}
    opt = Adam(params, lr=0.02)

    def logits(batch, train=False):
        hseq = gru.forward(batch, train=train)
        z, cache = ops.dense_forward(hseq.reshape(-1, 24), head["w"], head["b"])
        return z.reshape(len(batch), 12, 4), cache

    first = None
    for _ in range(150):
        z, cache = logits(x, train=True)
        loss, dz = ops.ctc_loss(z, labels, lengths)
        first = float(loss) if first is None else first
        dh, dw, db = ops.dense_backward(dz.reshape(-1, 4), cache)
        gru.backward(dh.reshape(len(x), 12, 24))
        opt.step({**gru.grads, "w": dw, "b": db})
    assert float(loss) < 0.02 * first
    xt, lt, nt = _toy(np.random.default_rng(9), 32)
    pred = ops.ctc_greedy_decode(logits(xt)[0])
    assert pred == [list(l[:n]) for l, n in zip(lt, nt)]


@pytest.mark.parametrize("name", gpu_param())
def test_layer_same_on_each_backend(rng, name):
    xp = backend.module_for(name)
    layer = _built(hidden=5, t=6, f=4, dtype=np.float32)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    g = rng.standard_normal((3, 6, 10)).astype(np.float32)
    y = layer.forward(x, train=True)
    dx = layer.backward(g)
    want = {k: v.copy() for k, v in layer.grads.items()}
    for k, v in layer.params.items():
        layer.params[k] = xp.asarray(v)
    y_d = layer.forward(xp.asarray(x), train=True)
    dx_d = layer.backward(xp.asarray(g))
    assert_allclose(y_d, y)
    assert_allclose(dx_d, dx)
    for k, v in want.items():
        assert_allclose(layer.grads[k], v, err_msg=k)
