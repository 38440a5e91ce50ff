"""The JSON header of model files and checkpoints: written here, and read back only through ``parse``.

``parse`` checks every field that xpnet reads from a header (format and versions,
the architecture, the array listing, the optimizer and training-state sections)
before anything is built from it, so a damaged or hostile header gives one
``ModelFileError`` sentence naming the file -- never an OverflowError from
``int(Infinity)`` deep inside a layer constructor.

The document: ``format`` ("xpnet"), ``format_version``, ``kind`` ("model" or
"checkpoint"), ``xpnet_version``, ``created``, ``dtype``, ``architecture``
(``Sequential.spec()``), ``metadata`` (the caller's), ``arrays`` (name -> shape
and dtype of every array in the archive); checkpoints add ``optimizer`` (the
``Optimizer.state_dict()`` description) and ``train_state``.

Numbers: the architecture, array listing and optimizer section hold finite numbers
only (``NaN``, ``Infinity`` and ``1e400`` are refused there).  ``metadata`` and
``train_state`` are the caller's data, stored as given: a NaN validation metric in
a training history is legitimate and stays readable.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy

from ..errors import ModelFileError, UsageError
from .layers import LAYER_TYPES
from .sequential import SPEC_VERSION

FORMAT = "xpnet"
FORMAT_VERSION = 1
HEADER_KEY = "__xpnet__"
KINDS = ("model", "checkpoint")
DTYPES = ("float32", "float64")

_MAX_SIZE = 2 ** 31 - 1  # any size in an architecture (channels, kernel, input shape)
_MAX_COUNT = 2 ** 63 - 1  # versions and step counters
# Layer constructor arguments by the kind of value they take (every built-in layer's config()).
_SIZE_ARGS = ("out_channels", "in_channels", "out_features", "in_features")
_PAIR_ARGS = ("kernel_size", "stride", "pad", "size")  # an int or [vertical, horizontal]
_REAL_ARGS = ("rate", "momentum", "eps")


def one_line(text) -> str:
    """Text that came from a file, safe in a one-line message: control characters
    (newlines, terminal escape sequences) are shown escaped, as in a repr."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def xpnet_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------
# Writing


def _json_default(obj):
    if isinstance(obj, numpy.integer):
        return int(obj)
    if isinstance(obj, numpy.floating):
        return float(obj)
    if isinstance(obj, numpy.bool_):
        return bool(obj)
    if isinstance(obj, numpy.ndarray) and obj.size <= 64:
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def to_json_data(value):
    """``value`` as plain JSON data (lists, dicts, numbers), as it would read back from a header."""
    return json.loads(json.dumps(value, default=_json_default))


def new_doc(model, kind: str, metadata) -> dict:
    """The header of a file holding ``model`` (``arrays`` is added by ``encode``)."""
    if metadata is not None and not isinstance(metadata, dict):
        raise UsageError(f"metadata must be a dict, got {type(metadata).__name__}.")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "xpnet_version": xpnet_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dtype": numpy.dtype(model.dtype).name,
        "architecture": model.spec(),
        "metadata": dict(metadata or {}),
    }


def encode(doc: dict, arrays: dict) -> numpy.ndarray:
    """``doc`` plus the listing of ``arrays`` as the uint8 array stored under ``HEADER_KEY``."""
    doc = dict(doc, arrays={k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in arrays.items()})
    try:
        text = json.dumps(doc, default=_json_default, allow_nan=True, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"metadata must be JSON-serialisable (strings, numbers, lists, dicts): {exc}.") from None
    return numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8)


# --------------------------------------------------------------------------
# Reading: every field checked in one place


class _Damaged(Exception):
    """What is wrong with a header, as the end of a sentence that starts with the file's name."""


def _show(value) -> str:
    text = one_line(json.dumps(value, allow_nan=True) if isinstance(value, (dict, list, float)) else repr(value))
    return text if len(text) <= 40 else text[:37] + "..."


def _where(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _fail(path: tuple, value, need: str):
    raise _Damaged(f"has a damaged header ({_where(path)} is {_show(value)}, not {need})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value, path, low=0, high=_MAX_COUNT, optional=False):
    if value is None and optional:
        return
    if not _is_int(value) or not low <= value <= high:
        need = {0: "a non-negative integer", 1: "a positive integer", -high - 1: "an integer"}.get(low)
        _fail(path, value, need if high == _MAX_COUNT else f"an integer from {low} to {high}")


def _finite(value) -> bool:
    """A number that is a finite float, or an int that converts to one (not 10**400)."""
    try:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        return False


def _real(value, path):
    if not _finite(value):
        _fail(path, value, "a finite number")


def _str(value, path, optional=False):
    if not (isinstance(value, str) or (optional and value is None)):
        _fail(path, value, "a string")


def _obj(value, path, optional=True) -> dict:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        _fail(path, value, "a JSON object")
    return value


def _finite_data(value, path):
    """Plain JSON data whose numbers are all finite (refuses NaN, Infinity, 1e400, 10**400)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_data(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_data(v, path + (i,))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _real(value, path)


def _layer_arg(key, value, path):
    if key in _SIZE_ARGS:
        _int(value, path, 1, _MAX_SIZE, optional=True)
    elif key in _PAIR_ARGS:
        if value is None or (key == "pad" and value == "same"):
            return
        if isinstance(value, list) and len(value) == 2:
            for i, v in enumerate(value):
                _int(v, path + (i,), 0, _MAX_SIZE)
        elif _is_int(value):
            _int(value, path, 0, _MAX_SIZE)
        else:
            _fail(path, value, "an integer or a pair of integers")
    elif key in _REAL_ARGS:
        _real(value, path)
    elif key == "bias":
        if not isinstance(value, bool):
            _fail(path, value, "true or false")
    elif key == "init":
        if not isinstance(value, str):
            _real(value, path)
    else:  # not a built-in argument: the layer's constructor refuses it; only plain finite data gets there
        _finite_data(value, path)


def _check_architecture(spec, path=("architecture",)):
    spec = _obj(spec, path, optional=False)
    version = spec.get("spec_version", 0)
    _int(version, path + ("spec_version",))
    if version > SPEC_VERSION:
        raise _Damaged(f"describes an architecture of spec version {version}, newer than this xpnet "
                       f"({xpnet_version()}) understands ({SPEC_VERSION}): upgrade xpnet")
    _str(spec.get("name", "model"), path + ("name",))
    shape = spec.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or not shape:
            _fail(path + ("input_shape",), shape, "a list of positive sizes")
        for i, s in enumerate(shape):
            _int(s, path + ("input_shape", i), 1, _MAX_SIZE)
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        _fail(path + ("layers",), layers, "a list of layers")
    for i, entry in enumerate(layers):
        here = path + ("layers", i)
        entry = _obj(entry, here, optional=False)
        kind = entry.get("type")
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            raise _Damaged(f"cannot be rebuilt: model architecture names an unknown layer type {_show(kind)} at "
                           f"position {i}: known types are {', '.join(sorted(LAYER_TYPES))}")
        _str(entry.get("name"), here + ("name",), optional=True)
        for key, value in _obj(entry.get("config"), here + ("config",)).items():
            _layer_arg(key, value, here + ("config", key))


def _check_arrays(listed):
    if not isinstance(listed, dict):
        raise _Damaged("has a malformed header (no valid 'arrays' table)")
    for name, info in listed.items():
        here = ("arrays", name)
        info = _obj(info, here, optional=False)
        shape = info.get("shape")
        if not isinstance(shape, list):
            _fail(here + ("shape",), shape, "a list of sizes")
        for i, s in enumerate(shape):
            _int(s, here + ("shape", i))
        _str(info.get("dtype"), here + ("dtype",))


def _check_optimizer(meta):
    if meta is None:
        return
    path = ("optimizer",)
    meta = _obj(meta, path, optional=False)
    _str(meta.get("type"), path + ("type",))
    _finite_data(_obj(meta.get("config"), path + ("config",)), path + ("config",))
    _int(meta.get("step_count", 0), path + ("step_count",))
    slots = meta.get("slots", [])
    if not isinstance(slots, list) or not all(isinstance(s, str) for s in slots):
        _fail(path + ("slots",), slots, "a list of names")


def _check(doc: dict) -> None:
    version = doc.get("format_version")
    _int(version, ("format_version",), 1)
    if version > FORMAT_VERSION:
        raise _Damaged(f"has format version {version}, newer than this xpnet ({xpnet_version()}) reads "
                       f"(up to {FORMAT_VERSION}): upgrade xpnet")
    if doc.get("kind") not in KINDS:
        _fail(("kind",), doc.get("kind"), "'model' or 'checkpoint'")
    if doc.get("dtype") not in DTYPES:
        raise _Damaged(f"has dtype {_show(doc.get('dtype'))}: xpnet reads float32 or float64")
    for key in ("xpnet_version", "created"):
        _str(doc.get(key, ""), (key,))
    _check_architecture(doc.get("architecture"))
    _obj(doc.get("metadata"), ("metadata",))
    _check_arrays(doc.get("arrays"))
    _check_optimizer(doc.get("optimizer"))
    # The Trainer checks its own training state; the step is also read by Checkpoint.step.
    _int(_obj(doc.get("train_state"), ("train_state",)).get("step", 0), ("train_state", "step"), -_MAX_COUNT - 1)


def parse(path, header) -> dict:
    """The validated header document of file ``path`` from its ``HEADER_KEY`` array.

    Raises ModelFileError (one sentence naming the file) for anything xpnet could not use.
    """
    if header.dtype != numpy.uint8 or header.ndim != 1:
        raise ModelFileError(f"model file {path} has a malformed '{HEADER_KEY}' header.")
    try:
        doc = json.loads(header.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError: not JSON, or an integer of over 4300 digits; RecursionError: lists nested too deep.
        raise ModelFileError(f"model file {path} has a damaged header (not valid JSON).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an xpnet model file (its header does not say format 'xpnet').")
    try:
        _check(doc)
    except _Damaged as exc:
        raise ModelFileError(f"model file {path} {exc}.") from None
    return doc


__all__ = ["FORMAT", "FORMAT_VERSION", "HEADER_KEY", "new_doc", "encode", "parse", "to_json_data", "one_line"]
