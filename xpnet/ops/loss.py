"""Losses on logits, fused with their final activation.

Both return ``(loss, dlogits)`` where ``loss`` is a 0-d array on the logits'
backend (reading it to the host is the caller's choice, so a training step
needs no device synchronisation) and ``dlogits`` has the logits' shape and
dtype.  Both are finite for any finite logits (±1e4 included).
"""

from __future__ import annotations

from .. import dispatch
from ..backend import check_same_backend, get_array_module
from ..errors import ShapeError


def _as_logits_dtype(t, logits, name):
    xp = get_array_module(logits)
    check_same_backend(t, logits, f"the loss ({name})")
    return xp.asarray(t).astype(logits.dtype, copy=False)


@dispatch.op("sigmoid_bce_with_logits")
def sigmoid_bce_with_logits(logits, targets):
    """Sigmoid + binary cross-entropy, summed over units, averaged over the batch.

    logits (N, K), targets (N, K) in [0, 1] (multi-hot or soft).  Per unit::

        loss = max(x, 0) - x*t + log1p(exp(-|x|))      # = -t log s(x) - (1-t) log(1 - s(x))
        dloss/dx = (sigmoid(x) - t) / N

    computed as max(x,0)*(1-t) - min(x,0)*t + log1p(exp(-|x|)): the same value, but a
    sum of non-negative terms, so a huge logit with a soft target cannot cancel to a
    negative loss.
    """
    if getattr(logits, "ndim", 0) < 1:
        raise ShapeError("sigmoid_bce_with_logits needs logits of shape (N, K).")
    if targets.shape != logits.shape:
        raise ShapeError(
            f"targets have shape {targets.shape} but logits have shape {logits.shape}: "
            "encode labels as multi-hot rows of the same width."
        )
    xp = get_array_module(logits)
    t = _as_logits_dtype(targets, logits, "targets")
    n = logits.shape[0]
    e = xp.exp(-xp.abs(logits))  # in (0, 1]
    per_unit = xp.maximum(logits, 0) * (1 - t) - xp.minimum(logits, 0) * t + xp.log1p(e)
    loss = per_unit.sum(dtype=logits.dtype) / logits.dtype.type(n)
    sig = xp.where(logits >= 0, 1 / (1 + e), e / (1 + e))
    dlogits = (sig - t) / logits.dtype.type(n)
    return loss, dlogits


def log_softmax(logits, axis=-1):
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_cross_entropy(logits, labels):
    """Softmax + cross-entropy, averaged over the batch.

    logits (N, K); labels either integer class indices (N,) or probability
    rows (N, K) (one-hot or soft).  dloss/dlogits = (softmax - onehot) / N.
    """
    if getattr(logits, "ndim", 0) != 2:
        raise ShapeError(f"softmax_cross_entropy needs logits of shape (N, K), got {getattr(logits, 'shape', None)}.")
    xp = get_array_module(logits)
    n, k = logits.shape
    check_same_backend(labels, logits, "the loss (labels)")
    labels = xp.asarray(labels)
    if labels.ndim == 1:
        if labels.shape[0] != n or labels.dtype.kind not in "iu":
            raise ShapeError(f"labels must be {n} integer class indices, got shape {labels.shape} dtype {labels.dtype}.")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ShapeError(f"labels must lie in [0, {k}), got values from {int(labels.min())} to {int(labels.max())}.")
        target = (labels[:, None] == xp.arange(k)).astype(logits.dtype)
    elif labels.shape == logits.shape:
        target = labels.astype(logits.dtype, copy=False)
    else:
        raise ShapeError(f"labels must have shape ({n},) or {logits.shape}, got {labels.shape}.")
    logp = log_softmax(logits)
    loss = -(target * logp).sum(dtype=logits.dtype) / logits.dtype.type(n)
    dlogits = (xp.exp(logp) - target) / logits.dtype.type(n)
    return loss, dlogits
