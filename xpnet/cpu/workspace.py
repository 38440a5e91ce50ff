"""Reusable buffers of the fused path: cache-line aligned allocation, and how conv work is cut
into chunks (sized for a core's cache) and groups of chunks (sized for fewer, larger NumPy calls)."""

from __future__ import annotations

import numpy

from .. import config

# Conv work is done on chunks of images whose im2col block (or conv output, if
# larger) is about this big: small enough to stay near a core's L2 cache.
CHUNK_BYTES = 1024 * 1024
# The element-wise work on a conv block's output (pool, bias, ReLU, their
# gradients) runs over groups of chunks whose conv output is about this big:
# fewer, larger NumPy calls, each of which costs the shard threads a turn at
# the GIL, still in cache.
GROUP_BYTES = 1024 * 1024

# Buffers start on a cache line.  NumPy only promises 16 bytes (a large array
# starts 16 bytes into a page), so every 64-byte AVX-512 load or store of an
# element-wise pass over such a buffer would straddle two cache lines.
ALIGN_BYTES = 64


def aligned_buffer(shape, dtype, zero: bool = False):
    """A NumPy buffer of ``shape`` and ``dtype`` whose first byte is ALIGN_BYTES-aligned.

    Views that start at a multiple of 64 bytes into it (rows of 16 float32
    channels or more) are aligned too.  ``zero`` fills it with zeros.
    """
    shape = (int(shape),) if numpy.ndim(shape) == 0 else tuple(int(s) for s in shape)
    dtype = numpy.dtype(dtype)
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    raw = numpy.empty(nbytes + ALIGN_BYTES, numpy.uint8)
    start = -raw.ctypes.data % ALIGN_BYTES
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    if zero:
        out.fill(0)
    return out


def chunk_images(bytes_per_image: int, n: int, target: int | None = None) -> int:
    """Images per chunk: about ``target`` (default CHUNK_BYTES) of im2col (or conv output), never
    above the im2col budget."""
    budget = min(CHUNK_BYTES if target is None else target, config.get_im2col_budget_bytes())
    return max(1, min(n, budget // max(1, bytes_per_image)))


def group_images(chunk: int, bytes_per_image: int, n: int) -> int:
    """Images per element-wise group: a multiple of ``chunk``, about GROUP_BYTES of conv output."""
    return min(n, chunk * max(1, GROUP_BYTES // max(1, chunk * bytes_per_image)))


_ONES: dict = {}  # dtype -> a read-only ones vector shared by all shards, grown on demand


def column_sums(a2d):
    """Sum of the rows of a2d (R, C), as one BLAS product with a ones vector.

    ``a2d.sum(axis=0)`` adds row after row, which is slow for the few tens of
    channels of a conv map; the product reads the array once.
    """
    r, dt = a2d.shape[0], a2d.dtype
    ones = _ONES.get(dt)
    if ones is None or ones.shape[0] < r:
        ones = _ONES[dt] = numpy.ones(max(r, 4096), dt)
    return numpy.matmul(ones[:r], a2d)
