"""The fused, batch-parallel CPU path (xpnet.cpu) against the plain layer-by-layer path.

Every model here runs one training step (forward, fused loss, backward) and an
evaluation forward on both paths from the same weights and inputs; outputs,
every gradient, the input gradient and BatchNorm running statistics must agree
(float64: to rounding; float32: the model tolerance of xpnet.testing).
"""

import numpy as np
import pytest

import xpnet
from xpnet import config, ops
from xpnet.cpu import executor as fuse, stages, workspace
from xpnet.errors import ShapeError, UsageError
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from xpnet.nn.sequential import Sequential
from xpnet.testing import assert_allclose


@pytest.fixture(autouse=True)
def _restore_settings():
    saved = (config.fast_paths_enabled(), config.get_num_threads(), config.get_im2col_budget_bytes(),
             workspace.CHUNK_BYTES, config.get_shard_mode())
    config.fast_paths(True)  # these tests are about the fast path, whatever XPNET_FAST says
    yield
    config.fast_paths(saved[0])
    config.set_num_threads(saved[1])
    config._budget_bytes = saved[2]
    workspace.CHUNK_BYTES = saved[3]
    config.set_shard_mode(saved[4])


@pytest.fixture
def thread_shards():
    """Shards 1..T-1 on threads of this process, for tests that look into every shard's state."""
    config.set_shard_mode("threads")


def one_step(model, x, t, fast, seed=7, input_grad=True, loss=None):
    """(logits, {grad name: grad}, dx, eval logits, {buffer: value}) for one step on one path.

    ``loss(logits, t) -> (loss, dlogits)``: default the fused sigmoid/BCE.
    """
    model.compute_input_grad = input_grad
    with xpnet.fast_paths(fast):
        xpnet.seed(seed)  # same dropout masks on both paths
        logits = model.forward(x, train=True)
        _, d = (loss or ops.sigmoid_bce_with_logits)(logits, t)
        dx = model.backward(d)
        grads = {k: v.copy() for k, v in model.gradients().items()}
        buffers = {k: v.copy() for k, v in model.buffers().items()}
        ev = model.forward(x, train=False)
    return logits, grads, dx, ev, buffers


def assert_paths_agree(layers_fn, input_shape, n=7, dtype=np.float64, threads=2, input_grad=True, kind="op",
                       prepare=None, loss=None, targets=None):
    xpnet.set_dtype(dtype)
    xpnet.seed(3)
    ref = Sequential(layers_fn(), input_shape=input_shape)
    if prepare is not None:
        prepare(ref)
    fast = ref.clone()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n,) + tuple(input_shape)).astype(dtype)
    t = (rng.random((n,) + ref.output_shape) < 0.3).astype(dtype) if targets is None else targets
    xpnet.set_num_threads(threads)
    a = one_step(ref, x, t, fast=False, input_grad=input_grad, loss=loss)
    b = one_step(fast, x, t, fast=True, input_grad=input_grad, loss=loss)
    assert fast.executor is not None and ref.executor is None  # each path really ran
    tol = kind if dtype == np.float64 else "model"
    assert_allclose(b[0], a[0], kind=tol, err_msg="logits")
    assert set(a[1]) == set(b[1])
    for name in a[1]:
        assert_allclose(b[1][name], a[1][name], kind=tol, err_msg=name)
    if input_grad:
        assert_allclose(b[2], a[2], kind=tol, err_msg="input gradient")
    else:
        assert a[2] is None and b[2] is None
    assert_allclose(b[3], a[3], kind=tol, err_msg="eval logits")
    for name in a[4]:
        assert_allclose(b[4][name], a[4][name], kind=tol, err_msg=name)
    return fast


def seed_like():  # captcha_net in miniature: odd maps, so pools drop a row and a column
    return [Conv2D(4, 3), ReLU(), MaxPool2D(2), Conv2D(6, 3), ReLU(), MaxPool2D(2), Flatten(),
            Dense(10), ReLU(), Dense(5)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_relu_pool_chain_matches_plain_path(threads):
    fast = assert_paths_agree(seed_like, (3, 17, 22), n=13, threads=threads)
    assert [type(s).__name__ for s in fast.executor.stages][:2] == ["ConvBlock", "ConvBlock"]
    assert all(len(s.layers) == 3 for s in fast.executor.stages[:2])  # conv+relu+pool fused


def test_batchnorm_blocks_whole_batch_statistics_across_shards(thread_shards):
    def layers():
        return [Conv2D(5, 3, pad="same", bias=False), BatchNorm(), ReLU(), Conv2D(6, 3, pad=1), BatchNorm(), ReLU(),
                MaxPool2D(2), Conv2D(4, 3), BatchNorm(), ReLU(), MaxPool2D(2),  # odd map: pool not fused
                Flatten(), Dense(8), BatchNorm(), ReLU(), Dropout(0.3), Dense(4)]
    def pooled_first(model):  # per training plan of a pooled BatchNorm block: did it pool raw z first?
        return [p.bn_stats[-1] for sh in model.executor.shards for p in sh.plans.values()
                if p.train and p.z_pooled is not None]

    fast = assert_paths_agree(layers, (3, 14, 16), n=11, threads=3)
    names = [type(s).__name__ for s in fast.executor.stages]
    assert pooled_first(fast) and all(pooled_first(fast))  # gamma > 0: max commutes with BatchNorm

    def some_negative_gammas(model):  # BatchNorm then no longer commutes with the pool
        for layer in model.layers:
            if isinstance(layer, BatchNorm):
                layer.params["gamma"][::2] *= -0.5
    fast = assert_paths_agree(layers, (3, 14, 16), n=11, threads=3, prepare=some_negative_gammas)
    assert pooled_first(fast) and not any(pooled_first(fast))
    assert names[:4] == ["ConvBlock", "ConvBlock", "ConvBlock", "PoolStage"]
    assert "BatchNormStage" in names and "DropoutStage" in names


def test_strides_padding_rectangular_kernels_and_big_pool_windows():
    def layers():
        return [Conv2D(5, (3, 2), stride=(2, 1), pad=(1, 2)), MaxPool2D(3), ReLU(),
                Conv2D(16, 2, bias=False), ReLU(), MaxPool2D((1, 2)),
                Conv2D(7, 1), Flatten(), Dense(3)]
    assert_paths_agree(layers, (2, 21, 19), n=9, threads=2)


def test_same_padding_input_gradient_by_im2col_with_rows_no_pool_reads():
    # 'same' conv on 21x21 then a 2x2 pool: the last row and column are never pooled, and the
    # input gradient goes through one product over the padded dz (not tap by tap).
    def layers():
        return [Conv2D(3, 3, pad="same"), Conv2D(5, 3, pad="same"), ReLU(), MaxPool2D(2), Flatten(), Dense(4)]
    fast = assert_paths_agree(layers, (2, 21, 21), n=6, threads=2)
    assert [s.dx_by_im2col for s in fast.executor.stages[:2]] == [True, True]


def test_overlapping_and_padded_pools_and_standalone_layers():
    def layers():
        return [ReLU(), MaxPool2D(3, stride=1, pad=1), Conv2D(9, 3), MaxPool2D(2, stride=1),
                BatchNorm(), ReLU(), MaxPool2D(2), Dropout(0.5), Flatten(), Dense(6)]
    assert_paths_agree(layers, (2, 10, 11), n=8, threads=2)


def test_dense_only_model_and_float32_tolerance():
    assert_paths_agree(lambda: [Dense(12), ReLU(), Dropout(0.2), Dense(12), BatchNorm(), ReLU(), Dense(3)],
                       (9,), n=10, threads=2)
    assert_paths_agree(seed_like, (3, 17, 22), n=12, dtype=np.float32, threads=2)


def test_seed_networks_match_plain_path():
    assert_paths_agree(lambda: xpnet.models.captcha_net(input_shape=(3, 32, 40)).layers, (3, 32, 40),
                       n=8, threads=2, input_grad=False)
    assert_paths_agree(lambda: xpnet.models.captcha_net_bn(input_shape=(3, 32, 48), width=4).layers,
                       (3, 32, 48), n=6, threads=2, input_grad=False)


def test_small_chunks_give_the_same_result():
    workspace.CHUNK_BYTES = 1  # one image per chunk everywhere
    assert_paths_agree(seed_like, (3, 17, 22), n=7, threads=2)
    workspace.CHUNK_BYTES = 1 << 30  # the whole shard in one chunk
    assert_paths_agree(seed_like, (3, 17, 22), n=7, threads=2)
    config.set_im2col_budget(0.001)  # below one image's im2col: one image per chunk, both paths
    assert_paths_agree(seed_like, (3, 17, 22), n=7, threads=2)


def bn_blocks():  # every BatchNorm path of the conv block: 'same' + pool, no pool, plain backward order
    return [Conv2D(5, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D(2),
            Conv2D(6, 3, pad=1), BatchNorm(), ReLU(), Conv2D(4, 3), BatchNorm(), ReLU(), MaxPool2D(2),
            Flatten(), Dense(4)]


@pytest.mark.parametrize("group_chunks", [1, 3, None])
def test_element_wise_groups_of_chunks_give_the_same_result(monkeypatch, group_chunks):
    # One image per chunk; the pool, bias, ReLU and BatchNorm work over groups of 1 or 3
    # chunks (7 images: a partial last group) or the whole shard.
    from xpnet.cpu import conv_plan
    workspace.CHUNK_BYTES = 1
    if group_chunks is None:
        monkeypatch.setattr(workspace, "GROUP_BYTES", 1 << 40)
    else:
        monkeypatch.setattr(conv_plan, "group_images", lambda chunk, nbytes, n: min(n, group_chunks * chunk))
    fast = assert_paths_agree(seed_like, (3, 17, 22), n=7, threads=2)
    plan = next(p for p in fast.executor.shards[0].plans.values() if p.train)
    rows = fast.executor.stages[0].geom.rows
    sizes = [[chunk.z.shape[0] // rows for chunk in group.chunks] for group in plan.groups]
    k = plan.n if group_chunks is None else group_chunks
    assert sizes == [[1] * min(k, plan.n - a) for a in range(0, plan.n, k)]
    assert plan.n > 3
    assert_paths_agree(bn_blocks, (3, 12, 14), n=7, threads=2)


def test_group_images_are_whole_chunks_within_the_batch():
    bytes_per_image = 1000
    for chunk in (1, 3, 7):
        for n in (1, 5, 20, 200):
            k = workspace.group_images(min(chunk, n), bytes_per_image, n)
            assert 1 <= k <= n
            assert k == n or k % min(chunk, n) == 0
    assert workspace.group_images(2, 10 * workspace.GROUP_BYTES, 100) == 2  # one chunk over the size: no grouping
    assert workspace.group_images(2, workspace.GROUP_BYTES // 8, 100) == 8


def test_k_major_blocks_with_phase_planes_and_without(monkeypatch, thread_shards):
    # Every conv K-major (as a first conv on few channels is): where the input gradient
    # is not needed, or comes from the im2col of dz, im2col is copied from phase planes.
    from xpnet.cpu import conv_block
    monkeypatch.setattr(conv_block.ConvBlock, "KMAJOR_BELOW_BYTES", 1 << 20)

    def layers():
        return [Conv2D(4, (3, 2), stride=(2, 1), pad=(1, 2)), ReLU(), MaxPool2D(2),
                Conv2D(5, 3, pad="same"), ReLU(), MaxPool2D((1, 2)), Conv2D(3, 2), Flatten(), Dense(4)]
    for input_grad in (False, True):
        fast = assert_paths_agree(layers, (2, 19, 23), n=7, threads=2, input_grad=input_grad)
        used = [p.phase_planes is not None for sh in fast.executor.shards for p in sh.plans.values() if p.train]
        assert any(used) and not all(used)  # the last conv (pad 0, input gradient tap by tap) has none
    config.set_im2col_budget(0.0001)  # the planes do not fit: the strided copy, same results
    fast = assert_paths_agree(layers, (2, 19, 23), n=7, threads=2, input_grad=False)
    assert all(p.phase_planes is None for sh in fast.executor.shards for p in sh.plans.values())


def test_conv_layer_reports_its_im2col_bytes():
    m = xpnet.models.captcha_net()
    conv2 = m.layers[3]
    assert conv2.im2col_nbytes(500) == 500 * 13 * 37 * 32 * 9 * 4 == ops.im2col_nbytes((500, 32, 15, 39), 3)
    with pytest.raises(UsageError, match="not built"):
        Conv2D(4, 3).im2col_nbytes(1)


def test_same_seed_same_threads_is_bitwise_reproducible_and_thread_count_only_reorders_sums(rng):
    xpnet.set_dtype(np.float32)
    x = rng.standard_normal((16, 3, 32, 40)).astype(np.float32)
    t = (rng.random((16, 144)) < 0.1).astype(np.float32)

    def train(threads, steps=3):
        xpnet.set_num_threads(threads)
        xpnet.seed(0)
        m = xpnet.models.captcha_net_bn(input_shape=(3, 32, 40), width=4)
        for _ in range(steps):
            _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), t)
            m.backward(d)
            for p, g in zip(m.parameters().values(), m.gradients().values()):
                p -= 0.1 * g
        return m.state_dict()

    a, b = train(2), train(2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # A different thread count adds the partial sums in another order: close, not equal
    # (after one step: later steps amplify float32 rounding in this small BN network).
    a, c = train(2, steps=1), train(1, steps=1)
    for k in a:
        assert_allclose(a[k], c[k], kind="model", err_msg=k)


def test_errors_match_the_plain_path(rng):
    m = Sequential(seed_like(), input_shape=(3, 17, 22))
    x = rng.standard_normal((6, 3, 17, 22)).astype(np.float32)
    with pytest.raises(UsageError, match="without a forward"):
        m.backward(np.zeros((6, 5), np.float32))
    m.forward(x, train=True)
    m.forward(x, train=False)  # evaluation drops what backward needs, as on the plain path
    with pytest.raises(UsageError, match="without a forward"):
        m.backward(np.zeros((6, 5), np.float32))
    m.forward(x, train=True)
    with pytest.raises(ShapeError, match="expected"):
        m.backward(np.zeros((5, 5), np.float32))


def test_error_in_one_shard_reaches_the_caller_and_the_pool_recovers(rng, thread_shards):
    m = Sequential([Dense(4), BatchNorm(), Dense(2)], input_shape=(3,))
    x = rng.standard_normal((8, 3)).astype(np.float32)
    xpnet.set_num_threads(2)
    m.forward(x, train=True)
    stage = m.executor.stages[0]
    original = stage.forward

    def broken(h, sh, step):
        if sh.k == 1:
            raise RuntimeError("shard 1 failed")
        return original(h, sh, step)

    stage.forward = broken
    with pytest.raises(RuntimeError, match="shard 1 failed"):
        m.forward(x, train=True)  # shard 0 waits at BatchNorm's barrier: it must be released
    stage.forward = original
    y = m.forward(x, train=True)
    assert y.shape == (8, 2) and np.isfinite(y).all()


def test_buffers_are_reused_after_the_first_step(rng, thread_shards):
    m = xpnet.models.captcha_net(input_shape=(3, 32, 40))
    x = rng.standard_normal((8, 3, 32, 40)).astype(np.float32)
    t = np.zeros((8, 144), np.float32)

    def step():
        _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), t)
        m.backward(d)

    def buffers():
        return sorted((sh.k, key, name, id(v)) for sh in m.executor.shards for key, p in sh.plans.items()
                      if key[2] for name, v in vars(p).items() if isinstance(v, np.ndarray))

    step()
    before = buffers()
    step()
    m.forward(x[:5], train=False)  # another batch size gets its own plan...
    step()
    assert buffers() == before and len(before) > 10  # ...and the training plan survives


@pytest.mark.parametrize("shape, dtype", [((3, 5, 7), np.float32), (17, np.float64), ((0, 4), np.float32),
                                           ((2, 3), bool), ((), np.float32)])
def test_workspace_buffers_start_on_a_cache_line(shape, dtype):
    bufs = [workspace.aligned_buffer(shape, dtype, zero=True) for _ in range(8)]
    for b in bufs:
        assert b.ctypes.data % workspace.ALIGN_BYTES == 0 or b.size == 0  # (no bytes: no address to speak of)
        assert b.shape == np.empty(shape).shape and b.dtype == np.dtype(dtype)
        assert b.flags.c_contiguous and b.flags.writeable and not b.any()
    if bufs[0].size:  # separate memory: writing one leaves the others as they were
        bufs[0].fill(1)
        assert bufs[0].all() and not any(b.any() for b in bufs[1:])


def test_every_conv_block_buffer_comes_from_the_aligned_workspace(rng, thread_shards):
    models = [(xpnet.models.captcha_net_bn(input_shape=(3, 16, 40), width=8), 6),
              (xpnet.models.captcha_net(input_shape=(3, 32, 40)), 5)]
    whole = {"y", "winner_records", "dpooled", "relu_positive", "dweight_matrix", "dweight_chunk", "col",
             "phase_planes", "input_buffer", "dx_buffer", "z_shard", "du_shard", "tap_slabs", "dz_col", "dz_padded"}
    checked = set()
    for m, n in models:
        x = rng.standard_normal((n,) + m.input_shape).astype(np.float32)
        _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), np.zeros((n, 144), np.float32))
        m.backward(d)
        m.forward(x, train=False)
        blocks = [st for st in m.executor.stages if hasattr(st, "weight_matrix")]
        assert len(blocks) == sum(isinstance(layer, Conv2D) for layer in m.layers)  # one block per conv
        for blk in blocks:
            for w in (*blk.weight_matrix.values(), *blk.bias.values(), blk.weight_taps):
                assert w is None or w.ctypes.data % workspace.ALIGN_BYTES == 0
        for sh in m.executor.shards:
            for p in sh.plans.values():
                for name, v in vars(p).items():
                    if not isinstance(v, np.ndarray):
                        continue
                    # every buffer and view is carved from a workspace's raw bytes...
                    assert v.base is not None and v.base.dtype == np.uint8, name
                    if name in whole:  # ...and each whole buffer starts on a cache line
                        assert v.ctypes.data % workspace.ALIGN_BYTES == 0, name
                        checked.add(name)
    assert {"y", "winner_records", "dpooled", "dweight_matrix", "col", "phase_planes", "input_buffer", "dx_buffer",
            "z_shard", "tap_slabs", "dz_col", "dz_padded"} <= checked


def test_switch_and_conditions_for_the_fast_path(rng):
    m = Sequential(seed_like(), input_shape=(3, 17, 22))
    x = rng.standard_normal((4, 3, 17, 22)).astype(np.float32)
    with xpnet.fast_paths(False):
        assert not xpnet.fast_paths_enabled()
        assert xpnet.dispatch.chain_for(m, x) is None
    assert xpnet.fast_paths_enabled()
    assert xpnet.dispatch.chain_for(m, x) is not None
    assert xpnet.dispatch.chain_for(m, x.tolist()) is None  # only NumPy arrays (never CuPy) take it

    class MyReLU(ReLU):  # an unknown layer type: the whole model stays on the plain path
        pass

    m2 = Sequential([Dense(3), MyReLU(), Dense(2)], input_shape=(4,))
    assert xpnet.dispatch.chain_for(m2, np.zeros((2, 4), np.float32)) is None
    with pytest.raises(UsageError):
        xpnet.set_num_threads(0)


def test_predict_and_gradients_are_fresh_arrays(rng):
    m = Sequential(seed_like(), input_shape=(3, 17, 22))
    x = rng.standard_normal((6, 3, 17, 22)).astype(np.float32)
    t = np.zeros((6, 5), np.float32)
    y1 = m.forward(x, train=True)
    _, d = ops.sigmoid_bce_with_logits(y1, t)
    m.backward(d)
    g1 = m.gradients()["conv1.W"]
    kept = y1.copy(), g1.copy()
    y2 = m.forward(x[::-1].copy(), train=True)
    _, d = ops.sigmoid_bce_with_logits(y2, t)
    m.backward(d)
    np.testing.assert_array_equal(y1, kept[0])  # not overwritten by the next step
    np.testing.assert_array_equal(g1, kept[1])
    assert m.gradients()["conv1.W"] is not g1


def test_ufunc_buffer_size_is_set_in_every_shard_and_restored_for_the_caller(rng, monkeypatch, thread_shards):
    # The executor shrinks NumPy's ufunc buffer inside its shards (strided views run
    # without copies through buffers); the caller's own setting must come back.
    seen = []
    real = stages.ReLUStage.forward

    def spy(self, x, sh, step):
        seen.append(np.getbufsize())
        return real(self, x, sh, step)

    monkeypatch.setattr(stages.ReLUStage, "forward", spy)
    xpnet.set_num_threads(2)
    m = Sequential([Flatten(), Dense(6), ReLU(), Dense(3)], input_shape=(2, 3, 3))
    x = rng.standard_normal((16, 2, 3, 3)).astype(np.float32)
    saved = np.setbufsize(4096)
    try:
        m.forward(x, train=False)
        assert np.getbufsize() == 4096
    finally:
        np.setbufsize(saved)
    assert seen == [fuse.UFUNC_BUFSIZE] * 2  # both shards, the calling thread's included


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_sums_match_a_float64_sum_and_grow_their_ones(rng, dtype):
    for rows in (1, 37, 5000, 9001):  # past the first ones vector (4096)
        a = rng.standard_normal((rows, 33)).astype(dtype)
        got = workspace.column_sums(a)
        assert got.dtype == dtype and got.shape == (33,)
        want = a.astype(np.float64).sum(axis=0)
        if dtype == np.float32:  # float32 accumulation: error grows with the row count
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-7 * rows)
        else:
            assert_allclose(got, want, kind="op")
    strided = rng.standard_normal((50, 20)).astype(dtype)[::2, ::3]
    np.testing.assert_allclose(workspace.column_sums(strided), strided.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)


def test_error_in_one_shards_backward_releases_the_other_from_the_gradient_barrier(rng):
    m = Sequential([Dense(4), ReLU(), Dense(2)], input_shape=(3,))  # no BatchNorm: the only barrier is the sum
    x = rng.standard_normal((8, 3)).astype(np.float32)
    d = np.ones((8, 2), np.float32)
    xpnet.set_num_threads(2)
    m.forward(x, train=True)
    m.backward(d)
    want = {k: v.copy() for k, v in m.gradients().items()}
    stage = m.executor.stages[0]
    original = stage.backward

    def broken(dy, sh, step, need_dx):
        if sh.k == 0:
            raise RuntimeError("shard 0 failed")
        return original(dy, sh, step, need_dx)

    stage.backward = broken
    m.forward(x, train=True)
    with pytest.raises(RuntimeError, match="shard 0 failed"):
        m.backward(d)  # shard 1 waits at the gradient barrier: it must be released
    stage.backward = original
    m.forward(x, train=True)
    m.backward(d)
    for k, v in m.gradients().items():
        np.testing.assert_array_equal(v, want[k])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_kept_gradient_is_not_changed_by_the_next_step(rng, threads):
    # A 1x1 conv on one channel: its (KH*KW*C, F) weight-gradient matrix is already
    # contiguous once transposed, so a view would have handed out the block's reused buffer.
    xpnet.set_num_threads(threads)
    m = Sequential([Conv2D(4, 1), ReLU(), MaxPool2D(2), Flatten(), Dense(3)], input_shape=(1, 6, 6))
    x = rng.standard_normal((8, 1, 6, 6)).astype(np.float32)
    t = np.zeros((8, 3), np.float32)

    def step(x):
        _, d = ops.sigmoid_bce_with_logits(m.forward(x, train=True), t)
        m.backward(d)
        return m.gradients()

    kept = step(x)
    copies = {k: v.copy() for k, v in kept.items()}
    step(3 * x)
    for k, v in kept.items():
        np.testing.assert_array_equal(v, copies[k], err_msg=k)


@pytest.mark.parametrize("between", ["conv block", "dropout"])
def test_blocks_reading_their_input_in_place_match_the_plain_path_step_after_step(rng, between):
    # From the second step a pad-0 block that is not the first reads the previous block's
    # output where it lies (no copy); after a dropout that output is a new array each
    # step (the block copies it, or reads it in place when it lands where the last one
    # was).  Three SGD steps on both paths.
    def layers():
        mid = [ReLU(), MaxPool2D(2)] if between == "conv block" else [ReLU(), Dropout(0.3)]
        return [Conv2D(4, 3)] + mid + [Conv2D(6, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(5)]
    xpnet.set_dtype(np.float64)
    xpnet.set_num_threads(2)
    xpnet.seed(3)
    ref = Sequential(layers(), input_shape=(3, 17, 22))
    fast = ref.clone()
    ref.compute_input_grad = fast.compute_input_grad = True
    x = rng.standard_normal((7, 3, 17, 22))
    t = (rng.random((7, 5)) < 0.3).astype(np.float64)
    opts = {id(m): xpnet.optim.SGD(m, lr=0.1, momentum=0.9) for m in (ref, fast)}
    for step in range(3):
        outs = {}
        for m, on in ((ref, False), (fast, True)):
            with xpnet.fast_paths(on):
                xpnet.seed(100 + step)
                logits = m.forward(x * (1 + step), train=True)
                _, d = ops.sigmoid_bce_with_logits(logits, t)
                dx = m.backward(d)
                opts[id(m)].step()
                outs[on] = (logits, dx, {k: v.copy() for k, v in m.gradients().items()})
        assert_allclose(outs[True][0], outs[False][0], kind="op", err_msg=f"logits, step {step}")
        assert_allclose(outs[True][1], outs[False][1], kind="op", err_msg=f"input gradient, step {step}")
        for k in outs[False][2]:
            assert_allclose(outs[True][2][k], outs[False][2][k], kind="op", err_msg=f"{k}, step {step}")
    second = [s for s in fast.executor.stages if type(s).__name__ == "ConvBlock"][1]
    plans = [p for sh in fast.executor.shards for k, p in sh.plans.items() if k[0] == second.index and k[2]]
    if between == "conv block":  # after a dropout it depends on where the allocator puts each new output
        assert plans and all(p.source_key != conv_block_key(p.padded_input) for p in plans)


def conv_block_key(a):
    from xpnet.cpu.conv_plan import buffer_key
    return buffer_key(a)


def test_gradient_dtypes_do_not_depend_on_the_thread_count(rng):
    # The shards' partial gradients are summed in place: the total keeps their dtype,
    # as one shard hands it out (a float64 d(logits) on a float32 model widens Dense's).
    x = rng.standard_normal((8, 2, 6, 6)).astype(np.float32)
    d = rng.standard_normal((8, 3))  # float64
    dtypes = []
    for threads in (1, 2):
        xpnet.set_num_threads(threads)
        xpnet.seed(0)
        m = Sequential([Conv2D(3, 3), ReLU(), MaxPool2D(2), Flatten(), Dense(3)], input_shape=(2, 6, 6))
        m.forward(x, train=True)
        m.backward(d)
        dtypes.append({k: v.dtype for k, v in m.gradients().items()})
    assert dtypes[0] == dtypes[1]


def test_the_callers_numpy_error_handling_applies_in_every_shard(rng):
    xpnet.set_num_threads(2)
    m = Sequential([Flatten(), Dense(3)], input_shape=(4,))
    x = np.zeros((8, 4), np.float32)
    x[-1] = 3e38  # only the last shard overflows
    m.layers[1].params["W"][...] = 10
    with np.errstate(over="ignore"):
        assert np.isinf(m.forward(x, train=False)[-1]).all()
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        m.forward(x, train=False)


def test_batch_statistics_combine_shards_of_very_different_means_in_one_all_reduce():
    # Three shards whose values sit around 0, 50 and 1000 (spread 1 to 3), each in uneven
    # chunks: the combined mean and variance match float64 numpy over all values, every shard
    # gets the same bits, and each calls the all-reduce (a barrier) once.
    import threading

    from xpnet.cpu.threads import Reducer

    class CountingReducer(Reducer):
        def __init__(self, t):
            super().__init__(t)
            self.calls = [0] * t

        def allreduce(self, k, key, value):
            self.calls[k] += 1
            return super().allreduce(k, key, value)

    rng = np.random.default_rng(9)
    shards = [[rng.normal(c, s, (r, 4)).astype(np.float32) for r in rows]
              for c, s, rows in ((0.0, 1.0, (7, 30)), (50.0, 2.0, (13,)), (1000.0, 3.0, (5, 9, 21)))]
    everything = np.concatenate([a for parts in shards for a in parts]).astype(np.float64)
    reducer = CountingReducer(3)
    step = type("OneStep", (), {"reducer": reducer})()
    results = [None] * 3

    def run(k):
        stats = stages.BatchStats()
        for chunk in shards[k]:
            stats.add(stages.batch_moments(chunk, np.float32))
        results[k] = stats.finish(stages.Shard(k), step, ("bn",), everything.shape[0])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for mean, var in results:
        np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(var, everything.var(axis=0), rtol=1e-5)
        assert mean.tobytes() == results[0][0].tobytes() and var.tobytes() == results[0][1].tobytes()
    assert reducer.calls == [1, 1, 1]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_statistics_of_an_rgb_first_block(dtype, thread_shards):
    # Three channels: 27 values an im2col row, read K-major in float32 and row-major in float64
    # (72 bytes a window row); both take the Gram path and match the plain path.
    def layers():
        return [Conv2D(5, 3, pad="same", bias=False), BatchNorm(), ReLU(), MaxPool2D(2), Conv2D(4, 3, pad=1),
                ReLU(), Flatten(), Dense(3)]
    fast = assert_paths_agree(layers, (3, 10, 14), n=9, dtype=dtype, threads=2, input_grad=False)
    assert fast.executor.stages[0].kmajor == (dtype == np.float32)
    plans = [p for sh in fast.executor.shards for p in sh.plans.values() if p.train and p.gram_stats]
    assert len(plans) == 2 and all(p.col_gram is not None for p in plans)
