"""Inverted dropout: in training, zero each value with probability ``rate`` and scale the rest
by 1/(1-rate), so evaluation (the identity) needs no rescaling.

The random draw stays with the caller (which generator, which device, how much
of a batch at once); these functions turn a uniform draw into the mask and apply it.
"""

from __future__ import annotations


def dropout_mask(u, rate: float):
    """The mask for a uniform draw u in [0, 1): 0 where u < rate, 1/(1-rate) elsewhere, in u's dtype."""
    return (u >= rate) * u.dtype.type(1.0 / (1.0 - rate))


def dropout_forward(x, mask):
    """(y = x * mask, cache); mask broadcasts against x (any shape)."""
    return x * mask, mask


def dropout_backward(dy, cache):
    """dx = dy * mask: each value's gradient goes through with the factor it was scaled by."""
    return dy * cache
