"""The optimizer update on NumPy, in slices on the fused path's CPU threads.

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

# Below this many parameter values in all, the update runs on the calling thread only.
PARALLEL_MIN_SIZE = 1 << 16


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


def sliced_updates(update, jobs, scale, lr, sliceable=False, scratch=None):
    """``apply_updates`` with each parameter split into one slice per thread."""
    t = slice_count(jobs, sliceable)
    jobs = [(name, p, numpy.ascontiguousarray(g), slots) for name, p, g, slots in jobs]
    if scratch is not None:
        scratch(t)

    def update_slice(k):
        for name, p, g, slots in jobs:
            lo, hi = k * p.size // t, (k + 1) * p.size // t
            if hi > lo:
                gk = g.reshape(-1)[lo:hi]
                update(name, p.reshape(-1)[lo:hi], gk if scale is None else gk * scale, lr,
                       {s: v.reshape(-1)[lo:hi] for s, v in slots.items()}, part=k)

    shard_pool().run(update_slice, t)


dispatch.register("optimizer_update", "numpy", "sliced on CPU threads", sliced_updates, applies)
