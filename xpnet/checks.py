"""Argument checks shared by the library, the application and the command line.

Each returns the value normalised (``int`` / ``float``) or raises a ``UsageError``
(CLI exit code 2) whose one sentence names the argument: ``name`` is what the
user typed (``"batch_size"``, ``"--epochs"``).
"""

from __future__ import annotations

import math
import numbers

from .errors import UsageError


def integer(value, name: str, minimum: int = 1, optional: bool = False, what: str | None = None):
    """An int (NumPy integers too, never a bool) of at least ``minimum``; None passes when optional."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        need = what or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise UsageError(f"{name} must be {need}, got {value!r}.")
    return int(value)


def positive_int(value, name: str, optional: bool = False):
    """An integer >= 1 (None passes when optional)."""
    return integer(value, name, 1, optional)


def number(value, name: str, allow_zero: bool = False, optional: bool = False):
    """A finite real number > 0 (>= 0 with ``allow_zero``); None passes when optional."""
    if value is None and optional:
        return None
    need = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool):
        raise UsageError(f"{name} must be a number {need}, got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number {need}, got {value!r}.") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise UsageError(f"{name} must be a finite number {need}, got {value!r}.")
    return v
