"""Readers exported to ONNX: the same texts and confidences as the .npz for every shipped model, through
onnxruntime and through onnx's reference evaluator; the metadata a reader elsewhere needs; bad files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.captcha import onnx_reader
from xpnet.captcha.export import export_model_file, export_reader, reader_metadata
from xpnet.captcha.network import build_model
from xpnet.captcha.recognizer import Recognizer, metadata_for
from xpnet.data import Charset, Preprocess, read_image
from xpnet.errors import ModelFileError, UsageError

onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install "xpnet[onnx]"')

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "fixtures" / "really_simple_4char"
FILES = sorted(REAL.glob("*.png"))[::3]  # 14 images, RGB ones included
CHARSET = Charset("23456789ABCDEFGHJKLMNPQRSTUVWXYZ", 4)
PP = Preprocess(height=24, width=72, channels=1)
SMALL = {"captcha_net_bn": {"width": 4}, "simple_convnet": {"filters": 4, "hidden": 16},
         "captcha_crnn": {"channels": (4, 8, 8), "hidden": 8}}  # tiny, fast versions


def randomise_batchnorm(model, seed=0):
    """Running statistics and scales far from a fresh BatchNorm's (which is the identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "running_var" in layer.buffers:
            c = layer.buffers["running_var"].shape[0]
            layer.buffers["running_mean"][...] = rng.normal(0, 0.3, c)
            layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
            layer.params["gamma"][...] = rng.uniform(0.5, 1.5, c)
            layer.params["beta"][...] = rng.normal(0, 0.2, c)
    return model


def sharpen_columns(model, scale=30.0):
    """A CTC model's per-column scores far from a fresh one's (near uniform): texts of mixed lengths, the
    empty one included, with confidences spread over (0, 1)."""
    if model.name == "captcha_crnn":
        model.layers[-1].params["W"] *= scale
        model.layers[-1].params["b"][0] = scale / 10  # the blank
    return model


@pytest.fixture(scope="module", params=sorted(xpnet.models.MODELS))
def exported(request, tmp_path_factory):
    """(model name, .npz path, .onnx path) of a randomly initialised reader of each shipped model."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    xpnet.seed(7)
    model = sharpen_columns(randomise_batchnorm(build_model(name, CHARSET, PP, **SMALL.get(name, {}))))
    head = getattr(xpnet.models.MODELS[name], "head", "bce")  # captcha_crnn: per-column scores for CTC
    xpnet.save(model, folder / "reader.npz", metadata_for(CHARSET, PP, model=name, data={"folder": "/somewhere"},
                                                          head=head))
    export_model_file(folder / "reader.npz", folder / "reader.onnx")
    return name, folder / "reader.npz", folder / "reader.onnx"


def without_onnxruntime(monkeypatch):
    def missing():
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(onnx_reader, "_import_onnxruntime", missing)


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_onnx_reader_reads_like_the_npz_reader(exported, runtime, monkeypatch):
    name, npz, onnx_path = exported
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "xpnet[onnx]"')
    else:
        without_onnxruntime(monkeypatch)  # what a machine without onnxruntime gets
    want = Recognizer.load(npz).predict_files(FILES)
    reader = Recognizer.load(onnx_path, batch_size=5)  # several batches
    assert reader.model.runtime == runtime and reader.describe().endswith(f"backend {runtime}")
    got = reader.predict_files(FILES)
    assert len(set(want.texts)) > 3 and np.ptp(want.confidences) > 1e-3, "the readings must not be trivial"
    assert got.texts == want.texts
    np.testing.assert_allclose(got.confidences, want.confidences, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.char_confidences, want.char_confidences, rtol=0, atol=1e-4)
    assert reader.charset == CHARSET and reader.preprocess == PP
    assert reader.metadata["model"] == name and reader.path == str(onnx_path)


def test_the_metadata_lets_any_program_reproduce_the_reading(exported):
    ort = pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "xpnet[onnx]"')
    name, npz, onnx_path = exported
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    assert meta["charset"] == {"chars": CHARSET.chars, "length": 4} and meta["length"] == 4
    assert meta["head"] == ("ctc" if name == "captcha_crnn" else "bce") and meta["xpnet_version"] == xpnet.__version__
    assert meta["preprocess"] == PP.to_dict() and meta["input_shape"] == [1, 24, 72]
    assert "x = pixel * (2/255) - 1" in meta["normalization"] and "fit" in meta["preprocessing"]
    assert "data" not in meta  # the training data's location stays on the training machine
    # Only what the metadata says: the uint8 image, the normalisation formula, argmax per position.
    pixels = np.stack([read_image(f, Preprocess.from_dict(meta["preprocess"])) for f in FILES])
    x = (pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)).astype(np.float32)
    probs, logits = sess.run(None, {"input": x})
    want = Recognizer.load(npz).predict_files(FILES)
    if meta["head"] == "ctc":  # per column: argmax, merge repeats, drop the blank (class 0)
        assert probs.shape == (len(FILES), meta["outputs"]["logits"][1], len(CHARSET.chars) + 1)
        np.testing.assert_allclose(probs.sum(axis=2), 1, atol=1e-5)
        texts = []
        for row in logits.argmax(axis=2):
            keep = [c for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
            texts.append("".join(meta["charset"]["chars"][c - 1] for c in keep))
        assert texts == want.texts and "class 0 (the blank)" in meta["decoding"]
        return
    assert probs.shape == (len(FILES), meta["length"], len(meta["charset"]["chars"]))
    texts = ["".join(meta["charset"]["chars"][i] for i in row) for row in logits.argmax(axis=2)]
    conf = np.take_along_axis(probs, logits.argmax(axis=2)[..., None], axis=2)[..., 0].prod(axis=1)
    assert texts == want.texts
    np.testing.assert_allclose(conf, want.confidences, atol=1e-4)


def test_export_reader_takes_a_loaded_reader_and_refuses_other_things(tmp_path, exported):
    _, npz, onnx_path = exported
    reader = Recognizer.load(npz)
    out = export_reader(reader, tmp_path / "again.onnx")
    assert {p.key: p.value for p in onnx.load(out).metadata_props} == \
           {k: json.dumps(v, sort_keys=True) for k, v in {"xpnet_version": xpnet.__version__,
                                                          **reader_metadata(reader)}.items()}
    with pytest.raises(UsageError, match="export_reader takes an xpnet.captcha.Recognizer"):
        export_reader(reader.model, tmp_path / "x.onnx")
    with pytest.raises(UsageError, match="already an ONNX model"):
        export_reader(Recognizer.load(onnx_path), tmp_path / "x.onnx")
    with pytest.raises(UsageError, match="export_reader"):  # the library function names the reader's way
        xpnet.export_onnx(reader, tmp_path / "x.onnx")
    with pytest.raises(UsageError, match="runs on the CPU"):
        Recognizer.load(onnx_path, to="cupy")


def test_a_plain_model_file_is_not_a_reader(tmp_path):
    model = xpnet.Sequential([xpnet.Flatten(), xpnet.Dense(8)], input_shape=(1, 4, 4))
    xpnet.save(model, tmp_path / "plain.npz")
    with pytest.raises(ModelFileError, match=r"plain.npz is not a CAPTCHA reader \(no charset or preprocess "
                                             r"in its metadata\).*xpnet.export_onnx"):
        export_model_file(tmp_path / "plain.npz", tmp_path / "plain.onnx")
    assert not (tmp_path / "plain.onnx").exists()
    xpnet.export_onnx(model, tmp_path / "plain.onnx")  # the bare network exports without reader metadata
    with pytest.raises(ModelFileError, match=r"plain.onnx is not a CAPTCHA reader \(no 'charset'.*xpnet export"):
        Recognizer.load(tmp_path / "plain.onnx")


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_damaged_onnx_files_are_one_model_file_sentence(tmp_path, exported, runtime, monkeypatch):
    if runtime == "reference":
        without_onnxruntime(monkeypatch)
    _, npz, onnx_path = exported
    data = onnx_path.read_bytes()
    cases = {"cut.onnx": data[:len(data) // 2], "noise.onnx": bytes(range(256)) * 8, "empty.onnx": b"",
             "renamed.onnx": npz.read_bytes()}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelFileError) as info:
            Recognizer.load(tmp_path / name)
        msg = str(info.value)
        assert name in msg and "\n" not in msg and msg.endswith("."), msg
    with pytest.raises(ModelFileError, match="missing.onnx does not exist"):
        Recognizer.load(tmp_path / "missing.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelFileError, match="folder.onnx is not a file"):
        Recognizer.load(tmp_path / "folder.onnx")


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_a_graph_that_fails_at_run_time_is_one_model_file_sentence(tmp_path, exported, runtime, monkeypatch):
    if runtime == "reference":
        without_onnxruntime(monkeypatch)
    proto = onnx.load(exported[2])
    (shape,) = [t for t in proto.graph.initializer if t.name == "output_shape"]
    shape.CopyFrom(onnx.numpy_helper.from_array(np.array([0, 3, 5], dtype=np.int64), "output_shape"))
    onnx.save(proto, tmp_path / "reshaped.onnx")
    # onnxruntime infers the new shape and refuses the file on loading; the evaluator fails on the first batch
    with pytest.raises(ModelFileError, match=r"reshaped.onnx .*export it again with `xpnet export`\.$"):
        Recognizer.load(tmp_path / "reshaped.onnx").predict_files(FILES[:2])


def _run_without(modules, code, tmp_path):
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_without_the_packages_loading_says_how_to_install_them(exported, tmp_path):
    _, _, onnx_path = exported
    load = ("from xpnet.captcha import Recognizer\n"
            "try:\n"
            f"    r = Recognizer.load({str(onnx_path)!r})\n"
            f"    print(r.model.runtime, r.predict_files([{str(FILES[0])!r}]).texts[0])\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    assert _run_without(["onnxruntime", "onnx"], load, tmp_path) == (
        f'UsageError reading the ONNX model {onnx_path} needs onnxruntime (or onnx), which is not installed: '
        f'pip install "xpnet[onnx]".')
    # onnx without onnxruntime: the reference evaluator reads, with the same text
    want = Recognizer.load(exported[1]).predict_files(FILES[:1]).texts[0]
    assert _run_without(["onnxruntime"], load, tmp_path) == f"reference {want}"


def test_a_ctc_readers_text_lengths_travel_into_the_onnx_file(tmp_path):
    xpnet.seed(7)
    model = build_model("captcha_crnn", CHARSET, PP, **SMALL.get("captcha_crnn", {}))
    for name, extra in (("plain", {}), ("lengths", {"lengths": [4, 4]})):
        xpnet.save(model, tmp_path / f"{name}.npz", metadata_for(CHARSET, PP, model="captcha_crnn", head="ctc",
                                                                **extra))
        export_model_file(tmp_path / f"{name}.npz", tmp_path / f"{name}.onnx")
    props = {p.key: json.loads(p.value) for p in onnx.load(tmp_path / "lengths.onnx").metadata_props}
    assert props["lengths"] == [4, 4] and '"lengths": [lo, hi]' in props["decoding"]
    assert Recognizer.load(tmp_path / "lengths.onnx").lengths == (4, 4) == Recognizer.load(
        tmp_path / "lengths.npz").lengths
    assert "lengths" not in {p.key for p in onnx.load(tmp_path / "plain.onnx").metadata_props}
    assert Recognizer.load(tmp_path / "plain.onnx").lengths is None
