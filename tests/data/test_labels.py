import numpy as np
import pytest

from xpnet.data import DIGITS_UPPER, Charset
from xpnet.data.labels import parse_length
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
    cs = Charset.infer(["AB", "ABC", "C"])
    assert (cs.chars, cs.min_length, cs.length, cs.lengths, cs.fixed) == ("ABC", 1, 3, "1-3", False)
    assert cs.check(["ABCA", "", "CC"]) == ["'ABCA' has 4 characters, expected 1-3", "'' has 0 characters, expected 1-3"]
    with pytest.raises(DataError):
        Charset.infer([])


def test_length_ranges_round_trip_and_refuse_the_multi_hot_code():
    cs = Charset("ABC", 6, min_length=4)
    assert Charset.from_dict(cs.to_dict()) == cs and cs.to_dict()["min_length"] == 4
    assert "min_length" not in Charset("ABC", 4).to_dict() and Charset("ABC", 4) != Charset("ABC", 4, 3)
    assert repr(cs) == "Charset('ABC', length=6, min_length=4)"
    with pytest.raises(UsageError, match="4-6 characters.*CTC head"):
        cs.encode(["ABCA"])
    with pytest.raises(UsageError, match="shortest"):
        Charset("ABC", 3, min_length=4)


@pytest.mark.parametrize("value, expected", [(4, (4, 4)), ("4", (4, 4)), ("4-6", (4, 6)), (" 2-2 ", (2, 2)),
                                             ((3, 5), (3, 5))])
def test_parse_length(value, expected):
    assert parse_length(value) == expected


@pytest.mark.parametrize("value", ["6-4", "0", "0-3", "a", "4-", "-4", "4-5-6", 4.5, True, None, (1, 2, 3)])
def test_parse_length_refuses(value):
    with pytest.raises(UsageError, match="--length must be a number of characters such as 4, or a range"):
        parse_length(value)


def test_invalid_charsets():
    with pytest.raises(UsageError, match="repeats"):
        Charset("AAB", 1)
    with pytest.raises(UsageError):
        Charset("AB", 0)
    assert Charset.from_dict(Charset("XY", 3).to_dict()) == Charset("XY", 3)
