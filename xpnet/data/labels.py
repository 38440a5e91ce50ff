"""The charset codec: text labels <-> class indices <-> multi-hot targets.

A label of ``length`` characters over a charset of K characters becomes a
multi-hot row of ``length * K`` units: block ``i`` (units ``i*K .. i*K+K-1``)
is the one-hot code of character ``i``.  This is the seed's multi-label,
multi-class layout; the model's last layer has ``length * K`` outputs.

A charset may also allow a range of lengths (``Charset(chars, 6, min_length=4)``:
labels of 4 to 6 characters).  Such labels are read by a CTC head
(``xpnet.captcha.heads``); the multi-hot codec above needs one length and says so.
"""

from __future__ import annotations

import numpy

from ..errors import DataError, UsageError

DIGITS_UPPER = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_length(value, name: str = "--length") -> tuple[int, int]:
    """(min, max) characters from ``4``, ``"4"``, ``"4-6"`` or ``(4, 6)``; UsageError naming ``name``."""
    if isinstance(value, bool):
        value = None
    lo = hi = None
    if isinstance(value, (int, numpy.integer)):
        lo = hi = int(value)
    elif isinstance(value, str):
        parts = value.strip().split("-")
        if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
            lo, hi = int(parts[0]), int(parts[-1])
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (int, numpy.integer)) and not isinstance(v, bool) for v in value):
        lo, hi = int(value[0]), int(value[1])
    if lo is None or lo < 1 or hi < lo:
        raise UsageError(f"{name} must be a number of characters such as 4, or a range such as 4-6 "
                         f"(at least 1, the smaller first), got {value!r}.")
    return lo, hi


def length_text(lo: int, hi: int) -> str:
    """"4" or "4-6"."""
    return str(lo) if lo == hi else f"{lo}-{hi}"


class Charset:
    """Characters and label length of a task.  ``Charset("0123456789", 1)`` is MNIST.

    ``length`` is the longest label; ``min_length`` (default: ``length``) the shortest.
    """

    def __init__(self, chars: str, length: int, min_length: int | None = None):
        if not isinstance(chars, str) or len(chars) < 2:
            raise UsageError(f"a charset needs at least 2 characters, got {chars!r}.")
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise UsageError(f"charset {chars!r} repeats characters {''.join(dup)!r}.")
        if int(length) < 1:
            raise UsageError(f"label length must be at least 1, got {length}.")
        if min_length is not None and not 1 <= int(min_length) <= int(length):
            raise UsageError(f"label lengths {min_length}-{length}: the shortest must be from 1 to the longest.")
        self.chars = chars
        self.length = int(length)
        self.min_length = self.length if min_length is None else int(min_length)
        self._index = {c: i for i, c in enumerate(chars)}

    @property
    def n_classes(self) -> int:
        return len(self.chars)

    @property
    def n_outputs(self) -> int:
        return self.length * self.n_classes

    @property
    def fixed(self) -> bool:
        """True when every label has ``length`` characters."""
        return self.min_length == self.length

    @property
    def lengths(self) -> str:
        """The label lengths as text: "4" or "4-6"."""
        return length_text(self.min_length, self.length)

    def _need_fixed(self):
        if not self.fixed:
            raise UsageError(f"labels of {self.lengths} characters cannot be coded as one block per character "
                             f"position (the bce head reads one length): read them with a CTC head "
                             f"(xpnet train --head ctc).")

    def check(self, labels) -> list[str]:
        """The labels (of a list) that this charset cannot encode, each with the reason."""
        bad = []
        for text in labels:
            if not self.min_length <= len(text) <= self.length:
                bad.append(f"{text!r} has {len(text)} characters, expected {self.lengths}")
            elif any(c not in self._index for c in text):
                odd = "".join(sorted({c for c in text if c not in self._index}))
                bad.append(f"{text!r} has characters {odd!r} outside the charset")
        return bad

    def indices(self, labels) -> numpy.ndarray:
        """(N, length) int64 class indices; DataError naming the labels that do not fit."""
        self._need_fixed()
        labels = list(labels)
        bad = self.check(labels)
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DataError(f"{len(bad)} label(s) do not fit charset {self.chars!r}, length {self.lengths}: "
                            + "; ".join(bad[:5]) + more + ".")
        out = numpy.empty((len(labels), self.length), dtype=numpy.int64)
        for n, text in enumerate(labels):
            out[n] = [self._index[c] for c in text]
        return out

    def encode(self, labels, dtype=numpy.float32) -> numpy.ndarray:
        """(N, length * n_classes) multi-hot targets."""
        return self.one_hot(self.indices(labels), dtype)

    def one_hot(self, idx, dtype=numpy.float32) -> numpy.ndarray:
        """(N, length) indices -> (N, length * n_classes) multi-hot (NumPy)."""
        self._need_fixed()
        idx = numpy.asarray(idx)
        n = idx.shape[0]
        out = numpy.zeros((n, self.length, self.n_classes), dtype=dtype)
        out[numpy.arange(n)[:, None], numpy.arange(self.length)[None, :], idx] = 1
        return out.reshape(n, self.n_outputs)

    def decode(self, idx) -> list[str]:
        """(N, length) class indices -> list of N strings."""
        idx = numpy.asarray(idx)
        table = numpy.array(list(self.chars))
        return ["".join(row) for row in table[idx]]

    def to_dict(self) -> dict:
        """{"chars", "length"} and, for a range of lengths, "min_length"."""
        d = {"chars": self.chars, "length": self.length}
        if not self.fixed:
            d["min_length"] = self.min_length
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Charset":
        try:
            lo = d.get("min_length")
            return cls(str(d["chars"]), int(d["length"]), None if lo is None else int(lo))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"malformed charset description {d!r}.") from None

    @classmethod
    def infer(cls, labels) -> "Charset":
        """The sorted set of characters in ``labels``, and their shortest and longest lengths."""
        labels = list(labels)
        if not labels:
            raise DataError("cannot infer a charset from no labels.")
        lengths = sorted({len(t) for t in labels})
        if lengths[0] < 1:
            raise DataError("cannot infer a charset from empty labels.")
        chars = "".join(sorted(set("".join(labels))))
        if len(chars) < 2:
            raise DataError(f"labels use only the character(s) {chars!r}: at least 2 classes are needed.")
        return cls(chars, lengths[-1], lengths[0])

    def __eq__(self, other):
        return isinstance(other, Charset) and (self.chars, self.length, self.min_length) == (
            other.chars, other.length, other.min_length)

    def __repr__(self):
        extra = "" if self.fixed else f", min_length={self.min_length}"
        return f"Charset({self.chars!r}, length={self.length}{extra})"
