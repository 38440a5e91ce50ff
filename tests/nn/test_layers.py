"""Every layer's gradients against central finite differences in float64."""

import numpy as np
import pytest

import xpnet
from xpnet import backend, ops
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from xpnet.testing import numerical_gradient


def gradcheck_layer(layer, x, rng, train=True, reseed=None, rtol=1e-5, atol=1e-7):
    """sum(layer(x) * g): compare backward's dx and parameter grads with finite differences."""
    layer.build(x.shape[1:], np.float64)
    layer.needs_input_grad = True

    def fwd():
        if reseed is not None:
            backend.seed(reseed)
        return layer.forward(x, train=train)

    y = fwd()
    g = rng.standard_normal(y.shape)
    dx = layer.backward(g)

    def f():
        out = fwd()
        layer._cache = None
        return float((out * g).sum())

    np.testing.assert_allclose(dx, numerical_gradient(f, x), rtol=rtol, atol=atol, err_msg=f"{layer} dx")
    for k, p in layer.params.items():
        np.testing.assert_allclose(layer.grads[k], numerical_gradient(f, p), rtol=rtol, atol=atol,
                                   err_msg=f"{layer} d{k}")
    return y


def test_conv2d_layer(rng):
    gradcheck_layer(Conv2D(3, (3, 2), stride=(2, 1), pad=(1, 0)), rng.standard_normal((2, 2, 7, 6)), rng)


def test_conv2d_same_padding_shape(rng):
    layer = Conv2D(4, 5, pad="same")
    y = gradcheck_layer(layer, rng.standard_normal((1, 2, 6, 7)), rng)
    assert y.shape == (1, 4, 6, 7) and layer.output_shape == (4, 6, 7)


def test_maxpool_layer(rng):
    x = (rng.permutation(2 * 3 * 7 * 7).reshape(2, 3, 7, 7) * 0.01).astype(np.float64)
    gradcheck_layer(MaxPool2D(3, 2, 1), x, rng)


def test_dense_layer(rng):
    gradcheck_layer(Dense(4), rng.standard_normal((3, 6)), rng)


def test_relu_layer(rng):
    x = rng.standard_normal((3, 8))
    x[np.abs(x) < 1e-2] = 0.3  # keep away from the kink
    gradcheck_layer(ReLU(), x, rng)


def test_flatten_layer(rng):
    y = gradcheck_layer(Flatten(), rng.standard_normal((2, 3, 2, 2)), rng)
    assert y.shape == (2, 12)


def test_dropout_layer_train_and_eval(rng):
    x = rng.standard_normal((4, 50))
    layer = Dropout(0.4)
    y = gradcheck_layer(layer, x, rng, reseed=3)
    dropped = (y == 0).mean()
    assert 0.2 < dropped < 0.6
    np.testing.assert_allclose(y[y != 0], x[y != 0] / 0.6)
    assert layer.forward(x, train=False) is x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_layer_mask_is_one_draw_from_xpnets_generator(rng, dtype):
    # The fused path draws the same numbers for the whole batch (DropoutStage): a seed
    # gives the same masks on both paths only while the layer draws exactly this.
    x = rng.standard_normal((6, 3, 4)).astype(dtype)
    layer = Dropout(0.3)
    xpnet.seed(21)
    y = layer.forward(x, train=True)
    dx = layer.backward(np.ones_like(x))
    xpnet.seed(21)
    mask = ops.dropout_mask(backend.rng().random(x.shape, dtype=dtype), 0.3)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(y, x * mask)
    np.testing.assert_array_equal(dx, mask)


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (5, 4)])
def test_batchnorm_layer_train(rng, shape):
    gradcheck_layer(BatchNorm(), rng.standard_normal(shape) * 3 + 2, rng)


def test_batchnorm_layer_eval_and_modes_differ(rng):
    layer = BatchNorm(momentum=0.5)
    x = rng.standard_normal((8, 3, 2, 2)) * 3 + 2
    layer.build(x.shape[1:], np.float64)
    y_train = layer.forward(x, train=True)
    layer._cache = None
    assert not np.allclose(layer.buffers["running_mean"], 0)  # updated by training
    y_eval = layer.forward(x, train=False)
    assert not np.allclose(y_train, y_eval)  # eval uses the running statistics
    assert abs(y_train.mean()) < 1e-10
    assert layer._cache is None  # evaluation keeps nothing for backward (the op test checks its gradient)


def test_backward_without_forward_is_explained():
    layer = Dense(3)
    layer.build((4,), np.float32)
    with pytest.raises(xpnet.errors.UsageError, match="without a forward"):
        layer.backward(np.zeros((2, 3), np.float32))


def test_eval_forward_keeps_no_cache(rng):
    layer = Conv2D(2, 3)
    layer.build((1, 5, 5), np.float32)
    layer.forward(rng.standard_normal((2, 1, 5, 5)).astype(np.float32), train=False)
    assert layer._cache is None
