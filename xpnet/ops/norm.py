"""Batch normalisation for conv maps (N, C, H, W) and vectors (N, C).

Statistics are per channel C, over every other axis.  In training mode the
batch statistics normalise and the running averages are updated in place;
in evaluation mode the running averages normalise.
"""

from __future__ import annotations

from ..backend import get_array_module
from ..errors import ShapeError


def _axes(x):
    if x.ndim == 4:
        return (0, 2, 3), (1, -1, 1, 1)
    if x.ndim == 2:
        return (0,), (1, -1)
    raise ShapeError(f"batch norm needs (N, C, H, W) or (N, C) input, got shape {x.shape}.")


def batchnorm_forward(x, gamma, beta, running_mean, running_var, train: bool,
                      momentum: float = 0.1, eps: float = 1e-5):
    """Returns (y with x's shape, cache).  Updates running_mean/var in place when train."""
    xp = get_array_module(x)
    axes, bshape = _axes(x)
    if x.shape[1] != gamma.shape[0]:
        raise ShapeError(f"batch norm expects {gamma.shape[0]} channels, got {x.shape[1]}.")
    if train:
        m = x.size // x.shape[1]
        if m < 2:
            raise ShapeError("batch norm in training mode needs more than one value per channel (batch of 1?).")
        mean = x.mean(axis=axes)
        xc = x - mean.reshape(bshape)
        var = (xc * xc).mean(axis=axes)
        # Running variance uses the unbiased estimate, as the major frameworks do.
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += (momentum * m / (m - 1)) * var
    else:
        mean, var = running_mean, running_var
        xc = x - mean.reshape(bshape)
    inv_std = 1 / xp.sqrt(var + x.dtype.type(eps))
    xhat = xc * inv_std.reshape(bshape)
    y = xhat * gamma.reshape(bshape) + beta.reshape(bshape)
    cache = (xhat, inv_std, gamma, train)
    return y, cache


def batchnorm_backward(dy, cache):
    """Gradients (dx, dgamma (C,), dbeta (C,))."""
    xhat, inv_std, gamma, train = cache
    axes, bshape = _axes(dy)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    g = (gamma * inv_std).reshape(bshape)
    if not train:  # statistics were constants
        return dy * g, dgamma, dbeta
    m = dy.size // dy.shape[1]
    dx = g * (dy - (dbeta.reshape(bshape) + xhat * dgamma.reshape(bshape)) / dy.dtype.type(m))
    return dx, dgamma, dbeta
