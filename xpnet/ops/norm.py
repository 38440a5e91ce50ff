"""Batch normalisation for conv maps (N, C, H, W) and vectors (N, C).

Statistics are per channel C, over every other axis.  In training mode the
batch statistics normalise and the running averages are updated in place;
in evaluation mode the running averages normalise.

The pieces below ``batchnorm_forward``/``batchnorm_backward`` are the formulas
themselves, on per-channel arrays that broadcast against the data (C,) or
(1, C, 1, 1): the fused CPU path computes its statistics its own way (per chunk,
all-reduced between threads) and then calls the same formulas.
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
    axes, bshape = _axes(x)
    if x.shape[1] != gamma.shape[0]:
        raise ShapeError(f"batch norm expects {gamma.shape[0]} channels, got {x.shape[1]}.")
    if train:
        m = x.size // x.shape[1]
        check_training_batch(m)
        mean = x.mean(axis=axes)
        xc = x - mean.reshape(bshape)
        var = (xc * xc).mean(axis=axes)
        update_running_stats(running_mean, running_var, mean, var, m, momentum)
    else:
        mean, var = running_mean, running_var
        xc = x - mean.reshape(bshape)
    inv_std = inverse_std(var, eps, x.dtype)
    xhat, y = normalise(xc, inv_std.reshape(bshape), gamma.reshape(bshape), beta.reshape(bshape))
    cache = (xhat, inv_std, gamma, train)
    return y, cache


def batchnorm_backward(dy, cache):
    """Gradients (dx, dgamma (C,), dbeta (C,))."""
    xhat, inv_std, gamma, train = cache
    axes, bshape = _axes(dy)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    scale = (gamma * inv_std).reshape(bshape)
    if not train:  # statistics were constants
        return dy * scale, dgamma, dbeta
    m = dy.size // dy.shape[1]
    return input_grad(dy, xhat, scale, dgamma.reshape(bshape), dbeta.reshape(bshape), m), dgamma, dbeta


# --------------------------------------------------------------------------- the formulas
def check_training_batch(m: int) -> None:
    """Batch statistics need more than one value per channel (m values in all)."""
    if m < 2:
        raise ShapeError("batch norm in training mode needs more than one value per channel (batch of 1?).")


def inverse_std(var, eps: float, dtype):
    """1 / sqrt(var + eps), computed in var's dtype and returned in ``dtype``."""
    xp = get_array_module(var)
    return (1 / xp.sqrt(var + var.dtype.type(eps))).astype(dtype, copy=False)


def update_running_stats(running_mean, running_var, mean, var, m: int, momentum: float) -> None:
    """Move the running averages (in place) towards the batch mean and variance of m values.

    The running variance takes the unbiased estimate m/(m-1) * var, as the major
    frameworks do.  ``mean``/``var`` may be wider than the buffers (the fused path
    keeps them in float64): each increment is rounded once to the buffer's dtype.
    """
    running_mean *= 1 - momentum
    running_mean += (momentum * mean).astype(running_mean.dtype, copy=False)
    running_var *= 1 - momentum
    running_var += ((momentum * m / (m - 1)) * var).astype(running_var.dtype, copy=False)


def normalise(xc, inv_std, gamma, beta):
    """(xhat, y) for centred values xc = x - mean: xhat = xc * inv_std, y = xhat * gamma + beta."""
    xhat = xc * inv_std
    return xhat, xhat * gamma + beta


def scale_and_shift(mean, inv_std, gamma, beta):
    """The normalisation as one affine map per channel, y = x * scale + shift.

    scale = gamma * inv_std, shift = beta - mean * scale: what a convolution
    followed by BatchNorm folds into its weights and bias.
    """
    scale = gamma * inv_std
    return scale, beta - mean * scale


def input_grad(dy, xhat, scale, dgamma, dbeta, m: int):
    """dx of a training-mode BatchNorm over m values per channel, scale = gamma * inv_std:

    dx = scale * (dy - (dbeta + xhat * dgamma) / m), with dbeta = sum(dy) and
    dgamma = sum(dy * xhat) over the m values (the batch statistics depend on x).
    """
    return scale * (dy - (dbeta + xhat * dgamma) / dy.dtype.type(m))


def input_grad_coefficients(scale, inv_std, mean, dgamma, dbeta, m: int):
    """``input_grad`` as an affine map of x per channel: dx = dy * scale + x * c_x + c_0.

    With xhat = (x - mean) * inv_std: c_x = -scale * inv_std * dgamma / m and
    c_0 = -scale * dbeta / m - c_x * mean.  One pass over dy and x, and xhat need
    not be kept.  Returns (c_x, c_0), computed in the arguments' dtype.
    """
    c_x = -(scale * inv_std * dgamma / m)
    c_0 = -(scale * dbeta / m) - c_x * mean
    return c_x, c_0
