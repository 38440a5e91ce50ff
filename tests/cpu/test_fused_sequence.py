"""The fused CPU path for sequence models (a CRNN reader: conv blocks -> Columns -> GRU ->
TimeDense, trained with CTC) against the plain layer-by-layer path."""

import numpy as np
import pytest

import xpnet
from xpnet import ops
from xpnet.cpu import executor as fuse
from xpnet.nn.recurrent import GRU
from xpnet.nn.sequence import Columns, TimeDense
from xpnet.nn.layers import Conv2D, MaxPool2D, ReLU

from .test_fused_executor import (_restore_settings, assert_paths_agree, one_step,  # noqa: F401  (fixtures)
                                  thread_shards)
from xpnet.testing import assert_allclose


def ctc(labels, lengths):
    def loss(logits, _t):
        return ops.ctc_loss(logits, labels, lengths, blank=0)
    return loss


def small_crnn(batchnorm):
    """captcha_crnn in miniature: (1, 16, 24) -> 3 blocks -> T = 6 steps of 8*2 features -> GRU(5) -> 5 classes."""
    return lambda: xpnet.models.captcha_crnn(n_classes=4, input_shape=(1, 16, 24), channels=(3, 4, 8), hidden=5,
                                             batchnorm=batchnorm).layers


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_crnn_with_ctc_matches_plain_path(batchnorm, dtype, threads):
    n = 9  # two uneven shards (4 + 5) with 2 threads
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 4, n)
    labels = rng.integers(1, 5, (n, 3))
    fast = assert_paths_agree(small_crnn(batchnorm), (1, 16, 24), n=n, dtype=dtype, threads=threads,
                              loss=ctc(labels, lengths), targets=lengths)
    names = [type(s).__name__ for s in fast.executor.stages]
    # the (2, 1) pool of the third block is fused into it, like the 2x2 ones
    assert names == ["ConvBlock"] * 3 + ["ColumnsStage", "GRUStage", "TimeDenseStage"]
    assert all(len(s.layers) == (4 if batchnorm else 3) for s in fast.executor.stages[:3])
    assert fast.executor.threads_for(n) == threads


def test_sequence_layers_after_a_plain_pool_one_way_gru_and_no_bias():
    # Columns after a MaxPool2D stage (NCHW input, not a conv block's NHWC), a one-way GRU,
    # a TimeDense without bias and a second GRU reading its output.
    def layers():
        return [Conv2D(3, 3, pad=1), ReLU(), MaxPool2D(3, stride=2), Columns(), GRU(4, bidirectional=False),
                TimeDense(6, bias=False), GRU(3), TimeDense(4)]
    fast = assert_paths_agree(layers, (2, 9, 11), n=10, threads=2)
    assert "PoolStage" in [type(s).__name__ for s in fast.executor.stages]


def test_crnn_runs_on_the_fused_executor():
    m = xpnet.models.captcha_crnn(batchnorm=True)
    x = np.zeros((8,) + m.input_shape, np.float32)
    y = m.forward(x, train=False)
    assert isinstance(m.executor, fuse.FusedExecutor) and y.shape == (8, 20, 37)
    assert fuse.plannable(m)


def test_stacked_gru_equals_the_reference_op_per_direction():
    # direction 1 of the stack reads the reversed sequence: the reference op with reverse=True
    from xpnet.cpu.stacked_gru import stacked_gru_backward, stacked_gru_forward, time_major
    from xpnet.ops.recurrent import gru_backward, gru_forward
    rng = np.random.default_rng(8)
    n, t_len, f, h = 3, 5, 4, 2
    x = rng.standard_normal((n, t_len, f))
    wx, wh = rng.standard_normal((2, f, 3 * h)), rng.standard_normal((2, h, 3 * h))
    bx, bh = rng.standard_normal((2, 3 * h)), rng.standard_normal((2, 3 * h))
    dy = rng.standard_normal((2, n, t_len, h))  # batch-major, time order, per direction
    states, cache = stacked_gru_forward(time_major(x, 2), wx, wh, bx, bh)
    dys = np.stack([dy[0].transpose(1, 0, 2), dy[1][:, ::-1].transpose(1, 0, 2)])
    dxs, dwx, dwh, dbx, dbh = stacked_gru_backward(dys, cache)
    dx_total = dxs[0].transpose(1, 0, 2) + dxs[1][::-1].transpose(1, 0, 2)
    dx_ref = np.zeros_like(x)
    for d, reverse in ((0, False), (1, True)):
        y, c = gru_forward(x, wx[d], wh[d], bx[d], bh[d], reverse=reverse)
        mine = states[d, 1:][::-1] if reverse else states[d, 1:]
        np.testing.assert_allclose(mine.transpose(1, 0, 2), y, rtol=1e-12, atol=1e-12)
        ref = gru_backward(dy[d], c)
        dx_ref += ref[0]
        for got, want in zip((dwx[d], dwh[d], dbx[d], dbh[d]), ref[1:]):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx_total, dx_ref, rtol=1e-10, atol=1e-12)
    assert stacked_gru_backward(dys, cache, need_dx=False)[0] is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_crnn_without_input_gradient_matches_plain_path(dtype):
    # no input gradient: the first BatchNorm block forms its weight gradient from the Gram matrix of its im2col rows
    n = 9
    rng = np.random.default_rng(6)
    lengths = rng.integers(1, 4, n)
    labels = rng.integers(1, 5, (n, 3))
    assert_paths_agree(small_crnn(True), (1, 16, 24), n=n, dtype=dtype, threads=2, input_grad=False,
                       loss=ctc(labels, lengths), targets=lengths)


def test_reused_gru_buffers_across_steps_and_batch_sizes(thread_shards):
    # The GRU stage keeps its work arrays per shard from step to step: every step of a run
    # whose batch size changes must still match the plain path, and what a step returned
    # (logits, gradients, the input gradient) must not change under later steps.
    xpnet.set_dtype(np.float64)
    xpnet.seed(3)
    ref = xpnet.models.captcha_crnn(n_classes=4, input_shape=(1, 16, 24), channels=(3, 4, 8), hidden=5)
    fast = ref.clone()
    xpnet.set_num_threads(2)
    rng = np.random.default_rng(2)
    kept, buffers_after = [], []
    for n in (9, 6, 9, 9):
        x = rng.standard_normal((n, 1, 16, 24))
        lengths = rng.integers(1, 4, n)
        labels = rng.integers(1, 5, (n, 3))
        a = one_step(ref, x, lengths, fast=False, loss=ctc(labels, lengths))
        b = one_step(fast, x, lengths, fast=True, loss=ctc(labels, lengths))
        for got, want in ((b[0], a[0]), (b[2], a[2])):
            assert_allclose(got, want, kind="op")
        for name in a[1]:
            assert_allclose(b[1][name], a[1][name], kind="op", err_msg=name)
        kept.append((b, {k: v.copy() for k, v in (("logits", b[0]), ("dx", b[2]))}))
        gru = next(s for s in fast.executor.stages if type(s).__name__ == "GRUStage")
        buffers_after.append({k: v for k, v in fast.executor.shards[0].buffers.items() if k[0] == gru.index})
    for b, copies in kept:
        np.testing.assert_array_equal(b[0], copies["logits"])
        np.testing.assert_array_equal(b[2], copies["dx"])
    # the last two steps (same size) used the very same arrays; the size change made new ones
    assert {k[1] for k in buffers_after[2]} >= {"xs", "gates", "states", "coef_h", "dgx", "dxs"}
    assert all(buffers_after[3][k] is v for k, v in buffers_after[2].items())
    assert not any(buffers_after[1][k] is v for k, v in buffers_after[0].items())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_first_block_statistics_from_the_gram_matrix(dtype, thread_shards):
    # captcha_crnn's first block (BatchNorm, a pool, no bias, no input gradient, 3x3 on one
    # channel) takes its BatchNorm statistics from the Gram matrix of its im2col rows when every
    # gamma is positive, and from z otherwise; both must match the plain path, also for inputs
    # whose mean is large against their spread (where E[z^2] - mean^2 could lose digits).
    def gram_steps(model):
        return [p.col_gram is not None for sh in model.executor.shards for p in sh.plans.values()
                if p.train and p.gram_stats]

    n = 9
    rng = np.random.default_rng(4)
    lengths, labels = rng.integers(1, 4, n), rng.integers(1, 5, (n, 3))
    fast = assert_paths_agree(small_crnn(True), (1, 16, 24), n=n, dtype=dtype, loss=ctc(labels, lengths),
                              targets=lengths, input_grad=False)
    assert gram_steps(fast) and all(gram_steps(fast))

    def negative_gamma(model):
        model.layers[1].params["gamma"][0] = -0.5
    fast = assert_paths_agree(small_crnn(True), (1, 16, 24), n=n, dtype=dtype, loss=ctc(labels, lengths),
                              targets=lengths, input_grad=False, prepare=negative_gamma)
    assert gram_steps(fast) and not any(gram_steps(fast))


def test_gram_statistics_of_inputs_far_from_zero(thread_shards):
    # Inputs around 1000 with a spread of 1 and no padding: z's mean is ~1000 times its spread,
    # so E[z^2] - mean^2, and dW's z*c_z + c_0 part formed from the Gram matrix, cancel almost
    # everything.  Against a float64 step, the fused float32 step must be about as accurate as
    # the plain float32 one (float32 Gram sums, as before, were 15x worse).
    channels = 1
    from xpnet.nn.layers import BatchNorm, Dense, Flatten
    from xpnet.nn.sequential import Sequential

    def step(dtype, fast):
        xpnet.set_dtype(dtype)
        xpnet.seed(3)
        model = Sequential([Conv2D(4, 3, bias=False), BatchNorm(), ReLU(), MaxPool2D(2), Flatten(), Dense(3)],
                           input_shape=(channels, 10, 14))
        rng = np.random.default_rng(8)
        x = (1000 + rng.standard_normal((8, channels, 10, 14))).astype(dtype)
        t = (rng.random((8, 3)) < 0.5).astype(dtype)
        out = one_step(model, x, t, fast=fast, input_grad=False)
        if fast:
            plans = [p for sh in model.executor.shards for p in sh.plans.values() if p.train]
            assert plans and all(p.col_gram is not None for p in plans)
        return out

    def error(got, want):
        return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())

    xpnet.set_num_threads(2)
    truth, plain, fast = step(np.float64, False), step(np.float32, False), step(np.float32, True)
    w = next(k for k in truth[1] if k.endswith(".W") and k.startswith("conv"))
    var = next(k for k in truth[4] if k.endswith("running_var"))
    assert error(fast[1][w], truth[1][w]) <= 2 * error(plain[1][w], truth[1][w]) + 1e-6
    assert error(fast[4][var] - 0.9, truth[4][var] - 0.9) < 1e-4  # the running variance's move
    assert error(fast[0], truth[0]) < 1e-3
