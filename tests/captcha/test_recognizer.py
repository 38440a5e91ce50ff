"""xpnet.recognizer: loading a reader, texts and confidences, evaluation, and the errors on bad input."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet import metrics
from xpnet.nn import optim
from xpnet.data import Charset, Preprocess, label_from_name, read_images
from xpnet.errors import DataError, ModelFileError, UsageError
from xpnet.captcha.recognizer import Prediction, Recognizer, image_files, metadata_for, sigmoid

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "fixtures" / "really_simple_4char"
REAL_CHARS = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def tiny_reader(charset=Charset("ABCD", 2), pp=Preprocess(height=24, width=40, channels=1)):
    model = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=charset.n_outputs, filters=4, hidden=16)
    return Recognizer(model, charset, pp)


def test_confidence_is_the_product_of_the_winning_sigmoids():
    reader = tiny_reader()
    logits = np.array([[3.0, -1.0, 0.5, -2.0, -4.0, -5.0, 2.0, -3.0],
                       [-800.0, -900.0, -700.0, -750.0, 900.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    pred = reader.decode(logits)
    assert pred.texts == ["AC", "CA"]
    want0 = 1 / (1 + np.exp(-3.0)) * 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(pred.confidences[0], want0, rtol=1e-12)
    np.testing.assert_allclose(pred.char_confidences[1], [1 / (1 + np.exp(700.0)), 1.0], rtol=1e-12)
    assert np.all(np.isfinite(pred.confidences)) and np.all((pred.confidences >= 0) & (pred.confidences <= 1))
    np.testing.assert_array_equal(pred.indices, [[0, 2], [2, 0]])
    # the stable sigmoid never overflows
    np.testing.assert_allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


def test_saved_reader_round_trip_gives_model_predict_results(tmp_path):
    cs, pp = Charset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", 4), Preprocess()
    xpnet.seed(3)
    model = xpnet.models.captcha_net(input_shape=pp.shape)
    xpnet.save(model, tmp_path / "m.npz", metadata_for(cs, pp, model="captcha_net"))
    files = xpnet.data.write_captcha_pngs(tmp_path / "imgs", 6, seed=5, workers=0, progress=False)
    reader = Recognizer.load(tmp_path / "m.npz")
    assert reader.charset == cs and reader.preprocess == pp
    pred = reader.predict_files(files)
    # the same numbers straight from the model: read, normalise, predict, arg-max per block
    x = pp.normalize_batch(read_images(files, pp))
    logits = model.predict(x)
    assert pred.texts == metrics.decode_text(logits, cs)
    blocks = logits.reshape(6, 4, 36).astype(np.float64)
    want = np.prod(1 / (1 + np.exp(-blocks.max(axis=2))), axis=1)
    np.testing.assert_allclose(pred.confidences, want, rtol=1e-6)
    assert pred.paths == [os.fspath(f) for f in files]
    # a folder stands for its image files, in name order
    assert image_files(tmp_path / "imgs") == sorted(os.fspath(f) for f in files)


def test_bad_model_files_are_one_sentence_errors(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Recognizer.load(tmp_path / "nothere.npz")
    model = tiny_reader().model
    xpnet.save(model, tmp_path / "good.npz", metadata_for(Charset("ABCD", 2), Preprocess(24, 40, 1)))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.npz"):
        Recognizer.load(tmp_path / "cut.npz")
    xpnet.save(model, tmp_path / "bare.npz")      # no charset / preprocessing in the metadata
    with pytest.raises(ModelFileError, match="not a CAPTCHA reader.*xpnet train"):
        Recognizer.load(tmp_path / "bare.npz")
    xpnet.save(model, tmp_path / "wrong.npz", metadata_for(Charset("ABC", 2), Preprocess(24, 40, 1)))
    with pytest.raises(ModelFileError, match="outputs"):
        Recognizer.load(tmp_path / "wrong.npz")


def test_unreadable_images_raise_or_are_reported(tmp_path):
    reader = tiny_reader()
    good = xpnet.data.write_captcha_pngs(tmp_path, 2, seed=1, charset="ABCD", length=2, workers=0, progress=False)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        reader.predict_files(good + [tmp_path / "broken.png"])
    pred = reader.predict_files(good + [tmp_path / "broken.png"], on_error="report")
    assert len(pred) == 2 and pred.skipped[0][0].endswith("broken.png")
    with pytest.raises(UsageError, match="uint8"):
        reader.predict(np.zeros((1, 1, 24, 40), np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        image_files(empty)


def test_score_counts_strings_characters_positions_and_confusions():
    reader = tiny_reader()
    idx = np.array([[0, 1], [2, 3], [1, 1], [3, 3]])
    pred = Prediction(texts=reader.charset.decode(idx), confidences=np.array([0.9, 0.8, 0.3, 0.2]),
                      char_confidences=np.ones((4, 2)), indices=idx, paths=["a", "b", "c", "d"])
    truth = np.array([[0, 1], [2, 3], [0, 1], [3, 0]])
    ev = reader.score(pred, truth)
    assert ev.n == 4 and ev.string_accuracy == 0.5 and ev.char_accuracy == 0.75
    assert ev.position_accuracy == [0.75, 0.75]
    assert ev.confused == [("A", "B", 1), ("A", "D", 1)]
    assert [m[0] for m in ev.mistakes] == ["c", "d"] and ev.mistakes[0][1:3] == ("AB", "BB")
    assert ev.mean_confidence == {"right": pytest.approx(0.85), "wrong": pytest.approx(0.25)}
    text = ev.report()
    assert "whole-string accuracy 50.00%" in text and "A->B: 1" in text


def test_eval_on_real_images_with_a_model_trained_here(tmp_path):
    """Train a small reader on the 40 real images, then evaluate the folder; the report must equal a
    direct computation from model.predict, and the model must have learnt the images it saw."""
    pp = Preprocess(height=24, width=72, channels=1)
    data = xpnet.data.load_folder(REAL, charset=REAL_CHARS, length=4, preprocess=pp)
    assert len(data) == 40
    xpnet.seed(0)
    model = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=data.charset.n_outputs, filters=16,
                                        hidden=128)
    opt = optim.AdamW(model, lr=optim.OneCycle(1e-2, total_steps=60), weight_decay=0.0)
    x, t = pp.normalize_batch(data.images), data.targets()
    from xpnet.ops.loss import sigmoid_bce_with_logits
    for _ in range(60):
        loss, d = sigmoid_bce_with_logits(model.forward(x, train=True), t)
        model.backward(d)
        opt.step()
    xpnet.save(model, tmp_path / "real.npz", metadata_for(data.charset, pp))
    # an extra file whose label does not fit, and an unreadable one: both skipped and listed
    folder = tmp_path / "imgs"
    shutil.copytree(REAL, folder)
    (folder / "A1.png").write_bytes((REAL / "222X.png").read_bytes())
    (folder / "ZZZZ_2.png").write_bytes(b"")
    reader = Recognizer.load(tmp_path / "real.npz")
    ev = reader.evaluate_folder(folder)
    logits = model.predict(x)
    assert ev.n == 40
    assert ev.string_accuracy == pytest.approx(metrics.string_accuracy(logits, t, 4))
    assert ev.char_accuracy == pytest.approx(metrics.char_accuracy(logits, t, 4))
    assert ev.string_accuracy >= 0.9            # it has seen these images (chance: 32**-4)
    assert sorted(os.path.basename(p) for p, _ in ev.skipped) == ["A1.png", "ZZZZ_2.png"]
    want_conf = metrics.most_confused(logits, t, data.charset)
    assert ev.confused == want_conf
    assert all(label_from_name(p) != r for p, _, r, _ in ev.mistakes)
