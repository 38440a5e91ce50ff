"""Conv-block geometry of the fused path (grouped_im2col) against the reference ops and naive
loops, the reference conv's im2col budget chunking, and the shard thread pool."""

import threading

import numpy as np
import pytest

import xpnet
from xpnet import config, ops
from xpnet.cpu import grouped_im2col
from xpnet.ops import pool as pool_ops
from xpnet.cpu.threads import ShardPool, shard_bounds

from tests import oracles

GEOMS = [  # (C, H, W, F, KH, KW, SH, SW, PH, PW, PKH, PKW)
    (3, 9, 11, 4, 3, 3, 1, 1, 0, 0, 2, 2),    # odd map: the pool drops a row and a column
    (2, 10, 9, 3, 3, 2, 2, 1, 1, 2, 1, 3),    # strides, padding, a 1x3 pool window
    (5, 7, 8, 2, 1, 1, 1, 1, 0, 0, 1, 1),     # 1x1 conv, no pool
]


def reference_rows(x_nchw, g):
    """The reference im2col rows (N, OH, OW, C*KH*KW in (C, KH, KW) order) cropped to the pooled area."""
    col = ops.im2col(x_nchw, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw))
    return col[:, :g.qh * g.pkh, :g.qw * g.pkw]


def im2col_matrix(xpad, g, plain=False):
    """The (N*rows, KH*KW*C) im2col matrix the conv block copies from ``grouped_window_view``."""
    view = grouped_im2col.grouped_window_view(xpad, g, plain)
    out = np.empty((xpad.shape[0] * g.rows, g.kdim), xpad.dtype)
    np.copyto(out.reshape(view.shape), view)
    return out


@pytest.mark.parametrize("geom", GEOMS)
def test_grouped_and_plain_im2col_are_reorderings_of_the_reference(rng, geom):
    g = grouped_im2col.ConvGeometry(*geom)
    n = 3
    x = rng.standard_normal((n, g.c, g.h, g.w))
    xpad = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw))).transpose(0, 2, 3, 1).copy()
    ref = reference_rows(x, g)                                       # (N, OH', OW', C, KH, KW)
    ref = ref.transpose(0, 1, 2, 4, 5, 3)                            # columns in (KH, KW, C) order
    ref = ref.reshape(n, g.qh, g.pkh, g.qw, g.pkw, g.kdim)
    plain = im2col_matrix(xpad, g, plain=True)
    np.testing.assert_array_equal(plain, ref.reshape(n * g.rows, g.kdim))
    grouped = im2col_matrix(xpad, g)
    np.testing.assert_array_equal(grouped, ref.transpose(0, 2, 4, 1, 3, 5).reshape(n * g.rows, g.kdim))
    # K-major from an NCHW buffer seen through an NHWC view (ConvBlock.im2col_views): the same
    # matrix, transposed.
    xpad_nchw = np.pad(x, ((0, 0), (0, 0), (g.ph, g.ph), (g.pw, g.pw)))
    view = grouped_im2col.grouped_window_view(xpad_nchw.transpose(0, 2, 3, 1), g)
    kmajor = np.empty((g.kdim, n * g.rows))
    np.copyto(kmajor.reshape(view.shape[5:] + view.shape[:5]), view.transpose(5, 6, 7, 0, 1, 2, 3, 4))
    np.testing.assert_array_equal(kmajor.T, grouped)


@pytest.mark.parametrize("geom", GEOMS)
def test_tap_col2im_is_the_adjoint_of_im2col(rng, geom):
    # col2im as the conv block does it: each tap's (rows, C) slab of the plain-order
    # matrix added into that tap's view of dx.
    g = grouped_im2col.ConvGeometry(*geom)
    n = 2
    x = rng.standard_normal((n, g.hp, g.wp, g.c))
    col = im2col_matrix(x, g, plain=True)
    c = rng.standard_normal(col.shape)
    back = np.zeros_like(x)
    views = grouped_im2col.tap_views(back, g)
    assert len(views) == g.kh * g.kw
    slabs = c.reshape(views[0].shape[:3] + (g.kh * g.kw, g.c))
    for t, view in enumerate(views):
        view += slabs[:, :, :, t]
    np.testing.assert_allclose(np.sum(col * c), np.sum(x * back), rtol=1e-12)


def test_weight_gradient_comes_back_from_the_matrix_layout(rng):
    w = rng.standard_normal((4, 3, 2, 5))
    wm = w.transpose(2, 3, 1, 0).reshape(-1, 4)  # (KH*KW*C, F), as ConvBlock.prepare lays out W
    assert wm.shape == (2 * 5 * 3, 4)
    back = grouped_im2col.weight_grad_from_matrix(wm, w.shape)
    np.testing.assert_array_equal(back, w)
    assert back.flags.c_contiguous and not np.shares_memory(back, wm)
    one = rng.standard_normal((1, 6))  # C = KH = KW = 1: the transposed view is contiguous already
    assert not np.shares_memory(grouped_im2col.weight_grad_from_matrix(one, (6, 1, 1, 1)), one)


@pytest.mark.parametrize("geom", [
    # (C, H, W, KH, KW, SH, SW, PH, PW, PKH, PKW)
    (3, 32, 80, 3, 3, 1, 1, 0, 0, 2, 2),   # captcha_net's first conv
    (2, 21, 19, 3, 2, 2, 1, 1, 2, 3, 3),   # strides, padding, a 3x3 pool
    (1, 12, 13, 5, 5, 1, 1, 0, 0, 2, 2),   # the MNIST conv
    (2, 9, 11, 3, 3, 2, 2, 1, 1, 1, 1),    # no pool
    (1, 10, 10, 2, 3, 1, 2, 0, 1, 2, 1),   # rectangular kernel and pool
])
def test_phase_planes_give_the_k_major_grouped_im2col(rng, geom):
    c, h, w, kh, kw, sh, sw, ph, pw, pkh, pkw = geom
    g = grouped_im2col.ConvGeometry(c, h, w, 4, kh, kw, sh, sw, ph, pw, pkh, pkw)
    xpad = rng.standard_normal((3, g.hp, g.wp, c))
    planes = np.ascontiguousarray(grouped_im2col.phase_planes_view(xpad, g))
    assert planes.shape == grouped_im2col.phase_shape(3, g)
    expected = grouped_im2col.grouped_window_view(xpad, g).transpose(5, 6, 7, 0, 1, 2, 3, 4)
    np.testing.assert_array_equal(grouped_im2col.phase_window_view(planes, g), expected)
    # from an NCHW buffer seen as NHWC (what the K-major block stores) as well
    nchw = np.ascontiguousarray(xpad.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(grouped_im2col.phase_planes_view(nchw.transpose(0, 2, 3, 1), g), planes)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_pool_blocks_max_and_routing_with_ties_to_the_first(rng, k):
    shape = (3, 5, 4)
    # Many exact ties (few distinct values), as in flat image regions.
    blocks = [rng.integers(0, 3, shape).astype(np.float64) for _ in range(k)]
    out = np.empty(shape)
    gt = np.empty((k - 1,) + shape, bool)
    pool_ops.pool_blocks_forward(blocks, out, gt)
    stack = np.stack(blocks)
    np.testing.assert_array_equal(out, stack.max(axis=0))
    winner = stack.argmax(axis=0)  # first maximum, as in ops.pool
    dy = rng.standard_normal(shape)
    douts = [np.full(shape, np.nan) for _ in range(k)]
    scratch = (np.empty(shape, bool), np.empty(shape, bool), np.empty(shape))
    pool_ops.pool_blocks_backward(dy, gt, douts, *scratch)
    for j in range(k):
        np.testing.assert_array_equal(douts[j], np.where(winner == j, dy, 0.0))
    # accumulate=True adds the routed gradient to what is there (BatchNorm pooled first)
    base = [rng.standard_normal(shape) for _ in range(k)]
    douts = [b.copy() for b in base]
    pool_ops.pool_blocks_backward(dy, gt, douts, *scratch, accumulate=True)
    for j in range(k):
        np.testing.assert_array_equal(douts[j], base[j] + np.where(winner == j, dy, 0.0))
    pool_ops.pool_blocks_forward(blocks, out)  # evaluation: no record of winners
    np.testing.assert_array_equal(out, stack.max(axis=0))


def test_reference_conv_chunks_over_the_im2col_budget(rng):
    x = rng.standard_normal((7, 3, 9, 11))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    y, cache = ops.conv2d_forward(x, w, b, 1, 1)
    dy = rng.standard_normal(y.shape)
    grads = ops.conv2d_backward(dy, cache)
    per_image = ops.im2col_nbytes((1, 3, 9, 11), 3, 1, 1, itemsize=8)
    config.set_im2col_budget(2.5 * per_image / 2**20)  # two images per chunk
    try:
        assert ops.conv.chunk_size(x.shape, (3, 3), (1, 1), (1, 1), 8) == 2
        y2, cache2 = ops.conv2d_forward(x, w, b, 1, 1)
        assert isinstance(cache2[1], tuple)  # x kept instead of col
        np.testing.assert_allclose(y2, y, rtol=1e-13)
        np.testing.assert_allclose(y2, oracles.conv2d(x, w, b, pad=(1, 1)), rtol=1e-10, atol=1e-12)
        for a, e in zip(ops.conv2d_backward(dy, cache2), grads):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)
    finally:
        config.set_im2col_budget(None)


def test_budget_setting_validates(monkeypatch):
    with pytest.raises(xpnet.errors.UsageError):
        config.set_im2col_budget(0)
    assert config.set_im2col_budget(64) == 64
    assert config.get_im2col_budget_bytes() == 64 * 2**20
    config.set_im2col_budget(None)
    assert config.get_im2col_budget_bytes() == 512 * 2**20


def test_shard_pool_runs_each_shard_once_and_allreduces_in_order():
    pool = ShardPool()
    seen = []

    def fn(k):
        seen.append((k, threading.current_thread() is threading.main_thread()))
        total = pool.reducer(3).allreduce(k, "x", np.array([float(k + 1)]))
        return k * 10, total

    results = pool.run(fn, 3)
    assert [r[0] for r in results] == [0, 10, 20]
    assert all(r[1][0] == 6.0 for r in results)
    assert sorted(seen) == [(0, True), (1, False), (2, False)]  # shard 0 on the caller's thread
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]


def test_models_stepped_from_two_threads_leave_blas_threads_as_they_were(rng):
    from threadpoolctl import threadpool_info

    before = [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    first = xpnet.models.captcha_net(input_shape=(3, 32, 40))
    models = [first, first.clone()]
    x = rng.standard_normal((8, 3, 32, 40)).astype(np.float32)
    t = np.zeros((8, 144), np.float32)
    errors = []

    def train(m):
        try:
            for _ in range(3):
                _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), t)
                m.backward(d)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(m,)) for m in models]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    np.testing.assert_array_equal(models[0].gradients()["conv1.W"], models[1].gradients()["conv1.W"])
    assert [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"] == before


def test_a_model_stepped_from_a_second_python_thread_gets_one_blas_thread_per_shard(rng, monkeypatch):
    # threadpoolctl ignores OpenBLAS limits set from any thread but the first that set
    # one: once the main thread had run a step, a step from another thread used
    # full-width BLAS in its shards (and gave other bits than the same step on the
    # main thread).
    from threadpoolctl import threadpool_info

    from xpnet.cpu import conv_block

    def blas_widths():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]
    if max(blas_widths() or [1]) < 2:
        pytest.skip("BLAS runs one thread here: a missing limit cannot be seen")
    seen = []
    real = conv_block.ConvBlock.backward

    def backward(self, *args, **kwargs):
        seen.append((threading.current_thread().name, blas_widths()))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(conv_block.ConvBlock, "backward", backward)
    model = xpnet.models.captcha_net(input_shape=(3, 32, 40))
    x = rng.standard_normal((8, 3, 32, 40)).astype(np.float32)
    t = (rng.random((8, 144)) < 0.1).astype(np.float32)

    def conv1_grad(m):
        _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), t)
        m.backward(d)
        return m.gradients()["conv1.W"].copy()
    on_main = conv1_grad(model.clone())
    got = {}
    th = threading.Thread(target=lambda: got.update(g=conv1_grad(model.clone())), name="user-thread")
    th.start()
    th.join()
    assert any(name == "user-thread" for name, _ in seen)
    assert all(widths == [1] * len(widths) for _, widths in seen), seen
    np.testing.assert_array_equal(got["g"], on_main)
