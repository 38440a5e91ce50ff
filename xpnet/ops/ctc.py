"""Connectionist temporal classification (Graves et al., 2006): the loss and three decoders.

Notation: N samples, T time steps, K classes (the blank included), S the padded label
width, L_n <= S the length of sample n's label, T_n <= T its input length, U = 2S + 1
the extended label (a blank before, between and after the characters).

* ``ctc_loss``: -log p(label | x) by the log-space forward-backward recursion,
  vectorised over the batch (one Python loop over T for each direction).
* ``ctc_greedy_decode``: the best path, repeats merged, blanks dropped.
* ``ctc_best_path``: the best path among those whose label length is in a range.
* ``ctc_beam_decode``: prefix beam search, for the most probable label rather
  than the most probable path.

``ctc_loss`` is declared with ``xpnet.dispatch`` so that a faster implementation (a
CUDA kernel) can register for a backend; this code stays the reference.

Unreachable states hold a large finite negative number instead of -inf, so
log-sum-exp never meets ``-inf - (-inf)`` and no step can produce a NaN.
"""

from __future__ import annotations

import numpy

from .. import backend, dispatch
from ..backend import get_array_module
from ..errors import ShapeError
from .loss import log_softmax

_NEG = -1e30  # "log 0": far below any real log-probability, finite in float32 and float64


def _host_ints(a, logits, name, shape):
    """An integer NumPy copy of labels or lengths, checked for backend, dtype and shape."""
    if isinstance(a, numpy.ndarray) or backend.is_cupy_array(a):
        backend.check_same_backend(a, logits, f"ctc ({name})")
        host = backend.to_numpy(a)
    else:
        host = numpy.asarray(a)
    if host.dtype.kind not in "iu" and not (host.size == 0 and host.dtype.kind == "f"):
        raise ShapeError(f"ctc {name} must be integers, got dtype {host.dtype}: encode characters as class indices.")
    if host.shape != shape:
        raise ShapeError(f"ctc {name} must have shape {shape}, got {host.shape}.")
    return host.astype(numpy.int64)


def _check_logits(logits, who):
    if getattr(logits, "ndim", None) != 3:
        raise ShapeError(f"{who} needs logits of shape (N, T, K), got shape {getattr(logits, 'shape', None)}.")
    if logits.dtype not in (numpy.float32, numpy.float64):
        raise ShapeError(f"{who} needs float32 or float64 logits, got {logits.dtype}: cast them with .astype('float32').")
    n, t, k = logits.shape
    if n < 1 or t < 1 or k < 2:
        raise ShapeError(f"{who} needs at least one sample, one time step and two classes, got logits {logits.shape}.")


def _check_blank(blank, k, who):
    if not isinstance(blank, (int, numpy.integer)) or isinstance(blank, bool) or not 0 <= blank < k:
        raise ShapeError(f"{who}: blank must be a class index in [0, {k}), got {blank!r}.")
    return int(blank)


def _input_lengths(input_lengths, logits, who):
    n, t, _ = logits.shape
    if input_lengths is None:
        return numpy.full(n, t, dtype=numpy.int64)
    lengths = _host_ints(input_lengths, logits, "input_lengths", (n,))
    bad = numpy.flatnonzero((lengths < 1) | (lengths > t))
    if bad.size:
        i = int(bad[0])
        raise ShapeError(f"{who}: input_lengths[{i}] is {int(lengths[i])}, outside [1, {t}] (the logits have T = {t}).")
    return lengths


def check_ctc_args(logits, labels, label_lengths, input_lengths=None, blank=0):
    """Validate everything on the host before any computation.

    Returns (labels (N, S) int64 with the padding set to ``blank``, label_lengths (N,),
    input_lengths (N,), blank) as NumPy arrays.
    """
    _check_logits(logits, "ctc_loss")
    n, t, k = logits.shape
    blank = _check_blank(blank, k, "ctc_loss")
    shape = tuple(labels.shape) if hasattr(labels, "shape") else numpy.shape(labels)
    if len(shape) != 2:
        raise ShapeError(f"ctc_loss needs labels of shape (N, S) (padded), got shape {shape}.")
    s = shape[1]
    lab = _host_ints(labels, logits, "labels", (n, s))
    lab_len = _host_ints(label_lengths, logits, "label_lengths", (n,))
    bad = numpy.flatnonzero((lab_len < 0) | (lab_len > s))
    if bad.size:
        i = int(bad[0])
        raise ShapeError(f"ctc_loss: label_lengths[{i}] is {int(lab_len[i])}, outside [0, {s}] (the labels are {s} wide).")
    in_len = _input_lengths(input_lengths, logits, "ctc_loss")
    inside = numpy.arange(s)[None, :] < lab_len[:, None]
    for test, what in (((lab < 0) | (lab >= k), f"outside [0, {k})"), (lab == blank, f"the blank ({blank})")):
        rows, cols = numpy.nonzero(test & inside)
        if rows.size:
            i, j = int(rows[0]), int(cols[0])
            raise ShapeError(f"ctc_loss: labels[{i}, {j}] is {int(lab[i, j])}, {what}: labels hold class indices "
                             f"in [0, {k}) other than the blank, and padding goes after label_lengths[{i}].")
    lab = numpy.where(inside, lab, blank)
    repeats = ((lab[:, 1:] == lab[:, :-1]) & inside[:, 1:]).sum(axis=1) if s > 1 else numpy.zeros(n, numpy.int64)
    need = lab_len + repeats
    bad = numpy.flatnonzero(need > in_len)
    if bad.size:
        i = int(bad[0])
        raise ShapeError(
            f"ctc_loss: sample {i} cannot fit its label in its input: {int(lab_len[i])} characters with "
            f"{int(repeats[i])} repeated neighbours need {int(need[i])} time steps, the input has {int(in_len[i])}.")
    return lab, lab_len, in_len, blank


def _logsumexp3(a, b, c):
    """Element-wise log(exp(a) + exp(b) + exp(c)); finite for finite inputs."""
    xp = get_array_module(a)
    m = xp.maximum(xp.maximum(a, b), c)
    return m + xp.log(xp.exp(a - m) + xp.exp(b - m) + xp.exp(c - m))


@dispatch.op("ctc_loss")
def ctc_loss(logits, labels, label_lengths, input_lengths=None, blank=0):
    """CTC loss averaged over the batch, and its gradient.

    logits (N, T, K) raw scores (log-softmax is applied inside); labels (N, S) integer
    class indices, padded after ``label_lengths`` (N,) with anything; ``input_lengths``
    (N,) in [1, T] (default T: every step counts).  Labels and lengths may be NumPy
    arrays, arrays on the logits' backend or sequences; they are read on the host to be
    checked before any computation.

    Returns (loss, dlogits): loss = sum_n -log p(label_n | x_n) / N as a 0-d array of the
    logits' dtype and backend; dlogits (N, T, K) = (softmax - occupancy) / N, zero for
    t >= T_n.  Computed in the logits' dtype; finite for any finite logits (a log-probability
    below -1e30, from logits more than 1e30 apart, counts as -1e30).

    Raises ShapeError naming the sample when a label cannot fit its input (L_n plus its
    number of repeated neighbours > T_n), and for a blank inside a label, a class index
    outside [0, K), a length out of range or non-integer labels.
    """
    lab, lab_len, in_len, blank = check_ctc_args(logits, labels, label_lengths, input_lengths, blank)
    xp = get_array_module(logits)
    dt = logits.dtype
    n, t_max, k = logits.shape
    s = lab.shape[1]
    u = 2 * s + 1
    neg = dt.type(_NEG)

    # Extended labels (blank, l1, blank, l2, ..., blank) and the skip-allowed mask.
    ext = numpy.full((n, u), blank, dtype=numpy.int64)
    ext[:, 1::2] = lab
    skip = numpy.zeros((n, u), dtype=bool)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    ext_len = 2 * lab_len + 1
    last = in_len - 1
    # beta starts (log 1) at the last blank and the last character of each sample.
    start_b = numpy.zeros((n, u), dtype=bool)
    start_b[numpy.arange(n), ext_len - 1] = True
    start_b[numpy.arange(n), numpy.maximum(ext_len - 2, 0)] = True
    # time steps past a sample's input length
    after = numpy.arange(t_max)[None, :] > last[:, None]  # (N, T)

    ext_d = xp.asarray(ext)
    skip_d = xp.asarray(skip)
    logp = log_softmax(logits)  # (N, T, K)
    lp = xp.take_along_axis(logp, xp.broadcast_to(ext_d[:, None, :], (n, t_max, u)), axis=2)
    # (T, N, U); a log-probability below "log 0" (logits so far apart that their difference
    # overflows) is "log 0" too, so every value below stays finite.
    lp = xp.ascontiguousarray(lp.transpose(1, 0, 2))
    xp.maximum(lp, neg, out=lp)

    pad1 = xp.full((n, 1), neg, dtype=dt)
    pad2 = xp.full((n, 2), neg, dtype=dt)
    nothing = xp.full((n, u), neg, dtype=dt)  # no skip transition when S = 0

    alpha = xp.empty((t_max, n, u), dtype=dt)
    a0 = xp.full((n, u), neg, dtype=dt)
    a0[:, 0] = lp[0, :, 0]
    if u > 1:
        a0[:, 1] = xp.where(xp.asarray(lab_len > 0), lp[0, :, 1], neg)
    alpha[0] = a0
    for t in range(1, t_max):
        prev = alpha[t - 1]
        one = xp.concatenate((pad1, prev[:, :-1]), axis=1)
        two = xp.where(skip_d, xp.concatenate((pad2, prev[:, :-2]), axis=1), neg) if u > 2 else nothing
        alpha[t] = _logsumexp3(prev, one, two) + lp[t]

    # beta[t, s]: log-probability of finishing from state s at time t, emissions after t only.
    init_b = xp.where(xp.asarray(start_b), dt.type(0), neg).astype(dt, copy=False)
    skip_next = xp.asarray(numpy.concatenate((skip[:, 2:], numpy.zeros((n, 2), dtype=bool)), axis=1)[:, :u])
    is_last = xp.asarray(numpy.arange(t_max)[:, None] == last[None, :])  # (T, N)
    after_d = xp.asarray(after.T)  # (T, N)
    beta = xp.empty((t_max, n, u), dtype=dt)
    nxt = xp.full((n, u), neg, dtype=dt)  # beta[t + 1] + lp[t + 1]
    for t in range(t_max - 1, -1, -1):
        one = xp.concatenate((nxt[:, 1:], pad1), axis=1)
        # s -> s + 2 is allowed when skip[s + 2]
        two = xp.where(skip_next, xp.concatenate((nxt[:, 2:], pad2), axis=1), neg) if u > 2 else nothing
        rec = _logsumexp3(nxt, one, two)
        b = xp.where(is_last[t][:, None], init_b, rec)
        b = xp.where(after_d[t][:, None], neg, b)
        beta[t] = b
        nxt = b + lp[t]

    # log p(label) per sample: alpha at its last step, in the last blank or the last character.
    a_last = alpha[xp.asarray(last), xp.arange(n)]  # (N, U)
    end = xp.take_along_axis(a_last, xp.asarray(ext_len - 1)[:, None], axis=1)[:, 0]
    pre = xp.take_along_axis(a_last, xp.asarray(numpy.maximum(ext_len - 2, 0))[:, None], axis=1)[:, 0]
    pre = xp.where(xp.asarray(lab_len > 0), pre, neg)
    m = xp.maximum(end, pre)
    log_p = m + xp.log(xp.exp(end - m) + xp.exp(pre - m))
    loss = -log_p.sum(dtype=dt) / dt.type(n)

    # Occupancy of each extended state.  At every step, sum_s alpha*beta = p(label): dividing
    # by that step's own sum rather than by p(label) is the same in exact arithmetic, and
    # makes each step's occupancy sum to 1 however far apart the logits are.  Past T_n the
    # values are meaningless (nothing is reachable) but finite, and those rows are zeroed below.
    ab = alpha + beta  # (T, N, U)
    gamma = xp.exp(ab - ab.max(axis=2, keepdims=True))  # the largest entry of each row is 1
    gamma /= gamma.sum(axis=2, keepdims=True)
    onehot = xp.asarray((ext[:, :, None] == numpy.arange(k)[None, None, :]).astype(dt))  # (N, U, K)
    occ = xp.matmul(gamma.transpose(1, 0, 2), onehot)  # (N, T, K)
    valid = xp.asarray(~after).astype(dt)[:, :, None]
    dlogits = (xp.exp(logp) - occ) * (valid / dt.type(n))
    return loss, dlogits


def _decode_args(logits, blank, input_lengths, who):
    _check_logits(logits, who)
    blank = _check_blank(blank, logits.shape[2], who)
    return blank, _input_lengths(input_lengths, logits, who)


def label_starts(path, blank=0):
    """(N, T) bool: the steps of a path (N, T) of classes where a label character begins
    (not the blank, not a repeat of the step before)."""
    starts = path != blank
    starts[:, 1:] &= path[:, 1:] != path[:, :-1]
    return starts


def ctc_greedy_decode(logits, blank=0, input_lengths=None):
    """Best-path decoding: the most probable class at each step, repeats merged, blanks dropped.

    logits (N, T, K) (raw scores or log-probabilities: the argmax is the same);
    ``input_lengths`` (N,) in [1, T] (default T).  Returns a list of N lists of class indices.
    """
    blank, in_len = _decode_args(logits, blank, input_lengths, "ctc_greedy_decode")
    best = backend.to_numpy(logits.argmax(axis=2))  # (N, T): one transfer of small integers
    keep = label_starts(best, blank)
    keep &= numpy.arange(best.shape[1])[None, :] < in_len[:, None]
    return [row[k].tolist() for row, k in zip(best, keep)]


def ctc_best_path(logits, blank=0, min_length=0, max_length=None):
    """The most probable alignment whose label has between ``min_length`` and ``max_length``
    characters: (N, T) class per step (collapse it as the greedy decoder does).

    logits (N, T, K) raw scores.  Where the plain best path (``ctc_greedy_decode``) already
    has an allowed length it is the answer; otherwise, e.g. a reader of 4-character texts
    that merged two characters into one, this finds the best alignment that does not.
    A Viterbi recursion on the host in float64, vectorised over the batch and the classes,
    one Python step per time step, over states (characters emitted so far k, class of the
    current step s)::

        V[t, k, blank] = lp[t, blank] + max over s' of V[t-1, k, s']
        V[t, k, c]     = lp[t, c] + max(V[t-1, k, c],                 (the same character goes on)
                                        max over s' != c of V[t-1, k-1, s'])   (a new one)

    Samples with no alignment of an allowed length (too few steps) keep the plain best path.
    """
    _check_logits(logits, "ctc_best_path")
    blank = _check_blank(blank, logits.shape[2], "ctc_best_path")
    n, t_len, k = logits.shape
    hi = t_len if max_length is None else int(max_length)
    lo = int(min_length)
    if not 0 <= lo <= hi:
        raise ShapeError(f"ctc_best_path needs 0 <= min_length <= max_length, got {min_length} and {max_length}.")
    hi = min(hi, t_len)
    lp = backend.to_numpy(log_softmax(logits)).astype(numpy.float64)
    greedy = lp.argmax(axis=2)
    length = label_starts(greedy, blank).sum(axis=1)
    redo = numpy.flatnonzero((length < lo) | (length > hi))
    if lo > t_len or redo.size == 0:
        return greedy
    greedy[redo] = _viterbi_in_range(lp[redo], blank, lo, hi, greedy[redo])
    return greedy


def _viterbi_in_range(lp, blank, lo, hi, fallback):
    """``ctc_best_path``'s recursion on lp (N, T, K) float64 log-probabilities -> (N, T) classes."""
    n, t_len, k = lp.shape
    neg = -numpy.inf
    chars = numpy.arange(k) != blank
    v = numpy.full((n, hi + 1, k), neg)
    v[:, 0, blank] = lp[:, 0, blank]
    if hi >= 1:
        v[:, 1, chars] = lp[:, 0, chars]
    from_emit = numpy.zeros((t_len, n, hi + 1, k), dtype=bool)  # the step before had k-1 characters
    from_class = numpy.zeros((t_len, n, hi + 1, k), dtype=numpy.int16)  # its class
    rows = numpy.arange(n)[:, None]
    ks = numpy.arange(hi + 1)[None, :]
    classes = numpy.arange(k, dtype=numpy.int16)
    for t in range(1, t_len):
        # the best and second best class of the step before, per k: for "max over s' != c"
        order = numpy.argsort(-v, axis=2)[:, :, :2]
        first, second = order[:, :, 0], order[:, :, 1] if k > 1 else order[:, :, 0]
        v_first = v[rows, ks, first]
        v_second = v[rows, ks, second]
        emit = numpy.full((n, hi + 1, k), neg)
        emit_from = numpy.zeros((n, hi + 1, k), dtype=numpy.int16)
        taken = first[:, :-1, None] == classes[None, None, :]  # the best class is c itself
        emit[:, 1:] = numpy.where(taken, v_second[:, :-1, None], v_first[:, :-1, None])
        emit_from[:, 1:] = numpy.where(taken, second[:, :-1, None], first[:, :-1, None])
        new_emit = emit > v
        best = numpy.where(new_emit, emit, v) + lp[:, t, None, :]
        from_emit[t] = new_emit
        from_class[t] = numpy.where(new_emit, emit_from, classes[None, None, :])
        # a blank keeps k and may follow any class
        best[:, :, blank] = v_first + lp[:, t, blank, None]
        from_emit[t, :, :, blank] = False
        from_class[t, :, :, blank] = first
        v = best
    allowed = v[:, lo:hi + 1].reshape(n, -1)
    end = allowed.argmax(axis=1)
    ok = numpy.isfinite(allowed[numpy.arange(n), end])
    cur_k, cur_s = end // k + lo, end % k
    path = numpy.empty((n, t_len), dtype=numpy.int64)
    every = numpy.arange(n)
    for t in range(t_len - 1, -1, -1):
        path[:, t] = cur_s
        if t:
            back_emit = from_emit[t, every, cur_k, cur_s]
            cur_s = from_class[t, every, cur_k, cur_s].astype(numpy.int64)
            cur_k = cur_k - back_emit
    return numpy.where(ok[:, None], path, fallback)


def ctc_beam_decode(logits, beam_width=8, blank=0, input_lengths=None):
    """Prefix beam search: the most probable label (summed over its alignments), not the best path.

    logits (N, T, K) raw scores; ``input_lengths`` (N,) in [1, T] (default T).  Keeps the
    ``beam_width`` most probable prefixes at each step, each with the log-probability of
    its alignments ending in a blank and in a character.  Returns (labels, log_probs):
    a list of N lists of class indices and a list of N floats, the log-probability of each
    label summed over the alignments that stayed in the beam (a lower bound of the true
    log p(label | x); equal when the beam is wide enough to keep every prefix).

    The search runs sample by sample on the host, vectorised over the K classes: its
    prefixes are Python tuples, and decoding is not a training hot path.  Scores are
    kept in float64 there (one log-softmax on the logits' backend and dtype first), so a
    long sum of log-probabilities loses nothing to rounding.
    """
    blank, in_len = _decode_args(logits, blank, input_lengths, "ctc_beam_decode")
    if not isinstance(beam_width, (int, numpy.integer)) or isinstance(beam_width, bool) or beam_width < 1:
        raise ShapeError(f"ctc_beam_decode: beam_width must be an integer >= 1, got {beam_width!r}.")
    logp = backend.to_numpy(log_softmax(logits)).astype(numpy.float64)
    labels, scores = [], []
    for lp, t_n in zip(logp, in_len):  # per sample: each keeps its own set of prefixes
        best, score = _prefix_beam(lp[:t_n], int(beam_width), blank)
        labels.append(list(best))
        scores.append(score)
    return labels, scores


def _prefix_beam(lp, width, blank):
    """Prefix beam search over lp (T, K) log-probabilities (float64 NumPy)."""
    neg = -numpy.inf
    prefixes = [()]
    pb = numpy.zeros(1)  # log p(prefix, alignment ending in a blank)
    pnb = numpy.full(1, neg)  # log p(prefix, alignment ending in its last character)
    for row in lp:
        total = numpy.logaddexp(pb, pnb)
        last = numpy.array([p[-1] if p else -1 for p in prefixes])
        has = last >= 0
        # The same prefix: a blank after anything, or its last character repeated.
        new_pb = total + row[blank]
        new_pnb = numpy.where(has, pnb + row[numpy.where(has, last, 0)], neg)
        # One character more; repeating the last character needs a blank in between.
        ext = total[:, None] + row[None, :]
        rows = numpy.flatnonzero(has)
        ext[rows, last[rows]] = pb[rows] + row[last[rows]]
        ext[:, blank] = neg
        # An extension that is already a prefix of the beam adds to that prefix.
        index = {p: i for i, p in enumerate(prefixes)}
        for i, p in enumerate(prefixes):
            j = index.get(p[:-1]) if p else None
            if j is not None:
                new_pnb[i] = numpy.logaddexp(new_pnb[i], ext[j, p[-1]])
                ext[j, p[-1]] = neg
        flat = ext.ravel()
        m = min(width, flat.size)
        top = numpy.argpartition(-flat, m - 1)[:m]
        top = top[numpy.isfinite(flat[top])]
        k = ext.shape[1]
        cand = [(prefixes[i], new_pb[i], new_pnb[i]) for i in range(len(prefixes))]
        cand += [(prefixes[c // k] + (int(c % k),), neg, flat[c]) for c in top]
        cand.sort(key=lambda e: (-numpy.logaddexp(e[1], e[2]), e[0]))
        cand = cand[:width]
        prefixes = [c[0] for c in cand]
        pb = numpy.array([c[1] for c in cand])
        pnb = numpy.array([c[2] for c in cand])
    total = numpy.logaddexp(pb, pnb)
    i = int(numpy.argmax(total))
    return prefixes[i], float(total[i])
