"""Where training batches come from: (x, y) arrays shuffled per epoch, or an iterable of (x, y) batches.

An array source replays its shuffle from a saved generator state, so a run resumed inside an
epoch sees the same batches; an iterable source is an epoch of ``steps_per_epoch`` batches (or
one pass of a sized, re-iterable one such as a list of batches).
"""

from __future__ import annotations

import numpy

from .. import backend, checks
from ..errors import DataError, UsageError


def is_array_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape")


def make_source(train, steps_per_epoch, batch_size: int, xp, device_data_bytes: int):
    """The source for ``Trainer.fit``'s ``train`` argument (usage errors before any step)."""
    if is_array_pair(train):
        if steps_per_epoch is not None:
            raise UsageError("steps_per_epoch is only for iterator sources: with arrays an epoch is one pass.")
        return ArraySource(train[0], train[1], batch_size, xp, device_data_bytes)
    return IterSource(train, steps_per_epoch)


def eval_batches(data, batch_size: int):
    """(x, y) batches of evaluation data: arrays cut into ``batch_size`` slices, or an iterable as it is."""
    if not is_array_pair(data):
        return iter(data)
    x_all, y_all = data
    if x_all.shape[0] != y_all.shape[0]:
        raise UsageError(f"evaluation data has {x_all.shape[0]} inputs but {y_all.shape[0]} targets.")
    return ((x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, x_all.shape[0], batch_size))


def to_backend(a, xp):
    if xp is numpy:
        return backend.to_numpy(a)
    return xp.asarray(a)


class ArraySource:
    """(x, y) arrays, shuffled per epoch by the trainer's generator; the last batch may be smaller.

    When the model lives on CuPy and the arrays on the host, they are moved to the device once
    if they take less than ``device_data_bytes`` (then a step copies only indices).
    """

    resumable = True

    def __init__(self, x, y, batch_size, xp, device_data_bytes):
        if not hasattr(x, "shape") or not hasattr(y, "shape"):
            raise UsageError("training data must be a pair of arrays (x, y) or an iterable of (x, y) batches.")
        if x.shape[0] != y.shape[0]:
            raise UsageError(f"training data has {x.shape[0]} inputs but {y.shape[0]} targets.")
        n = int(x.shape[0])
        if n == 0:
            raise UsageError("the training set is empty.")
        if batch_size > n:
            raise UsageError(
                f"batch_size {batch_size} is larger than the training set ({n} samples): "
                f"use batch_size={n} or less."
            )
        if xp is not numpy and not backend.is_cupy_array(x) and x.nbytes + y.nbytes <= device_data_bytes:
            x, y = xp.asarray(x), xp.asarray(y)  # once, so steps copy nothing from the host
        self.x, self.y, self.n, self.batch_size = x, y, n, batch_size
        self.steps_per_epoch = -(-n // batch_size)
        self._order = None

    def start_epoch(self, rng, skip=0):
        order = rng.permutation(self.n)
        xp = backend.get_array_module(self.x)
        self._order = xp.asarray(order) if xp is not numpy else order

    def batch(self, b):
        idx = self._order[b * self.batch_size:(b + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


class IterSource:
    """An iterable or iterator of (x, y) batches, e.g. an endless generator of fresh CAPTCHAs."""

    def __init__(self, data, steps_per_epoch):
        if not hasattr(data, "__iter__"):
            raise UsageError(
                f"training data must be a pair of arrays (x, y) or an iterable of (x, y) batches, "
                f"got {type(data).__name__}."
            )
        self.data = data
        # A list or a dataset object gives a new iterator each time; a generator is its own iterator.
        self.reiterable = iter(data) is not data
        if steps_per_epoch is None:
            if self.reiterable and hasattr(data, "__len__"):
                steps_per_epoch = len(data)
                self.pass_per_epoch = True
            else:
                raise UsageError(
                    "training from an iterator or generator needs steps_per_epoch (the number of steps "
                    "between evaluations and checkpoints)."
                )
        else:
            self.pass_per_epoch = False
        self.steps_per_epoch = checks.positive_int(steps_per_epoch, "steps_per_epoch")
        # A pass-per-epoch source (a list of batches) can be replayed up to the resume point.
        self.resumable = self.pass_per_epoch
        self._it = None

    def start_epoch(self, rng, skip=0):
        if self._it is None or self.pass_per_epoch:
            self._it = iter(self.data)
            if self.pass_per_epoch and skip:
                for _ in range(skip):  # resumed inside an epoch: skip the batches already trained on
                    next(self._it)

    def batch(self, b):
        try:
            item = next(self._it)
        except StopIteration:
            if not self.reiterable:
                raise DataError(
                    "the batch iterator ran out before the planned number of steps: make it endless or "
                    "lower epochs * steps_per_epoch."
                ) from None
            self._it = iter(self.data)
            try:
                item = next(self._it)
            except StopIteration:
                raise DataError("the training data yields no batches.") from None
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise UsageError(f"each training batch must be a pair (x, y), got {type(item).__name__}.")
        return item[0], item[1]
