"""xpnet.export_onnx: every layer type as standard ONNX operators, equal to the model's own forward
in onnxruntime and in onnx's reference evaluator (GRU layers included); the graph's contract;
refusals and atomic writes."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.errors import ShapeError, StorageError, UsageError
from xpnet.nn.layers import LAYER_TYPES, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from xpnet.nn.onnx_export import EXPORTERS, OPSET, export_onnx, to_onnx
from xpnet.nn.recurrent import GRU
from xpnet.nn.sequence import Columns, TimeDense
from xpnet.testing import assert_allclose

onnx = pytest.importorskip("onnx", reason='needs the onnx extra: pip install "xpnet[onnx]"')
from onnx.reference import ReferenceEvaluator  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STANDARD_OPS = {"Conv", "MaxPool", "Relu", "Gemm", "BatchNormalization", "Flatten", "Reshape", "Sigmoid", "Identity",
                "GRU", "Transpose", "MatMul", "Add", "Softmax"}


def ort_run(proto, x):
    ort = pytest.importorskip("onnxruntime", reason='needs the onnx extra: pip install "xpnet[onnx]"')
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def reference_run(proto, x):
    with np.errstate(all="ignore"):  # the evaluator's Sigmoid warns on large logits (its result is right)
        return ReferenceEvaluator(proto).run(None, {"input": x})


RUNNERS = {"onnxruntime": ort_run, "reference": reference_run}


def randomise(model, seed=0):
    """Non-trivial weights and BatchNorm statistics (a fresh BatchNorm is the identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for store in (layer.params, layer.buffers):
            for key, v in store.items():
                r = rng.standard_normal(v.shape)
                if key == "running_var":
                    r = np.abs(r) + 0.3
                elif key == "W":
                    r *= np.sqrt(2.0 / np.prod(v.shape[1:] if v.ndim == 4 else v.shape[:1]))
                elif isinstance(layer, GRU):  # gates neither saturated nor all alike: every weight shows
                    r *= 0.6
                v[...] = r.astype(v.dtype)
    return model


def every_layer_model():
    """Every layer type, with strides, padding, odd sizes, non-square kernels and windows."""
    return randomise(xpnet.Sequential([
        Conv2D(5, (3, 2), stride=(2, 1), pad=(1, 0)), BatchNorm(), ReLU(),
        MaxPool2D(3, stride=2, pad=1), Conv2D(4, 3, pad="same", bias=False),
        MaxPool2D((2, 3), stride=(1, 2)), Flatten(), Dense(12, bias=False), BatchNorm(), Dropout(0.3), ReLU(),
        Dense(8)], input_shape=(2, 13, 17)))


def gru_model(bidirectional=True, t=7, f=5):
    """(T, F) sequences: a GRU, a one-way GRU on its states, then every step's states into a Dense."""
    return randomise(xpnet.Sequential([
        GRU(4, bidirectional=bidirectional, name="rnn"), GRU(3, bidirectional=False, name="rnn2"), ReLU(),
        Flatten(), Dense(10)], input_shape=(t, f)), seed=3)


def columns_model():
    """A small CRNN: conv features, one vector per column, a GRU, per-step scores (with and without bias)."""
    return randomise(xpnet.Sequential([
        Conv2D(3, 3, pad="same"), ReLU(), MaxPool2D((2, 1), stride=(2, 1)), Columns(), TimeDense(6, bias=False),
        GRU(3), TimeDense(5)], input_shape=(2, 6, 7)), seed=4)


def test_every_layer_type_has_an_onnx_form():
    assert set(LAYER_TYPES.values()) <= set(EXPORTERS)
    used = {type(layer) for model in (every_layer_model(), gru_model(), columns_model()) for layer in model.layers}
    assert used == set(LAYER_TYPES.values())


@pytest.mark.parametrize("runtime", RUNNERS)
def test_a_ctc_graph_gives_per_step_logits_and_softmax_probabilities(runtime):
    model = columns_model()
    proto = to_onnx(model, head="ctc")
    assert {node.op_type for node in proto.graph.node} <= STANDARD_OPS
    assert {"MatMul", "Add", "Softmax", "Transpose"} <= {node.op_type for node in proto.graph.node}
    for n in (1, 4):
        x = np.random.default_rng(n).standard_normal((n, 2, 6, 7)).astype(np.float32)
        probs, logits = RUNNERS[runtime](proto, x)
        want = model.forward(x)
        assert logits.shape == probs.shape == (n, 7, 5)
        assert_allclose(logits, want)
        e = np.exp(logits.astype(np.float64) - logits.max(axis=2, keepdims=True))
        np.testing.assert_allclose(probs, e / e.sum(axis=2, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("runtime", RUNNERS)
def test_the_graph_computes_what_the_model_computes(runtime):
    model = every_layer_model()
    proto = to_onnx(model, length=2)
    for n in (1, 5):  # the batch size is dynamic
        x = np.random.default_rng(n).standard_normal((n, 2, 13, 17)).astype(np.float32)
        probs, logits = RUNNERS[runtime](proto, x)
        want = model.forward(x)
        assert logits.shape == probs.shape == (n, 2, 4)
        np.testing.assert_allclose(logits.reshape(n, 8), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("runtime", RUNNERS)
def test_a_gru_graph_computes_what_the_model_computes(runtime, bidirectional):
    model = gru_model(bidirectional)
    proto = to_onnx(model, length=2)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 7, 5)).astype(np.float32)
        probs, logits = RUNNERS[runtime](proto, x)
        assert logits.shape == probs.shape == (n, 2, 5)
        assert_allclose(logits.reshape(n, 10), model.forward(x))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("runtime", RUNNERS)
def test_a_gru_graph_gives_every_state_in_place_forward_direction_first(runtime, bidirectional):
    model = randomise(xpnet.Sequential([GRU(4, bidirectional=bidirectional)], input_shape=(9, 3)), seed=5)
    proto = to_onnx(model)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 9, 3)).astype(np.float32)
        _, states = RUNNERS[runtime](proto, x)
        want = model.forward(x)
        assert want.shape == (n, 9, 8 if bidirectional else 4)
        assert_allclose(states, want)


def test_a_gru_becomes_one_onnx_gru_with_the_gates_reordered():
    model = gru_model()
    gru = model.layers[0]
    proto = to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {node.op_type for node in proto.graph.node} <= STANDARD_OPS
    nodes = [node for node in proto.graph.node if node.op_type == "GRU"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in nodes]
    assert attrs == [{"direction": b"bidirectional", "hidden_size": 4, "linear_before_reset": 1, "layout": 0},
                     {"direction": b"forward", "hidden_size": 3, "linear_before_reset": 1, "layout": 0}]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    w, r, b = inits["rnn.W"], inits["rnn.R"], inits["rnn.B"]
    assert w.shape == (2, 12, 5) and r.shape == (2, 12, 4) and b.shape == (2, 24)
    h = 4
    for i, d in enumerate(("fw", "bw")):
        for onnx_gate, ours in enumerate((1, 0, 2)):  # ONNX (z, r, h) from xpnet's (r, z, n)
            rows, cols = slice(onnx_gate * h, (onnx_gate + 1) * h), slice(ours * h, (ours + 1) * h)
            np.testing.assert_array_equal(w[i, rows], gru.params[f"Wx_{d}"][:, cols].T)
            np.testing.assert_array_equal(r[i, rows], gru.params[f"Wh_{d}"][:, cols].T)
            np.testing.assert_array_equal(b[i, rows], gru.params[f"bx_{d}"][cols])
            np.testing.assert_array_equal(b[i, 3 * h:][rows], gru.params[f"bh_{d}"][cols])
    assert inits["rnn2.W"].shape == (1, 9, 8)
    (inp,) = proto.graph.input
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", 7, 5]


def test_a_gru_model_read_back_from_its_file_exports_the_same_graph(tmp_path):
    model = gru_model(t=5, f=3)
    loaded, _ = xpnet.load(xpnet.save(model, tmp_path / "m.npz"))
    x = np.random.default_rng(4).standard_normal((3, 5, 3)).astype(np.float32)
    assert_allclose(ort_run(to_onnx(loaded), x)[1], model.forward(x))


@pytest.mark.parametrize("runtime", RUNNERS)
def test_pool_padding_is_never_the_maximum(runtime):
    # every value negative: a zero-padded pool would return 0 at the borders; xpnet pads with -inf
    model = xpnet.Sequential([MaxPool2D(3, stride=2, pad=1), Flatten()], input_shape=(1, 6, 7))
    x = -1 - np.random.default_rng(2).random((2, 1, 6, 7)).astype(np.float32)
    _, logits = RUNNERS[runtime](to_onnx(model), x)
    assert logits.shape == (2, 1 * 3 * 4) and (logits < -1).all()
    np.testing.assert_array_equal(logits, model.forward(x))


def test_the_graph_is_valid_standard_and_float32(tmp_path):
    model = every_layer_model()
    path = export_onnx(model, tmp_path / "m.onnx", length=2, metadata={"charset": {"chars": "ABCD", "length": 2}})
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert {node.op_type for node in proto.graph.node} <= STANDARD_OPS
    assert "Dropout" not in {node.op_type for node in proto.graph.node}
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer if t.name != "output_shape")
    # every weight and running statistic is an initializer with the model's values
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(inits[key], value)
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 2, 13, 17]
    assert [o.name for o in proto.graph.output] == ["probabilities", "logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["head"] == '"bce"' and meta["xpnet_version"] == f'"{xpnet.__version__}"'
    assert meta["charset"] == '{"chars": "ABCD", "length": 2}'


@pytest.mark.parametrize("opset", [OPSET, 21])
def test_a_newer_opset_gets_the_ir_version_it_needs(opset):
    model = xpnet.Sequential([Conv2D(2, 3), MaxPool2D(2), Flatten(), Dense(4)], input_shape=(1, 6, 6))
    proto = to_onnx(model, opset=opset)
    assert proto.ir_version == (8 if opset == OPSET else onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)]))
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(ort_run(proto, x)[1], model.forward(x), rtol=1e-5, atol=1e-5)


def test_a_plain_model_keeps_its_output_shape_and_float64_weights_become_float32():
    xpnet.set_dtype("float64")
    model = xpnet.models.simple_convnet(input_shape=(1, 12, 12), n_classes=6, filters=3, hidden=8)
    xpnet.set_dtype("float32")
    proto = to_onnx(model)
    assert {p.key for p in proto.metadata_props} == {"xpnet_version", "head"}
    x = np.random.default_rng(0).standard_normal((3, 1, 12, 12))
    probs, logits = reference_run(proto, x.astype(np.float32))
    assert logits.shape == (3, 6) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, model.forward(x), rtol=1e-4, atol=1e-5)


def test_what_cannot_be_exported_is_refused_in_one_sentence():
    class Scale(ReLU):
        pass

    model = xpnet.Sequential([Flatten(), Scale(name="odd"), Dense(4)], input_shape=(1, 3, 3))
    with pytest.raises(UsageError, match=r"layer 'odd' \(Scale\) has no ONNX form"):
        to_onnx(model)
    with pytest.raises(UsageError, match="only a built model"):
        to_onnx(xpnet.Sequential([Flatten(), Dense(4)]))
    with pytest.raises(UsageError, match="takes an xpnet Sequential, got list"):
        to_onnx([Dense(4)])
    plain = xpnet.Sequential([Flatten(), Dense(6)], input_shape=(1, 3, 3))
    with pytest.raises(ShapeError, match="do not split into 4 positions"):
        to_onnx(plain, length=4)
    with pytest.raises(ShapeError, match=r"\(C, H, W\) inputs"):
        to_onnx(xpnet.Sequential([Dense(4)], input_shape=(5,)))
    with pytest.raises(ShapeError, match=r"\(T, F\) sequences into a first GRU"):
        to_onnx(xpnet.Sequential([ReLU(), GRU(2)], input_shape=(4, 3)))
    with pytest.raises(UsageError, match="head 'softmax' cannot be exported yet"):
        to_onnx(plain, head="softmax")
    with pytest.raises(ShapeError, match=r"a CTC head needs per-step scores \(T, K\)"):
        to_onnx(plain, head="ctc")
    with pytest.raises(UsageError, match="metadata 'bad' cannot be stored as JSON"):
        to_onnx(plain, metadata={"bad": {1, 2}})
    plain.layers[-1].params["b"][2] = np.nan
    with pytest.raises(UsageError, match=r"refusing to export model 'model': its 'dense1.b' holds NaN"):
        to_onnx(plain)
    plain.layers[-1].params["b"][2] = 0
    with pytest.raises(UsageError, match="opset 11 cannot be used: choose one from 17 to"):
        to_onnx(plain, opset=11)
    with pytest.raises(UsageError, match="opset 999 cannot be used"):
        to_onnx(plain, opset=999)


def test_writes_are_atomic_and_failures_are_one_storage_sentence(tmp_path, monkeypatch):
    model = xpnet.Sequential([Flatten(), Dense(6)], input_shape=(1, 3, 3))
    with pytest.raises(StorageError, match="folder .* does not exist"):
        export_onnx(model, tmp_path / "nowhere" / "m.onnx")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")

    def refuse(folder, name):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("xpnet.storage._create_temp", refuse)
    with pytest.raises(StorageError, match="permission denied.*previous m.onnx is intact"):
        export_onnx(model, target)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.onnx"]


def test_without_onnx_exporting_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['onnx'] = None\n"
            "import xpnet\n"
            "m = xpnet.Sequential([xpnet.Flatten(), xpnet.Dense(2)], input_shape=(1, 2, 2))\n"
            "try:\n"
            f"    xpnet.export_onnx(m, {str(tmp_path / 'm.onnx')!r})\n"
            "except xpnet.errors.UsageError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ('exporting to ONNX needs the onnx package, which is not installed: '
                                  'pip install "xpnet[onnx]".')
    assert not (tmp_path / "m.onnx").exists()
