"""A CAPTCHA reader from an ``.onnx`` file (``xpnet export``): the network runs in onnxruntime.

    reader = Recognizer.load("reader.onnx")    # same texts and confidences as the .npz it came from

``load_reader`` opens the file, reads the charset and preprocessing from its
``metadata_props`` (each value JSON) and returns an ``OnnxNetwork``: the parts of a
``Sequential`` that a ``Recognizer`` uses (input and output shapes, dtype, ``forward``),
so preprocessing and decoding are the very code the ``.npz`` reader runs.
``forward`` takes the normalised batch (N, C, H, W) float32 and returns the
graph's ``logits`` output flattened to (N, length*K) ((N, T*(K+1)) for a CTC reader,
which the ``Recognizer`` reshapes to (N, T, K + 1)).

The graph runs in onnxruntime (CPU); where onnxruntime is not installed but
``onnx`` is, in ``onnx.reference.ReferenceEvaluator`` (slow, exact). Without
either, loading is one UsageError sentence. A damaged or foreign file is one
ModelFileError sentence naming it.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy

from .. import config
from ..data.images import Preprocess
from ..data.labels import Charset
from ..errors import DataError, ModelFileError, UsageError
from ..memory import OutOfMemoryError
from ..nn.file_header import one_line
from ..storage import describe_oserror
from ..nn.onnx_export import HEADS, INSTALL_HINT

RUNTIMES = ("auto", "onnxruntime", "reference")


def is_onnx_path(path) -> bool:
    """Whether ``path`` names an ONNX file (by its extension, ``.onnx``)."""
    return os.fspath(path).lower().endswith(".onnx")


def _import_onnxruntime():
    import onnxruntime

    return onnxruntime


def _import_onnx():
    import onnx
    from onnx.reference import ReferenceEvaluator  # noqa: F401 -- present in every onnx >= 1.13

    return onnx


class OnnxNetwork:
    """An ONNX graph made by ``xpnet.export_onnx``, seen as a built NumPy float32 model.

    ``runtime`` is ``"onnxruntime"`` or ``"reference"`` (onnx.reference.ReferenceEvaluator).
    """

    built = True
    backend = "numpy"  # inputs and outputs are NumPy arrays
    dtype = numpy.dtype(numpy.float32)

    def __init__(self, run, input_shape, output_shape, name: str, runtime: str, path: str = ""):
        self._run, self.runtime, self.name, self.path = run, runtime, name, path
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.layers: list = []  # the graph's layers are not xpnet objects

    def build(self, input_shape, dtype=None):
        if tuple(int(s) for s in input_shape) != self.input_shape:
            raise ModelFileError(f"the ONNX model {self.path} takes inputs {self.input_shape}, not "
                                 f"{tuple(input_shape)}.")
        return self

    def parameters(self) -> OrderedDict:
        """Empty: the weights live in the ONNX graph, not in arrays xpnet holds."""
        return OrderedDict()

    def forward(self, x, train: bool = False):
        """(N, C, H, W) float32 -> (N, length*K) float32 logits."""
        if train:
            raise UsageError(f"the ONNX model {self.path} is for reading only: train the .npz model instead.")
        x = numpy.ascontiguousarray(x, dtype=numpy.float32)
        if x.shape[1:] != self.input_shape:
            raise UsageError(f"the ONNX model {self.path} takes batches (N,) + {self.input_shape}, "
                             f"got {x.shape}.")
        try:
            out = self._run(x)
        except MemoryError:
            raise OutOfMemoryError(f"out of memory reading a batch of {x.shape[0]} images with {self.path}: "
                                   "use a smaller batch size.") from None
        except Exception as exc:  # noqa: BLE001 -- a graph that loads but cannot run: the file is at fault
            raise ModelFileError(f"the ONNX model {self.path} failed on a batch of {x.shape[0]} ({type(exc).__name__}: "
                                 f"{one_line(str(exc).strip()[:200])}): export it again with `xpnet export`.") from None
        return numpy.asarray(out, dtype=numpy.float32).reshape(x.shape[0], -1)

    __call__ = forward

    def predict(self, x, batch_size: int = 256):
        """Logits for any number of samples, ``batch_size`` at a time."""
        parts = [self.forward(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        return numpy.concatenate(parts) if parts else numpy.zeros((0,) + self.output_shape, numpy.float32)

    def n_params(self) -> int:
        return 0

    def __repr__(self):
        return f"OnnxNetwork({self.path!r}, runtime={self.runtime!r}, input_shape={self.input_shape})"


def _pick_runtime(runtime: str, path):
    if runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")
    if runtime in ("auto", "onnxruntime"):
        try:
            return "onnxruntime", _import_onnxruntime()
        except ImportError:
            if runtime == "onnxruntime":
                raise UsageError(f"reading {path} needs onnxruntime, which is not installed: {INSTALL_HINT}.") \
                    from None
    try:
        return "reference", _import_onnx()
    except ImportError:
        raise UsageError(f"reading the ONNX model {path} needs onnxruntime (or onnx), which is not installed: "
                         f"{INSTALL_HINT}.") from None


def _damaged(path, exc) -> ModelFileError:
    text = (str(exc).strip().splitlines() or [""])[0]
    why = text.rsplit("failed:", 1)[-1].strip()  # onnxruntime repeats "Load model from <path> failed:" first
    return ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {one_line(why)}): export it "
                          f"again with `xpnet export MODEL.npz {Path(path).name}`.")


def _session(path, ort):
    """(run, metadata strings, input dims, logits dims) from onnxruntime."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: failures become one xpnet sentence, not a log on stderr
    try:
        sess = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types for bad files
        raise _damaged(path, exc) from None
    inputs, outputs = sess.get_inputs(), {o.name: o for o in sess.get_outputs()}
    if len(inputs) != 1 or "logits" not in outputs or inputs[0].type != "tensor(float)":
        raise ModelFileError(f"{path} is an ONNX model but not one exported by xpnet (it needs one float input "
                             "and a 'logits' output): export the reader with `xpnet export`.")
    name = inputs[0].name
    run = lambda x: sess.run(["logits"], {name: x})[0]  # noqa: E731 -- InferenceSession.run is thread-safe
    return run, dict(sess.get_modelmeta().custom_metadata_map), inputs[0].shape, outputs["logits"].shape


def _reference(path, onnx):
    """(run, metadata strings, input dims, logits dims) from onnx.reference.ReferenceEvaluator."""
    from onnx.reference import ReferenceEvaluator

    try:
        proto = onnx.load(os.fspath(path))
        onnx.checker.check_model(proto)
        evaluator = ReferenceEvaluator(proto)
    except Exception as exc:  # noqa: BLE001 -- protobuf and the checker raise many types for bad files
        raise _damaged(path, exc) from None
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    outputs = {o.name: o for o in graph.output}
    if len(inputs) != 1 or "logits" not in outputs or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelFileError(f"{path} is an ONNX model but not one exported by xpnet (it needs one float input "
                             "and a 'logits' output): export the reader with `xpnet export`.")
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param  # noqa: E731
                      for d in v.type.tensor_type.shape.dim]
    lock, name = threading.Lock(), inputs[0].name

    def run(x):
        with lock, numpy.errstate(all="ignore"):  # the evaluator's Sigmoid warns on large logits it handles
            return evaluator.run(["logits"], {name: x})[0]

    return run, {p.key: p.value for p in proto.metadata_props}, dims(inputs[0]), dims(outputs["logits"])


def _parse_metadata(raw: dict) -> dict:
    meta = {}
    for key, text in raw.items():
        try:
            meta[key] = json.loads(text)
        except ValueError:
            meta[key] = text  # a foreign, non-JSON entry: kept as the string it is
    return meta


def load_network(path, runtime: str = "auto"):
    """``(OnnxNetwork, metadata dict)`` for an ONNX file exported by xpnet.

    ``runtime``: ``"auto"`` (onnxruntime, else the reference evaluator), ``"onnxruntime"``, ``"reference"``.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file (a folder?)" if path.exists() else "does not exist"
        raise ModelFileError(f"ONNX model {path} {what}: check the path.")
    if path.stat().st_size == 0:
        raise ModelFileError(f"ONNX model {path} is empty (0 bytes): export it again with `xpnet export`.")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelFileError(f"ONNX model {path} cannot be read: {describe_oserror(exc)}.") from None
    if head in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ModelFileError(f"{path} is a zip archive (an xpnet .npz model file?), not an ONNX model: give "
                             "a .npz file its .npz name, or convert it with `xpnet export MODEL.npz OUT.onnx`.")
    kind, module = _pick_runtime(runtime, path)
    run, raw, in_dims, out_dims = (_session if kind == "onnxruntime" else _reference)(path, module)
    fixed = lambda dims: all(isinstance(d, int) and d > 0 for d in dims)  # noqa: E731
    if len(in_dims) != 4 or not fixed(in_dims[1:]) or len(out_dims) < 2 or not fixed(out_dims[1:]):
        raise ModelFileError(f"{path} is an ONNX model but not one exported by xpnet (input {in_dims}, logits "
                             f"{out_dims}): export the reader with `xpnet export`.")
    meta = _parse_metadata(raw)
    network = OnnxNetwork(run, in_dims[1:], (int(numpy.prod(out_dims[1:])),), str(meta.get("model") or path.stem),
                          kind, os.fspath(path))
    return network, meta


def load_reader(path, runtime: str = "auto"):
    """``(OnnxNetwork, Charset, Preprocess, metadata)`` of a reader exported by ``xpnet export``."""
    network, meta = load_network(path, runtime)
    head = meta.get("head", "bce")
    if head not in HEADS:
        raise ModelFileError(f"ONNX model {path} has a {head!r} head, which this xpnet cannot decode: upgrade xpnet.")
    try:
        charset = Charset.from_dict(meta["charset"])
        preprocess = Preprocess.from_dict(meta["preprocess"])
    except (KeyError, TypeError, DataError, UsageError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else one_line(exc)
        raise ModelFileError(
            f"ONNX model {path} is not a CAPTCHA reader ({what} in its metadata): export a reader's .npz with "
            f"`xpnet export MODEL.npz {Path(path).name}`.") from None
    if head == "ctc":
        units = network.output_shape[0]
        if units % (charset.n_classes + 1) or network.input_shape != preprocess.shape:
            raise ModelFileError(
                f"ONNX model {path} takes {network.input_shape} and gives {units} logits, but its metadata "
                f"describes {preprocess.shape} inputs and a CTC head of {charset.n_classes + 1} classes per column: "
                "export it again with `xpnet export`.")
    elif network.output_shape != (charset.n_outputs,) or network.input_shape != preprocess.shape:
        raise ModelFileError(
            f"ONNX model {path} takes {network.input_shape} and gives {network.output_shape[0]} logits, but its "
            f"metadata describes {preprocess.shape} inputs and {charset.n_outputs} outputs: export it again with "
            "`xpnet export`.")
    return network, charset, preprocess, meta


__all__ = ["OnnxNetwork", "load_network", "load_reader", "is_onnx_path", "RUNTIMES"]
