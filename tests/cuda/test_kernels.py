"""xpnet's CUDA kernels against the generic ops, on three runtimes.

* ``emulated``: the kernels' CUDA C compiled with the host C++ compiler and run
  on the CPU (``xpnet.cuda.emulate``), through the same Python wrappers the GPU
  uses -- catches index arithmetic and marshalling bugs in CI.
* ``cupy`` (``gpu`` marker): the real kernels on a CUDA device, compared with
  NumPy *and* with the generic CuPy path (kernels switched off).
* compile checks: ``nvcc -c`` for sm_90 and, where CuPy's NVRTC bindings load,
  NVRTC itself.

Inputs are drawn from NumPy's RNG; max-pool inputs are tie-free permutations.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import oracles
import xpnet
from xpnet import backend, ops
from xpnet.cuda import emulate
from xpnet.cuda import kernels as K
from xpnet.cuda.source import KERNEL_NAMES, module_source
from xpnet.errors import BackendError, ShapeError
from xpnet.ops.im2col import pair
from xpnet.testing import assert_allclose

DTYPES = [np.float32, np.float64]

# x shape (N, C, H, W), kernel, stride, pad: odd sizes, rectangular kernels,
# strides > 1, padding on one or both axes, windows that leave rows unread.
CONV_CASES = [
    ((2, 3, 9, 11), (3, 3), 1, 0),
    ((3, 2, 8, 7), (4, 3), (2, 1), (1, 2)),
    ((1, 4, 5, 5), (1, 1), 1, 0),
    ((2, 1, 7, 6), (5, 4), (3, 2), (2, 3)),
    ((2, 3, 6, 13), (2, 2), 2, 0),
]
# Pool: size, stride, pad on a (2, 3, 9, 7) input.
POOL_CASES = [(2, None, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 1)), (3, 1, 1), ((1, 2), None, 0), (3, None, 0)]
POOL_SHAPE = (2, 3, 9, 7)


class Device:
    """A runtime plus the doors to it: put (host -> runtime arrays), get (-> NumPy)."""

    def __init__(self, name, rt, put, get):
        self.name, self.rt, self.put, self.get = name, rt, put, get

    def generic(self, fn, *args, **kwargs):
        """The generic xp op on this device's arrays (kernels off), or None in the emulation."""
        if self.name != "cupy":
            return None
        with xpnet.reference_paths():
            return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def emulated_rt():
    if emulate.find_cxx() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) for the CPU emulation of the CUDA kernels")
    return emulate.EmulatedRuntime()


@pytest.fixture(params=["emulated", pytest.param("cupy", marks=pytest.mark.gpu)])
def dev(request):
    if request.param == "emulated":
        return Device("emulated", request.getfixturevalue("emulated_rt"), np.array, np.asarray)
    return Device("cupy", K.CupyRuntime(), backend.cupy.asarray, backend.to_numpy)


def tie_free(rng, shape, dtype, scale=0.01):
    """Distinct values (a permutation), so every window has one maximum."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 3) * scale).reshape(shape).astype(dtype)


# ------------------------------------------------------------------- im2col

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_matches_op(dev, rng, dtype, case):
    shape, kernel, stride, pad = case
    x = rng.standard_normal(shape).astype(dtype)
    xd = dev.put(x)
    col = K._im2col(dev.rt, xd, kernel, stride, pad)
    expected = ops.im2col(x, kernel, stride, pad)
    got = dev.get(col)
    assert got.dtype == dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)  # a copy: exact
    generic = dev.generic(ops.im2col, xd, kernel, stride, pad)
    if generic is not None:
        assert np.array_equal(got, dev.get(generic))
    assert np.array_equal(dev.get(xd), x)  # input untouched


def test_im2col_noncontiguous_input_and_out_buffer(dev, rng):
    base = rng.standard_normal((2, 9, 3, 11)).astype(np.float32)
    x = base.transpose(0, 2, 1, 3)[:, :, ::-1]  # strided, negative stride
    expected = ops.im2col(np.ascontiguousarray(x), (3, 2), (2, 1), (1, 0))
    xd = dev.put(base).transpose(0, 2, 1, 3)[:, :, ::-1]
    out = dev.put(np.zeros(expected.shape, np.float32))
    res = K._im2col(dev.rt, xd, (3, 2), (2, 1), (1, 0), out=out)
    assert res is out and np.array_equal(dev.get(out), expected)
    with pytest.raises(ShapeError, match="out buffer"):
        K._im2col(dev.rt, xd, (3, 3), 1, 0, out=out)


# ------------------------------------------------------------------- col2im

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_matches_op_and_is_deterministic(dev, rng, dtype, case):
    shape, kernel, stride, pad = case
    col_shape = ops.im2col(np.zeros(shape, dtype), kernel, stride, pad).shape
    c = rng.standard_normal(col_shape).astype(dtype)
    cd = dev.put(c)
    dx = K._col2im(dev.rt, cd, shape, kernel, stride, pad)
    got = dev.get(dx)
    assert_allclose(got, ops.col2im(c, shape, kernel, stride, pad))
    again = dev.get(K._col2im(dev.rt, cd, shape, kernel, stride, pad))
    assert got.tobytes() == again.tobytes()  # gather, fixed order: bitwise equal
    generic = dev.generic(ops.col2im, cd, shape, kernel, stride, pad)
    if generic is not None:
        assert_allclose(got, dev.get(generic))
    assert np.array_equal(dev.get(cd), c)


@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_is_the_adjoint_of_im2col(dev, rng, case):
    """<im2col(x), c> == <x, col2im(c)> in float64: independent of any reference code."""
    shape, kernel, stride, pad = case
    x = rng.standard_normal(shape)
    col = dev.get(K._im2col(dev.rt, dev.put(x), kernel, stride, pad))
    c = rng.standard_normal(col.shape)
    back = dev.get(K._col2im(dev.rt, dev.put(c), shape, kernel, stride, pad))
    assert np.isclose(np.vdot(col, c), np.vdot(x, back), rtol=1e-12, atol=1e-12)


def test_col2im_rejects_a_wrong_shape(dev):
    with pytest.raises(ShapeError, match="col has shape"):
        K._col2im(dev.rt, dev.put(np.zeros((1, 2, 2, 1, 3, 3), np.float32)), (1, 1, 5, 5), 3, 1, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cnhw_column_layout_kernels(dev, rng, dtype, case):
    """colT (C, KH, KW, N, OH, OW) is im2col's col with its axes moved; col2im_cnhw its adjoint."""
    shape, kernel, stride, pad = case
    x = rng.standard_normal(shape).astype(dtype)
    expected = ops.im2col(x, kernel, stride, pad).transpose(3, 4, 5, 0, 1, 2)
    colT = dev.get(K._im2col_cnhw(dev.rt, dev.put(x), kernel, stride, pad))
    assert colT.dtype == dtype and np.array_equal(colT, expected)
    c = rng.standard_normal(colT.shape).astype(dtype)
    dx = dev.get(K._col2im_cnhw(dev.rt, dev.put(c), shape, kernel, stride, pad))
    assert_allclose(dx, ops.col2im(np.ascontiguousarray(c.transpose(3, 4, 5, 0, 1, 2)), shape, kernel, stride, pad))
    assert dx.tobytes() == dev.get(K._col2im_cnhw(dev.rt, dev.put(c), shape, kernel, stride, pad)).tobytes()
    with pytest.raises(ShapeError, match="colT has shape"):
        K._col2im_cnhw(dev.rt, dev.put(c), (shape[0] + 1,) + shape[1:], kernel, stride, pad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias,relu", [(True, True), (True, False), (False, False)])
def test_fnp_to_nfp_epilogue(dev, rng, dtype, with_bias, relu):
    n, f, oh, ow = 3, 5, 4, 7
    yT = rng.standard_normal((f, n * oh * ow)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype) if with_bias else None
    expected = yT.reshape(f, n, oh, ow).transpose(1, 0, 2, 3)
    if with_bias:
        expected = expected + b.reshape(1, f, 1, 1)
    if relu:
        expected = ops.relu_forward(expected)[0]
    got = K._fnp_to_nfp(dev.rt, dev.put(yT), None if b is None else dev.put(b), (n, f, oh, ow), relu)
    assert np.array_equal(dev.get(got), expected)


# ---------------------------------------------------------------- max pooling

def window_positions(idx, size, stride, pad):
    """Window-local argmax -> (row, col) in unpadded input coordinates, as the oracle gives."""
    (kh, kw), (sh, sw), (ph, pw) = (pair(size, ""), pair(stride if stride is not None else size, ""),
                                    pair(pad, ""))
    oh, ow = idx.shape[2], idx.shape[3]
    rows = np.arange(oh)[:, None] * sh - ph + idx // kw
    cols = np.arange(ow)[None, :] * sw - pw + idx % kw
    return np.stack([rows, cols], axis=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("args", POOL_CASES)
def test_max_pool_matches_op_and_oracle(dev, rng, dtype, args):
    size, stride, pad = args
    x = tie_free(rng, POOL_SHAPE, dtype)
    xd = dev.put(x)
    y, idx = K._max_pool_forward(dev.rt, xd, size, stride, pad)
    y_ref, cache = ops.max_pool2d_forward(x, size, stride, pad)
    y_naive, arg_naive = oracles.max_pool2d(x, pair(size, ""), pair(stride or size, ""), pair(pad, ""))
    got_y, got_idx = dev.get(y), dev.get(idx)
    assert got_y.dtype == dtype and got_idx.dtype == np.int32
    assert np.array_equal(got_y, y_ref) and np.array_equal(got_y, y_naive.astype(dtype))
    assert np.array_equal(window_positions(got_idx, size, stride, pad), arg_naive)

    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dyd = dev.put(dy)
    dx = dev.get(K._max_pool_backward(dev.rt, dyd, idx, x.shape, size, stride, pad))
    assert_allclose(dx, ops.max_pool2d_backward(dy, cache))
    assert_allclose(dx, oracles.max_pool2d_backward(dy, arg_naive, x.shape).astype(dtype))
    again = dev.get(K._max_pool_backward(dev.rt, dyd, idx, x.shape, size, stride, pad))
    assert dx.tobytes() == again.tobytes()

    generic = dev.generic(ops.max_pool2d_forward, xd, size, stride, pad)
    if generic is not None:
        assert np.array_equal(got_y, dev.get(generic[0]))
        assert_allclose(dx, dev.get(dev.generic(ops.max_pool2d_backward, dyd, generic[1])))
    assert np.array_equal(dev.get(xd), x) and np.array_equal(dev.get(dyd), dy)


@pytest.mark.parametrize("args", POOL_CASES)
def test_max_pool_backward_fused_with_relu(dev, rng, args):
    """relu -> pool: routing dy * (y > 0) equals relu_backward(pool_backward(dy))."""
    size, stride, pad = args
    z = tie_free(rng, POOL_SHAPE, np.float64)
    z[:, :, :5] -= 1000.0  # the top rows all negative: ReLU makes whole windows of zeros
    a, relu_cache = ops.relu_forward(z)
    y, cache = ops.max_pool2d_forward(a, size, stride, pad)
    dy = rng.standard_normal(y.shape)
    expected = ops.relu_backward(ops.max_pool2d_backward(dy, cache), relu_cache)
    yd, idx = K._max_pool_forward(dev.rt, dev.put(a), size, stride, pad)
    got = dev.get(K._max_pool_backward(dev.rt, dev.put(dy), idx, a.shape, size, stride, pad, relu_y=yd))
    assert_allclose(got, expected)
    assert (dev.get(yd) == 0).any()  # the zero windows were exercised


def test_max_pool_first_maximum_wins_and_padding_never_wins(dev):
    x = np.full((1, 1, 4, 4), -5.0, np.float32)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = 3.0  # a tie inside one window
    y, idx = K._max_pool_forward(dev.rt, dev.put(x), 3, 1, 1)
    y, idx = dev.get(y), dev.get(idx)
    y_ref, _ = ops.max_pool2d_forward(x, 3, 1, 1)
    _, arg_naive = oracles.max_pool2d(x, (3, 3), (1, 1), (1, 1))
    assert np.array_equal(y, y_ref) and np.array_equal(window_positions(idx, 3, 1, 1), arg_naive)
    assert idx[0, 0, 1, 1] == 4  # window rows/cols 0..2 holds both 3.0s (positions 4 and 5): first wins
    assert idx[0, 0, 0, 0] == 8  # window rows/cols -1..1: the 3.0 at (1, 1) is its last cell
    assert (y > -np.inf).all()   # -5 beats padding


def test_max_pool_all_minus_inf_and_nan_follow_numpy_argmax(dev):
    x = np.full((1, 1, 4, 4), -np.inf, np.float64)
    x[0, 0, 3, 3] = np.nan
    y, idx = K._max_pool_forward(dev.rt, dev.put(x), 2, 2, 0)
    y_ref, _ = ops.max_pool2d_forward(x, 2, 2, 0)
    windows = x.reshape(1, 1, 2, 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(1, 1, 2, 2, 4)
    assert np.array_equal(dev.get(y), y_ref, equal_nan=True)
    assert np.array_equal(dev.get(idx), np.argmax(windows, axis=-1))  # all -inf: 0; NaN wins
    assert dev.get(idx)[0, 0, 1, 1] == 3 and dev.get(idx)[0, 0, 0, 0] == 0


def test_max_pool_rejects_bad_arguments(dev):
    x = dev.put(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ShapeError, match="at most half"):
        K._max_pool_forward(dev.rt, x, 2, 2, 2)
    with pytest.raises(ShapeError, match="does not fit"):
        K._max_pool_forward(dev.rt, x, 5, 1, 0)
    with pytest.raises(ShapeError, match="expected"):
        K._max_pool_backward(dev.rt, x, dev.put(np.zeros((1, 1, 4, 4), np.int32)), (1, 1, 4, 4), 2)
    with pytest.raises(ShapeError, match="float32 or float64"):
        K._max_pool_forward(dev.rt, dev.put(np.zeros((1, 1, 4, 4), np.int64)), 2)


# ------------------------------------------------- bias, ReLU, conv output layout

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias,relu", [(True, True), (True, False), (False, False)])
def test_nhwc_to_nchw_is_the_conv_output_epilogue(dev, rng, dtype, with_bias, relu):
    n, f, oh, ow = 3, 5, 4, 7
    x = rng.standard_normal((n, 2, 6, 9)).astype(dtype)
    w = rng.standard_normal((f, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype) if with_bias else None
    expected, _ = ops.conv2d_forward(x, w, b)  # bias added, NCHW
    if relu:
        expected = ops.relu_forward(expected)[0]
    y2 = ops.im2col(x, (3, 3)).reshape(n * oh * ow, -1) @ w.reshape(f, -1).T  # the conv's product
    got = K._nhwc_to_nchw(dev.rt, dev.put(y2), None if b is None else dev.put(b), (n, f, oh, ow), relu)
    assert_allclose(dev.get(got), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward(dev, rng, dtype):
    x = rng.standard_normal((4, 3, 5, 6)).astype(dtype)
    y, cache = ops.relu_forward(x)
    dy = rng.standard_normal(x.shape).astype(dtype)
    got = dev.get(K._relu_backward(dev.rt, dev.put(dy), dev.put(y)))
    assert np.array_equal(got, ops.relu_backward(dy, cache))


# ------------------------------------------------------------- fused loss

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_bce_with_logits(dev, rng, dtype, soft):
    x = (rng.standard_normal((9, 144)) * 5).astype(dtype)
    x[0, :4] = (1e4, -1e4, 80.0, -80.0)  # finite at the extremes
    t = rng.random(x.shape) if soft else (rng.random(x.shape) < 0.1)
    t = t.astype(dtype)
    loss, dlogits = K._sigmoid_bce_with_logits(dev.rt, dev.put(x), dev.put(t))
    loss_ref, d_ref = ops.sigmoid_bce_with_logits(x, t)
    got_loss, got_d = dev.get(loss), dev.get(dlogits)
    assert got_loss.shape == () and got_loss.dtype == dtype
    assert np.isfinite(got_loss) and np.isfinite(got_d).all()
    assert_allclose(got_loss, loss_ref)
    assert_allclose(got_d, d_ref)
    assert abs(float(got_loss) - oracles.bce_with_logits(x[1:], t[1:]) * 8 / 9
               - float(ops.sigmoid_bce_with_logits(x[:1], t[:1])[0]) / 9) < 1e-3 * abs(float(got_loss))
    loss2, d2 = K._sigmoid_bce_with_logits(dev.rt, dev.put(x), dev.put(t))
    assert dev.get(loss2).tobytes() == got_loss.tobytes() and dev.get(d2).tobytes() == got_d.tobytes()


def test_bce_rejects_mismatched_targets(dev):
    with pytest.raises(ShapeError, match="multi-hot rows"):
        K._sigmoid_bce_with_logits(dev.rt, dev.put(np.zeros((2, 3), np.float32)),
                                   dev.put(np.zeros((2, 4), np.float32)))


# ------------------------------------------------------ emulation specifics

def test_emulation_with_the_real_launch_shape(rng):
    """The GPU's own grid/block (256 threads) on small inputs, so the launch math is exercised."""
    if emulate.find_cxx() is None:
        pytest.skip("no C++ compiler for the CPU emulation")
    rt = emulate.EmulatedRuntime(launch="real")
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    col = K._im2col(rt, x, 3, 2, 1)
    assert np.array_equal(col, ops.im2col(x, 3, 2, 1))
    assert_allclose(K._col2im(rt, col, x.shape, 3, 2, 1), ops.col2im(col, x.shape, 3, 2, 1))
    xt = tie_free(rng, POOL_SHAPE, np.float32)
    y, idx = K._max_pool_forward(rt, xt, 3, 2, 1)
    assert np.array_equal(y, ops.max_pool2d_forward(xt, 3, 2, 1)[0])


def test_emulation_uses_64_bit_indices_when_arrays_are_huge(emulated_rt, rng, monkeypatch):
    monkeypatch.setattr(K, "_INT32_LIMIT", 10)  # pretend every array is huge
    x = rng.standard_normal((2, 3, 9, 7))
    start = len(emulated_rt.launches)
    col = K._im2col(emulated_rt, x, 3, 2, 1)
    y, idx = K._max_pool_forward(emulated_rt, tie_free(rng, POOL_SHAPE, np.float32), 3, 2, 1)
    assert np.array_equal(col, ops.im2col(x, 3, 2, 1))
    assert all(wide for _, _, wide, _ in emulated_rt.launches[start:])
    assert_allclose(K._col2im(emulated_rt, col, x.shape, 3, 2, 1), ops.col2im(col, x.shape, 3, 2, 1))


def test_emulation_catches_an_out_of_bounds_write(emulated_rt):
    """The guard zones work: a launch told to write past its array raises."""
    x = np.zeros((1, 1, 4, 4), np.float32)
    col = np.zeros((1, 2, 2, 1, 3, 3), np.float32)
    args = [("p", x), ("p", col), ("I", col.size + 5)] + K._window_args(1, 4, 4, 2, 2, 3, 3, 1, 1, 0, 0)
    with pytest.raises(BackendError, match="wrote outside an array"):
        emulated_rt.launch("xpnet_im2col", np.float32, False, col.size + 5, args)


def test_emulation_reads_outside_an_array_show_as_nan(emulated_rt):
    x = np.ones((1, 1, 4, 4), np.float32)
    col = np.zeros((1, 2, 2, 1, 3, 3), np.float32)
    # Claim the input is 8 rows high: the kernel reads past its end.
    args = [("p", x), ("p", col), ("I", col.size)] + K._window_args(1, 8, 4, 2, 2, 3, 3, 3, 1, 0, 0)
    emulated_rt.launch("xpnet_im2col", np.float32, False, col.size, args)
    assert np.isnan(col).any()


def test_wrappers_argument_lists_fit_the_kernel_signatures(emulated_rt):
    """The emulation checks every launch against the parsed CUDA signature; a wrong list fails."""
    assert set(emulate.kernel_signatures()) == set(KERNEL_NAMES)
    x = np.zeros((1, 1, 4, 4), np.float32)
    col = np.zeros((1, 2, 2, 1, 3, 3), np.float32)
    good = [("p", x), ("p", col), ("I", col.size)] + K._window_args(1, 4, 4, 2, 2, 3, 3, 1, 1, 0, 0)
    for bad in (good[:-1], [("p", x), ("p", col.astype(np.float64))] + good[2:], good[:2] + [("i", 36)] + good[3:]):
        with pytest.raises(BackendError, match="kernel xpnet_im2col"):
            emulated_rt.launch("xpnet_im2col", np.float32, False, col.size, bad)


class RecordingCupyRuntime(K.CupyRuntime):
    """CupyRuntime's own argument conversion, on NumPy arrays, checked against the signatures
    with the exact scalar types CuPy will pass to the kernel (int32 vs int64, float vs double)."""

    xp = np

    def __init__(self, emulated):
        super().__init__()
        self.emulated = emulated
        self.calls = []

    def function(self, name, dtype_char, wide):
        params = emulate.kernel_signatures()[name]
        scalar = {"I": np.int64 if wide else np.int32, "int": np.int32, "T": np.dtype(dtype_char).type}

        def launch(grid, block, args):
            assert len(grid) == 1 and len(block) == 1 and grid[0] >= 1 and block[0] == K.BLOCK
            assert len(args) == len(params)
            for ptype, arg in zip(params, args):
                base = ptype.replace("const ", "")
                if base.endswith("*"):
                    assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous
                else:
                    assert type(arg) is scalar[base], (name, ptype, type(arg))
            self.calls.append(name)
            # Run it too, through the emulation, with the converted values.
            kinds = [("p", a) if isinstance(a, np.ndarray) else
                     ({np.int32: "i", np.int64: "I"}.get(type(a), "T"), a) for a in args]
            kinds = [("I", v) if p == "I" else (k, v) for p, (k, v) in zip(params, kinds)]
            self.emulated.launch(name, np.dtype(dtype_char), wide, int(args[params.index("I")]), kinds)

        return launch


@pytest.mark.parametrize("wide", [False, True])
def test_cupy_runtime_passes_the_scalar_types_the_kernels_declare(emulated_rt, rng, monkeypatch, wide):
    if wide:
        monkeypatch.setattr(K, "_INT32_LIMIT", 10)
    rt = RecordingCupyRuntime(emulated_rt)
    for dtype in DTYPES:
        x = tie_free(rng, POOL_SHAPE, dtype)
        col = K._im2col(rt, x, 3, 2, 1)
        assert np.array_equal(col, ops.im2col(x, 3, 2, 1))
        K._col2im(rt, col, x.shape, 3, 2, 1)
        colT = K._im2col_cnhw(rt, x, 3, 2, 1)
        assert np.array_equal(colT, col.transpose(3, 4, 5, 0, 1, 2))
        K._col2im_cnhw(rt, colT, x.shape, 3, 2, 1)
        K._fnp_to_nfp(rt, x.reshape(3, -1), x[0, :, 0, 0].copy(), (2, 3, 9, 7), relu=True)
        y, idx = K._max_pool_forward(rt, x, 3, 2, 1)
        assert np.array_equal(y, ops.max_pool2d_forward(x, 3, 2, 1)[0])
        K._max_pool_backward(rt, y, idx, x.shape, 3, 2, 1, relu_y=y)
        K._nhwc_to_nchw(rt, x.reshape(-1, 7), None, (2, 7, 3, 9), relu=True)
        K._relu_backward(rt, x, x)
        loss, d = K._sigmoid_bce_with_logits(rt, x.reshape(2, -1), (x.reshape(2, -1) > 0).astype(dtype))
        assert_allclose(loss, ops.sigmoid_bce_with_logits(x.reshape(2, -1), (x.reshape(2, -1) > 0).astype(dtype))[0])
    assert set(rt.calls) == set(KERNEL_NAMES)


# ------------------------------------------------------------- compile checks

def test_kernel_sources_compile_with_nvcc_for_sm90(tmp_path):
    if emulate.find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed: the kernels' compile check needs it")
    # float with 32-bit and double with 64-bit indices: every type path, half the compile time
    # (emulate.nvcc_check() without `variants` compiles all four).
    results = emulate.nvcc_check("sm_90", workdir=str(tmp_path), variants=[("f", False), ("d", True)])
    assert set(results) == {"float_i32", "double_i64"}
    for tag, out in results.items():
        for name in KERNEL_NAMES:
            assert f"Compiling entry function '{name}'" in out, (tag, name)
        assert "spill stores" in out and " 0 bytes spill stores" in out, out


def test_kernel_sources_compile_with_nvrtc():
    """NVRTC (what CuPy uses on the GPU) where CuPy's bindings and libnvrtc load."""
    if backend.cupy is None:
        pytest.skip(f"CuPy is not importable here ({backend._device_reason}); nvcc covers the CPU check")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # no libnvrtc on a CPU machine
        pytest.skip(f"NVRTC cannot be loaded here: {type(exc).__name__}")
    for dtype_char in "fd":
        for wide in (False, True):
            prog = nvrtc.createProgram(module_source(dtype_char, wide), "xpnet_kernels.cu", [], [])
            nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90"])
            ptx = nvrtc.getPTX(prog)
            ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
            assert all(f".entry {name}" in ptx for name in KERNEL_NAMES)


# ------------------------------------------------------------------ guard

def test_usable_only_for_cupy_float_arrays():
    assert not K.usable(np.zeros((2, 2), np.float32))  # NumPy arrays never take the kernel path
    assert not K.usable()


@pytest.mark.gpu
def test_usable_on_cupy_arrays():
    cp = backend.cupy
    assert K.usable(cp.zeros(3, np.float32), cp.zeros(3, np.float32))
    assert not K.usable(cp.zeros(3, np.float32), cp.zeros(3, np.float64))
    assert not K.usable(cp.zeros(3, np.int32))
    assert not K.usable(cp.zeros(3, np.float32), np.zeros(3, np.float32))


def test_module_imports_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupyx'] = None\n"
            "from xpnet.cuda import kernels\n"
            "import numpy\n"
            "assert not kernels.usable(numpy.zeros(2, numpy.float32))\n"
            "print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ----------------------------------------------------------- GPU-only checks

@pytest.mark.gpu
def test_kernels_queue_without_host_synchronisation(rng):
    """Capture one conv-pool-loss round in a CUDA graph: any host sync inside would fail the capture."""
    cp = backend.cupy
    x = cp.asarray(rng.standard_normal((4, 3, 12, 10)).astype(np.float32))
    b = cp.asarray(rng.standard_normal(5).astype(np.float32))
    t = cp.asarray((rng.random((4, 7)) < 0.2).astype(np.float32))

    def step():
        col = K.im2col(x, 3, 1, 1)
        y2 = col.reshape(4 * 12 * 10, -1)[:, :5]
        y = K.nhwc_to_nchw(y2, b, (4, 5, 12, 10), relu=True)
        p, idx = K.max_pool_forward(y, 2)
        dx = K.max_pool_backward(p, idx, y.shape, 2, relu_y=p)
        K.col2im(col, x.shape, 3, 1, 1)
        loss, d = K.sigmoid_bce_with_logits(p.reshape(4, -1)[:, :7], t)
        return dx, loss

    expected = [a.get() for a in step()]  # compiles and warms the memory pool
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        outs = step()
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    for a, e in zip(outs, expected):
        assert np.array_equal(a.get(), e)
