"""Winograd F(2x2, 3x3) convolution (xpnet.cpu.winograd) against a naive float64 convolution,
its gradients against finite differences, and the conv blocks that use it against the plain path."""

import numpy as np
import pytest

import xpnet
from xpnet import config
from xpnet.cpu import conv_block, conv_plan, winograd, workspace
from xpnet.cpu.grouped_im2col import ConvGeometry
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ReLU

from .test_fused_executor import assert_paths_agree


@pytest.fixture(autouse=True)
def _restore_settings():
    saved = (config.fast_paths_enabled(), config.get_num_threads(), config.get_shard_mode(), workspace.CHUNK_BYTES,
             conv_plan.WINOGRAD_CHUNK_BYTES, conv_block.ConvBlock.USE_WINOGRAD)
    config.fast_paths(True)
    yield
    config.fast_paths(saved[0])
    config.set_num_threads(saved[1])
    config.set_shard_mode(saved[2])
    workspace.CHUNK_BYTES, conv_plan.WINOGRAD_CHUNK_BYTES, conv_block.ConvBlock.USE_WINOGRAD = saved[3:]


def naive_conv(x, w):
    """'same' 3x3 convolution, float64, loop over the taps: x (N, H, W, C), w (F, C, 3, 3) -> (N, H, W, F)."""
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[0]))
    for k in range(3):
        for l in range(3):
            out += xp[:, k:k + h, l:l + wd] @ w[:, :, k, l].T
    return out


def winograd_conv(x, w):
    """The module's forward on one chunk: (conv output (N, H, W, F), what backward needs)."""
    n, h, wd, c = x.shape
    f, th, tw = w.shape[0], h // 2, wd // 2
    phases = np.zeros((2, n, h + 2, tw + 1, c), x.dtype)
    winograd.split_columns(x, phases)
    cols = np.empty((4, n, h + 2, tw, c), x.dtype)
    v = np.empty((4, 4, n, th, tw, c), x.dtype)
    winograd.input_transform(phases, cols, v)
    u = winograd.kernel_transform(np.ascontiguousarray(w.transpose(2, 3, 1, 0))).reshape(16, c, f)
    m = np.matmul(v.reshape(16, -1, c), u).reshape(4, 4, n, th, tw, f)
    y = np.empty((n, th, 2, tw, 2, f), x.dtype)  # output (2i + pi, 2j + pj) at y[:, i, pi, j, pj]
    blocks = [[y[:, :, pi, :, pj] for pj in range(2)] for pi in range(2)]
    winograd.output_transform(m, np.empty((2, 4, n, th, tw, f), x.dtype), blocks)
    return y.reshape(n, h, wd, f), (v, u)


def winograd_grads(dy, saved, shape):
    """dW (F, C, 3, 3) and dx (N, H, W, C) from dy (N, H, W, F), through the module's backward."""
    v, u = saved
    n, h, wd, c = shape
    f, th, tw = dy.shape[-1], h // 2, wd // 2
    dy6 = dy.reshape(n, th, 2, tw, 2, f)
    dm = np.empty((4, 4, n, th, tw, f), dy.dtype)
    winograd.output_transform_transpose([[dy6[:, :, pi, :, pj] for pj in range(2)] for pi in range(2)],
                                        np.empty((4, 2, n, th, tw, f), dy.dtype), dm)
    du = np.matmul(v.reshape(16, -1, c).transpose(0, 2, 1), dm.reshape(16, -1, f))
    dw = winograd.kernel_transform_transpose(du).reshape(3, 3, c, f).transpose(3, 2, 0, 1)
    dv = np.matmul(dm.reshape(16, -1, f), u.transpose(0, 2, 1)).reshape(4, 4, n, th, tw, c)
    dphases = np.empty((2, n, h + 2, tw + 1, c), dy.dtype)
    winograd.input_transform_transpose(dv, np.empty((4, n, h + 2, tw, c), dy.dtype), dphases)
    dx = np.empty(shape, dy.dtype)
    winograd.join_columns(dphases, dx)
    return dw, dx


@pytest.mark.parametrize("shape", [(3, 4, 6, 5), (2, 2, 10, 3), (1, 8, 2, 4)])
def test_forward_and_gradients_match_a_naive_float64_convolution(rng, shape):
    x = rng.standard_normal(shape)
    w = rng.standard_normal((7, shape[-1], 3, 3))
    y, saved = winograd_conv(x, w)
    np.testing.assert_allclose(y, naive_conv(x, w), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dw, dx = winograd_grads(dy, saved, x.shape)
    # the reference gradients of sum(conv(x, w) * dy), tap by tap
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dxp = np.zeros_like(xp)
    dw_ref = np.zeros_like(w)
    h, wd = shape[1], shape[2]
    for k in range(3):
        for l in range(3):
            dw_ref[:, :, k, l] = np.einsum("nhwf,nhwc->fc", dy, xp[:, k:k + h, l:l + wd])
            dxp[:, k:k + h, l:l + wd] += dy @ w[:, :, k, l]
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dxp[:, 1:-1, 1:-1], rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences(rng):
    x = rng.standard_normal((2, 4, 4, 3))
    w = rng.standard_normal((2, 3, 3, 3))
    r = rng.standard_normal((2, 4, 4, 2))

    def loss(x, w):
        return float(np.sum(winograd_conv(x, w)[0] * r))

    _, saved = winograd_conv(x, w)
    dw, dx = winograd_grads(r, saved, x.shape)
    eps = 1e-6
    for a, grad, f in ((x, dx, lambda a: loss(a, w)), (w, dw, lambda a: loss(x, a))):
        numeric = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            plus, minus = a.copy(), a.copy()
            plus[i] += eps
            minus[i] -= eps
            numeric[i] = (f(plus) - f(minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_float32_stays_float32_and_close_to_float64(rng):
    x = rng.standard_normal((2, 8, 12, 32)).astype(np.float32)
    w = (rng.standard_normal((16, 32, 3, 3)) / 17).astype(np.float32)
    y, _ = winograd_conv(x, w)
    assert y.dtype == np.float32
    ref = naive_conv(x.astype(np.float64), w.astype(np.float64))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def geometry(c=32, h=8, w=12, k=3, stride=1, pad=1, pool=(2, 2)):
    return ConvGeometry.make((c, h, w), (8, c, k, k), stride, pad, pool)


def test_which_geometries_it_computes():
    assert winograd.applies(geometry())
    assert winograd.applies(geometry(pool=(2, 1))) and winograd.applies(geometry(pool=(1, 1)))
    assert not winograd.applies(geometry(c=winograd.MIN_CHANNELS - 1))  # too few channels to gain
    assert not winograd.applies(geometry(k=5, pad=2))
    assert not winograd.applies(geometry(stride=2))
    assert not winograd.applies(geometry(pad=0))
    assert not winograd.applies(geometry(h=9))  # odd map: no whole tiles
    assert not winograd.applies(geometry(pool=(3, 3), h=12))


def wide_blocks():  # a first block by im2col (2 channels in), then Winograd blocks with every pool shape
    return [Conv2D(32, 3, pad="same"), ReLU(), MaxPool2D(2),
            Conv2D(32, 3, pad="same"), ReLU(), MaxPool2D(2),
            Conv2D(32, 3, pad="same"), ReLU(), MaxPool2D((2, 1)),
            Conv2D(33, 3, pad="same"), ReLU(), MaxPool2D((1, 2)),
            Conv2D(7, 3, pad="same"), ReLU(), Flatten(), Dense(5)]


def wide_bn_blocks():
    return [Conv2D(32, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D(2),
            Conv2D(34, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D((2, 1)),
            Conv2D(32, 3, pad="same", bias=False), BatchNorm(), ReLU(),
            Conv2D(6, 3, pad="same"), BatchNorm(), ReLU(), MaxPool2D(2), Flatten(), Dense(4)]


def uses_winograd(model):
    return [getattr(s, "winograd", None) for s in model.executor.stages if type(s).__name__ == "ConvBlock"]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_winograd_blocks_match_the_plain_path(threads):
    fast = assert_paths_agree(wide_blocks, (2, 32, 32), n=7, threads=threads)
    assert uses_winograd(fast) == [False, True, True, True, True]


@pytest.mark.parametrize("chunk_bytes", [1, None])
def test_winograd_blocks_with_batchnorm_and_chunks_of_one_image(chunk_bytes):
    # one image a chunk (7 images: every shard ends on a short group), or the default chunks
    if chunk_bytes is not None:
        conv_plan.WINOGRAD_CHUNK_BYTES = chunk_bytes
    fast = assert_paths_agree(wide_bn_blocks, (2, 16, 24), n=7, threads=2)
    assert uses_winograd(fast) == [False, True, True, True]

    def some_negative_gammas(model):  # BatchNorm then no longer commutes with the pool
        for layer in model.layers:
            if isinstance(layer, BatchNorm):
                layer.params["gamma"][::2] *= -0.5
    assert_paths_agree(wide_bn_blocks, (2, 16, 24), n=7, threads=2, prepare=some_negative_gammas)


def test_a_first_winograd_block_with_and_without_an_input_gradient():
    def layers():
        return [Conv2D(16, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D(2), Flatten(), Dense(3)]
    for input_grad in (False, True):
        fast = assert_paths_agree(layers, (32, 6, 10), n=5, threads=2, input_grad=input_grad)
        assert uses_winograd(fast) == [True]


def test_float32_winograd_blocks_within_the_model_tolerance():
    fast = assert_paths_agree(wide_bn_blocks, (2, 16, 24), n=6, dtype=np.float32, threads=2)
    assert uses_winograd(fast) == [False, True, True, True]


def test_winograd_can_be_switched_off():
    conv_block.ConvBlock.USE_WINOGRAD = False
    fast = assert_paths_agree(wide_blocks, (2, 32, 32), n=5, threads=2)
    assert uses_winograd(fast) == [False, False, False, False, False]


def test_short_last_chunks_and_aligned_winograd_buffers(monkeypatch):
    # Two images a chunk on shards of 4 and 3 images: each shard's last chunk is short (views
    # of the leading part of every chunk buffer).  Threads: the patched chunking stays in this process.
    config.set_shard_mode("threads")
    monkeypatch.setattr(conv_plan, "chunk_images", lambda nbytes, n, target=None: min(n, 2))
    fast = assert_paths_agree(wide_bn_blocks, (2, 16, 24), n=7, threads=2)
    blocks = [s for s in fast.executor.stages if getattr(s, "winograd", False)]
    assert blocks and all(s.weight_taps is None for s in blocks)  # the im2col path's buffers are not made
    sizes = set()
    for sh in fast.executor.shards:
        for key, plan in sh.plans.items():
            if plan.winograd_buffers is None:
                continue
            sizes |= {chunk.stop - chunk.start for group in plan.groups for chunk in group.chunks}
            for buffer in (*plan.winograd_buffers.values(), plan.input_phases):
                assert buffer.ctypes.data % workspace.ALIGN_BYTES == 0
            assert plan.col is None and plan.dweight_chunk is None
    assert sizes == {1, 2}


def test_captcha_crnn_convolves_its_wide_blocks_by_winograd():
    xpnet.set_dtype(np.float32)
    model = xpnet.models.captcha_crnn(n_classes=5, batchnorm=True)
    model.forward(np.zeros((2,) + model.input_shape, np.float32), train=False)
    assert uses_winograd(model) == [False, True, True]  # the first block has one input channel
