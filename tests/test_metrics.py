"""Metrics on crafted logits: decoding, ties, the all-zeros model, label formats, confusion."""

import numpy as np
import pytest

from xpnet import metrics
from xpnet.data import Charset
from xpnet.errors import ShapeError

CS = Charset("ABC", 2)  # 2 characters, 3 classes: 6 logits per sample


def logits_for(texts, charset=CS, high=5.0):
    """Logits whose per-block argmax spells ``texts``."""
    return np.where(charset.encode(texts) > 0, high, -high).astype(np.float32)


def test_decode_argmax_per_block():
    z = np.array([[0.1, 0.9, 0.2, 3.0, -1.0, 2.0],
                  [-5.0, -6.0, -4.0, 0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.decode(z, 2), [[1, 0], [2, 2]])
    assert metrics.decode_text(z, CS) == ["BA", "CC"]


def test_ties_go_to_the_first_class():
    z = np.array([[1.0, 1.0, 0.0, 0.0, 2.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.decode(z, 2), [[0, 1]])
    assert metrics.decode_text(z, CS) == ["AB"]


def test_all_zeros_model_reads_nothing_though_per_output_agreement_is_high():
    truth = ["BC", "CB", "CC", "BB"]
    y = CS.encode(truth)
    z = np.zeros((4, 6), dtype=np.float32)       # a model that predicts nothing: every sigmoid = 0.5
    assert metrics.decode_text(z, CS) == ["AA"] * 4  # ties everywhere -> the first class
    assert metrics.char_accuracy(z, y, 2) == 0.0
    assert metrics.string_accuracy(z, y, 2) == 0.0
    # The figure we never call accuracy: thresholding "predict no unit" agrees with 4 of every 6 targets.
    per_output = float(((z > 0) == (y > 0.5)).mean())
    assert per_output == pytest.approx(4 / 6)


def test_char_and_string_accuracy_count_differently():
    truth = ["AB", "BC", "CA", "AA"]
    z = logits_for(["AB", "BA", "CB", "BB"])  # right characters: 2, 1, 1, 0 -> 4 of 8; 1 string of 4
    y = CS.encode(truth)
    assert metrics.string_accuracy(z, y, 2) == pytest.approx(1 / 4)
    assert metrics.char_accuracy(z, y, 2) == pytest.approx(4 / 8)


@pytest.mark.parametrize("fmt", ["multi-hot float", "multi-hot uint8", "indices"])
def test_label_formats_give_the_same_answer(fmt):
    truth = ["AB", "BC", "CA"]
    z = logits_for(["AB", "BB", "CA"])
    y = {"multi-hot float": CS.encode(truth), "multi-hot uint8": CS.encode(truth, np.uint8),
         "indices": CS.indices(truth)}[fmt]
    assert metrics.char_accuracy(z, y, 2) == pytest.approx(5 / 6)
    assert metrics.string_accuracy(z, y, 2) == pytest.approx(2 / 3)


def test_plain_accuracy_for_one_label():
    z = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.5], [1.0, 1.0, 0.0]], dtype=np.float32)
    assert metrics.accuracy(z, np.array([1, 0, 1, 1])) == pytest.approx(0.5)  # the tie in row 4 picks 0
    assert metrics.accuracy(z, np.eye(3, dtype=np.float32)[[1, 0, 2, 0]]) == pytest.approx(1.0)


def test_confusion_and_most_confused_pairs():
    truth = ["AB", "AB", "CB", "AA"]
    z = logits_for(["AC", "AC", "CA", "AA"])
    cm = metrics.confusion_matrix(z, CS.indices(truth), 2)
    assert cm.shape == (3, 3) and cm.sum() == 8
    assert cm[1, 2] == 2 and cm[1, 0] == 1 and cm.trace() == 5
    assert metrics.most_confused(z, CS.encode(truth), CS) == [("B", "C", 2), ("B", "A", 1)]
    assert metrics.most_confused(z, CS.encode(truth), CS, top=1) == [("B", "C", 2)]


def test_multilabel_metrics_for_a_trainer():
    fns = metrics.multilabel_metrics(2)
    z = logits_for(["AB", "CC"])
    y = CS.encode(["AB", "CA"])
    assert fns["char_accuracy"](z, y) == pytest.approx(0.75)
    assert fns["string_accuracy"](z, y) == pytest.approx(0.5)


def test_shape_errors_name_the_problem():
    with pytest.raises(ShapeError, match="do not split into 4"):
        metrics.decode(np.zeros((2, 6)), 4)
    with pytest.raises(ShapeError, match="match neither"):
        metrics.char_accuracy(np.zeros((2, 6)), np.zeros((2, 5)), 2)
    with pytest.raises(ShapeError, match="2 predictions but 3 labels"):
        metrics.char_accuracy(np.zeros((2, 6)), np.zeros((3, 2), dtype=np.int64), 2)
    with pytest.raises(ShapeError, match="needs 6"):
        metrics.decode_text(np.zeros((2, 8)), CS)


@pytest.mark.gpu
def test_metrics_on_cupy_logits_match_numpy(rng):
    from xpnet import backend

    cp = backend.module_for("cupy")
    z = rng.standard_normal((50, 6)).astype(np.float32)
    z[:5] = 0.0  # ties
    y = CS.encode(["".join(rng.choice(list("ABC"), 2)) for _ in range(50)])
    for fn in (metrics.char_accuracy, metrics.string_accuracy):
        assert fn(cp.asarray(z), cp.asarray(y), 2) == fn(z, y, 2)
        assert fn(cp.asarray(z), y, 2) == fn(z, y, 2)  # host labels with device logits
    assert metrics.decode_text(cp.asarray(z), CS) == metrics.decode_text(z, CS)
    np.testing.assert_array_equal(metrics.confusion_matrix(cp.asarray(z), y, 2), metrics.confusion_matrix(z, y, 2))


def test_wilson_interval_against_a_reference_and_edge_cases():
    from xpnet.metrics import wilson_interval

    # Published values (Newcombe 1998, table I, method 3): 81 of 263 -> 0.2553-0.3662; 15 of 148 -> 0.0624-0.1605
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    lo, hi = wilson_interval(200, 200)
    assert hi == 1.0 and 0.98 < lo < 0.99            # all right: still an interval below 1
    assert wilson_interval(0, 10)[0] == 0.0
    lo90, hi90 = wilson_interval(180, 200, confidence=0.90)
    lo95, hi95 = wilson_interval(180, 200)
    assert lo95 < lo90 < 0.9 < hi90 < hi95
    with pytest.raises(ShapeError):
        wilson_interval(5, 4)
