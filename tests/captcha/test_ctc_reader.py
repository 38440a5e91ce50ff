"""A CTC reader end to end: a tiny CRNN trained with xpnet.Trainer on generated CAPTCHAs of lengths 3-5,
saved and loaded as a reader (head "ctc"), its decoding of texts of any length, its evaluation (CER,
length accuracy) against hand-computed values, and its ONNX export."""

import numpy as np
import pytest
from PIL import Image

import xpnet
from xpnet import ops
from xpnet.captcha import Recognizer, metadata_for
from xpnet.captcha.heads import BCELoss, CTCLoss, ctc_decode, ctc_metadata, ctc_targets, edit_distances, head_of
from xpnet.data import Charset, Preprocess, generate_captchas
from xpnet.errors import DataError, ModelFileError, ShapeError, UsageError
from xpnet.testing import numerical_gradient

CHARS = "23456789"
CHARSET = Charset(CHARS, 5)  # a CTC reader's length: its longest training label
PP = Preprocess(channels=1)  # 1 x 32 x 80
STEPS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(reader path, training history, images, texts): 300 CAPTCHAs, 100 each of 3, 4 and 5 characters."""
    parts = [generate_captchas(100, seed=n, charset=CHARS, length=n, preprocess=PP, workers=0, progress=False)
             for n in (3, 4, 5)]
    images = np.concatenate([p.images for p in parts])
    texts = [t for p in parts for t in p.labels]
    xpnet.seed(0)
    model = xpnet.models.build("captcha_crnn", n_classes=len(CHARS), channels=(8, 16, 16), hidden=24,
                               batchnorm=True)  # BatchNorm leaves CTC's all-blank plateau sooner
    trainer = xpnet.Trainer(model, xpnet.Adam(model, lr=3e-3), loss=CTCLoss(), batch_size=32, progress=False,
                            log=None, plot=False, max_steps=STEPS, seed=1)
    trainer.fit((PP.normalize_batch(images, np.float32), ctc_targets(texts, CHARSET)), epochs=1000)
    path = tmp_path_factory.mktemp("ctc") / "reader.npz"
    xpnet.save(model, path, ctc_metadata(CHARSET, PP, model="captcha_crnn"))
    return path, trainer.history, images, texts


def test_the_loss_falls_clearly(trained):
    _, history, _, _ = trained
    steps = dict((int(s), float(v)) for s, v in history.steps)
    assert max(steps) == STEPS
    assert steps[STEPS] < 0.3 * steps[20] and steps[STEPS] < 0.2 * steps[10], steps


def test_save_load_round_trip_reads_like_the_trained_model(trained):
    path, _, images, texts = trained
    reader = Recognizer.load(path)
    assert reader.head == "ctc" and reader.metadata["head"] == "ctc" and reader.steps == 20
    assert reader.charset == CHARSET and reader.preprocess == PP
    logits = reader.logits(images[::10])
    assert logits.shape == (30, 20, len(CHARS) + 1) and logits.dtype == np.float32
    pred = reader.predict(images[::10])
    assert all(set(t) <= set(CHARS) for t in pred.texts)
    assert len({len(t) for t in pred.texts}) > 1, pred.texts  # texts of different lengths
    assert ((pred.confidences >= 0) & (pred.confidences <= 1)).all()
    want = [[CHARS.index(c) for c in t] for t in pred.texts]
    assert pred.texts == ["".join(CHARS[c - 1] for c in row) for row in ops.ctc_greedy_decode(logits)]
    assert [row[row >= 0].tolist() for row in pred.indices] == want
    again = Recognizer.load(path, batch_size=7).predict(images[::10])  # several batches, same reading
    assert again.texts == pred.texts
    np.testing.assert_allclose(again.confidences, pred.confidences, rtol=1e-6)
    ev = reader.evaluate(images, texts)
    assert ev.string_accuracy > 0.5 and ev.char_error_rate < 0.2 and ev.length_accuracy > 0.6, ev.report()
    assert "character error rate" in ev.report() and ev.char_accuracy == pytest.approx(1 - ev.char_error_rate)


def test_the_reader_reads_fresh_captchas_of_each_length(trained):
    path, _, _, _ = trained
    reader = Recognizer.load(path)
    fresh = [generate_captchas(20, seed=99, charset=CHARS, length=n, preprocess=PP, workers=0, progress=False)
             for n in (3, 4, 5)]
    ev = reader.evaluate(np.concatenate([f.images for f in fresh]), [t for f in fresh for t in f.labels])
    assert ev.n == 60 and ev.char_error_rate < 0.5 and ev.string_accuracy > 0.1, ev.report()


def _logits(paths, k=len(CHARS) + 1, t=8, high=6.0):
    """(N, t, k) logits whose best path is each given column sequence (class 0 the blank)."""
    z = np.zeros((len(paths), t, k), np.float32)
    for n, path in enumerate(paths):
        for s, c in enumerate(path):
            z[n, s, c] = high
    return z


def _reader(t=8):
    model = xpnet.Sequential([xpnet.Flatten(), xpnet.Dense(t * (len(CHARS) + 1))], input_shape=PP.shape)
    return Recognizer(model, CHARSET, PP, ctc_metadata(CHARSET, PP))


def test_decoding_texts_of_different_lengths_and_their_confidences():
    # class c is CHARS[c - 1]: 1 -> '2', 2 -> '3', ...; repeats merge unless a blank separates them
    paths = [[1, 1, 0, 2, 3, 3, 0, 0], [1, 0, 1, 2, 0, 3, 4, 5], [0] * 8, [8, 8, 8, 8, 8, 8, 8, 8]]
    pred = _reader().decode(_logits(paths))
    assert pred.texts == ["234", "223456", "", "9"]
    assert pred.indices.shape == (4, 8) and pred.indices.dtype == np.int64
    assert pred.indices[0].tolist() == [0, 1, 2, -1, -1, -1, -1, -1] and (pred.indices[2] == -1).all()
    p = np.exp(6) / (np.exp(6) + 8)  # each column's best probability
    assert np.isnan(pred.char_confidences[0, 3:]).all() and np.isnan(pred.char_confidences[2]).all()
    np.testing.assert_allclose(pred.char_confidences[0, :3], p, rtol=1e-6)
    np.testing.assert_allclose(pred.confidences, [p ** 3, p ** 6, p, p], rtol=1e-6)
    # a character's confidence is its best column over the run that emitted it
    z = _logits([[1, 1, 0, 0, 0, 0, 0, 0]])
    z[0, 0, 1] = 2.0
    got = ctc_decode(z, CHARSET)
    assert got[0] == ["2"] and got[1][0] == pytest.approx(p, rel=1e-6)
    assert _reader().decode(np.zeros((0, 8, 9), np.float32)).texts == []


def test_score_reports_cer_and_length_accuracy_as_computed_by_hand():
    reader = _reader()
    paths = [[1, 2, 3], [1, 2, 3, 4], [], [1, 0, 1, 3, 0, 3]]
    pred = reader.decode(_logits(paths))
    assert pred.texts == ["234", "2345", "", "2244"]
    truth = ["234", "2346", "23", "224"]
    # edit distances 0, 1 (5->6), 2 (two deletions), 1 (one insertion): 4 over 3 + 4 + 2 + 3 = 12 characters
    assert edit_distances(pred.texts, truth).tolist() == [0, 1, 2, 1]
    ev = reader.score(pred, truth)
    assert ev.n == 4 and ev.string_accuracy == 0.25
    assert ev.char_error_rate == pytest.approx(4 / 12) and ev.char_accuracy == pytest.approx(8 / 12)
    assert ev.length_accuracy == 0.5  # "234" and "2345" have their label's length
    assert ev.confused == [("6", "5", 1)] and ev.position_accuracy == []
    assert [m[1:3] for m in ev.mistakes] == [("2346", "2345"), ("23", ""), ("224", "2244")]
    assert "character error rate 33.33%, length accuracy 50.00%" in ev.report()
    padded = np.array([[0, 1, 2, -1], [0, 1, 2, 4], [0, 1, -1, -1], [0, 0, 2, -1]])  # the same truth as indices
    assert reader.score(pred, padded).char_error_rate == ev.char_error_rate
    with pytest.raises(DataError, match="outside charset"):
        reader.score(pred, ["234", "2346", "23", "2X4"])
    assert edit_distances(["kitten", "", "ab"], ["sitting", "abc", ""]).tolist() == [3, 3, 2]


def test_evaluate_folder_takes_any_length_and_lists_the_rest(tmp_path, trained):
    path, _, images, texts = trained
    reader = Recognizer.load(path)
    names = []
    for i in (0, 150, 299):  # lengths 3, 4 and 5
        names.append(f"{texts[i]}_{i}.png")
        Image.fromarray(images[i, 0]).save(tmp_path / names[-1])
    Image.fromarray(images[1, 0]).save(tmp_path / "2A4_1.png")  # 'A' is not in the charset
    (tmp_path / "23_9.png").write_bytes(b"not an image")
    ev = reader.evaluate_folder(tmp_path)
    assert ev.n == 3 and sorted(p.split("/")[-1] for p, _ in ev.skipped) == ["23_9.png", "2A4_1.png"]
    direct = reader.score(reader.predict(images[[0, 150, 299]]), [texts[0], texts[150], texts[299]])
    assert ev.char_error_rate == pytest.approx(direct.char_error_rate)
    assert ev.length_accuracy == direct.length_accuracy and ev.string_accuracy == direct.string_accuracy
    assert reader.has_label("23456789_1.png") and not reader.has_label("2" * 21 + ".png")


def test_ctc_targets_pack_lengths_then_labels_and_the_loss_is_ctc_loss(rng):
    y = ctc_targets(["23", "9", "234"], CHARSET)
    assert y.dtype == np.int64 and y.tolist() == [[2, 1, 2, 0], [1, 8, 0, 0], [3, 1, 2, 3]]
    assert ctc_targets(["23"], CHARSET, width=5).shape == (1, 6)
    logits = rng.standard_normal((3, 6, 9))
    loss, d = CTCLoss()(logits, y)
    want, dwant = ops.ctc_loss(logits, y[:, 1:], y[:, 0])
    assert float(loss) == float(want) and np.array_equal(d, dwant)
    same, _ = CTCLoss()(logits, y.astype(np.float64))  # a transform that cast the targets
    assert float(same) == float(loss)
    with pytest.raises(DataError, match=r"2 label\(s\) cannot be CTC targets.*'' is empty.*'2A'"):
        ctc_targets(["", "2A", "23"], CHARSET)
    with pytest.raises(DataError, match="width 1 is shorter"):
        ctc_targets(["23"], CHARSET, width=1)
    with pytest.raises(ShapeError, match=r"CTCLoss needs targets \(N, 1 \+ S\)"):
        CTCLoss()(logits, y[:, 0])


def test_label_smoothing_follows_the_columns_cross_entropy_to_uniform_and_reports_the_plain_loss(rng):
    y = ctc_targets(["23", "9", "234"], CHARSET)
    logits = rng.standard_normal((3, 6, 9))
    eps = 0.2
    smoothed = CTCLoss(smoothing=eps)
    loss, d = smoothed(logits, y)
    ctc, dctc = ops.ctc_loss(logits, y[:, 1:], y[:, 0])
    assert float(loss) == float(ctc)  # the loss reported: -log p(label), as without smoothing
    # naive float64 reference: per column -mean_k log softmax, summed over columns, averaged over samples
    logp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    uniform = sum(-logp[n, t].mean() for n in range(3) for t in range(6)) / 3
    assert float(smoothed.objective(logits, y)) == pytest.approx((1 - eps) * float(ctc) + eps * uniform, rel=1e-12)
    x = logits.copy()
    np.testing.assert_allclose(d, numerical_gradient(lambda: float(smoothed.objective(x, y)), x),
                               rtol=1e-6, atol=1e-8)
    assert not np.allclose(d, dctc)
    loss32, d32 = smoothed(logits.astype(np.float32), y)
    assert loss32.dtype == np.float32 and d32.dtype == np.float32
    np.testing.assert_allclose(d32, d, rtol=1e-4, atol=1e-6)
    assert float(CTCLoss().objective(logits, y)) == float(ctc)
    with pytest.raises(UsageError, match=r"smoothing must be in \[0, 1\)"):
        CTCLoss(smoothing=1.0)


def test_bce_label_smoothing_pulls_the_targets_towards_one_half(rng):
    logits = rng.standard_normal((4, 6))
    t = (rng.random((4, 6)) < 0.3).astype(np.float64)
    loss, d = BCELoss(smoothing=0.1)(logits, t)
    want, dwant = ops.sigmoid_bce_with_logits(logits, t * 0.9 + 0.05)
    assert np.allclose(d, dwant, rtol=1e-12)
    assert float(loss) == float(ops.sigmoid_bce_with_logits(logits, t)[0]) != float(want)
    assert float(BCELoss(smoothing=0.1).objective(logits, t)) == pytest.approx(float(want), rel=1e-12)
    plain, dplain = BCELoss()(logits, t)
    assert float(plain) == float(loss) and not np.allclose(dplain, d)
    with pytest.raises(UsageError):
        BCELoss(smoothing=-0.1)


def test_the_head_key_and_the_bce_default():
    assert head_of(metadata_for(CHARSET, PP)) == "bce" and head_of(None) == "bce"
    assert ctc_metadata(CHARSET, PP, head="bce")["head"] == "ctc"
    bce = xpnet.Sequential([xpnet.Flatten(), xpnet.Dense(CHARSET.n_outputs)], input_shape=PP.shape)
    assert Recognizer(bce, CHARSET, PP, metadata_for(CHARSET, PP)).head == "bce"
    with pytest.raises(ModelFileError, match="a CTC reader of charset '23456789' needs \\(T, 9\\)"):
        Recognizer(xpnet.models.build("captcha_crnn", n_classes=5, channels=(2, 2, 2), hidden=2), CHARSET, PP,
                   ctc_metadata(CHARSET, PP))
    with pytest.raises(ModelFileError, match="'attention' head, which this xpnet cannot decode"):
        Recognizer(bce, CHARSET, PP, {"head": "attention"})


def test_onnx_round_trip_reads_the_same(tmp_path, trained):
    pytest.importorskip("onnx", reason='needs the onnx extra: pip install "xpnet[onnx]"')
    from xpnet.captcha.export import export_model_file

    path, _, images, _ = trained
    out = export_model_file(path, tmp_path / "reader.onnx")
    want = Recognizer.load(path).predict(images[::7])
    reader = Recognizer.load(out, batch_size=16)
    got = reader.predict(images[::7])
    assert reader.head == "ctc" and reader.metadata["head"] == "ctc" and reader.steps == 20
    assert reader.metadata["outputs"]["probabilities"] == ["N", 20, 9]
    assert got.texts == want.texts and any(want.texts)
    np.testing.assert_allclose(got.confidences, want.confidences, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.char_confidences, want.char_confidences, rtol=0, atol=1e-4)


def test_training_metrics_agree_with_the_readers_decoding():
    from xpnet.captcha.heads import columns_needed, ctc_metrics

    cs = Charset("ABC", 4, min_length=1)
    rng = np.random.default_rng(3)
    n, t = 40, 9
    truths = ["".join(rng.choice(list("ABC"), rng.integers(1, 5))) for _ in range(n)]
    logits = rng.standard_normal((n, t, 4)).astype(np.float32)
    for i in range(0, n, 2):  # every other row spells its truth exactly: blank, char, blank, char, ...
        logits[i] = -5.0
        logits[i, :, 0] = 5.0
        for j, c in enumerate(truths[i]):
            logits[i, 2 * j + 1, 0], logits[i, 2 * j + 1, 1 + "ABC".index(c)] = -5.0, 5.0
    y = ctc_targets(truths, cs, width=4)
    texts = ctc_decode(logits, cs)[0]
    m = ctc_metrics(cs)
    want = np.mean([a == b for a, b in zip(texts, truths)])
    assert 0.5 <= want < 1 and m["string_accuracy"](logits, y) == pytest.approx(want)
    cer = edit_distances(texts, truths).sum() / sum(map(len, truths))
    assert m["char_error_rate"](logits, y.astype(np.float32)) == pytest.approx(cer)  # float targets too
    assert [columns_needed(s) for s in ("", "AB", "AAB", "AAAA")] == [0, 2, 4, 7]


def test_a_reader_of_known_lengths_reads_the_best_path_of_such_a_length():
    # class 1 over three columns reads '2' (merged); a reader of 2-character texts splits it at the
    # column least sure of being a '2' -- the best path with two characters, not the best path
    z = np.log(np.array([[[0.03, 0.9] + [0.01] * 7, [0.3, 0.6] + [0.1 / 7] * 7, [0.03, 0.9] + [0.01] * 7]]))
    z = z.astype(np.float32)
    plain = Recognizer(_reader(3).model, CHARSET, PP, ctc_metadata(CHARSET, PP))
    assert plain.lengths is None and plain.decode(z).texts == ["2"]
    two = Recognizer(_reader(3).model, CHARSET, PP, ctc_metadata(CHARSET, PP, lengths=[2, 2]))
    pred = two.decode(z)
    assert two.lengths == (2, 2) and pred.texts == ["22"]
    np.testing.assert_allclose(pred.confidences, [0.9 * 0.9], rtol=1e-5)
    # readings that already have an allowed length are the plain best path
    paths = [[1, 0, 2], [3, 3, 4]]
    assert Recognizer(_reader(3).model, CHARSET, PP, ctc_metadata(CHARSET, PP, lengths=[2, 3])).decode(
        _logits(paths, t=3)).texts == plain.decode(_logits(paths, t=3)).texts == ["23", "45"]
    for bad in ([3, 2], "4", [1]):
        with pytest.raises(ModelFileError, match="lengths"):
            Recognizer(_reader(3).model, CHARSET, PP, ctc_metadata(CHARSET, PP, lengths=bad))
