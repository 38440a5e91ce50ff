"""Batches fetched ahead in a background thread and handed over on the model's device.

    with Prefetcher(source, first=0, stop=steps_per_epoch, xp=numpy, ahead=2) as batches:
        for b in range(0, steps_per_epoch):
            x, y = next(batches)            # batch b, already on the model's backend
            ...                             # the training step
    batches.wait_seconds                    # time spent inside next(): waiting for data

``source`` is a trainer source (``training.sources``: ``start_epoch`` already
called, ``batch(b)`` for ``first <= b < stop`` in order).  With ``ahead >= 1``
one daemon thread calls ``source.batch(b)`` for the next ``ahead`` batches and
moves each to the device while the current step runs:

* on NumPy, the thread only takes the batch (an array source's shuffled
  indexing, a stream's batch from its generator processes); ``HostHandover``
  passes arrays through;
* on CuPy, ``xpnet.cuda.transfer.StreamCopier`` copies it on a stream of its
  own, so the copy overlaps the step; the training stream waits for it on the
  device, never on the host.

Batches come out in the order of ``b`` and are the same arrays (same values,
same dtypes: nothing is converted) as ``source.batch(b)`` gives, so a run
with prefetching is the run without it.  A batch belongs to the consumer until
it asks for the next one: then the previous batch is released (on CuPy only
after the device has run the work queued on it).  An exception raised by the
source is raised by ``next`` at the batch where it happened.  ``ahead=0``
fetches in the caller's thread (the plain path, for debugging and comparison).

``wait_seconds`` is the time the consumer spent in ``next`` (waiting for a
batch that was not ready, plus the hand-over).  Over a training epoch,
``wait_seconds / epoch seconds`` is the share of the time the loop waited for
data; on a GPU it is an upper bound on the time the device idled for want of
data (the device can only starve while the loop waits).
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import numpy

from .. import backend, checks
from .sources import to_backend

_POLL = 0.1  # seconds between checks of the stop flag while the worker waits for room in the queue


class HostHandover:
    """The NumPy device: batches are used where they are (``backend.to_numpy`` of each array)."""

    def copy(self, a):
        return backend.to_numpy(a), None

    def accept(self, ticket) -> None:
        pass

    def mark(self):
        return None

    def release(self, mark) -> None:
        pass


class PlainHandover(HostHandover):
    """Without a worker thread: each array moved with ``sources.to_backend`` on the current stream."""

    def __init__(self, xp):
        self.xp = xp

    def copy(self, a):
        return to_backend(a, self.xp), None


def device_for(xp):
    """The hand-over for the model's array module: ``StreamCopier`` on CuPy, ``HostHandover`` on NumPy."""
    if xp is numpy:
        return HostHandover()
    from ..cuda.transfer import StreamCopier

    return StreamCopier()


class Prefetcher:
    """An iterator of batches ``first .. stop - 1`` of ``source`` on the device (see the module docstring).

    source  a trainer source: ``batch(b) -> (x, y)``
    xp      the model's array module (numpy or cupy); decides the hand-over unless ``device`` is given
    ahead   batches fetched ahead by the background thread (0: fetch in the caller's thread)
    device  the hand-over (``copy``, ``accept``, ``mark``, ``release``); default ``device_for(xp)``
    """

    def __init__(self, source, first: int, stop: int, xp=numpy, ahead: int = 2, device=None):
        self.source = source
        self.next_b, self.stop = int(first), int(stop)
        self.ahead = checks.integer(ahead, "prefetch", 0, what="0 (no prefetching) or a positive integer")
        if device is None:  # fetched in the caller's thread, a batch moves on the training stream as before
            device = device_for(xp) if self.ahead else PlainHandover(xp)
        self.device = device
        self.wait_seconds = 0.0
        self._held = None            # the batch handed out last: (x, y)
        self._closed = False
        self._thread = None
        if self.ahead and self.next_b < self.stop:
            self._queue: queue.Queue = queue.Queue(maxsize=self.ahead)
            self._retired: collections.deque = collections.deque()  # (batch, mark): freed by the worker
            self._stop_flag = threading.Event()
            self._thread = threading.Thread(target=self._work, name="xpnet-prefetch", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- consumer side
    def __iter__(self):
        return self

    def __next__(self):
        if self._closed or self.next_b >= self.stop:
            raise StopIteration
        t = time.monotonic()
        if self._thread is None:  # the plain path: fetched here, used at once
            x, y, tickets = self._fetch(self.next_b)
            for ticket in tickets:
                self.device.accept(ticket)
        else:
            b, kind, payload = self._queue.get()
            if kind == "error":
                self.close()
                raise payload
            x, y, tickets = payload
            for ticket in tickets:
                self.device.accept(ticket)
            if self._held is not None:  # the previous batch: freed once the device is past this point
                self._retired.append((self._held, self.device.mark()))
        self._held = (x, y)
        self.next_b += 1
        self.wait_seconds += time.monotonic() - t
        return x, y

    def close(self) -> None:
        """Stop the worker (it finishes the batch it is fetching) and release the batches it holds."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._stop_flag.set()
            self._thread.join()
            while not self._queue.empty():
                self._queue.get_nowait()
            if self._held is not None:
                self._retired.append((self._held, self.device.mark()))
            self._drain_retired()
        self._held = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---------------------------------------------------------------- worker side
    def _fetch(self, b):
        x, y = self.source.batch(b)
        x, tx = self.device.copy(x)
        y, ty = self.device.copy(y)
        return x, y, (tx, ty)

    def _drain_retired(self) -> None:
        while self._retired:
            _batch, mark = self._retired.popleft()
            self.device.release(mark)  # only now may the memory of _batch go back to the pool

    def _work(self) -> None:
        b = self.next_b
        while b < self.stop and not self._stop_flag.is_set():
            self._drain_retired()
            try:
                item = (b, "ok", self._fetch(b))
            except BaseException as exc:  # noqa: BLE001 -- raised again by the consumer at this batch
                item = (b, "error", exc)
            while not self._stop_flag.is_set():
                try:
                    self._queue.put(item, timeout=_POLL)
                    break
                except queue.Full:
                    continue
            if item[1] == "error":
                return
            item = None  # the batch's last references are the consumer's and the retired queue's
            b += 1


__all__ = ["Prefetcher", "HostHandover", "PlainHandover", "device_for"]
