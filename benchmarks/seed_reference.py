"""A seed-style reference: the CAPTCHA network written the way the original blog post
(and "Deep Learning from Scratch") writes it, for the benchmark only -- not part of xpnet.

What makes it "seed-style", on purpose:
* float64 everywhere (im2col allocates float64 whatever the input);
* im2col fills a zero-initialised (N, C, KH, KW, OH, OW) buffer with a Python
  loop over the kernel offsets, then transposes; col2im loops the same way;
* max pooling goes through im2col (one column per window) and argmax;
* separate sigmoid and binary cross-entropy with log(y + 1e-7), backward through
  both (a divide by y and by 1 - y), as the seed did.

Its defects that would distort a speed comparison are fixed: the forward pass
runs once per step, the ReLU between the two dense layers is there, every
layer is trained (the network is the same as ``xpnet.models.captcha_net``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


def im2col(x, fh, fw, stride=1, pad=0):
    n, c, h, w = x.shape
    oh = (h + 2 * pad - fh) // stride + 1
    ow = (w + 2 * pad - fw) // stride + 1
    img = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)], "constant")
    col = np.zeros((n, c, fh, fw, oh, ow))
    for y in range(fh):
        y_max = y + stride * oh
        for xx in range(fw):
            x_max = xx + stride * ow
            col[:, :, y, xx, :, :] = img[:, :, y:y_max:stride, xx:x_max:stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(n * oh * ow, -1)


def col2im(col, input_shape, fh, fw, stride=1, pad=0):
    n, c, h, w = input_shape
    oh = (h + 2 * pad - fh) // stride + 1
    ow = (w + 2 * pad - fw) // stride + 1
    col = col.reshape(n, oh, ow, c, fh, fw).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((n, c, h + 2 * pad + stride - 1, w + 2 * pad + stride - 1))
    for y in range(fh):
        y_max = y + stride * oh
        for xx in range(fw):
            x_max = xx + stride * ow
            img[:, :, y:y_max:stride, xx:x_max:stride] += col[:, :, y, xx, :, :]
    return img[:, :, pad:h + pad, pad:w + pad]


class Convolution:
    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b, self.stride, self.pad = W, b, stride, pad

    def forward(self, x):
        fn, c, fh, fw = self.W.shape
        n, c, h, w = x.shape
        oh = 1 + (h + 2 * self.pad - fh) // self.stride
        ow = 1 + (w + 2 * self.pad - fw) // self.stride
        col = im2col(x, fh, fw, self.stride, self.pad)
        col_w = self.W.reshape(fn, -1).T
        out = np.dot(col, col_w) + self.b
        self.x, self.col, self.col_w = x, col, col_w
        return out.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)

    def backward(self, dout):
        fn, c, fh, fw = self.W.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, fn)
        self.db = np.sum(dout, axis=0)
        self.dW = np.dot(self.col.T, dout).transpose(1, 0).reshape(fn, c, fh, fw)
        dcol = np.dot(dout, self.col_w.T)
        return col2im(dcol, self.x.shape, fh, fw, self.stride, self.pad)


class Pooling:
    def __init__(self, pool_h, pool_w, stride=2):
        self.pool_h, self.pool_w, self.stride = pool_h, pool_w, stride

    def forward(self, x):
        n, c, h, w = x.shape
        oh = 1 + (h - self.pool_h) // self.stride
        ow = 1 + (w - self.pool_w) // self.stride
        col = im2col(x, self.pool_h, self.pool_w, self.stride).reshape(-1, self.pool_h * self.pool_w)
        self.arg_max = np.argmax(col, axis=1)
        self.x = x
        return np.max(col, axis=1).reshape(n, oh, ow, c).transpose(0, 3, 1, 2)

    def backward(self, dout):
        dout = dout.transpose(0, 2, 3, 1)
        size = self.pool_h * self.pool_w
        dmax = np.zeros((dout.size, size))
        dmax[np.arange(self.arg_max.size), self.arg_max.flatten()] = dout.flatten()
        dmax = dmax.reshape(dout.shape + (size,))
        dcol = dmax.reshape(dmax.shape[0] * dmax.shape[1] * dmax.shape[2], -1)
        return col2im(dcol, self.x.shape, self.pool_h, self.pool_w, self.stride)


class Relu:
    def forward(self, x):
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout = dout.copy()
        dout[self.mask] = 0
        return dout


class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b

    def forward(self, x):
        self.original_x_shape = x.shape
        x = x.reshape(x.shape[0], -1)
        self.x = x
        return np.dot(x, self.W) + self.b

    def backward(self, dout):
        dx = np.dot(dout, self.W.T)
        self.dW = np.dot(self.x.T, dout)
        self.db = np.sum(dout, axis=0)
        return dx.reshape(*self.original_x_shape)


class SigmoidBCE:
    """Sigmoid, then binary cross-entropy with log(y + 1e-7): the seed's loss, kept separate."""

    def forward(self, x, t):
        self.t = t
        self.y = 1 / (1 + np.exp(-x))
        y = self.y
        return -np.sum(t * np.log(y + 1e-7) + (1 - t) * np.log(1 - y + 1e-7)) / x.shape[0]

    def backward(self):
        y, t = self.y, self.t
        dy = (-t / (y + 1e-7) + (1 - t) / (1 - y + 1e-7)) / t.shape[0]
        return dy * y * (1 - y)


class SeedCaptchaNet:
    """input (3, 32, 80) -> [conv 3x3 -> ReLU -> pool 2x2] x (32, 64, 128) -> 512 -> ReLU -> 144."""

    def __init__(self, input_shape=(3, 32, 80), outputs=144, seed=0):
        rng = np.random.default_rng(seed)
        c, h, w = input_shape
        self.params = {}
        chans = [c, 32, 64, 128]
        for i in range(3):
            fan_in = chans[i] * 9
            self.params[f"W{i + 1}"] = rng.standard_normal((chans[i + 1], chans[i], 3, 3)) * np.sqrt(2 / fan_in)
            self.params[f"b{i + 1}"] = np.zeros(chans[i + 1])
            h, w = (h - 2) // 2, (w - 2) // 2
        flat = 128 * h * w
        self.params["W4"] = rng.standard_normal((flat, 512)) * np.sqrt(2 / flat)
        self.params["b4"] = np.zeros(512)
        self.params["W5"] = rng.standard_normal((512, outputs)) * np.sqrt(2 / 512)
        self.params["b5"] = np.zeros(outputs)
        p = self.params
        self.layers = OrderedDict()
        for i in range(1, 4):
            self.layers[f"Conv{i}"] = Convolution(p[f"W{i}"], p[f"b{i}"])
            self.layers[f"Relu{i}"] = Relu()
            self.layers[f"Pool{i}"] = Pooling(2, 2, stride=2)
        self.layers["Affine1"] = Affine(p["W4"], p["b4"])
        self.layers["Relu4"] = Relu()  # the seed registered its ReLU twice: restored here
        self.layers["Affine2"] = Affine(p["W5"], p["b5"])
        self.last = SigmoidBCE()

    def predict(self, x):
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def train_step(self, x, t, lr=0.01):
        loss = self.last.forward(self.predict(x), t)
        dout = self.last.backward()
        for layer in reversed(self.layers.values()):
            dout = layer.backward(dout)
        names = {"Conv1": 1, "Conv2": 2, "Conv3": 3, "Affine1": 4, "Affine2": 5}
        for lname, i in names.items():
            layer = self.layers[lname]
            self.params[f"W{i}"] -= lr * layer.dW
            self.params[f"b{i}"] -= lr * layer.db
        return loss
