"""Naive float64 reference implementations: plain loops, obviously correct, slow.

The ops under test must agree with these on odd shapes, strides and padding.
"""

import math

import numpy as np


def conv2d(x, w, b, stride=(1, 1), pad=(0, 0)):
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    sh, sw = stride
    ph, pw = pad
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, f, oh, ow))
    for ni in range(n):
        for fi in range(f):
            for i in range(oh):
                for j in range(ow):
                    acc = 0.0
                    for ci in range(c):
                        for a in range(kh):
                            for bb in range(kw):
                                acc += xp[ni, ci, i * sh + a, j * sw + bb] * w[fi, ci, a, bb]
                    y[ni, fi, i, j] = acc + (b[fi] if b is not None else 0.0)
    return y


def max_pool2d(x, size=(2, 2), stride=(2, 2), pad=(0, 0)):
    """Returns y and dx_of_ones: the gradient of sum(y * g) for g given later via argmax positions."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    kh, kw = size
    sh, sw = stride
    ph, pw = pad
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, c, oh, ow))
    arg = np.zeros((n, c, oh, ow, 2), int)  # (row, col) in unpadded coordinates
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    best, pos = -math.inf, None
                    for a in range(kh):
                        for bb in range(kw):
                            r, s = i * sh + a - ph, j * sw + bb - pw
                            if 0 <= r < h and 0 <= s < w and x[ni, ci, r, s] > best:
                                best, pos = x[ni, ci, r, s], (r, s)
                    y[ni, ci, i, j] = best
                    arg[ni, ci, i, j] = pos
    return y, arg


def max_pool2d_backward(dy, arg, x_shape):
    dx = np.zeros(x_shape)
    n, c, oh, ow = dy.shape
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    r, s = arg[ni, ci, i, j]
                    dx[ni, ci, r, s] += dy[ni, ci, i, j]
    return dx


def bce_with_logits(x, t):
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    total = 0.0
    for xi, ti in zip(x.ravel(), t.ravel()):
        s = 1.0 / (1.0 + math.exp(-xi))
        total += -(ti * math.log(s) + (1 - ti) * math.log(1 - s))
    return total / x.shape[0]


def softmax_ce(x, labels):
    x = np.asarray(x, np.float64)
    total = 0.0
    for row, lab in zip(x, labels):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[lab]
    return total / x.shape[0]
