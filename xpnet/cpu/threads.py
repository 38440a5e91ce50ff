"""A batch-parallel executor for the CPU: run one function per batch shard on a few
threads, each with single-threaded BLAS, with deterministic all-reduce.

NumPy's element-wise work runs on one core; BLAS alone uses all of them.
Splitting the batch into T shards run by T threads (NumPy releases the GIL
inside its loops and inside BLAS) keeps every core busy for the whole step.

* ``ShardPool.run(fn, t)`` calls ``fn(k)`` for k = 0..t-1: shard 0 in the calling
  thread, the others in persistent worker threads; it returns the results in
  shard order and re-raises the first error (by shard order).
* ``Reducer.allreduce(k, key, value)`` -- called by every shard with the same
  ``key`` -- returns the sum of all shards' values, added in shard order, so
  every shard gets the bitwise same total and a run is reproducible.
  BatchNorm uses it for whole-batch statistics.
* ``blas_threads(n)`` limits BLAS to n threads for a block (threadpoolctl).
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy

_controller = None
_controller_failed = False


def _blas_controller():
    """threadpoolctl's controller for the loaded BLAS libraries, or None without threadpoolctl."""
    global _controller, _controller_failed
    if _controller is None and not _controller_failed:
        try:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController().select(user_api="blas")
        except Exception:  # not installed, or an exotic BLAS it cannot drive
            _controller_failed = True
    return _controller


def can_limit_blas() -> bool:
    return _blas_controller() is not None


def _set_threads(lib, n: int):
    """Set one BLAS library's thread count, from whichever Python thread calls.

    threadpoolctl (3.6 and later) ignores OpenBLAS (pthreads) limits set from any
    thread but the first one that set a limit, while that thread lives: a model
    stepped from a second Python thread (a server's worker, a GUI's training
    thread) then ran every shard with full-width BLAS -- oversubscribed, and with
    results that depended on the calling thread.  Its process-wide setter is safe
    here: xpnet's regions run one at a time under the pool's lock.
    """
    getattr(lib, "_real_set_num_threads", lib.set_num_threads)(n)


@contextlib.contextmanager
def blas_threads(n: int):
    """Limit BLAS to ``n`` threads inside the block (no-op when threadpoolctl is missing)."""
    ctl = _blas_controller()
    if ctl is None:
        yield
        return
    saved = [lib.num_threads for lib in ctl.lib_controllers]
    changed = [lib for lib, s in zip(ctl.lib_controllers, saved) if s != n]
    for lib in changed:
        _set_threads(lib, n)
    try:
        yield
    finally:
        for lib, s in zip(ctl.lib_controllers, saved):
            if lib in changed:
                _set_threads(lib, s)


class _Worker:
    def __init__(self, index: int):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"xpnet-shard-{index}", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            job = self.inbox.get()
            if job is None:
                return
            fn, k = job
            try:
                self.outbox.put((True, fn(k)))
            except BaseException as exc:  # handed to the caller, re-raised there
                self.outbox.put((False, exc))


class Reducer:
    """Deterministic all-reduce between the shards of one ``ShardPool.run``."""

    def __init__(self, t: int):
        self.t = t
        self.barrier = threading.Barrier(t) if t > 1 else None
        self._slots: dict = {}

    def reset(self):
        self._slots.clear()
        if self.barrier is not None and self.barrier.broken:
            self.barrier.reset()

    def abort(self):
        if self.barrier is not None:
            self.barrier.abort()

    def allreduce(self, k: int, key, value):
        """Sum of ``value`` over the shards (in shard order); every shard must call it with ``key``."""
        if self.t == 1:
            return value
        self._slots[(key, k)] = value
        self.barrier.wait()
        total = self._slots[(key, 0)]
        for j in range(1, self.t):
            total = total + self._slots[(key, j)]
        return total

    def wait(self):
        """A plain barrier between the shards."""
        if self.barrier is not None:
            self.barrier.wait()


class ShardPool:
    """Persistent worker threads running one function per shard."""

    def __init__(self):
        self._workers: list[_Worker] = []
        # One parallel region at a time per pool (re-entrant for the calling thread).
        self.lock = threading.RLock()
        self.reducers: dict[int, Reducer] = {}

    def reducer(self, t: int) -> Reducer:
        r = self.reducers.get(t)
        if r is None:
            r = self.reducers[t] = Reducer(t)
        return r

    def run(self, fn, t: int, blas: int | None = None, bufsize: int | None = None):
        """[fn(0), ..., fn(t-1)], shard 0 on this thread; the first error (by shard) is raised.

        ``blas``: limit BLAS to that many threads for the region.  Set and restored
        under the pool's lock, so two Python threads running regions one after the
        other cannot leave BLAS limited.

        Every shard runs under the caller's NumPy error handling (``numpy.errstate``
        is per thread: a worker would otherwise use its own), and with ``bufsize``
        as NumPy's ufunc buffer size when given; both are put back afterwards.
        """
        fn = _with_numpy_state(fn, numpy.geterr(), bufsize)
        with self.lock, (blas_threads(blas) if blas else contextlib.nullcontext()):
            if t == 1:
                return [fn(0)]
            while len(self._workers) < t - 1:
                self._workers.append(_Worker(len(self._workers) + 1))
            reducer = self.reducer(t)
            reducer.reset()

            def guarded(k):
                try:
                    return fn(k)
                except BaseException:
                    reducer.abort()  # release shards waiting at a barrier
                    raise

            for k in range(1, t):
                self._workers[k - 1].inbox.put((guarded, k))
            results, errors = [None] * t, [None] * t
            try:
                results[0] = guarded(0)
            except BaseException as exc:
                errors[0] = exc
            for k in range(1, t):
                ok, value = self._workers[k - 1].outbox.get()
                if ok:
                    results[k] = value
                else:
                    errors[k] = value
            reducer.reset()
        # A BrokenBarrierError is only the echo of another shard's error: report the cause.
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real or any(e is not None for e in errors):
            raise (real or [e for e in errors if e is not None])[0]
        return results


def _with_numpy_state(fn, err: dict, bufsize: int | None):
    """fn run under NumPy error handling ``err`` and ufunc buffer size ``bufsize`` (if given)."""
    def run(k):
        with numpy.errstate(**err):
            if bufsize is None:
                return fn(k)
            saved = numpy.setbufsize(bufsize)
            try:
                return fn(k)
            finally:
                numpy.setbufsize(saved)
    return run


_pool: ShardPool | None = None


def shard_pool() -> ShardPool:
    """The process-wide pool (threads are created on first use)."""
    global _pool
    if _pool is None:
        _pool = ShardPool()
    return _pool


def shard_bounds(n: int, t: int) -> list[tuple[int, int]]:
    """Split range(n) into t contiguous shards whose sizes differ by at most one."""
    return [(k * n // t, (k + 1) * n // t) for k in range(t)]
