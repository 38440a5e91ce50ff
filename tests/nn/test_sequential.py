import numpy as np
import pytest

import xpnet
from xpnet import models, ops
from xpnet.errors import ShapeError, UsageError
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from xpnet.nn.sequential import Sequential
from xpnet.testing import numerical_gradient


def tiny_model(dtype=np.float64):
    xpnet.set_dtype(dtype)
    return Sequential([Conv2D(3, 3, pad=1), BatchNorm(), ReLU(), MaxPool2D(2), Conv2D(4, (2, 3)), ReLU(),
                       Flatten(), Dense(5), ReLU(), Dense(6)], input_shape=(2, 6, 8))


def test_whole_model_gradients_match_finite_differences(rng):
    model = tiny_model()
    x = rng.standard_normal((3, 2, 6, 8))
    t = (rng.random((3, 6)) < 0.3).astype(np.float64)

    def loss():
        out = model.forward(x, train=True)
        return float(ops.sigmoid_bce_with_logits(out, t)[0])

    logits = model.forward(x, train=True)
    _, d = ops.sigmoid_bce_with_logits(logits, t)
    assert model.backward(d) is None  # the input gradient is skipped by default
    grads = {k: v.copy() for k, v in model.gradients().items()}
    for name, p in model.parameters().items():
        np.testing.assert_allclose(grads[name], numerical_gradient(loss, p), rtol=1e-5, atol=1e-8, err_msg=name)


def test_input_gradient_on_request(rng):
    model = tiny_model()
    model.compute_input_grad = True
    x = rng.standard_normal((2, 2, 6, 8))
    t = np.zeros((2, 6))
    _, d = ops.sigmoid_bce_with_logits(model.forward(x, train=True), t)
    dx = model.backward(d)
    num = numerical_gradient(lambda: float(ops.sigmoid_bce_with_logits(model.forward(x, train=True), t)[0]), x)
    np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-8)


def test_captcha_net_shapes_and_flatten_size():
    m = models.captcha_net()
    assert m.layers[-1].output_shape == (144,)
    assert m.parameters()["dense1.W"].shape == (2048, 512)
    # The seed's defect fixed: a ReLU between the two dense layers.
    kinds = [type(l).__name__ for l in m.layers]
    assert kinds[-3:] == ["Dense", "ReLU", "Dense"]
    m2 = models.captcha_net(length=5, n_classes=32, input_shape=(1, 48, 128))
    assert m2.parameters()["dense1.W"].shape == (128 * 4 * 14, 512) and m2.output_shape == (160,)
    y = m2.forward(np.zeros((2, 1, 48, 128), np.float32))
    assert y.shape == (2, 160) and y.dtype == np.float32


def test_simple_convnet_is_the_seed_network():
    m = models.simple_convnet()
    assert m.parameters()["dense1.W"].shape == (4320, 100)
    assert m.parameters()["conv1.W"].shape == (30, 1, 5, 5)
    assert m.output_shape == (10,)


def test_init_options():
    w_he = models.captcha_net().parameters()["dense1.W"]
    assert abs(w_he.std() - np.sqrt(2 / 2048)) < 2e-3
    w_seed = models.captcha_net(init="normal").parameters()["dense1.W"]
    assert abs(w_seed.std() - 0.01) < 1e-3
    w_gl = models.captcha_net(init="glorot").parameters()["dense1.W"]
    assert abs(w_gl.std() - np.sqrt(2 / (2048 + 512))) < 2e-3
    with pytest.raises(UsageError, match="Unknown init"):
        models.captcha_net(init="xavier!")


def test_parameters_gradients_buffers_by_name(rng):
    m = tiny_model(np.float32)
    assert list(m.parameters())[:4] == ["conv1.W", "conv1.b", "bn1.gamma", "bn1.beta"]
    assert list(m.buffers()) == ["bn1.running_mean", "bn1.running_var"]
    with pytest.raises(UsageError, match="No gradients yet"):
        m.gradients()
    x = rng.standard_normal((2, 2, 6, 8)).astype(np.float32)
    _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), np.zeros((2, 6), np.float32))
    m.backward(d)
    g = m.gradients()
    assert list(g) == list(m.parameters())
    assert all(g[k].shape == p.shape and g[k].dtype == np.float32 for k, p in m.parameters().items())


def test_summary_lists_shapes_and_counts():
    s = models.captcha_net().summary()
    assert "(128, 2, 8)" in s and "1,049,088" in s and "total parameters: 1,216,208" in s


def test_spec_roundtrip_and_clone(rng):
    m = models.captcha_net_bn(input_shape=(1, 32, 64))
    m2 = Sequential.from_spec(m.spec())
    assert m2.spec() == m.spec()
    twin = m.clone()
    x = rng.standard_normal((3, 1, 32, 64)).astype(np.float32)
    np.testing.assert_array_equal(m.forward(x), twin.forward(x))
    state = xpnet.backend.get_rng_state()
    m.clone()
    assert xpnet.backend.get_rng_state() == state  # cloning does not consume randomness


def test_from_spec_refuses_unknown_layer_types():
    spec = models.simple_convnet().spec()
    spec["layers"][0]["type"] = "os.system"
    with pytest.raises(ShapeError, match="unknown layer type 'os.system'"):
        Sequential.from_spec(spec)
    spec = models.simple_convnet().spec()
    spec["spec_version"] = 99
    with pytest.raises(ShapeError, match="upgrade xpnet"):
        Sequential.from_spec(spec)


def test_load_state_dict_checks_names_and_shapes():
    m = models.simple_convnet()
    state = {k: v.copy() for k, v in m.state_dict().items()}
    state.pop("dense2.b")
    with pytest.raises(ShapeError, match="missing"):
        m.load_state_dict(state)
    state = {k: v.copy() for k, v in m.state_dict().items()}
    state["dense2.b"] = np.zeros(11, np.float32)
    with pytest.raises(ShapeError, match="dense2.b"):
        m.load_state_dict(state)


def test_predict_in_chunks_equals_forward(rng):
    m = models.simple_convnet()
    x = rng.standard_normal((10, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(m.predict(x, batch_size=3), m.forward(x), rtol=1e-5, atol=1e-5)


def test_lazy_build_on_first_batch(rng):
    m = Sequential([Flatten(), Dense(3)])
    assert not m.built
    y = m.forward(rng.standard_normal((2, 4, 5)).astype(np.float32))
    assert y.shape == (2, 3) and m.input_shape == (4, 5)


def test_to_numpy_keeps_values():
    m = models.simple_convnet()
    before = {k: v.copy() for k, v in m.parameters().items()}
    m.to("numpy")
    assert all(np.array_equal(before[k], v) for k, v in m.parameters().items())
    assert m.backend == "numpy"


def test_duplicate_names_and_bad_layers():
    with pytest.raises(UsageError, match="unique"):
        Sequential([Dense(2, name="a"), Dense(2, name="a")])
    with pytest.raises(UsageError, match="xpnet layers"):
        Sequential([lambda x: x])
    with pytest.raises(ShapeError, match="Flatten"):
        Sequential([Dense(3)], input_shape=(3, 4, 4))


def test_dropout_model_train_vs_eval(rng):
    m = Sequential([Flatten(), Dropout(0.5), Dense(4)], input_shape=(10,))
    x = rng.standard_normal((5, 10)).astype(np.float32)
    assert np.array_equal(m.forward(x), m.forward(x))
    assert not np.array_equal(m.forward(x, train=True), m.forward(x, train=True))


@pytest.mark.parametrize("spec", [
    {"spec_version": float("inf"), "layers": []},
    {"spec_version": 1, "layers": [{"type": "Dense", "config": {"out_features": 3}}], "input_shape": [float("inf")]},
    {"spec_version": 1, "layers": [{"type": "Dense", "config": {"out_features": float("inf")}}], "input_shape": [3]},
    {"spec_version": 1, "layers": [{"type": "Dense", "config": {"out_features": 3}}], "input_shape": 7},
    {"spec_version": 1, "layers": "Dense"},
    None,
])
def test_from_spec_refuses_malformed_numbers_with_a_shape_error(spec):
    # int(Infinity) used to escape as OverflowError: any spec given in code gets one ShapeError.
    with pytest.raises(ShapeError):
        Sequential.from_spec(spec)


def test_a_refused_state_leaves_the_model_unchanged():
    m = Sequential([Dense(4), ReLU(), Dense(2)], input_shape=(3,))
    before = {k: v.copy() for k, v in m.state_dict().items()}
    state = {k: np.ones_like(v) for k, v in before.items()}
    state["dense2.W"] = np.ones((5, 5), np.float32)  # the last one misshaped: nothing may be copied
    assert "dense2.W" in m.state_mismatch(state)
    with pytest.raises(ShapeError, match="dense2.W"):
        m.load_state_dict(state)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    del state["dense2.W"]
    assert "missing" in m.state_mismatch(state)
