"""Shards 1..T-1 of the fused CPU path in worker processes instead of threads.

Why: NumPy releases the interpreter lock inside each call, so T threads of one
process do run in parallel, but every call hands the lock back and forth.  A
thread that finds it held sleeps, and waking it costs ~40 us on a VM.  A CRNN
step at batch 64 makes thousands of calls: with two threads the process used
~170% of two cores (the rest waiting for the lock), and a 32-image shard's first
conv block ran 1.7x slower than alone.  Two processes share no lock
(benchmarks/NOTES.md #43).

How: shard 0 runs in the calling thread as before; each other shard runs in a
worker process (``python -m xpnet.cpu.shard_worker``, started once, one BLAS
thread) that holds a replica of the model (rebuilt from ``Sequential.spec()``)
whose parameters and buffers are views of a shared memory file (the *arena*).
Per call the main process copies the model's state, the batch (and in backward
the output gradient) into the arena and sends one command per worker down a
pipe; the replica's executor then runs exactly the per-shard code the threads
run.  BatchNorm all-reduces go through the pipes (``MainReducer`` sums in shard
order, like ``threads.Reducer``), outputs, input gradients and partial weight
gradients come back through the arena, and the main process adds the partial
gradients in shard order.  So a step gives the same bits as with threads.

Messages on a pipe: one kind byte, an 8-byte little-endian length, the payload
(JSON for commands and replies, raw array bytes for all-reduce values); never
pickle.  Any error or interruption in a call stops the workers; the next call
starts new ones (a backward whose forward ran on the stopped ones is refused).
Warnings a worker's shard raises are raised again in the caller; the settings
that change a shard's arithmetic (im2col budget, chunk size) go with every
command.  Runtime changes to ``xpnet.dispatch`` (a preferred implementation) are
not seen by the workers: use ``XPNET_SHARDS=threads`` with them.  Dropout masks
are drawn in the main process, as with threads, and reach the workers through
the arena.  Used for T > 1 unless
``XPNET_SHARDS=threads``; when a worker cannot start, threads are used from then
on (with one warning).
"""

from __future__ import annotations

import atexit
import itertools
import json
import mmap
import os
import select
import subprocess
import sys
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy

from .. import config, errors
from ..errors import XpnetError
from ..nn.file_header import _json_default
from ..nn.layers import Dropout

_tokens = itertools.count(1)
ALIGN = 64  # every arena region starts on a cache line
STARTUP_TIMEOUT_S = 60.0
MAX_REPLICAS = 8  # models whose replicas the workers keep (the least recently loaded goes)
READY, COMMAND, DONE, VALUE, ERROR = b"R", b"J", b"D", b"V", b"E"


class ShardWorkerError(XpnetError):
    """A shard worker process failed or exited."""


class NoSharedMemory(OSError):
    """The arena file could not be made (a full /dev/shm): the step runs on threads instead."""


# --------------------------------------------------------------------------- pipe messages
def write_message(fd: int, kind: bytes, payload: bytes = b"") -> None:
    data = memoryview(kind + len(payload).to_bytes(8, "little") + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_message(fd: int) -> tuple[bytes, bytes]:
    head = _read_exact(fd, 9)
    return head[:1], _read_exact(fd, int.from_bytes(head[1:], "little"))


def value_message(key, value) -> bytes:
    """An all-reduce contribution: the key (checked on arrival: every shard must reduce in the same order)
    and the array's bytes."""
    tag = repr(key).encode()
    return len(tag).to_bytes(2, "little") + tag + numpy.ascontiguousarray(value).tobytes()


def parse_value(payload: bytes, key, like) -> numpy.ndarray:
    n = int.from_bytes(payload[:2], "little")
    if payload[2:2 + n] != repr(key).encode():
        raise ShardWorkerError(f"shards all-reduced in different orders ({payload[2:2 + n]!r} against {key!r}).")
    return numpy.frombuffer(payload[2 + n:], dtype=like.dtype).reshape(like.shape)


def describe_exception(exc: BaseException) -> bytes:
    """A worker's error for the main process: its class (when the main process can raise the same) and text."""
    cls = type(exc)
    known = cls.__module__ == "builtins" or cls.__module__ == errors.__name__
    return json.dumps({"type": cls.__name__ if known else None, "module": cls.__module__,
                       "message": str(exc), "name": cls.__name__}).encode()


def worker_exception(info: dict) -> BaseException:
    """The exception to raise for a worker's error: the same class for built-in and xpnet errors
    (a FloatingPointError under numpy.errstate, a ShapeError), else a ShardWorkerError naming it."""
    import builtins

    source = builtins if info.get("module") == "builtins" else errors
    cls = getattr(source, info.get("type") or "", None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(info["message"])
        except Exception:  # a class whose constructor wants more than a message
            pass
    return ShardWorkerError(f"a CPU shard worker failed: {info.get('name')}: {info.get('message')}")


# --------------------------------------------------------------------------- the arena
def state_arrays(model) -> list:
    """Every parameter and buffer of the model, in layer order: the arena's state region."""
    return [(i, kind, name, arr) for i, layer in enumerate(model.layers)
            for kind, table in (("params", layer.params), ("buffers", layer.buffers)) for name, arr in table.items()]


def mask_regions(executor, step) -> list:
    """[(stage index, arena region)] of the step's dropout masks (the data a worker cannot draw itself)."""
    layer_index = {id(layer): i for i, layer in enumerate(executor.model.layers)}
    return [(st.index, f"mask/{layer_index[id(st.layers[0])]}") for st in executor.stages
            if (st.index, "mask") in step.data]


def arena_layout(model, n: int, workers: int) -> tuple[list, int]:
    """[(region name, offset, shape, dtype str)] and the total bytes, for batches of up to n."""
    dt = numpy.dtype(model.dtype)
    regions, offset = [], 0

    def add(name, shape, dtype):
        nonlocal offset
        regions.append((name, offset, [int(s) for s in shape], numpy.dtype(dtype).str))
        offset += -(-int(numpy.prod(shape, dtype=numpy.int64)) * numpy.dtype(dtype).itemsize // ALIGN) * ALIGN

    for i, kind, name, arr in state_arrays(model):
        add(f"state/{i}/{kind}/{name}", arr.shape, arr.dtype)
    for name, shape in (("x", model.input_shape), ("out", model.output_shape), ("dout", model.output_shape),
                        ("dx", model.input_shape)):
        add(name, (n,) + tuple(shape), dt)
    for i, layer in enumerate(model.layers):
        if type(layer) is Dropout:  # the main process's mask for the whole batch
            add(f"mask/{i}", (n,) + tuple(layer.input_shape), dt)
    for k in range(1, workers + 1):
        for i, layer in enumerate(model.layers):
            for name, arr in layer.params.items():
                add(f"grad/{k}/{i}/{name}", arr.shape, arr.dtype)
    return regions, max(offset, ALIGN)


def map_regions(mm, regions) -> dict:
    return {name: numpy.frombuffer(mm, dtype=numpy.dtype(dt), count=int(numpy.prod(shape, dtype=numpy.int64)),
                                   offset=off).reshape(shape) for name, off, shape, dt in regions}


def _arena_folder() -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


class Arena:
    """A shared memory file mapped by the main process and the workers."""

    def __init__(self, executor, n: int, workers: int):
        model = executor.model
        self.n, self.workers = n, workers
        self.owner = weakref.ref(executor)
        self.token = next(_tokens)  # names the worker's replica (a file name may come again)
        self.regions, size = arena_layout(model, n, workers)
        fd, self.path = tempfile.mkstemp(prefix=f"xpnet-shards-{os.getpid()}-", dir=_arena_folder())
        try:
            # Reserve the pages now: a tmpfs file only truncated to its size, past what /dev/shm
            # holds (64 MB in a default container), would kill the process (SIGBUS) when touched.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.views = map_regions(self.mm, self.regions)

    def unlink(self):
        try:
            os.unlink(self.path)
        except OSError:
            pass


def worker_settings() -> dict:
    """This process's settings that change what a shard computes, for the workers to use too."""
    from . import conv_plan, workspace

    return {"im2col_budget_bytes": config.get_im2col_budget_bytes(), "chunk_bytes": workspace.CHUNK_BYTES,
            "winograd_chunk_bytes": conv_plan.WINOGRAD_CHUNK_BYTES}


def apply_settings(settings: dict) -> None:
    from . import conv_plan, workspace

    config._budget_bytes = int(settings["im2col_budget_bytes"])
    workspace.CHUNK_BYTES = int(settings["chunk_bytes"])
    conv_plan.WINOGRAD_CHUNK_BYTES = int(settings["winograd_chunk_bytes"])


def reissue_warnings(found) -> None:
    """Warnings a worker's shard raised (NumPy's overflow warnings...), raised again here, where the
    caller's filters apply (``-W error`` stops a run on them, as with threads)."""
    import builtins

    for name, message in found:
        cls = getattr(builtins, name, None)
        if not (isinstance(cls, type) and issubclass(cls, Warning)):
            cls = RuntimeWarning
        warnings.warn(message, cls, stacklevel=2)


# --------------------------------------------------------------------------- the main side
class MainReducer:
    """Shard 0's all-reduce: the workers' values in shard order, the total sent back to each."""

    def __init__(self, group, t: int):
        self.group = group
        self.t = t

    def allreduce(self, k, key, value):
        total = value
        for w in self.group.workers[:self.t - 1]:
            kind, payload = w.read()
            if kind != VALUE:
                w.raise_reply(kind, payload)
            total = total + parse_value(payload, key, value)
        message = value_message(key, total)
        for w in self.group.workers[:self.t - 1]:
            w.write(VALUE, message)
        return total


class Worker:
    """One worker process and its pipes."""

    def __init__(self):
        env = dict(os.environ, XPNET_BACKEND="numpy", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", XPNET_NUM_THREADS="1")
        # The worker imports the same xpnet as this process, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen([sys.executable, "-m", "xpnet.cpu.shard_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self.out_fd, self.in_fd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        try:
            # An interpreter that is not Python (an embedding application) would never answer.
            if not select.select([self.in_fd], [], [], STARTUP_TIMEOUT_S)[0]:
                raise ShardWorkerError(f"a CPU shard worker did not start within {STARTUP_TIMEOUT_S:g} s "
                                       f"({sys.executable} -m xpnet.cpu.shard_worker).")
            kind, payload = self.read()
            if kind != READY:
                self.raise_reply(kind, payload)
        except BaseException:  # an error, or Ctrl-C while it starts: no process left behind
            self.stop()
            raise

    def write(self, kind, payload=b""):
        try:
            write_message(self.out_fd, kind, payload)
        except OSError:
            raise ShardWorkerError(f"a CPU shard worker process ended unexpectedly ({self._exit()}).") from None

    def read(self):
        try:
            return read_message(self.in_fd)
        except (EOFError, OSError):
            raise ShardWorkerError(f"a CPU shard worker process ended unexpectedly ({self._exit()}).") from None

    def command(self, **cmd):
        # default: NumPy scalars in a layer's settings (a BatchNorm eps given as numpy.float32)
        self.write(COMMAND, json.dumps(cmd, default=_json_default).encode())

    def reply(self) -> dict:
        kind, payload = self.read()
        if kind != DONE:
            self.raise_reply(kind, payload)
        reply = json.loads(payload)
        reissue_warnings(reply.pop("warnings", ()))
        return reply

    def raise_reply(self, kind, payload):
        if kind == ERROR:
            raise worker_exception(json.loads(payload))
        raise ShardWorkerError(f"a CPU shard worker sent an unexpected message {kind!r}.")

    def _exit(self) -> str:
        try:
            code = self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"exit status {code}"

    def stop(self):
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ProcessGroup:
    """The worker processes of this process, and which executor's replica each holds."""

    def __init__(self):
        self.pid = os.getpid()  # a forked child inherits the group, but the workers are its parent's
        self.workers: list[Worker] = []
        self.arenas: dict = {}  # id(executor) -> Arena, oldest first: the replicas every worker holds
        self.generation = 0  # counts stops: a step's backward needs the workers its forward ran on

    def ensure(self, count: int):
        while len(self.workers) < count:
            self.workers.append(Worker())

    def stop(self):
        for w in self.workers:
            w.stop()
        self.workers = []
        self.arenas = {}
        self.generation += 1

    def arena_for(self, executor, n: int, t: int) -> Arena:
        """The executor's arena, made (and loaded by every worker) when there is none large enough."""
        arena = self.arenas.get(id(executor))
        spec = executor.model.spec()  # a layer setting changed since (a BatchNorm's eps): a new replica
        if (arena is not None and arena.owner() is executor and arena.n >= n and arena.workers == len(self.workers)
                and arena.spec == spec):
            return arena
        # Replicas to drop: this executor's old one, those of executors gone, the oldest past MAX_REPLICAS.
        keep = {key: a for key, a in self.arenas.items() if a.owner() is not None and key != id(executor)}
        while len(keep) >= MAX_REPLICAS:
            keep.pop(next(iter(keep)))
        drop = [a.token for key, a in self.arenas.items() if key not in keep]
        try:
            arena = Arena(executor, n, len(self.workers))
        except OSError as exc:
            size = arena_layout(executor.model, n, len(self.workers))[1]
            raise NoSharedMemory(f"no shared memory file of {size / 2**20:.1f} MB in {_arena_folder()}: "
                                 f"{exc}") from None
        self.arenas = dict(keep)
        self.arenas[id(executor)] = arena
        arena.spec = spec
        model = executor.model
        try:
            for w in self.workers:
                w.command(op="load", token=arena.token, drop=drop, path=arena.path, regions=arena.regions,
                          spec=spec, dtype=numpy.dtype(model.dtype).str, winograd=executor.winograd)
            for w in self.workers:
                w.reply()
        finally:
            arena.unlink()  # mapped by every process now: the memory goes when the last one unmaps it
        return arena

    def _guarded(self, fn):
        """Run fn under the shard pool's lock (one region at a time, as with threads); on any error
        or interruption the workers are stopped (they may be mid-step)."""
        from .threads import shard_pool

        with shard_pool().lock:
            try:
                return fn()
            except NoSharedMemory:
                raise  # nothing was sent to the workers yet
            except BaseException:
                self.stop()
                raise

    def forward(self, executor, x, out, train: bool, t: int):
        from .executor import UFUNC_BUFSIZE
        from .threads import shard_pool

        def run():
            n = x.shape[0]
            self.ensure(t - 1)
            arena = self.arena_for(executor, n, t)
            v = arena.views
            for i, kind, name, arr in state_arrays(executor.model):
                numpy.copyto(v[f"state/{i}/{kind}/{name}"], arr)
            numpy.copyto(v["x"][:n], x)
            step = executor.new_step(x, train, t, MainReducer(self, t))  # draws the dropout masks
            masks = mask_regions(executor, step)
            for stage_index, region in masks:
                numpy.copyto(v[region][:n], step.data[(stage_index, "mask")])
            err = numpy.geterr()
            flags = [bool(layer.needs_input_grad) for layer in executor.model.layers]
            for k, w in enumerate(self.workers[:t - 1], start=1):
                w.command(op="forward", token=arena.token, n=n, t=t, k=k, train=bool(train), err=err,
                          input_grads=flags, masks=masks, settings=worker_settings())
            shard_pool().run(lambda _: executor.forward_shard(0, step, x, out), 1, blas=1, bufsize=UFUNC_BUFSIZE)
            for w in self.workers[:t - 1]:
                w.reply()
            a = step.bounds[1][0]
            out[a:] = v["out"][a:n]
            step.arena, step.generation = arena, self.generation
            return step
        return self._guarded(run)

    def backward(self, executor, step, dout, dx_full, need, keys):
        from .executor import UFUNC_BUFSIZE
        from .threads import shard_pool

        if step.generation != self.generation or self.arenas.get(id(executor)) is not step.arena:
            raise ShardWorkerError("the CPU shard workers this step's forward ran on were stopped since (an error "
                                   "in another model's step) or hold another model now: run forward(x, "
                                   "train=True) again before backward.")

        def run():
            arena, t, n = step.arena, step.t, step.n
            v = arena.views
            numpy.copyto(v["dout"][:n], dout)
            for w in self.workers[:t - 1]:
                w.command(op="backward", token=arena.token, need=[bool(b) for b in need],
                          want_dx=dx_full is not None, err=numpy.geterr())
            sh = shard_pool().run(lambda _: executor.backward_shard(0, step, dout, dx_full, need), 1, blas=1,
                                  bufsize=UFUNC_BUFSIZE)[0]
            present = [set(w.reply()["grads"]) for w in self.workers[:t - 1]]
            index = {id(layer): i for i, layer in enumerate(executor.model.layers)}
            for layer, name in keys:
                tag = f"{index[id(layer)]}/{name}"
                parts = [v[f"grad/{k}/{tag}"] for k, got in enumerate(present, start=1) if tag in got]
                total = sh.grads.get((layer, name))
                if total is None or not parts:
                    continue  # BatchNorm's gamma/beta: all-reduced already, on shard 0 only
                total = numpy.ascontiguousarray(total)
                for part in parts:  # in shard order, as the threads add them: the same bits
                    numpy.add(total, part, out=total)
                sh.grads[(layer, name)] = total
            if dx_full is not None:
                a = step.bounds[1][0]
                dx_full[a:] = v["dx"][a:n]
        self._guarded(run)


_group: ProcessGroup | None = None
_failed: str | None = None


def _stop_group():
    if _group is not None and _group.pid == os.getpid():
        _group.stop()


def _forget_workers_in_child():
    """In a forked child: close the copies of the parent's worker pipes (else a worker never sees the
    end of its input while the child lives, and the parent waits for it when stopping it)."""
    global _group
    if _group is not None:
        for w in _group.workers:
            for f in (w.proc.stdin, w.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        _group = None


atexit.register(_stop_group)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_in_child)


def usable(t: int) -> bool:
    """Whether a step on t shards should use worker processes."""
    if t < 2 or _failed is not None or config.get_shard_mode() != "processes":
        return False
    # Only POSIX systems are covered (shared files unlinked while mapped); a frozen
    # application's interpreter is the application itself, never to be started as a worker.
    return os.name == "posix" and not getattr(sys, "frozen", False) and bool(sys.executable)


def group_for(executor, t: int) -> ProcessGroup | None:
    """The process group to run this step with, or None: threads."""
    from .threads import shard_pool

    global _group, _failed
    if not usable(t):
        return None
    with shard_pool().lock:  # two Python threads stepping models must not start workers side by side
        if _group is None or _group.pid != os.getpid():  # in a forked child: workers of its own
            _group = ProcessGroup()
        try:
            _group.ensure(t - 1)
        except Exception as exc:  # no interpreter to start, no pipes, a worker that died at import...
            give_up(f"could not start ({exc})")
            return None
        return _group


def give_up(why: str) -> None:
    """Threads from now on in this process, with one warning saying why."""
    global _failed
    if _group is not None:
        _group.stop()
    _failed = why
    warnings.warn(f"xpnet: CPU shard worker processes {why}; using threads instead.", RuntimeWarning, stacklevel=4)
