"""Element-wise activations.  Shapes: any; output has the input's shape and dtype."""

from __future__ import annotations

from .. import dispatch
from ..backend import get_array_module


def relu_forward(x):
    """y = max(x, 0).  Returns (y, cache) where the cache is y itself (y > 0 <=> x > 0)."""
    xp = get_array_module(x)
    y = xp.maximum(x, 0)
    return y, y


@dispatch.op("relu_backward")
def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0."""
    y = cache
    return dy * (y > 0)


def sigmoid(x):
    """Numerically stable logistic function: never overflows, keeps the dtype."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]: cannot overflow
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
