"""Metrics for multi-label, multi-class output (one block of classes per character).

The model's logits have shape (N, length * n_classes): block ``i`` (units
``i*K .. i*K+K-1``) scores character ``i``.  Prediction takes the argmax
inside each block (ties go to the first, lowest class index, on both
backends)::

    idx = decode(logits, length)                 # (N, length) class indices
    texts = decode_text(logits, charset)         # ["2A2X", ...] via Charset.decode
    char_accuracy(logits, y, length)             # fraction of characters right
    string_accuracy(logits, y, length)           # fraction of samples with every character right
    accuracy(logits, y)                          # one-label problems (length 1), e.g. MNIST

``y`` (the truth) may be class indices (N, length) -- or (N,) when length is
1 -- or the multi-hot targets (N, length * n_classes) used for the loss.

Why no "binary accuracy": averaged over all length*K sigmoid outputs, a model
that predicts "no" everywhere scores (K-1)/K (97% for K = 36) while reading
no character.  xpnet never reports that figure as accuracy.

Metric functions return Python floats (one device synchronisation each); the
arithmetic runs on the logits' backend.
"""

from __future__ import annotations

from collections import Counter

import numpy

from . import backend
from .errors import ShapeError


def _blocks(logits, length: int):
    if getattr(logits, "ndim", None) != 2:
        raise ShapeError(f"logits must have shape (N, length * n_classes), got {getattr(logits, 'shape', None)}.")
    length = int(length)
    n, width = logits.shape
    if length < 1 or width % length:
        raise ShapeError(
            f"logits have {width} units, which do not split into {length} character block(s) of equal size."
        )
    return logits.reshape(n, length, width // length)


def decode(logits, length: int = 1):
    """(N, length * K) logits -> (N, length) class indices (argmax per block, first on ties).

    Stays on the logits' backend.
    """
    return _blocks(logits, length).argmax(axis=2)


def decode_text(logits, charset) -> list[str]:
    """(N, length * K) logits -> N strings through ``charset`` (an ``xpnet.data.Charset``)."""
    if _blocks(logits, charset.length).shape[2] != charset.n_classes:
        raise ShapeError(
            f"logits have {logits.shape[1]} units but charset {charset.chars!r} with length {charset.length} "
            f"needs {charset.n_outputs}."
        )
    return charset.decode(backend.to_numpy(decode(logits, charset.length)))


def true_indices(y, length: int, n_classes: int, xp=numpy):
    """The truth as (N, length) indices on module ``xp``.

    Accepts class indices (N, length) -- or (N,) when length is 1 -- or
    multi-hot targets (N, length * n_classes) of any dtype (argmax per block).
    Labels on another backend than ``xp`` are moved (labels are small).
    """
    if xp is numpy:
        y = backend.to_numpy(y)
    else:
        y = xp.asarray(y)
    if y.ndim == 2 and y.shape[1] == length * n_classes:
        return y.reshape(y.shape[0], length, n_classes).argmax(axis=2)
    if y.ndim == 1 and length == 1 and y.dtype.kind in "iu":
        return y.reshape(-1, 1)
    if y.ndim == 2 and y.shape[1] == length and y.dtype.kind in "iu":
        return y
    n = y.shape[0] if y.ndim else "N"
    raise ShapeError(
        f"labels of shape {tuple(y.shape)} and dtype {y.dtype} match neither integer class indices "
        f"({n}, {length}) nor multi-hot targets ({n}, {length * n_classes})."
    )


def _pred_and_true(logits, y, length):
    pred = decode(logits, length)
    k = logits.shape[1] // int(length)
    truth = true_indices(y, int(length), k, backend.get_array_module(pred))
    if truth.shape[0] != pred.shape[0]:
        raise ShapeError(f"{pred.shape[0]} predictions but {truth.shape[0]} labels.")
    return pred, truth


def char_accuracy(logits, y, length: int = 1) -> float:
    """Fraction of characters predicted right, over all N * length characters."""
    pred, truth = _pred_and_true(logits, y, length)
    if pred.size == 0:
        return float("nan")
    return float((pred == truth).mean())


def string_accuracy(logits, y, length: int = 1) -> float:
    """Fraction of samples whose every character is right (the CAPTCHA is solved)."""
    pred, truth = _pred_and_true(logits, y, length)
    if pred.shape[0] == 0:
        return float("nan")
    return float((pred == truth).all(axis=1).mean())


def accuracy(logits, y) -> float:
    """Plain accuracy for one-label problems: (N, K) logits against indices (N,) or one-hot (N, K)."""
    return char_accuracy(logits, y, length=1)


def confusion_matrix(logits, y, length: int = 1):
    """(K, K) NumPy int64 counts over all characters: row = true class, column = predicted class."""
    pred, truth = _pred_and_true(logits, y, length)
    k = logits.shape[1] // int(length)
    pred, truth = backend.to_numpy(pred).ravel(), backend.to_numpy(truth).ravel()
    out = numpy.zeros((k, k), dtype=numpy.int64)
    numpy.add.at(out, (truth, pred), 1)
    return out


def most_confused(logits, y, charset, top: int = 10) -> list[tuple[str, str, int]]:
    """The ``top`` most frequent mistakes as (true character, predicted character, count), most first.

    Ties in count are ordered by the characters' order in the charset.
    """
    cm = confusion_matrix(logits, y, charset.length)
    if cm.shape[0] != charset.n_classes:
        raise ShapeError(f"logits have {cm.shape[0]} classes per character but the charset has {charset.n_classes}.")
    mistakes = Counter()
    rows, cols = numpy.nonzero(cm)
    for t, p in zip(rows.tolist(), cols.tolist()):
        if t != p:
            mistakes[(t, p)] = int(cm[t, p])
    ordered = sorted(mistakes.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(charset.chars[t], charset.chars[p], n) for (t, p), n in ordered[:top]]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion k / n (e.g. images read right of n tested).

    Small test sets are noisy: 180 of 200 right is 90% with a 95% interval of about 85-93%.
    Unlike the normal approximation it stays inside [0, 1] and is sound at 0 or n successes.
    """
    import statistics

    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ShapeError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    if not 0 < confidence < 1:
        raise ShapeError(f"confidence must be between 0 and 1, got {confidence}.")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / denom
    # at 0 or n successes the bound is exactly 0 or 1 (the formula leaves rounding residue)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def multilabel_metrics(length: int) -> dict:
    """``{"char_accuracy": f, "string_accuracy": f}`` with ``f(logits, y) -> float``, for a Trainer."""
    def char_acc(logits, y):
        return char_accuracy(logits, y, length)

    def string_acc(logits, y):
        return string_accuracy(logits, y, length)

    char_acc.__name__, string_acc.__name__ = "char_accuracy", "string_accuracy"
    return {"char_accuracy": char_acc, "string_accuracy": string_acc}


__all__ = ["decode", "decode_text", "true_indices", "char_accuracy", "string_accuracy", "accuracy",
           "confusion_matrix", "most_confused", "multilabel_metrics", "wilson_interval"]
