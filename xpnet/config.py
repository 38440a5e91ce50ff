"""Run-time settings of the CPU speed machinery, each with an environment variable.

* ``fast_paths(enabled)`` -- use the fused, batch-parallel executor for
  ``Sequential`` on NumPy (default on; ``XPNET_FAST=0`` turns it off).  The plain
  layer-by-layer path stays beside it as the reference; tests hold the two equal.
  Works as a setter and as a context manager::

      xpnet.fast_paths(False)              # from now on
      with xpnet.fast_paths(False): ...    # for a block, restored afterwards

* ``set_num_threads(n)`` -- how many CPU threads the batch-parallel executor
  splits a batch across (default: the CPU cores this process may use;
  ``XPNET_NUM_THREADS``).  The result depends on n only through the order in
  which per-thread partial gradients are summed, which is fixed for a given n:
  the same seed and settings give bitwise-identical runs.
* ``set_im2col_budget(mb)`` -- the most memory one convolution's im2col matrix
  may take (default 512 MiB; ``XPNET_IM2COL_BUDGET_MB``).  Larger batches are
  split into chunks that fit, with the same results.

CuPy arrays never use the CPU machinery (threads, BLAS thread control, cache
blocking): on the GPU the plain path runs.
"""

from __future__ import annotations

import os
import warnings

from .errors import UsageError

DEFAULT_IM2COL_BUDGET_MB = 512.0


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    warnings.warn(f"{name}={raw!r} is not understood (use 1 or 0): using {int(default)}.", stacklevel=2)
    return default


def _env_number(name: str, default, cast, minimum):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        warnings.warn(f"{name}={raw!r} is not a number >= {minimum}: using the default.", stacklevel=2)
        return default
    return value


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_fast = _env_flag("XPNET_FAST", True)
_threads = int(_env_number("XPNET_NUM_THREADS", 0, int, 0)) or _default_threads()
_budget_bytes = int(_env_number("XPNET_IM2COL_BUDGET_MB", DEFAULT_IM2COL_BUDGET_MB, float, 1e-3) * 2**20)


class fast_paths:
    """Turn the fast paths on or off; also a context manager restoring the previous state."""

    def __init__(self, enabled: bool = True):
        global _fast
        self._previous = _fast
        _fast = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _fast
        _fast = self._previous
        return False


def fast_paths_enabled() -> bool:
    return _fast


def set_num_threads(n: int | None) -> int:
    """Threads for the batch-parallel executor (None: all usable cores); returns the value set."""
    global _threads
    if n is None:
        _threads = _default_threads()
    else:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"set_num_threads needs a positive integer (or None), got {n!r}.")
        _threads = n
    return _threads


def get_num_threads() -> int:
    return _threads


def set_im2col_budget(mb: float | None) -> float:
    """Largest im2col matrix per convolution in MiB (None: the default, 512); returns it."""
    global _budget_bytes
    if mb is None:
        mb = DEFAULT_IM2COL_BUDGET_MB
    try:
        value = float(mb)
    except (TypeError, ValueError):
        raise UsageError(f"set_im2col_budget needs a size in MiB, got {mb!r}.") from None
    if not value > 0:
        raise UsageError(f"set_im2col_budget needs a positive size in MiB, got {mb!r}.")
    _budget_bytes = int(value * 2**20)
    return value


def get_im2col_budget_bytes() -> int:
    return _budget_bytes
