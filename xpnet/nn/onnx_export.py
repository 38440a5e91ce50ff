"""A ``Sequential`` as an ONNX graph of standard operators, so it runs in onnxruntime (any language).

    xpnet.export_onnx(model, "model.onnx")                   # plain model: (N, D) outputs
    xpnet.export_onnx(model, "reader.onnx", length=4,         # (N, 4, D/4) outputs
                      metadata={"charset": {...}})             # each value stored as JSON text

The graph (opset ``OPSET``, weights as float32 initializers):

    input          (N, C, H, W) float32, N dynamic: the preprocessed batch; (N, T, F)
                   sequences for a model whose first layer is a GRU
    probabilities  (N, length, K) float32: Sigmoid of the logits (the "bce" head: one
                   independent sigmoid unit per class and position)
    logits         (N, length, K) float32: the model's outputs before the sigmoid

Without ``length`` both outputs keep the model's own output shape (N, *output_shape).
``head="ctc"`` (a model ending in per-step scores (T, K), e.g. ``captcha_crnn``): ``logits``
(N, T, K) and ``probabilities`` their Softmax over the K classes of each step (the blank is
class 0).
Layers map one to one: Conv2D -> Conv (zero ``pads``), MaxPool2D -> MaxPool (ONNX ignores
padded cells, as xpnet's -inf padding does; ``ceil_mode=0`` floors the output size as
xpnet does), Dense -> Gemm, ReLU -> Relu, Flatten -> Flatten, BatchNorm ->
BatchNormalization with the running statistics, Dropout -> nothing (identity at inference),
GRU -> Transpose, GRU, Transpose, Reshape (see ``_gru``), Columns -> Transpose, Reshape,
TimeDense -> MatMul, Add.
``metadata`` goes into the model's ``metadata_props``: one entry per key, its value as JSON.
``onnx`` is an optional extra: without it exporting is one UsageError sentence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy

from .. import __version__, backend
from ..errors import ShapeError, UsageError
from ..storage import atomic_write
from .layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .recurrent import GRU
from .sequence import Columns, TimeDense
from .sequential import Sequential

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (readable by every onnxruntime since 1.11); newer opsets need more
HEADS = ("bce", "ctc")  # sigmoid per unit; softmax per step (CTC)
INSTALL_HINT = 'pip install "xpnet[onnx]"'


def require_onnx():
    """The ``onnx`` module, or one UsageError sentence saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise UsageError(f"exporting to ONNX needs the onnx package, which is not installed: {INSTALL_HINT}.") from None
    return onnx


def _weight(layer, key):
    return numpy.ascontiguousarray(backend.to_numpy(layer.params[key]), dtype=numpy.float32)


def _buffer(layer, key):
    return numpy.ascontiguousarray(backend.to_numpy(layer.buffers[key]), dtype=numpy.float32)


class _Graph:
    """Nodes and float32 initializers collected layer by layer; each layer's output is named after it."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.inits = onnx, [], []

    def init(self, name, array):
        self.inits.append(self.onnx.numpy_helper.from_array(numpy.asarray(array), name))
        return name

    def node(self, op, inputs, name, output=None, **attrs):
        """Add a node; its output tensor is ``<name>.y`` unless given (never a weight's or the graph's name)."""
        output = output or f"{name}.y"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _conv(g, layer, x):
    inputs = [x, g.init(f"{layer.name}.W", _weight(layer, "W"))]
    if "b" in layer.params:
        inputs.append(g.init(f"{layer.name}.b", _weight(layer, "b")))
    (ph, pw), (kh, kw) = layer.pad, layer.kernel_size
    return g.node("Conv", inputs, layer.name, kernel_shape=[kh, kw], strides=list(layer.stride),
                  pads=[ph, pw, ph, pw], dilations=[1, 1], group=1)


def _pool(g, layer, x):
    ph, pw = layer.pad
    return g.node("MaxPool", [x], layer.name, kernel_shape=list(layer.size), strides=list(layer.stride),
                  pads=[ph, pw, ph, pw], ceil_mode=0)


def _dense(g, layer, x):
    inputs = [x, g.init(f"{layer.name}.W", _weight(layer, "W"))]  # W is (D_in, D_out): no transB
    if "b" in layer.params:
        inputs.append(g.init(f"{layer.name}.b", _weight(layer, "b")))
    return g.node("Gemm", inputs, layer.name, alpha=1.0, beta=1.0, transA=0, transB=0)


def _batchnorm(g, layer, x):
    inputs = [x] + [g.init(f"{layer.name}.{k}", f(layer, k)) for f, k in
                    ((_weight, "gamma"), (_weight, "beta"), (_buffer, "running_mean"), (_buffer, "running_var"))]
    return g.node("BatchNormalization", inputs, layer.name, epsilon=layer.eps,
                  momentum=1.0 - layer.momentum)  # ONNX weighs the old running value; unused at inference


def _gru_gates(a, h):
    """xpnet's gate blocks (r, z, n) along axis 0 of ``a`` -> ONNX's order (z, r, h)."""
    return numpy.concatenate([a[h:2 * h], a[:h], a[2 * h:]])


def _gru(g, layer, x):
    """(N, T, F) -> (N, T, D*H), D = 1 or 2 directions, the forward one first.

    ONNX's GRU with ``linear_before_reset=1`` is xpnet's cell (the reset gate scales the hidden
    product after its bias).  Its weights per direction: W (3H, F) = Wx.T, R (3H, H) = Wh.T,
    B (6H,) = [bx, bh], every one with the gates reordered.  onnxruntime runs only ``layout=0``
    (time first), hence the Transposes: (N, T, F) -> (T, N, F) -> GRU -> Y (T, D, N, H) ->
    (N, T, D, H) -> (N, T, D*H).
    """
    h, dirs = layer.hidden_size, layer.directions
    w = numpy.stack([_gru_gates(_weight(layer, f"Wx_{d}").T, h) for d in dirs])
    r = numpy.stack([_gru_gates(_weight(layer, f"Wh_{d}").T, h) for d in dirs])
    b = numpy.stack([numpy.concatenate([_gru_gates(_weight(layer, f"bx_{d}"), h),
                                        _gru_gates(_weight(layer, f"bh_{d}"), h)]) for d in dirs])
    name = layer.name
    xt = g.node("Transpose", [x], f"{name}/time_first", perm=[1, 0, 2])
    y = g.node("GRU", [xt, g.init(f"{name}.W", w), g.init(f"{name}.R", r), g.init(f"{name}.B", b)], name,
               f"{name}.states", direction="bidirectional" if len(dirs) == 2 else "forward", hidden_size=h,
               linear_before_reset=1, layout=0)
    y = g.node("Transpose", [y], f"{name}/batch_first", perm=[2, 0, 1, 3])
    shape = numpy.array([0, 0, len(dirs) * h], dtype=numpy.int64)  # 0: keep N and T
    return g.node("Reshape", [y, g.init(f"{name}.out_shape", shape)], f"{name}/join_directions")


def _columns(g, layer, x):
    """(N, C, H, W) -> Transpose (N, W, C, H) -> Reshape (N, W, C*H)."""
    c, h, _ = layer.input_shape
    y = g.node("Transpose", [x], f"{layer.name}/columns_first", perm=[0, 3, 1, 2])
    shape = numpy.array([0, 0, c * h], dtype=numpy.int64)
    return g.node("Reshape", [y, g.init(f"{layer.name}.out_shape", shape)], layer.name)


def _time_dense(g, layer, x):
    """(N, T, F) @ W (F, K) + b: MatMul broadcasts over N and T."""
    y = g.node("MatMul", [x, g.init(f"{layer.name}.W", _weight(layer, "W"))], f"{layer.name}/matmul")
    if "b" not in layer.params:
        return y
    return g.node("Add", [y, g.init(f"{layer.name}.b", _weight(layer, "b"))], layer.name)


EXPORTERS = {
    Conv2D: _conv,
    MaxPool2D: _pool,
    Dense: _dense,
    ReLU: lambda g, layer, x: g.node("Relu", [x], layer.name),
    Flatten: lambda g, layer, x: g.node("Flatten", [x], layer.name, axis=1),
    BatchNorm: _batchnorm,
    Dropout: lambda g, layer, x: x,  # identity at inference
    GRU: _gru,
    Columns: _columns,
    TimeDense: _time_dense,
}


def _check_model(model, length, head):
    if not isinstance(model, Sequential):
        hint = (": for a CAPTCHA reader use xpnet.captcha.export.export_reader(reader, path), which adds its "
                "charset and preprocessing" if hasattr(model, "charset") else "")
        raise UsageError(f"export_onnx takes an xpnet Sequential, got {type(model).__name__}{hint}.")
    if not model.built:
        raise UsageError("only a built model can be exported: give input_shape or run a batch through it first.")
    sequences = len(model.input_shape) == 2 and bool(model.layers) and isinstance(model.layers[0], GRU)
    if len(model.input_shape) != 3 and not sequences:
        raise ShapeError(f"the ONNX export takes models of (C, H, W) inputs (or (T, F) sequences into a first GRU), "
                         f"model '{model.name}' takes {model.input_shape}.")
    for layer in model.layers:
        if type(layer) not in EXPORTERS:
            raise UsageError(f"layer '{layer.name}' ({type(layer).__name__}) has no ONNX form: only "
                             f"{', '.join(cls.__name__ for cls in EXPORTERS)} layers can be exported.")
    for key, value in model.state_dict().items():
        if not numpy.isfinite(backend.to_numpy(value)).all():
            raise UsageError(f"refusing to export model '{model.name}': its {key!r} holds NaN or infinite values "
                             "(the training diverged): export an earlier checkpoint.")
    if head not in HEADS:
        raise UsageError(f"head {head!r} cannot be exported yet: choose one of {', '.join(HEADS)}.")
    out = tuple(model.output_shape)
    if head == "ctc":
        if length is not None or len(out) != 2 or out[1] < 2:
            raise ShapeError(f"a CTC head needs per-step scores (T, K) and no length, model '{model.name}' has "
                             f"outputs {out}.")
        return out
    if length is not None:
        length = int(length)
        if len(out) != 1 or length < 1 or out[0] % length:
            raise ShapeError(f"model '{model.name}' has outputs {out}, which do not split into {length} "
                             "positions of equal size.")
        return (length, out[0] // length)
    return out


def to_onnx(model, length: int | None = None, metadata: dict | None = None, head: str = "bce",
            opset: int = OPSET):
    """The ``onnx.ModelProto`` of ``model`` (see the module docstring); checked with ``onnx.checker``."""
    onnx = require_onnx()
    from onnx import TensorProto, helper

    newest = onnx.defs.onnx_opset_version()
    if not OPSET <= int(opset) <= newest:
        raise UsageError(f"opset {opset} cannot be used: choose one from {OPSET} to {newest} (the newest this onnx "
                         "package knows).")
    opset_id = helper.make_opsetid("", int(opset))
    out_shape = _check_model(model, length, head)
    g = _Graph(onnx)
    x = "input"
    for layer in model.layers:
        x = EXPORTERS[type(layer)](g, layer, x)
    if length is not None or head == "ctc":
        x = g.node("Reshape", [x, g.init("output_shape", numpy.array([0, *out_shape], dtype=numpy.int64))],
                   "head/reshape", "logits")
    else:
        x = g.node("Identity", [x], "head/identity", "logits")
    if head == "ctc":
        g.node("Softmax", [x], "head/softmax", "probabilities", axis=-1)
    else:
        g.node("Sigmoid", [x], "head/sigmoid", "probabilities")
    graph = helper.make_graph(
        g.nodes, model.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *model.input_shape])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", *out_shape]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *out_shape])],
        g.inits, doc_string=f"xpnet model '{model.name}': input (N, {', '.join(map(str, model.input_shape))}) "
                            f"float32; outputs (N, {', '.join(map(str, out_shape))}) "
                            f"{'softmax' if head == 'ctc' else 'sigmoid'} probabilities and "
                            "logits.")
    ir_version = max(IR_VERSION, helper.find_min_ir_version_for([opset_id]))
    proto = helper.make_model(graph, opset_imports=[opset_id], ir_version=ir_version, producer_name="xpnet",
                              producer_version=__version__)
    meta = {**(metadata or {}), "xpnet_version": __version__, "head": head}  # what the graph is wins
    for key, value in meta.items():
        try:
            text = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"metadata {key!r} cannot be stored as JSON ({exc}): give plain numbers, strings, "
                             "lists and dicts.") from None
        proto.metadata_props.add(key=str(key), value=text)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, length: int | None = None, metadata: dict | None = None, head: str = "bce",
                opset: int = OPSET) -> Path:
    """Write ``model`` as an ONNX file at ``path``, atomically (see ``to_onnx``); returns the path.

    A model that cannot be written is one StorageError sentence; nothing is left half-written.
    """
    data = to_onnx(model, length, metadata, head, opset).SerializeToString()
    return atomic_write(Path(path), lambda f: f.write(data), "ONNX model")


__all__ = ["export_onnx", "to_onnx", "require_onnx", "EXPORTERS", "OPSET", "INSTALL_HINT"]
