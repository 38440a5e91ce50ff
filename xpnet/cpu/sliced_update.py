"""The optimizer update on NumPy, on the fused path's CPU threads (large parameters in slices).

Registered with ``xpnet.dispatch`` for the op ``optimizer_update``
(reference: ``xpnet.nn.optim.apply_updates``, one parameter after the other).
Every built-in update is element-wise, so slice k of each parameter gives the
same bits as the whole array, whatever the number of slices.  Only those
updates are split: a subclass's ``_update`` may use the parameter's name or the
whole array, or rebind its slots.
"""

from __future__ import annotations

import numpy

from .. import config, dispatch
from .threads import shard_pool

# Below this many parameter values in all, the update runs on the calling thread only: Adam on
# the CRNN reader (359k values in 19 arrays) took 1.0-1.2 ms on one thread and 1.4 ms on two,
# simple_convnet (434k) about the same on both; captcha_net (1.2M) 3.6 ms on one, 2.2 on two.
PARALLEL_MIN_SIZE = 1 << 19


def slice_count(jobs, sliceable: bool) -> int:
    """How many CPU threads share an update of ``jobs`` (name, p, g, slots): 1 unless the
    update is sliceable, the model large and every array a contiguous NumPy array."""
    t = config.get_num_threads()
    if t == 1 or not sliceable:
        return 1
    total = 0
    for _, p, _, slots in jobs:
        if type(p) is not numpy.ndarray or not p.flags.c_contiguous or \
                any(not v.flags.c_contiguous for v in slots.values()):
            return 1
        total += p.size
    return t if total >= PARALLEL_MIN_SIZE else 1


def applies(update, jobs, scale, lr, sliceable=False, scratch=None) -> bool:
    return slice_count(jobs, sliceable) > 1


def work_units(jobs, t: int) -> list[list]:
    """The update's work for each of t threads: lists of (job, slice index or None).

    Parameters larger than 1/(2t) of the total are cut into t slices; the others stay whole,
    so a thread makes fewer, larger calls (small calls from two threads at once wait for the
    interpreter lock at every call).  Units go largest first to the least loaded thread.
    """
    total = sum(job[1].size for job in jobs)
    units = []
    for job in jobs:
        size = job[1].size
        if size > total / (2 * t):
            units += [(job, k, (k + 1) * size // t - k * size // t) for k in range(t)]
        else:
            units.append((job, None, size))
    loads, work = [0] * t, [[] for _ in range(t)]
    for job, part, size in sorted(units, key=lambda u: -u[2]):
        k = loads.index(min(loads))
        loads[k] += size
        work[k].append((job, part))
    return work


def sliced_updates(update, jobs, scale, lr, sliceable=False, scratch=None):
    """``apply_updates`` on the CPU threads: each thread updates some parameters whole and a slice
    of each large one (``work_units``)."""
    t = slice_count(jobs, sliceable)
    jobs = [(name, p, numpy.ascontiguousarray(g), slots) for name, p, g, slots in jobs]
    if scratch is not None:
        scratch(t)
    work = work_units(jobs, t)

    def update_part(k):
        for (name, p, g, slots), part in work[k]:
            if part is None:
                update(name, p, g if scale is None else g * scale, lr, slots)
                continue
            lo, hi = part * p.size // t, (part + 1) * p.size // t
            if hi > lo:
                gk = g.reshape(-1)[lo:hi]
                update(name, p.reshape(-1)[lo:hi], gk if scale is None else gk * scale, lr,
                       {s: v.reshape(-1)[lo:hi] for s, v in slots.items()}, part=part)

    shard_pool().run(update_part, t)


dispatch.register("optimizer_update", "numpy", "sliced on CPU threads", sliced_updates, applies)
