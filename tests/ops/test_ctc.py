"""CTC loss and decoders against brute force over every alignment and a per-sample
alpha recursion (float64 oracles written here), finite differences and CuPy."""

import itertools
import math
import warnings

import numpy as np
import pytest

from xpnet import backend, ops
from xpnet.errors import DeviceMismatchError, ShapeError
from xpnet.nn.optim import Adam
from xpnet.testing import GRADCHECK, assert_allclose, numerical_gradient, tolerance

from tests.conftest import gpu_param


# ------------------------------------------------------------------ oracles
def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _collapse(path, blank):
    out, prev = [], None
    for p in path:
        if p != prev and p != blank:
            out.append(int(p))
        prev = p
    return tuple(out)


def _label_logprobs_brute(logits_nt, blank):
    """{label: log p(label)} for one sample, summing every one of the K**T paths."""
    lp = _log_softmax64(logits_nt)
    t_len, k = lp.shape
    table = {}
    for path in itertools.product(range(k), repeat=t_len):
        s = sum(lp[t, c] for t, c in enumerate(path))
        lab = _collapse(path, blank)
        table[lab] = np.logaddexp(table.get(lab, -np.inf), s)
    return table


def _nll_alpha(logits_nt, label, blank):
    """-log p(label) for one sample by the textbook alpha recursion in probability space."""
    y = np.exp(_log_softmax64(logits_nt))
    ext = [blank]
    for c in label:
        ext += [int(c), blank]
    t_len, u = len(y), len(ext)
    alpha = [[0.0] * u for _ in range(t_len)]
    alpha[0][0] = y[0, blank]
    if u > 1:
        alpha[0][1] = y[0, ext[1]]
    for t in range(1, t_len):
        for s in range(u):
            a = alpha[t - 1][s] + (alpha[t - 1][s - 1] if s >= 1 else 0.0)
            if s >= 2 and ext[s] != blank and ext[s] != ext[s - 2]:
                a += alpha[t - 1][s - 2]
            alpha[t][s] = a * y[t, ext[s]]
    p = alpha[-1][-1] + (alpha[-1][-2] if u > 1 else 0.0)
    return -math.log(p)


# (N, T, K, labels as lists, input lengths or None, blank)
CASES = [
    (3, 5, 4, [[1, 2], [1, 1], [3]], None, 0),
    (4, 5, 3, [[1, 2, 1], [], [2, 2], [1]], [5, 4, 5, 2], 0),     # empty label, short inputs, repeats
    (2, 4, 4, [[0, 2], [3, 3]], [4, 4], 1),                       # blank is not 0
    (1, 1, 3, [[2]], None, 0),                                    # one step
    (3, 6, 3, [[1, 2, 1, 2], [2, 1, 1], [1, 1, 1]], [6, 4, 5], 0),  # labels filling their inputs
]


def _case_arrays(case, rng, dtype=np.float64, scale=1.5, pad_value=7):
    n, t, k, labs, in_len, blank = case
    logits = (rng.standard_normal((n, t, k)) * scale).astype(dtype)
    s = max(1, max(len(l) for l in labs))
    labels = np.full((n, s), pad_value, dtype=np.int64)  # padding: anything, even out of range
    for i, l in enumerate(labs):
        labels[i, :len(l)] = l
    lengths = np.array([len(l) for l in labs])
    return logits, labels, lengths, (None if in_len is None else np.array(in_len)), blank


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("case", CASES)
def test_ctc_loss_matches_brute_force_over_alignments(rng, case):
    logits, labels, lengths, in_len, blank = _case_arrays(case, rng)
    loss, _ = ops.ctc_loss(logits, labels, lengths, in_len, blank=blank)
    n, t = logits.shape[:2]
    want = 0.0
    for i in range(n):
        t_i = t if in_len is None else in_len[i]
        table = _label_logprobs_brute(logits[i, :t_i], blank)
        want -= table[tuple(labels[i, :lengths[i]])]
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(float(loss), want / n, rtol=1e-12)


def test_ctc_loss_matches_alpha_recursion_on_longer_sequences(rng):
    n, t, k = 5, 14, 6
    logits = rng.standard_normal((n, t, k)) * 2
    labs = [[1, 2, 3, 4, 5], [3, 3, 3], [], [5, 1, 5, 1, 5, 1, 5], [2]]
    in_len = np.array([14, 9, 3, 14, 1])
    labels = np.zeros((n, 7), np.int64)
    for i, l in enumerate(labs):
        labels[i, :len(l)] = l
    loss, _ = ops.ctc_loss(logits, labels, [len(l) for l in labs], in_len)
    want = sum(_nll_alpha(logits[i, :in_len[i]], labs[i], 0) for i in range(n)) / n
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)


def test_ctc_batch_equals_samples_one_at_a_time(rng):
    logits, labels, lengths, in_len, blank = _case_arrays(CASES[1], rng)
    loss, d = ops.ctc_loss(logits, labels, lengths, in_len)
    n = len(logits)
    for i in range(n):
        li, di = ops.ctc_loss(logits[i:i + 1], labels[i:i + 1], lengths[i:i + 1], in_len[i:i + 1])
        np.testing.assert_allclose(d[i] * n, di[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(loss) * n, sum(float(ops.ctc_loss(logits[i:i + 1], labels[i:i + 1],
                               lengths[i:i + 1], in_len[i:i + 1])[0]) for i in range(n)), rtol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_ctc_gradient_matches_finite_differences(rng, case):
    logits, labels, lengths, in_len, blank = _case_arrays(case, rng)
    _, d = ops.ctc_loss(logits, labels, lengths, in_len, blank=blank)
    num = numerical_gradient(lambda: float(ops.ctc_loss(logits, labels, lengths, in_len, blank=blank)[0]), logits)
    np.testing.assert_allclose(d, num, rtol=GRADCHECK["rtol"], atol=1e-8)


def test_ctc_gradient_rows_sum_to_zero_and_vanish_past_the_input_length(rng):
    logits, labels, lengths, in_len, _ = _case_arrays(CASES[1], rng)
    _, d = ops.ctc_loss(logits, labels, lengths, in_len)
    np.testing.assert_allclose(d.sum(axis=2), 0, atol=1e-15)  # softmax and occupancy both sum to 1
    for i, t_i in enumerate(in_len):
        assert np.all(d[i, t_i:] == 0)
        assert np.all(np.abs(d[i, :t_i]).sum(axis=1) > 0)


def test_ctc_gradient_matches_finite_differences_when_the_label_is_unlikely(rng):
    """Logits that favour another label: the occupancy is normalised per step, still exact."""
    logits = rng.standard_normal((2, 5, 4)) * 3
    logits[:, :, 3] += 6  # class 3 dominates, the labels never use it
    labels, lengths = np.array([[1, 2, 1], [2, 2, 0]]), np.array([3, 2])
    loss, d = ops.ctc_loss(logits, labels, lengths)
    assert float(loss) > 10
    num = numerical_gradient(lambda: float(ops.ctc_loss(logits, labels, lengths)[0]), logits)
    np.testing.assert_allclose(d, num, rtol=GRADCHECK["rtol"], atol=1e-8)


def test_ctc_float32_in_float32_out_close_to_float64(rng):
    logits, labels, lengths, in_len, _ = _case_arrays(CASES[4], rng)
    l64, d64 = ops.ctc_loss(logits, labels, lengths, in_len)
    l32, d32 = ops.ctc_loss(logits.astype(np.float32), labels.astype(np.int32), lengths.astype(np.int32),
                            in_len.astype(np.int32))
    assert l32.dtype == d32.dtype == np.float32 and d32.shape == logits.shape
    np.testing.assert_allclose(float(l32), float(l64), **tolerance(np.float32))
    np.testing.assert_allclose(d32, d64, **tolerance(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e4, 1e8, 1e37])
def test_ctc_finite_for_extreme_logits_without_warnings(rng, dtype, scale):
    n, t, k = 3, 6, 5
    logits = (rng.choice([-scale, 0.0, scale], size=(n, t, k)) + rng.standard_normal((n, t, k))).astype(dtype)
    labels = np.array([[1, 2, 3], [4, 4, 0], [2, 0, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, d = ops.ctc_loss(logits, labels, [3, 2, 1], [6, 4, 6])
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert np.all(np.isfinite(d)) and d.dtype == dtype
    # softmax and occupancy each sum to 1 at every counted step, however far apart the logits
    np.testing.assert_allclose(d.sum(axis=2), 0, atol=1e-6)
    assert np.all(d[1, 4:] == 0)
    # A confident, right answer costs almost nothing; the gradient is then almost zero.
    sure = np.full((1, 4, 3), -1e4, dtype)
    sure[0, [0, 1, 2, 3], [1, 0, 2, 2]] = 1e4  # path 1, blank, 2, 2 -> label (1, 2)
    loss, d = ops.ctc_loss(sure, np.array([[1, 2]]), [2])
    assert float(loss) == 0.0 and np.all(d == 0)


def test_ctc_does_not_mutate_and_takes_noncontiguous_inputs(rng):
    base = rng.standard_normal((4, 7, 6))
    logits = base[::2, :, ::2]  # (2, 7, 3), non-contiguous
    lab_base = np.array([[1, 9, 2, 9, 1], [2, 9, 2, 9, 0]])
    labels = lab_base[:, ::2]  # (2, 3), non-contiguous
    lengths, in_len = np.array([3, 2]), np.array([7, 5])
    copies = [a.copy() for a in (base, lab_base, lengths, in_len)]
    loss, d = ops.ctc_loss(logits, labels, lengths, in_len)
    want_loss, want_d = ops.ctc_loss(np.ascontiguousarray(logits), np.ascontiguousarray(labels), lengths, in_len)
    assert float(loss) == float(want_loss) and np.array_equal(d, want_d)
    for a, c in zip((base, lab_base, lengths, in_len), copies):
        assert np.array_equal(a, c)


def test_ctc_labels_as_lists_are_accepted(rng):
    logits = rng.standard_normal((2, 4, 3))
    a = ops.ctc_loss(logits, [[1, 2], [2, 0]], [2, 1], [4, 3])
    b = ops.ctc_loss(logits, np.array([[1, 2], [2, 0]]), np.array([2, 1]), np.array([4, 3]))
    assert float(a[0]) == float(b[0]) and np.array_equal(a[1], b[1])


def test_ctc_all_labels_empty_costs_the_blanks(rng):
    logits = rng.standard_normal((2, 3, 4))
    loss, d = ops.ctc_loss(logits, np.zeros((2, 0), np.int64), [0, 0], [3, 2])
    lp = _log_softmax64(logits)
    np.testing.assert_allclose(float(loss), -(lp[0, :, 0].sum() + lp[1, :2, 0].sum()) / 2, rtol=1e-12)
    want = np.exp(lp) / 2
    want[:, :, 0] -= 0.5
    want[1, 2] = 0
    np.testing.assert_allclose(d, want, atol=1e-15)


def test_ctc_refuses_a_label_that_cannot_fit_naming_the_sample(rng):
    logits = rng.standard_normal((3, 4, 5))
    labels = np.array([[1, 2, 3, 4], [1, 1, 2, 2], [1, 2, 0, 0]])
    # sample 1: 4 characters and 2 repeated neighbours need 6 steps, it has 4
    with pytest.raises(ShapeError, match=r"sample 1 cannot fit .* need 6 time steps, the input has 4"):
        ops.ctc_loss(logits, labels, [4, 4, 2])
    with pytest.raises(ShapeError, match=r"sample 2 cannot fit .* need 2 time steps, the input has 1"):
        ops.ctc_loss(logits, labels, [4, 2, 2], [4, 4, 1])
    ops.ctc_loss(logits, labels, [4, 3, 2])  # 1, 1, 2 needs 4 steps: fits exactly


@pytest.mark.parametrize("labels, lengths, in_len, blank, match", [
    ([[1, 0]], [2], None, 0, r"labels\[0, 1\] is 0, the blank"),
    ([[1, 5]], [2], None, 0, r"labels\[0, 1\] is 5, outside \[0, 5\)"),
    ([[-1, 2]], [2], None, 0, r"labels\[0, 0\] is -1, outside"),
    ([[1, 2]], [-1], None, 0, r"label_lengths\[0\] is -1, outside \[0, 2\]"),
    ([[1, 2]], [3], None, 0, r"label_lengths\[0\] is 3"),
    ([[1, 2]], [2], [0], 0, r"input_lengths\[0\] is 0, outside \[1, 4\]"),
    ([[1, 2]], [2], [5], 0, r"input_lengths\[0\] is 5"),
    ([[1.0, 2.0]], [2], None, 0, "must be integers"),
    ([[1, 2]], [2.0], None, 0, "must be integers"),
    ([[1, 2]], [2, 2], None, 0, r"label_lengths must have shape \(1,\)"),
    ([1, 2], [2], None, 0, r"labels of shape \(N, S\)"),
    ([[1, 2]], [2], None, 5, r"blank must be a class index in \[0, 5\)"),
])
def test_ctc_bad_arguments_get_one_sentence(rng, labels, lengths, in_len, blank, match):
    logits = rng.standard_normal((1, 4, 5))
    with pytest.raises(ShapeError, match=match):
        ops.ctc_loss(logits, np.array(labels), np.array(lengths), None if in_len is None else np.array(in_len),
                     blank=blank)


def test_ctc_refuses_bad_logits():
    with pytest.raises(ShapeError, match=r"float32 or float64 logits, got float16"):
        ops.ctc_loss(np.zeros((1, 3, 4), np.float16), [[1]], [1])
    with pytest.raises(ShapeError, match=r"float32 or float64 logits, got int64"):
        ops.ctc_loss(np.zeros((1, 3, 4), np.int64), [[1]], [1])
    with pytest.raises(ShapeError, match=r"shape \(N, T, K\)"):
        ops.ctc_loss(np.zeros((3, 4)), [[1]], [1])
    with pytest.raises(ShapeError, match="at least one sample"):
        ops.ctc_loss(np.zeros((0, 3, 4)), np.zeros((0, 1), np.int64), np.zeros(0, np.int64))


def test_adam_on_free_logits_learns_the_labels():
    """A few hundred steps of CTC drive the loss down and greedy decoding to the labels."""
    rng = np.random.default_rng(5)
    labels = np.array([[1, 2, 3, 0], [3, 3, 1, 0], [2, 1, 2, 3], [4, 0, 0, 0]])
    lengths = np.array([3, 3, 4, 1])
    params = {"z": (rng.standard_normal((4, 9, 5)) * 0.1).astype(np.float32)}
    opt = Adam(params, lr=0.05)
    first = None
    for _ in range(200):
        loss, d = ops.ctc_loss(params["z"], labels, lengths)
        first = float(loss) if first is None else first
        opt.step({"z": d})
    assert float(loss) < 0.05 * first
    assert ops.ctc_greedy_decode(params["z"]) == [[1, 2, 3], [3, 3, 1], [2, 1, 2, 3], [4]]


# ------------------------------------------------------------------ decoders
def _greedy_oracle(logits, blank, in_len=None):
    out = []
    for i, row in enumerate(logits):
        t_i = len(row) if in_len is None else in_len[i]
        out.append(list(_collapse([int(np.argmax(row[t])) for t in range(t_i)], blank)))
    return out


def test_greedy_decode_matches_a_per_sample_loop(rng):
    logits = rng.standard_normal((6, 9, 4)) * 2
    assert ops.ctc_greedy_decode(logits) == _greedy_oracle(logits, 0)
    in_len = np.array([9, 1, 4, 5, 8, 2])
    assert ops.ctc_greedy_decode(logits, blank=2, input_lengths=in_len) == _greedy_oracle(logits, 2, in_len)
    # log-probabilities decode the same as raw scores
    assert ops.ctc_greedy_decode(_log_softmax64(logits)) == ops.ctc_greedy_decode(logits)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    best = [0, 1, 1, 0, 1, 2, 2, 0, 0, 3]  # -> 1, 1, 2, 3
    logits = np.eye(4)[best][None].astype(np.float32)
    assert ops.ctc_greedy_decode(logits) == [[1, 1, 2, 3]]


@pytest.mark.parametrize("blank", [0, 2])
def test_wide_beam_finds_the_most_probable_label(rng, blank):
    n, t, k = 5, 4, 3
    logits = rng.standard_normal((n, t, k)) * 1.5
    labels, scores = ops.ctc_beam_decode(logits, beam_width=64, blank=blank)
    for i in range(n):
        table = _label_logprobs_brute(logits[i], blank)
        best = max(table, key=table.get)
        assert tuple(labels[i]) == best
        np.testing.assert_allclose(scores[i], table[best], rtol=1e-12)


def _label_logprob(logits_i, label, in_len=None):
    """log p(label) of one sample through ctc_loss (exact, all alignments)."""
    lab = np.array([list(label) or [1]])
    lens = None if in_len is None else np.array([in_len])
    return -float(ops.ctc_loss(logits_i[None], lab, [len(label)], lens)[0])


def test_beam_is_at_least_as_probable_as_greedy(rng):
    n, t, k = 8, 12, 5
    logits = rng.standard_normal((n, t, k)) * 1.2
    in_len = rng.integers(6, t + 1, size=n)
    greedy = ops.ctc_greedy_decode(logits, input_lengths=in_len)
    beam, scores = ops.ctc_beam_decode(logits, beam_width=8, input_lengths=in_len)
    better = 0
    for i in range(n):
        p_beam = _label_logprob(logits[i], beam[i], in_len[i])
        p_greedy = _label_logprob(logits[i], greedy[i], in_len[i])
        assert p_beam >= p_greedy - 1e-12
        assert scores[i] <= p_beam + 1e-9  # the beam's score sums the alignments it kept
        better += p_beam > p_greedy + 1e-9
    assert better > 0  # on flat random inputs the best path is not always the best label


def test_beam_equals_greedy_on_peaked_inputs(rng):
    n, t, k = 6, 10, 6
    best = rng.integers(0, k, size=(n, t))
    logits = (rng.standard_normal((n, t, k)) + 8 * np.eye(k)[best]).astype(np.float32)
    greedy = ops.ctc_greedy_decode(logits)
    beam, scores = ops.ctc_beam_decode(logits, beam_width=4)
    assert beam == greedy
    assert all(s <= 0 and s > -1 for s in scores)


def test_beam_width_one_and_bad_width(rng):
    logits = rng.standard_normal((2, 5, 3))
    labels, scores = ops.ctc_beam_decode(logits, beam_width=1)
    assert len(labels) == 2 and all(isinstance(c, int) for l in labels for c in l)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ShapeError, match="beam_width must be an integer >= 1"):
            ops.ctc_beam_decode(logits, beam_width=bad)
    with pytest.raises(ShapeError, match=r"input_lengths\[1\] is 6"):
        ops.ctc_greedy_decode(logits, input_lengths=[5, 6])


@pytest.mark.parametrize("blank", [0, 2])
def test_best_path_in_a_length_range_against_every_alignment(rng, blank):
    # a batch whose rows need the constraint or not, against brute force over all K^T paths
    n, t, k = 12, 5, 3
    logits = rng.standard_normal((n, t, k)) * 2
    lp = _log_softmax64(logits)
    for lo, hi in ((2, 2), (1, 3), (0, 1), (3, 4)):
        got = ops.ctc_best_path(logits, blank=blank, min_length=lo, max_length=hi)
        assert got.shape == (n, t)
        for i in range(n):
            score = max(sum(lp[i, j, c] for j, c in enumerate(path))
                        for path in itertools.product(range(k), repeat=t)
                        if lo <= len(_collapse(path, blank)) <= hi)
            assert lo <= len(_collapse(got[i], blank)) <= hi
            np.testing.assert_allclose(sum(lp[i, j, c] for j, c in enumerate(got[i])), score, rtol=1e-12)


def test_best_path_keeps_the_greedy_path_of_an_allowed_length_and_when_none_fits(rng):
    logits = rng.standard_normal((6, 9, 4)).astype(np.float32)
    greedy = logits.argmax(axis=2)
    np.testing.assert_array_equal(ops.ctc_best_path(logits), greedy)  # no constraint
    np.testing.assert_array_equal(ops.ctc_best_path(logits, min_length=0, max_length=9), greedy)
    # 3 steps cannot emit 4 characters, and 1 1 needs a blank between: the plain best path stays
    short = np.eye(3)[[1, 0, 2]][None] * 5.0
    np.testing.assert_array_equal(ops.ctc_best_path(short, min_length=4, max_length=4), [[1, 0, 2]])
    # a merged pair: 1 1 1 read as one character; asked for two, the best split takes a blank or a 2
    merged = np.log(np.array([[[0.05, 0.9, 0.05], [0.3, 0.6, 0.1], [0.05, 0.9, 0.05]]]))
    two = ops.ctc_best_path(merged, min_length=2, max_length=2)
    assert list(_collapse(two[0], 0)) == [1, 1] and two[0].tolist() == [1, 0, 1]
    with pytest.raises(ShapeError, match="min_length <= max_length"):
        ops.ctc_best_path(logits, min_length=3, max_length=2)


# ------------------------------------------------------------------ backends
@pytest.mark.parametrize("name", gpu_param())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ctc_same_on_each_backend(rng, name, dtype):
    xp = backend.module_for(name)
    logits, labels, lengths, in_len, _ = _case_arrays(CASES[4], rng, dtype)
    want_loss, want_d = ops.ctc_loss(logits, labels, lengths, in_len)
    loss, d = ops.ctc_loss(xp.asarray(logits), xp.asarray(labels), xp.asarray(lengths), xp.asarray(in_len))
    assert backend.get_array_module(loss, d) is xp
    assert_allclose(loss, want_loss)
    assert_allclose(d, want_d)
    assert ops.ctc_greedy_decode(xp.asarray(logits)) == ops.ctc_greedy_decode(logits)
    labs, scores = ops.ctc_beam_decode(xp.asarray(logits), beam_width=4)
    want_labs, want_scores = ops.ctc_beam_decode(logits, beam_width=4)
    assert labs == want_labs
    np.testing.assert_allclose(scores, want_scores, **tolerance(dtype))


@pytest.mark.gpu
def test_ctc_refuses_labels_on_another_backend(rng):
    logits = backend.cupy.asarray(rng.standard_normal((1, 4, 3)))
    with pytest.raises(DeviceMismatchError):
        ops.ctc_loss(logits, np.array([[1, 2]]), backend.cupy.asarray([2]))

