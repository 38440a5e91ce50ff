"""Reusable scratch buffers, so a training step allocates (and page-faults) nothing new
after the first one.

A ``Workspace`` hands out arrays by name; asking again with the same name,
shape and dtype returns the same array.  Up to ``keep`` shapes are kept per name
(a training batch and the smaller last batch of an epoch, say) before the
least recently used one is dropped.  Contents are *not* cleared between uses
unless ``zero=True`` on creation: callers overwrite what they read.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy


class Workspace:
    def __init__(self, xp=numpy, keep: int = 2):
        self.xp = xp
        self.keep = keep
        self._store: dict = {}

    def get(self, name, shape, dtype, zero: bool = False):
        """The buffer ``name`` of ``shape``/``dtype``; a new one is zero-filled when ``zero``."""
        shape = tuple(int(s) for s in shape)
        dtype = numpy.dtype(dtype)
        slots = self._store.setdefault(name, OrderedDict())
        key = (shape, dtype.str)
        buf = slots.get(key)
        if buf is None:
            buf = (self.xp.zeros if zero else self.xp.empty)(shape, dtype=dtype)
            slots[key] = buf
            while len(slots) > self.keep:
                slots.popitem(last=False)
        else:
            slots.move_to_end(key)
        return buf

    def nbytes(self) -> int:
        return sum(int(b.nbytes) for slots in self._store.values() for b in slots.values())

    def clear(self) -> None:
        self._store.clear()
