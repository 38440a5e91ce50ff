"""The charset codec: text labels <-> class indices <-> multi-hot targets.

A label of ``length`` characters over a charset of K characters becomes a
multi-hot row of ``length * K`` units: block ``i`` (units ``i*K .. i*K+K-1``)
is the one-hot code of character ``i``.  This is the seed's multi-label,
multi-class layout; the model's last layer has ``length * K`` outputs.
"""

from __future__ import annotations

import numpy

from ..errors import DataError, UsageError

DIGITS_UPPER = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Charset:
    """Characters and label length of a task.  ``Charset("0123456789", 1)`` is MNIST."""

    def __init__(self, chars: str, length: int):
        if not isinstance(chars, str) or len(chars) < 2:
            raise UsageError(f"a charset needs at least 2 characters, got {chars!r}.")
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise UsageError(f"charset {chars!r} repeats characters {''.join(dup)!r}.")
        if int(length) < 1:
            raise UsageError(f"label length must be at least 1, got {length}.")
        self.chars = chars
        self.length = int(length)
        self._index = {c: i for i, c in enumerate(chars)}

    @property
    def n_classes(self) -> int:
        return len(self.chars)

    @property
    def n_outputs(self) -> int:
        return self.length * self.n_classes

    def check(self, labels) -> list[str]:
        """The labels (of a list) that this charset cannot encode, each with the reason."""
        bad = []
        for text in labels:
            if len(text) != self.length:
                bad.append(f"{text!r} has {len(text)} characters, expected {self.length}")
            elif any(c not in self._index for c in text):
                odd = "".join(sorted({c for c in text if c not in self._index}))
                bad.append(f"{text!r} has characters {odd!r} outside the charset")
        return bad

    def indices(self, labels) -> numpy.ndarray:
        """(N, length) int64 class indices; DataError naming the labels that do not fit."""
        labels = list(labels)
        bad = self.check(labels)
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DataError(f"{len(bad)} label(s) do not fit charset {self.chars!r}, length {self.length}: "
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
        return {"chars": self.chars, "length": self.length}

    @classmethod
    def from_dict(cls, d: dict) -> "Charset":
        try:
            return cls(str(d["chars"]), int(d["length"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"malformed charset description {d!r}.") from None

    @classmethod
    def infer(cls, labels) -> "Charset":
        """The sorted set of characters in ``labels``; all labels must have one length."""
        labels = list(labels)
        if not labels:
            raise DataError("cannot infer a charset from no labels.")
        lengths = sorted({len(t) for t in labels})
        if len(lengths) != 1:
            counts = {n: sum(1 for t in labels if len(t) == n) for n in lengths}
            raise DataError(f"labels have mixed lengths {counts} (length: count): give --length to keep one length.")
        chars = "".join(sorted(set("".join(labels))))
        if len(chars) < 2:
            raise DataError(f"labels use only the character(s) {chars!r}: at least 2 classes are needed.")
        return cls(chars, lengths[0])

    def __eq__(self, other):
        return isinstance(other, Charset) and (self.chars, self.length) == (other.chars, other.length)

    def __repr__(self):
        return f"Charset({self.chars!r}, length={self.length})"
