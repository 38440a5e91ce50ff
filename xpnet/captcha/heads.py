"""How a reader's outputs become texts: the "bce" head (one block of K sigmoid units per
character position, a fixed length) and the "ctc" head (K + 1 scores per image column,
class 0 the CTC blank and class i + 1 the charset's character i: texts of any length).

A model file says which in its metadata (``"head"``; no key means ``"bce"``).  For training a
CTC reader with ``xpnet.Trainer``:

    y = ctc_targets(texts, charset)                 # (N, 1 + S) int64, see below
    Trainer(model, optimizer, loss=CTCLoss(), ...).fit((x, y), ...)
    xpnet.save(model, path, ctc_metadata(charset, preprocess))

The packing of ``y``: column 0 holds each label's length L_n, columns 1 .. L_n its class
indices (charset index + 1, so 0 is the blank), the rest 0.  One integer array travels
through the Trainer's sources and batching like any target array.
"""

from __future__ import annotations

import numpy

from .. import backend
from ..data.images import Preprocess
from ..data.labels import Charset
from ..errors import DataError, ModelFileError, ShapeError, UsageError
from ..ops.ctc import ctc_best_path, ctc_loss, label_starts
from ..ops.loss import log_softmax, sigmoid_bce_with_logits

HEADS = ("bce", "ctc")
BLANK = 0


def head_of(metadata) -> str:
    """The head a model file's metadata declares ("bce" when it says nothing)."""
    return str((metadata or {}).get("head", "bce"))


def ctc_metadata(charset: Charset, preprocess: Preprocess, **extra) -> dict:
    """The metadata of a CTC reader (``metadata_for`` plus ``"head": "ctc"``).

    ``charset.length`` is the longest label the reader was trained on (its texts may be of
    any length from 0 up to the model's number of columns).  ``lengths=[lo, hi]`` in ``extra``
    (``xpnet train`` records its charset's range) makes readings the best path among those of
    lo to hi characters (``reading_path``).
    """
    return {"task": "captcha", "charset": charset.to_dict(), "length": charset.length,
            "preprocess": preprocess.to_dict(), "input_shape": list(preprocess.shape), **extra, "head": "ctc"}


def check_texts(texts, charset: Charset) -> list[str]:
    """The texts (of a list) a CTC reader over ``charset`` cannot learn, each with the reason."""
    bad = []
    for text in texts:
        if not text:
            bad.append(f"{text!r} is empty")
        elif any(c not in charset.chars for c in text):
            odd = "".join(sorted({c for c in text if c not in charset.chars}))
            bad.append(f"{text!r} has characters {odd!r} outside the charset")
    return bad


def ctc_targets(texts, charset: Charset, width: int | None = None) -> numpy.ndarray:
    """(N, 1 + S) int64 packed CTC targets (module docstring): lengths, then labels padded with 0.

    ``width`` S defaults to the longest text.  A DataError names texts that are empty or hold
    characters outside the charset.
    """
    texts = list(texts)
    bad = check_texts(texts, charset)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} label(s) cannot be CTC targets over {charset.chars!r}: "
                        + "; ".join(bad[:5]) + more + ".")
    longest = max((len(t) for t in texts), default=0)
    s = longest if width is None else int(width)
    if s < longest:
        raise DataError(f"ctc_targets: width {s} is shorter than the longest label ({longest} characters).")
    out = numpy.zeros((len(texts), 1 + s), dtype=numpy.int64)
    table = {c: i + 1 for i, c in enumerate(charset.chars)}
    for n, text in enumerate(texts):
        out[n, 0] = len(text)
        out[n, 1:1 + len(text)] = [table[c] for c in text]
    return out


class CTCLoss:
    """``loss(logits, y) -> (loss, dlogits)`` for ``xpnet.Trainer``: ``xpnet.ops.ctc_loss`` with the
    blank at class 0, logits (N, T, K + 1), ``y`` packed by ``ctc_targets`` (on any backend).

    ``smoothing`` eps in [0, 1) is label smoothing for CTC: the gradient is that of
    ``objective`` = (1 - eps) * ctc + eps * u, where u is each column's cross-entropy against the
    uniform distribution over the K + 1 classes, summed over the columns and averaged over the
    batch (it adds ``eps * (softmax - 1 / (K + 1)) / N`` to every column's gradient).  The loss
    returned stays the plain CTC loss, -log p(label), so that logs, the validation loss and
    ``StuckWatch`` read the same scale with or without smoothing (u alone is about 10 at any
    accuracy for 32 columns, which would hide a loss that falls).
    """

    def __init__(self, smoothing: float = 0.0):
        self.smoothing = _check_smoothing(smoothing, "CTC")

    def __call__(self, logits, y):
        loss, dlogits = ctc_loss(logits, *self._labels(logits, y), blank=BLANK)
        if self.smoothing:
            eps = logits.dtype.type(self.smoothing)
            dlogits *= logits.dtype.type(1) - eps
            dlogits += _uniform_cross_entropy(logits)[1] * eps
        return loss, dlogits

    def objective(self, logits, y):
        """The value whose gradient ``__call__`` returns (0-d array): (1 - eps) * ctc + eps * u."""
        loss, _ = ctc_loss(logits, *self._labels(logits, y), blank=BLANK)
        if not self.smoothing:
            return loss
        eps = logits.dtype.type(self.smoothing)
        return loss * (logits.dtype.type(1) - eps) + _uniform_cross_entropy(logits)[0] * eps

    @staticmethod
    def _labels(logits, y):
        if getattr(y, "ndim", None) != 2 or y.shape[1] < 2 or y.shape[0] != logits.shape[0]:
            raise ShapeError(f"CTCLoss needs targets (N, 1 + S) packed by ctc_targets for {logits.shape[0]} "
                             f"samples, got shape {getattr(y, 'shape', None)}.")
        if y.dtype.kind not in "iu":
            xp = backend.get_array_module(y)
            y = xp.rint(y).astype(numpy.int64)  # a transform that made the targets floats
        return y[:, 1:], y[:, 0]

    def __repr__(self):
        return f"CTCLoss(smoothing={self.smoothing:g})" if self.smoothing else "CTCLoss()"


class BCELoss:
    """``loss(logits, y) -> (loss, dlogits)`` of the bce head: ``sigmoid_bce_with_logits`` on
    multi-hot targets (N, L * K).  ``smoothing`` eps in [0, 1): the gradient is that of
    ``objective``, the loss against targets pulled towards 1/2, ``t * (1 - eps) + eps / 2``; the
    loss returned stays the one against the targets themselves (as for ``CTCLoss``)."""

    def __init__(self, smoothing: float = 0.0):
        self.smoothing = _check_smoothing(smoothing, "BCE")

    def __call__(self, logits, y):
        if not self.smoothing:
            return sigmoid_bce_with_logits(logits, y)
        loss, _ = sigmoid_bce_with_logits(logits, y)
        return loss, sigmoid_bce_with_logits(logits, self._smoothed(logits, y))[1]

    def objective(self, logits, y):
        """The value whose gradient ``__call__`` returns (0-d array)."""
        return sigmoid_bce_with_logits(logits, self._smoothed(logits, y) if self.smoothing else y)[0]

    def _smoothed(self, logits, y):
        eps = logits.dtype.type(self.smoothing)
        return y.astype(logits.dtype, copy=False) * (logits.dtype.type(1) - eps) + eps / logits.dtype.type(2)

    def __repr__(self):
        return f"BCELoss(smoothing={self.smoothing:g})" if self.smoothing else "BCELoss()"


def _check_smoothing(value, head: str) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{head} label smoothing must be in [0, 1), got {value!r}.")
    return value


def _uniform_cross_entropy(logits):
    """(u, du/dlogits): each column's cross-entropy against the uniform distribution, summed over
    the columns and averaged over the batch.  logits (N, T, K); in their dtype."""
    xp = backend.get_array_module(logits)
    n, _, k = logits.shape
    dt = logits.dtype.type
    logp = log_softmax(logits)  # (N, T, K)
    grad = xp.exp(logp)
    grad -= dt(1) / dt(k)
    grad /= dt(n)
    return -logp.sum(dtype=logits.dtype) / dt(k * n), grad


def columns_needed(text: str) -> int:
    """The fewest columns a CTC reader needs to emit ``text``: one per character, plus a blank
    between each pair of equal neighbours (else they would merge)."""
    return len(text) + sum(a == b for a, b in zip(text, text[1:]))


def read_lengths(metadata: dict):
    """A CTC reader's ``"lengths"`` metadata, [shortest, longest] text it was trained on, as a
    tuple; None where absent (readings of any length).  ModelFileError when malformed."""
    value = metadata.get("lengths")
    if value is None:
        return None
    try:
        lo, hi = (int(v) for v in value)
        if 0 <= lo <= hi:
            return lo, hi
    except (TypeError, ValueError):
        pass
    raise ModelFileError(f"the reader's metadata has lengths {value!r}: expected [shortest, longest] text lengths.")


def text_lengths(charset: Charset) -> list:
    """[shortest, longest]: the ``"lengths"`` metadata of a CTC reader trained on ``charset``'s texts."""
    return [charset.min_length, charset.length]


def reading_path(logits, lengths=None):
    """(N, T) class per column of a reading of (N, T, K + 1) logits.  ``lengths`` None: the best
    path (argmax per column); (lo, hi): the best path among those whose text has lo to hi
    characters -- the plain best path unless that has a length the reader never saw, e.g. two
    equal-looking neighbours merged into one character (``xpnet.ops.ctc_best_path``)."""
    if lengths is None:
        return backend.to_numpy(logits.argmax(axis=2))
    return ctc_best_path(logits, BLANK, lengths[0], lengths[1])


def best_path(logits, lengths=None):
    """(N, T) charset indices of the reading (``reading_path``), left-aligned and padded with -1,
    and the (N,) lengths: repeats merged, blanks dropped (no probabilities: for metrics)."""
    indices, counts, _ = _collapse(reading_path(logits, lengths).astype(numpy.int64))
    return indices, counts


def _collapse(best):
    """Best-path classes (N, T) -> (indices (N, T) padded with -1, lengths (N,), starts (N, T) bool:
    the columns where a character begins)."""
    n, t = best.shape
    starts = label_starts(best, BLANK)
    lengths = starts.sum(axis=1)
    indices = numpy.full((n, t), -1, dtype=numpy.int64)
    indices[numpy.arange(t)[None, :] < lengths[:, None]] = best[starts] - 1
    return indices, lengths, starts


def ctc_metrics(charset: Charset, lengths=None) -> dict:
    """``{"string_accuracy": f, "char_error_rate": f}``, ``f(logits, y) -> float``, for a Trainer
    whose targets ``y`` are packed by ``ctc_targets`` (logits (N, T, K + 1), read as ``ctc_decode``
    reads them, with ``lengths``)."""
    def _read(logits, y):
        indices, counts = best_path(logits, lengths)
        y = numpy.rint(backend.to_numpy(y)).astype(numpy.int64)
        width = max(indices.shape[1], y.shape[1] - 1)
        pred = numpy.full((len(y), width), -1, dtype=numpy.int64)
        pred[:, :indices.shape[1]] = indices
        truth = numpy.full_like(pred, -1)
        truth[:, :y.shape[1] - 1] = y[:, 1:] - 1
        return pred, counts, truth, y[:, 0]

    def string_accuracy(logits, y):
        pred, _, truth, _ = _read(logits, y)
        return float((pred == truth).all(axis=1).mean())

    def char_error_rate(logits, y):
        pred, counts, truth, true_lengths = _read(logits, y)
        table = numpy.array(list(charset.chars))
        reads = ["".join(table[row[:m]]) for row, m in zip(pred, counts.tolist())]
        truths = ["".join(table[row[:m]]) for row, m in zip(truth, true_lengths.tolist())]
        return float(edit_distances(reads, truths).sum() / max(1, int(true_lengths.sum())))

    return {"string_accuracy": string_accuracy, "char_error_rate": char_error_rate}


def softmax(logits):
    """Softmax over the last axis, in float64 (NumPy)."""
    z = numpy.asarray(logits, dtype=numpy.float64)
    z = numpy.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def ctc_decode(logits, charset: Charset, lengths=None):
    """Best-path reading of (N, T, K + 1) logits (``reading_path``: of ``lengths`` (lo, hi) characters
    when given, a reader's ``read_lengths``).

    Returns (texts, confidences (N,), char_confidences (N, T), indices (N, T)):
    * ``indices``: the class indices (into ``charset.chars``) of the characters read, left-aligned,
      padded with -1 up to T (the most characters T columns can emit);
    * ``char_confidences``: for each character read, the highest softmax probability it has over
      the run of columns that emitted it; NaN in the padding;
    * ``confidences``: the product of the text's character confidences; for an empty reading, the
      lowest blank probability over the columns.  Always in [0, 1].
    """
    logits = numpy.asarray(logits)
    n, t, k = logits.shape
    probs = softmax(logits)
    best = reading_path(logits, lengths)
    p_best = numpy.take_along_axis(probs, best[:, :, None], axis=2)[:, :, 0]
    chars = best != BLANK
    indices, lengths, starts = _collapse(best)
    run = numpy.cumsum(starts.ravel()) - 1  # the character (over the whole batch) each column belongs to
    peaks = numpy.zeros(int(lengths.sum()), dtype=numpy.float64)
    numpy.maximum.at(peaks, run[chars.ravel()], p_best.ravel()[chars.ravel()])
    slot = numpy.arange(t)[None, :] < lengths[:, None]  # (N, T): the filled slots of the padded outputs
    char_conf = numpy.full((n, t), numpy.nan, dtype=numpy.float64)
    char_conf[slot] = peaks
    conf = numpy.where(slot, char_conf, 1.0).prod(axis=1)
    empty = lengths == 0
    if empty.any():
        conf[empty] = probs[empty, :, BLANK].min(axis=1)
    table = numpy.array(list(charset.chars))
    texts = ["".join(table[row[:m]]) for row, m in zip(indices, lengths.tolist())]
    return texts, numpy.clip(conf, 0.0, 1.0), char_conf, indices


def edit_distances(reads, truths) -> numpy.ndarray:
    """(N,) Levenshtein distances between pairs of strings (insertions, deletions, substitutions count 1).

    The dynamic programme runs over the characters, vectorised over the batch.
    """
    reads, truths = list(reads), list(truths)
    n = len(reads)
    la = numpy.array([len(a) for a in reads], dtype=numpy.int64)
    lb = numpy.array([len(b) for b in truths], dtype=numpy.int64)
    if n == 0:
        return numpy.zeros(0, dtype=numpy.int64)
    wa, wb = int(la.max(initial=0)), int(lb.max(initial=0))
    a = numpy.full((n, max(wa, 1)), -1, dtype=numpy.int64)
    b = numpy.full((n, max(wb, 1)), -2, dtype=numpy.int64)
    for i, (x, y) in enumerate(zip(reads, truths)):
        a[i, :len(x)] = [ord(c) for c in x]
        b[i, :len(y)] = [ord(c) for c in y]
    prev = numpy.broadcast_to(numpy.arange(wb + 1), (n, wb + 1)).copy()  # row i = 0 of the table
    out = numpy.where(la == 0, lb, 0)
    for i in range(1, wa + 1):
        cur = numpy.empty_like(prev)
        cur[:, 0] = i
        sub = prev[:, :-1] + (a[:, i - 1:i] != b[:, :wb])
        best = numpy.minimum(sub, prev[:, 1:] + 1)
        for j in range(1, wb + 1):  # the insertion term depends on the cell to the left
            cur[:, j] = numpy.minimum(best[:, j - 1], cur[:, j - 1] + 1)
        done = la == i
        out[done] = cur[done, lb[done]]
        prev = cur
    return out


__all__ = ["HEADS", "BLANK", "head_of", "ctc_metadata", "check_texts", "ctc_targets", "CTCLoss", "ctc_decode",
           "edit_distances", "softmax", "columns_needed", "best_path", "ctc_metrics",
           "reading_path", "read_lengths", "text_lengths"]
