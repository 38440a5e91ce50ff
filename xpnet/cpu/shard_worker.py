"""A worker process of ``process_shards``: runs shard k of each step on a replica of the model.

Started as ``python -m xpnet.cpu.shard_worker`` with pipes on stdin (commands from
the main process) and stdout (replies); anything the code prints goes to stderr.
Commands (JSON):

* ``load``: build a replica from ``spec`` whose parameters and buffers are views
  of the arena file at ``path``, kept under ``token``; the replicas listed in
  ``drop`` go (the main process keeps track of what every worker holds);
* ``forward``: shard k of a step of n samples on t shards, input and output in the
  arena; the step is kept for the backward that follows a training forward;
* ``backward``: shard k's backward; its partial gradients go to the arena, the
  reply lists which it wrote.

All-reduces are ``VALUE`` messages both ways (``WorkerReducer``).  End of input:
the main process is gone, so the worker exits.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import warnings

import numpy

from . import process_shards as ps


class WorkerReducer:
    """Shard k's side of ``process_shards.MainReducer``."""

    def __init__(self, in_fd, out_fd):
        self.in_fd, self.out_fd = in_fd, out_fd

    def allreduce(self, k, key, value):
        ps.write_message(self.out_fd, ps.VALUE, ps.value_message(key, value))
        kind, payload = ps.read_message(self.in_fd)
        if kind != ps.VALUE:
            raise ps.ShardWorkerError(f"expected an all-reduce total, got message {kind!r}")
        return ps.parse_value(payload, key, value).copy()


class Replica:
    def __init__(self, cmd):
        from ..nn.sequential import Sequential
        from .executor import FusedExecutor

        with open(cmd["path"], "r+b") as f:
            self.mm = mmap.mmap(f.fileno(), 0)
        self.views = ps.map_regions(self.mm, cmd["regions"])
        self.model = Sequential.from_spec(cmd["spec"], dtype=numpy.dtype(cmd["dtype"]))
        for i, kind, name, _ in ps.state_arrays(self.model):
            getattr(self.model.layers[i], kind)[name] = self.views[f"state/{i}/{kind}/{name}"]
        self.executor = FusedExecutor(self.model, winograd=cmd["winograd"])  # the main executor's choice
        self.step = None
        self.k = None


def serve(in_fd: int, out_fd: int) -> None:
    from .executor import UFUNC_BUFSIZE

    numpy.setbufsize(UFUNC_BUFSIZE)
    reducer = WorkerReducer(in_fd, out_fd)
    replicas: dict = {}
    try:
        ps.write_message(out_fd, ps.READY)
        while True:
            kind, payload = ps.read_message(in_fd)
            if kind != ps.COMMAND:
                continue
            cmd = json.loads(payload)
            try:
                with warnings.catch_warnings(record=True) as found:
                    warnings.simplefilter("always")
                    reply = run(cmd, replicas, reducer)
                reply["warnings"] = [[type(w.message).__name__, str(w.message)] for w in found]
            except Exception as exc:
                ps.write_message(out_fd, ps.ERROR, ps.describe_exception(exc))
                continue
            ps.write_message(out_fd, ps.DONE, json.dumps(reply).encode())
    except (EOFError, OSError):
        return  # the main process closed the pipes (it stopped the workers, or it is gone)


def run(cmd, replicas, reducer) -> dict:
    op = cmd["op"]
    if op == "load":
        for token in cmd["drop"]:  # the main process decides which replicas stay
            replicas.pop(token, None)
        replicas[cmd["token"]] = Replica(cmd)
        return {}
    rep = replicas[cmd["token"]]
    ex, v = rep.executor, rep.views
    with numpy.errstate(**cmd["err"]):
        if op == "forward":
            n, k = cmd["n"], cmd["k"]
            ps.apply_settings(cmd["settings"])
            for layer, flag in zip(rep.model.layers, cmd["input_grads"]):
                layer.needs_input_grad = flag
            x = v["x"][:n]
            masks = {(index, "mask"): v[region][:n] for index, region in cmd["masks"]}
            rep.step = ex.new_step(x, cmd["train"], cmd["t"], reducer, data=masks)
            rep.k = k
            ex.forward_shard(k, rep.step, x, v["out"][:n])
            if not cmd["train"]:
                rep.step = None
            return {}
        if op == "backward":
            step, k, rep.step = rep.step, rep.k, None
            n = step.n
            dx = v["dx"][:n] if cmd["want_dx"] else None
            sh = ex.backward_shard(k, step, v["dout"][:n], dx, cmd["need"])
            index = {id(layer): i for i, layer in enumerate(rep.model.layers)}
            wrote = []
            for (layer, name), g in sh.grads.items():
                tag = f"{index[id(layer)]}/{name}"
                numpy.copyto(v[f"grad/{k}/{tag}"], g)
                wrote.append(tag)
            sh.grads.clear()
            return {"grads": wrote}
    raise ps.ShardWorkerError(f"unknown command {op!r}")


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the main process handles it
    # (and stops the workers), a worker must not die with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The protocol owns the real stdout; prints go to stderr.
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.fileno(), out_fd)


if __name__ == "__main__":
    main()
