import numpy as np
import pytest

from xpnet.data import DIGITS_UPPER, Charset
from xpnet.errors import DataError, UsageError


def test_encode_decode_roundtrip():
    cs = Charset(DIGITS_UPPER, 4)
    labels = ["2A2X", "ZZ09", "0000"]
    t = cs.encode(labels)
    assert t.shape == (3, 144) and t.dtype == np.float32
    assert t.sum(axis=1).tolist() == [4, 4, 4]
    assert t[0, 0 * 36 + 2] == 1 and t[0, 1 * 36 + 10] == 1 and t[0, 3 * 36 + 33] == 1
    assert cs.decode(t.reshape(3, 4, 36).argmax(-1)) == labels


def test_bad_labels_are_all_named():
    cs = Charset("ABC", 2)
    with pytest.raises(DataError, match=r"2 label\(s\).*'AD'.*'D'.*'ABC' has 3 characters"):
        cs.indices(["AB", "AD", "ABC"])


def test_infer_and_mixed_lengths():
    cs = Charset.infer(["BA", "CA"])
    assert cs.chars == "ABC" and cs.length == 2
    with pytest.raises(DataError, match=r"mixed lengths \{2: 1, 3: 1\}"):
        Charset.infer(["AB", "ABC"])
    with pytest.raises(DataError):
        Charset.infer([])


def test_invalid_charsets():
    with pytest.raises(UsageError, match="repeats"):
        Charset("AAB", 1)
    with pytest.raises(UsageError):
        Charset("AB", 0)
    assert Charset.from_dict(Charset("XY", 3).to_dict()) == Charset("XY", 3)
