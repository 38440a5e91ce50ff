"""Every ``XPNET_*`` environment variable, parsed in one place with one policy.

| variable                 | values                      | default       | what it sets                          |
|--------------------------|-----------------------------|---------------|---------------------------------------|
| ``XPNET_BACKEND``        | ``numpy``, ``cupy``, ``auto`` | ``auto``     | where new arrays go (``xpnet.use``)   |
| ``XPNET_DTYPE``          | ``float32``, ``float64``    | ``float32``   | default float dtype                   |
| ``XPNET_REFERENCE``      | ``1``/``0`` (on/off, ...)   | ``0``         | force the reference paths everywhere  |
| ``XPNET_NUM_THREADS``    | an integer >= 1             | usable cores  | CPU threads of the fused path         |
| ``XPNET_IM2COL_BUDGET_MB`` | a number > 0              | ``512``       | largest im2col matrix per convolution |
| ``XPNET_SHARDS``         | ``processes``, ``threads``  | ``processes`` | what runs the fused path's shards 1..T-1 |

The policy: a bad value never breaks ``import xpnet``; it raises a ``UsageError``
(one sentence naming the variable; exit code 2 from the ``xpnet`` command,
which checks them all at start with ``check_environment()``) the first time the
setting is read.  The setters below (``set_num_threads``, ...) change a
setting for this process and clear its error.
"""

from __future__ import annotations

import os

from .checks import integer, number
from .errors import BackendUsageError, UsageError

DEFAULT_IM2COL_BUDGET_MB = 512.0
BACKEND_NAMES = ("numpy", "cupy", "auto")
DTYPE_NAMES = ("float32", "float64")
SHARD_MODES = ("processes", "threads")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Variables of earlier versions, refused with the replacement rather than silently ignored.
_REPLACED = {
    "XPNET_FAST": "XPNET_REFERENCE=1 (the reference paths on both backends)",
    "XPNET_CUDA_KERNELS": "XPNET_REFERENCE=1 (the reference paths on both backends)",
}


def _read(name: str, parse, default):
    """(value, error): the parsed variable, or the default and the UsageError to raise on use."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default, None
    try:
        return parse(raw.strip()), None
    except UsageError as exc:
        return default, type(exc)(f"{name}={raw} is not valid: {exc}")


def _choice(options, error=UsageError):
    def parse(raw):
        if raw.lower() not in options:
            raise error(f"choose one of {', '.join(options)}.")
        return raw.lower()
    return parse


def _flag(raw):
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise UsageError("use 1 (on) or 0 (off).")


def _threads(raw):
    try:
        value = int(raw)
    except ValueError:
        value = None
    return integer(value, "the thread count", 1)


def _budget(raw):
    return number(raw, "the budget in MiB")


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def read_backend_env() -> tuple[str, str | None, Exception | None]:
    """(requested backend name, the variable's text for messages or None, error) from XPNET_BACKEND."""
    name, error = _read("XPNET_BACKEND", _choice(BACKEND_NAMES, BackendUsageError), "auto")
    origin = f"XPNET_BACKEND={os.environ['XPNET_BACKEND']}" if os.environ.get("XPNET_BACKEND", "").strip() else None
    return name, origin, error


def read_dtype_env() -> tuple[str, Exception | None]:
    """(dtype name, error) from XPNET_DTYPE."""
    return _read("XPNET_DTYPE", _choice(DTYPE_NAMES, BackendUsageError), "float32")


def _replaced_error():
    for old, new in _REPLACED.items():
        if os.environ.get(old, "").strip():
            return UsageError(f"{old} is no longer read: use {new}, and unset {old}.")
    return None


_reference, _reference_error = _read("XPNET_REFERENCE", _flag, False)
_reference_error = _reference_error or _replaced_error()
_threads_value, _threads_error = _read("XPNET_NUM_THREADS", _threads, None)
_budget_mb, _budget_error = _read("XPNET_IM2COL_BUDGET_MB", _budget, DEFAULT_IM2COL_BUDGET_MB)
_budget_bytes = int(_budget_mb * 2**20)
_shard_mode, _shard_mode_error = _read("XPNET_SHARDS", _choice(SHARD_MODES), "processes")


def _raise(error):
    if error is not None:
        raise error


def check_environment() -> None:
    """Raise the first bad ``XPNET_*`` value (the CLI calls this before any work)."""
    for error in (read_backend_env()[2], read_dtype_env()[1], _reference_error, _threads_error, _budget_error,
                  _shard_mode_error):
        _raise(error)


# ------------------------------------------------------------- reference paths

def reference_forced() -> bool:
    """True when every op runs its reference code and models run layer by layer."""
    _raise(_reference_error)
    return _reference


def force_reference(enabled: bool = True) -> bool:
    """Force (or stop forcing) the reference paths; returns the previous setting."""
    global _reference, _reference_error
    previous = reference_forced()
    _reference, _reference_error = bool(enabled), None
    return previous


class fast_paths:
    """``xpnet.fast_paths(False)``: the reference paths from now on; also a context manager.

    The opposite of ``reference_paths``: ``fast_paths(False)`` forces the reference.
    """

    def __init__(self, enabled: bool = True):
        self._previous = force_reference(not enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        force_reference(self._previous)
        return False


def fast_paths_enabled() -> bool:
    return not reference_forced()


# ----------------------------------------------------------------- CPU threads

def set_num_threads(n: int | None) -> int:
    """Threads for the fused CPU path (None: all usable cores); returns the value set."""
    global _threads_value, _threads_error
    _threads_value = None if n is None else integer(n, "set_num_threads", 1, what="a positive integer (or None)")
    _threads_error = None
    return get_num_threads()


def get_num_threads() -> int:
    _raise(_threads_error)
    return _threads_value or _default_threads()


def set_shard_mode(mode: str) -> str:
    """What runs the fused path's shards after the first: ``"processes"`` (worker processes, the default:
    no interpreter lock shared between shards) or ``"threads"``; returns the mode set."""
    global _shard_mode, _shard_mode_error
    _shard_mode, _shard_mode_error = _choice(SHARD_MODES)(str(mode)), None
    return _shard_mode


def get_shard_mode() -> str:
    _raise(_shard_mode_error)
    return _shard_mode


# --------------------------------------------------------------- im2col budget

def set_im2col_budget(mb: float | None) -> float:
    """Largest im2col matrix per convolution in MiB (None: the default, 512); returns it."""
    global _budget_bytes, _budget_error
    value = DEFAULT_IM2COL_BUDGET_MB if mb is None else number(mb, "set_im2col_budget (MiB)")
    _budget_bytes, _budget_error = int(value * 2**20), None
    return value


def get_im2col_budget_bytes() -> int:
    _raise(_budget_error)
    return _budget_bytes
