"""Host -> device copies of training batches on a CUDA stream of their own.

    copier = StreamCopier()                 # in the thread that trains (records the device)
    x_dev, ticket = copier.copy(x_host)     # in a worker thread: an async copy on the side stream
    copier.accept(ticket)                   # in the training thread: its stream waits for the copy
    mark = copier.mark()                    # in the training thread: "work queued so far"
    copier.release(mark)                    # in the worker thread: wait until that work has run

Why a stream of its own: on CuPy's default stream the copy of batch k+1 would
queue behind step k; on a non-blocking stream it runs while step k computes.
The host array is first copied into a pinned (page-locked) buffer, the only kind
of host memory a device copy can read asynchronously; the worker thread then
waits for the copy (``copy`` returns after it), so one pinned buffer per
(shape, dtype) is reused for every batch.

Why ``mark`` / ``release``: a device array allocated on the side stream goes
back to that stream's part of CuPy's memory pool when it is freed, and the pool
may hand the block to the next copy at once, while kernels queued on the
training stream still read it.  So the prefetcher keeps each handed-out batch
referenced until the training stream has passed a ``mark`` recorded when the
next batch was taken, and drops it only after ``release`` (see
``xpnet.training.prefetch``).

Only CuPy is touched here, through ``xpnet.backend``; on NumPy the prefetcher
uses ``HostHandover`` (xpnet.training.prefetch) and this module is never used.
"""

from __future__ import annotations

import numpy

from .. import backend
from ..errors import BackendError


class StreamCopier:
    """Copies host arrays to the current CUDA device on a non-blocking stream (see the module docstring)."""

    def __init__(self):
        cp = backend.cupy
        if cp is None or not backend.has_cupy_gpu:
            raise BackendError(f"StreamCopier needs CuPy and a CUDA device: {backend.device_reason()}.")
        self._cp = cp
        self.device_id = cp.cuda.Device().id
        with cp.cuda.Device(self.device_id):
            self.stream = cp.cuda.Stream(non_blocking=True)
        self._pinned: dict = {}

    def _staging(self, a: numpy.ndarray) -> numpy.ndarray:
        key = (a.shape, a.dtype.str)
        buf = self._pinned.get(key)
        if buf is None:
            buf = backend.cupyx.empty_pinned(a.shape, a.dtype)
            self._pinned[key] = buf
        return buf

    def copy(self, a):
        """``a`` on the device, and the ticket ``accept`` needs; returns once the copy has finished.

        A CuPy array (a source that makes its batches on the device) is returned as it is.
        """
        cp = self._cp
        if isinstance(a, cp.ndarray):
            return a, None
        a = numpy.ascontiguousarray(a)
        pinned = self._staging(a)
        pinned[...] = a
        with cp.cuda.Device(self.device_id), self.stream:
            out = cp.empty(a.shape, a.dtype)
            out.set(pinned, stream=self.stream)
            done = self.stream.record()
        done.synchronize()  # this worker waits, not the training thread; the pinned buffer is free again
        return out, done

    def accept(self, ticket) -> None:
        """The training thread's stream waits for the copy of ``ticket`` (no host synchronisation)."""
        if ticket is not None:
            self._cp.cuda.get_current_stream().wait_event(ticket)

    def mark(self):
        """An event after all the work the training thread has queued so far."""
        with self._cp.cuda.Device(self.device_id):
            return self._cp.cuda.get_current_stream().record()

    def release(self, mark) -> None:
        """Wait (in the worker thread) until the work before ``mark`` has run on the device."""
        mark.synchronize()


__all__ = ["StreamCopier"]
