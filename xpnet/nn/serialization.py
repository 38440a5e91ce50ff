"""Model files and training checkpoints: one ``.npz`` each, never pickle.

    xpnet.save(model, "reader.npz", metadata={"charset": charset.to_dict()})
    model, metadata = xpnet.load("reader.npz")                 # rebuilt on the current backend
    metadata = xpnet.nn.serialization.load_weights(model, "reader.npz")      # into a model of the same architecture

A file is a plain ``np.savez`` archive read with ``allow_pickle=False``: a JSON
header (``__xpnet__``, see ``file_header``), the model's parameters and buffers
as ``state/<name>`` and, in checkpoints, the optimizer slots as
``optimizer/<slot>/<name>``.  A checkpoint is a model file with more in it, so
``xpnet.load`` opens either.  Writes are atomic (``xpnet.storage``); every
problem on reading is one ``ModelFileError`` sentence naming the file.
"""

from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .. import backend, checks
from ..errors import ModelFileError, UsageError, XpnetError
from ..storage import atomic_write, check_writable, describe_oserror, remove_stale_temp_files
from . import file_header
from .file_header import FORMAT_VERSION, HEADER_KEY, one_line
from .sequential import Sequential

STATE_PREFIX = "state/"
OPTIM_PREFIX = "optimizer/"

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


# --------------------------------------------------------------------------
# Writing


def _write_npz(f, arrays: dict) -> None:
    """The one place that writes archive bytes (tests replace it to simulate a full disk)."""
    numpy.savez(f, **arrays)


def _model_arrays(model) -> dict:
    if not getattr(model, "built", False):
        raise UsageError("Only a built model can be saved: give input_shape or run a batch through it first.")
    arrays = {STATE_PREFIX + k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    for k, v in arrays.items():
        if not numpy.isfinite(v).all():
            # Such a file could never be loaded (load refuses it): better to fail now, naming the array.
            exc = ModelFileError(f"refusing to save: the model's {k[len(STATE_PREFIX):]!r} holds NaN or "
                                 "infinite values (the training diverged).")
            exc.array_name = k[len(STATE_PREFIX):]
            raise exc
    return arrays


def _write_archive(path, doc: dict, arrays: dict, what: str) -> Path:
    payload = {HEADER_KEY: file_header.encode(doc, arrays), **arrays}
    return atomic_write(path, lambda f: _write_npz(f, payload), what)


def save(model, path, metadata: dict | None = None) -> Path:
    """Write ``model`` (architecture + weights + ``metadata``) to ``path`` (.npz), atomically.

    ``metadata``: a JSON-safe dict stored as given (charset, length, input
    shape, preprocessing...).  Returns the path written.
    """
    path = Path(path)
    return _write_archive(path, file_header.new_doc(model, "model", metadata), _model_arrays(model), "model file")


def save_checkpoint(path, model, optimizer=None, train_state: dict | None = None,
                    metadata: dict | None = None) -> Path:
    """Write a training checkpoint: model, optimizer state, ``train_state`` (step, epoch, RNG
    states, history...: JSON-safe) and ``metadata``, atomically."""
    doc = file_header.new_doc(model, "checkpoint", metadata)
    arrays = _model_arrays(model)
    if optimizer is not None:
        meta, slots = optimizer.state_dict()
        doc["optimizer"] = meta
        arrays.update({OPTIM_PREFIX + k: v for k, v in slots.items()})
    doc["train_state"] = dict(train_state or {})
    return _write_archive(Path(path), doc, arrays, "checkpoint")


# --------------------------------------------------------------------------
# Reading


def _sniff(path: Path) -> None:
    """Refuse anything that is not a zip archive, before numpy sees it."""
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist: check the path.")
    if not path.is_file():
        raise ModelFileError(f"model file {path} is not a file (a folder?): give the path of a .npz file.")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelFileError(f"model file {path} cannot be read: {describe_oserror(exc)}.") from None
    if head[:4] in _ZIP_MAGICS:
        return
    if not head:
        raise ModelFileError(f"model file {path} is empty (0 bytes): it was never written completely.")
    if head[:1] == b"\x80":  # pickle protocols 2-5 start with PROTO
        raise ModelFileError(
            f"{path} looks like a Python pickle, not an xpnet model file: xpnet never loads pickles "
            "because they can run arbitrary code."
        )
    if head.startswith(_NPY_MAGIC):
        raise ModelFileError(f"{path} is a single .npy array, not an xpnet model file (.npz made by xpnet.save).")
    raise ModelFileError(f"{path} is not an xpnet model file (not a .npz archive).")


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError, TypeError)


def read_file(path):
    """``(doc, arrays)``: the JSON document and every array (NumPy) of an xpnet file, validated.

    Raises ModelFileError with one sentence for every kind of damage.
    """
    path = Path(path)
    _sniff(path)
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if HEADER_KEY not in names:
                raise ModelFileError(
                    f"{path} is a .npz archive but not an xpnet model file (it has no '{HEADER_KEY}' header)."
                )
            header = npz[HEADER_KEY]
            doc = file_header.parse(path, header)  # every field checked, before anything is built
            listed = doc["arrays"]
            missing = sorted(set(listed) - names)
            if missing:
                raise ModelFileError(
                    f"model file {path} is incomplete: arrays {missing[:3]} listed in its header are missing."
                )
            arrays = {}
            for key, info in listed.items():
                a = npz[key]  # reads the member: a bad CRC or a truncated member raises here
                if list(a.shape) != info["shape"] or a.dtype.name != info["dtype"]:
                    raise ModelFileError(
                        f"model file {path} is corrupt: array {key!r} has shape {list(a.shape)} {a.dtype.name}, "
                        f"its header says {info.get('shape')} {info.get('dtype')}."
                    )
                arrays[key] = a
    except XpnetError:
        raise
    except MemoryError:
        # A member whose .npy header claims a huge shape: refuse it rather than let MemoryError out.
        raise ModelFileError(
            f"model file {path} declares an array too large to load: the file is corrupt or not from xpnet."
        ) from None
    except _READ_ERRORS as exc:
        if isinstance(exc, ValueError) and "pickle" in str(exc).lower():
            raise ModelFileError(
                f"model file {path} contains pickled (object) arrays: xpnet never loads pickles because they "
                "can run arbitrary code."
            ) from None
        raise ModelFileError(
            f"model file {path} is truncated or corrupt ({type(exc).__name__}: {one_line(exc)}): use another copy "
            "or an earlier checkpoint."
        ) from None
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not numpy.isfinite(a).all():
            raise ModelFileError(
                f"model file {path} has NaN or infinite values in {key!r}: the run that wrote it diverged "
                "-- use an earlier checkpoint."
            )
    return doc, arrays


def read_header(path) -> dict:
    """The JSON document of an xpnet file (validates the whole file)."""
    return read_file(path)[0]


def _comparable(spec: dict) -> dict:
    """The parts of an architecture that decide whether weights fit (names, types, configs, input)."""
    layers = []
    for entry in spec.get("layers", []):
        config = {k: v for k, v in (entry.get("config") or {}).items() if k != "init"}
        layers.append({"type": entry.get("type"), "name": entry.get("name"), "config": config})
    shape = spec.get("input_shape")
    return {"input_shape": list(shape) if shape is not None else None,
            "layers": file_header.to_json_data(layers)}


def _describe_difference(file_spec: dict, model_spec: dict) -> str:
    a, b = _comparable(file_spec), _comparable(model_spec)
    if a["input_shape"] != b["input_shape"]:
        return f"input shape {a['input_shape']} in the file, {b['input_shape']} in the model"
    if len(a["layers"]) != len(b["layers"]):
        return f"{len(a['layers'])} layers in the file, {len(b['layers'])} in the model"
    for i, (la, lb) in enumerate(zip(a["layers"], b["layers"])):
        if la != lb:
            return f"layer {i} is {la['type']} '{la['name']}' {la['config']} in the file, " \
                   f"{lb['type']} '{lb['name']}' {lb['config']} in the model"
    return "same architecture"


def _build_from_doc(path, doc, to=None):
    spec, dtype = doc["architecture"], doc["dtype"]  # checked by file_header.parse
    target = to or backend.current()
    state = backend.get_rng_state()  # building draws initial weights: leave the user's generator alone
    try:
        with backend.using(target):
            model = Sequential.from_spec(spec, dtype=dtype)
    except XpnetError as exc:
        raise ModelFileError(f"model file {path} cannot be rebuilt: {one_line(exc)}") from None
    except (AttributeError, TypeError, ValueError, KeyError, OverflowError) as exc:  # a second line of defence
        raise ModelFileError(f"model file {path} has a malformed architecture ({one_line(exc)}).") from None
    except MemoryError:
        raise ModelFileError(
            f"model file {path} describes layers too large to build in this machine's memory: "
            "the file is corrupt, or the model needs a larger machine."
        ) from None
    finally:
        backend.set_rng_state(state)
    if not model.built:
        raise ModelFileError(f"model file {path} has no input shape in its architecture, so it cannot be rebuilt.")
    return model


def _load_state(path, model, arrays) -> None:
    state = {k[len(STATE_PREFIX):]: v for k, v in arrays.items() if k.startswith(STATE_PREFIX)}
    why = model.state_mismatch(state)
    if why is not None:
        raise ModelFileError(f"model file {path} does not fit the model: {why}.")
    model.load_state_dict(state)


def load(path, to: str | None = None):
    """Rebuild the model stored in ``path`` (a model file or a checkpoint).

    Returns ``(model, metadata)``: the model on backend ``to`` (default: the
    current backend) with the file's dtype, and the metadata dict given to
    ``save``.  Does not consume xpnet's random generator.
    """
    doc, arrays = read_file(path)
    model = _build_from_doc(path, doc, to)
    _load_state(path, model, arrays)
    return model, doc.get("metadata") or {}


def load_weights(model, path) -> dict:
    """Copy the weights of ``path`` into ``model``, which must have the same architecture.

    Returns the file's metadata.  A different architecture raises ModelFileError naming the difference.
    """
    doc, arrays = read_file(path)
    _check_architecture(path, doc, model)
    _load_state(path, model, arrays)
    return doc.get("metadata") or {}


def load_matching(model, path) -> tuple[list, list, dict]:
    """Start ``model`` from another model file where they agree: transfer to a new task.

    Every parameter and buffer of ``model`` whose name and shape (and dtype) match an array
    of ``path`` is copied; the others keep their fresh values (for example a new output layer
    for another charset, or a dense layer after an input of another width).  Returns
    ``(loaded names, kept names, the file's metadata)``.  A file of another dtype, or one of
    whose arrays none fits, is a UsageError naming it.
    """
    doc, arrays = read_file(path)
    state = {k[len(STATE_PREFIX):]: v for k, v in arrays.items() if k.startswith(STATE_PREFIX)}
    own = model.state_dict()
    if state and doc.get("dtype") != numpy.dtype(model.dtype).name:
        raise UsageError(f"{path} holds {doc.get('dtype')} weights but the model is {numpy.dtype(model.dtype).name}:"
                         f" use the same XPNET_DTYPE for both (xpnet never casts silently).")
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise UsageError(f"none of the arrays of {path} fits model '{model.name}' (names and shapes differ): "
                         f"start from a model file of the same network.")
    for key, value in fits.items():
        target = own[key]
        xp = backend.get_array_module(target)
        target[...] = xp.asarray(value) if xp is not numpy else value
    return sorted(fits), [k for k in own if k not in fits], doc.get("metadata") or {}


def _check_architecture(path, doc, model) -> None:
    if not getattr(model, "built", False):
        raise UsageError("load_weights needs a built model: give input_shape or run a batch through it first.")
    file_spec = doc["architecture"]
    if _comparable(file_spec) != _comparable(model.spec()):
        raise ModelFileError(
            f"model file {path} holds a different architecture than the model given: "
            f"{one_line(_describe_difference(file_spec, model.spec()))}."
        )
    if doc["dtype"] != numpy.dtype(model.dtype).name:
        raise ModelFileError(
            f"model file {path} holds {doc['dtype']} weights but the model is {model.dtype}: "
            f"build the model with dtype {doc['dtype']} or use xpnet.load."
        )


# --------------------------------------------------------------------------
# Checkpoints


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns."""

    path: Path
    model: object
    metadata: dict
    train_state: dict
    optimizer_meta: dict | None = None
    optimizer_arrays: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.train_state.get("step", 0))  # an int in any file: checked by file_header.parse


def load_checkpoint(path, model=None, optimizer=None, to: str | None = None) -> Checkpoint:
    """Open a checkpoint.  With ``model``, its weights are loaded into it (same architecture
    required), else a model is rebuilt; with ``optimizer``, its state is restored too."""
    path = Path(path)
    doc, arrays = read_file(path)
    if doc.get("kind") != "checkpoint":
        raise ModelFileError(f"{path} is a model file, not a training checkpoint: it cannot resume a run.")
    if model is None:
        model = _build_from_doc(path, doc, to)
    else:
        _check_architecture(path, doc, model)
    _load_state(path, model, arrays)
    optim_arrays = {k[len(OPTIM_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)}
    optim_meta = doc.get("optimizer")
    if optimizer is not None:
        if optim_meta is None:
            raise ModelFileError(f"checkpoint {path} holds no optimizer state, so the optimizer cannot be restored.")
        try:
            optimizer.load_state_dict(optim_meta, optim_arrays)
        except ModelFileError as exc:
            raise ModelFileError(f"checkpoint {path}: {one_line(exc)}") from None  # name the file
        except XpnetError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"checkpoint {path} has a malformed optimizer state ({one_line(exc)}).") from None
    return Checkpoint(path, model, doc.get("metadata") or {}, doc.get("train_state") or {}, optim_meta, optim_arrays)


CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.npz$")


def checkpoint_name(step: int) -> str:
    """``ckpt-<step>.npz``, the step zero-padded so that names sort like steps."""
    return f"ckpt-{checks.integer(step, 'step', minimum=0):09d}.npz"


def list_checkpoints(folder) -> list[Path]:
    """Checkpoint files ``ckpt-<step>.npz`` in ``folder``, newest (highest step) first.

    Temporary files (``.ckpt-....tmp``) never match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]


def is_complete(path) -> bool:
    """True when ``path`` is a readable xpnet file whose every member passes its CRC check."""
    try:
        read_file(path)
        return True
    except ModelFileError:
        return False


def latest_checkpoint(folder) -> Path | None:
    """The newest COMPLETE checkpoint in ``folder`` (damaged ones are skipped with a warning), or None."""
    for p in list_checkpoints(folder):
        try:
            doc = read_header(p)
        except ModelFileError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}", stacklevel=2)
            continue
        if doc.get("kind") == "checkpoint":
            return p
    return None


__all__ = ["save", "load", "load_weights", "read_file", "read_header", "save_checkpoint", "load_checkpoint",
           "Checkpoint", "latest_checkpoint", "list_checkpoints", "checkpoint_name", "atomic_write",
           "check_writable", "remove_stale_temp_files", "is_complete", "FORMAT_VERSION", "HEADER_KEY"]
