"""Model files and training checkpoints: one ``.npz`` each, never pickle.

    xpnet.save(model, "reader.npz", metadata={"charset": charset.to_dict(), "input_shape": [3, 32, 80]})
    model, metadata = xpnet.load("reader.npz")       # rebuilt on the current backend
    metadata = xpnet.io.load_weights(model, "reader.npz")   # into an existing model of the same architecture

File layout (a plain ``np.savez`` archive, read with ``allow_pickle=False``):

* ``__xpnet__`` -- a uint8 array holding a UTF-8 JSON document::

      {"format": "xpnet", "format_version": 1, "kind": "model" | "checkpoint",
       "xpnet_version": "0.1.0", "created": "2024-...Z", "dtype": "float32",
       "architecture": model.spec(), "metadata": {...caller's JSON-safe dict...},
       "arrays": {"state/conv1.W": {"shape": [...], "dtype": "float32"}, ...},
       # checkpoints only:
       "optimizer": {...Optimizer.state_dict() meta...}, "train_state": {...}}

* ``state/<name>`` -- the model's parameters and buffers (``model.state_dict()``);
* ``optimizer/<slot>/<name>`` -- optimizer slots (checkpoints only).

Suggested metadata keys (free-form, stored as given): ``charset`` (
``Charset.to_dict()``), ``length``, ``input_shape``, ``preprocessing`` (resize,
scaling...), ``task``.

A checkpoint is a model file with more in it: ``xpnet.load`` opens either.

Safety and errors: every problem is one ``ModelFileError`` sentence naming the
file -- missing file, not a zip archive (a pickle is recognised and refused
without being run), truncated or corrupt archive (zip CRC), no xpnet header,
a newer format version, an unknown layer type, an architecture other than the
model given, missing arrays, NaN/inf weights.

Writes are atomic: a temporary file in the same folder, flushed and fsync'ed,
then ``os.replace`` over the target and an fsync of the folder.  If writing
fails (full disk, permissions), the temporary file is removed, the previous
file under that name is untouched, and ``StorageError`` says so.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import re
import secrets
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .. import backend
from ..errors import ModelFileError, StorageError, UsageError, XpnetError

FORMAT = "xpnet"
FORMAT_VERSION = 1
HEADER_KEY = "__xpnet__"
STATE_PREFIX = "state/"
OPTIM_PREFIX = "optimizer/"

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _one_line(text) -> str:
    """Text that came from a file, safe in a one-line message: control characters
    (newlines, terminal escape sequences) are shown escaped, as in a repr."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _xpnet_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); harmless where folders cannot be opened (Windows)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (or a read-only file system)"
    return exc.strerror or str(exc)


def _create_temp(folder: Path, name: str):
    """A new hidden file ``.<name>.<pid>.<random>.tmp`` in ``folder`` (mode 0666 less the umask)."""
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)


def atomic_write(path, write, what: str = "file") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary temporary file in the same folder.

    The temporary name starts with '.' and ends with '.tmp', so it never matches
    ``*.npz`` and is never taken for a finished file.  On OSError the temporary
    file is removed, ``path`` keeps its previous content, and StorageError is raised.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        if not folder.is_dir():
            raise StorageError(f"cannot write {what} {path}: the folder {folder} does not exist.")
        fd, tmp_name = _create_temp(folder, path.name)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(folder)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"nothing was written as {path.name}"
        raise StorageError(
            f"could not write {what} {path}: {_describe_oserror(exc)}; {kept} "
            "-- free some space or choose another output folder."
        ) from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return path


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never guess, keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or cannot tell: keep the file
        return True
    return True


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files of ``atomic_write`` left in ``folder`` by writers that were killed.

    A file ``.<name>.<pid>.<random>.tmp`` is removed only when process ``pid`` no longer exists on
    this machine (a live writer's file is kept).  Returns the paths removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_RE.match(p.name)
        if m is None or int(m.group("pid")) == os.getpid() or _process_alive(int(m.group("pid"))):
            continue
        try:
            if p.is_file():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def check_writable(folder, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it is writable (write, fsync, delete a probe file).

    Raises StorageError at once, so a run does not fail after an hour of training.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = _create_temp(folder, "xpnet-write-test")
        try:
            os.write(fd, b"xpnet")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise StorageError(
            f"the {what} {folder} cannot be written: {_describe_oserror(exc)} -- choose another folder."
        ) from exc
    return folder


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


def _to_json(doc: dict, what: str) -> bytes:
    try:
        return json.dumps(doc, default=_json_default, allow_nan=True, sort_keys=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what} must be JSON-serialisable (strings, numbers, lists, dicts): {exc}.") from None


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
    doc = dict(doc)
    doc["arrays"] = {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in arrays.items()}
    header = numpy.frombuffer(_to_json(doc, "metadata"), dtype=numpy.uint8)
    payload = {HEADER_KEY: header, **arrays}
    return atomic_write(path, lambda f: _write_npz(f, payload), what)


def _base_doc(model, kind: str, metadata) -> dict:
    if metadata is not None and not isinstance(metadata, dict):
        raise UsageError(f"metadata must be a dict, got {type(metadata).__name__}.")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "xpnet_version": _xpnet_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dtype": numpy.dtype(model.dtype).name,
        "architecture": model.spec(),
        "metadata": dict(metadata or {}),
    }


def save(model, path, metadata: dict | None = None) -> Path:
    """Write ``model`` (architecture + weights + ``metadata``) to ``path`` (.npz), atomically.

    ``metadata``: a JSON-safe dict stored as given (charset, length, input
    shape, preprocessing...).  Returns the path written.
    """
    path = Path(path)
    return _write_archive(path, _base_doc(model, "model", metadata), _model_arrays(model), "model file")


def save_checkpoint(path, model, optimizer=None, train_state: dict | None = None,
                    metadata: dict | None = None) -> Path:
    """Write a training checkpoint: model, optimizer state, ``train_state`` (step, epoch, RNG
    states, history...: JSON-safe) and ``metadata``, atomically."""
    doc = _base_doc(model, "checkpoint", metadata)
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
        raise ModelFileError(f"model file {path} cannot be read: {_describe_oserror(exc)}.") from None
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
            doc = _parse_header(path, header)
            listed = doc.get("arrays")
            if not isinstance(listed, dict) or not all(isinstance(v, dict) for v in listed.values()):
                raise ModelFileError(f"model file {path} has a malformed header (no valid 'arrays' table).")
            missing = sorted(set(listed) - names)
            if missing:
                raise ModelFileError(
                    f"model file {path} is incomplete: arrays {missing[:3]} listed in its header are missing."
                )
            arrays = {}
            for key, info in listed.items():
                a = npz[key]  # reads the member: a bad CRC or a truncated member raises here
                if list(a.shape) != list(info.get("shape", [])) or a.dtype.name != info.get("dtype"):
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
            f"model file {path} is truncated or corrupt ({type(exc).__name__}: {_one_line(exc)}): use another copy "
            "or an earlier checkpoint."
        ) from None
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not numpy.isfinite(a).all():
            raise ModelFileError(
                f"model file {path} has NaN or infinite values in {key!r}: the run that wrote it diverged "
                "-- use an earlier checkpoint."
            )
    return doc, arrays


def _parse_header(path, header) -> dict:
    if header.dtype != numpy.uint8 or header.ndim != 1:
        raise ModelFileError(f"model file {path} has a malformed '{HEADER_KEY}' header.")
    try:
        doc = json.loads(header.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"model file {path} has a damaged header (not valid JSON).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an xpnet model file (its header does not say format 'xpnet').")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"model file {path} has a malformed header (format_version {version!r}).")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"model file {path} has format version {version}, newer than this xpnet ({_xpnet_version()}) reads "
            f"(up to {FORMAT_VERSION}): upgrade xpnet."
        )
    if version < 1:
        raise ModelFileError(f"model file {path} has an invalid format version {version}.")
    # Later code reads these as dicts: a hand-edited or hostile header must fail here, in one sentence.
    for key in ("architecture", "metadata", "train_state", "optimizer"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise ModelFileError(f"model file {path} has a malformed header ('{key}' is not a JSON object).")
    return doc


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
            "layers": json.loads(json.dumps(layers, default=_json_default))}


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
    from .sequential import Sequential

    spec = doc.get("architecture")
    dtype = doc.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise ModelFileError(f"model file {path} has dtype {dtype!r}: xpnet reads float32 or float64.")
    target = to or backend.current()
    state = backend.get_rng_state()  # building draws initial weights: leave the user's generator alone
    try:
        with backend.using(target):
            model = Sequential.from_spec(spec, dtype=dtype)
    except XpnetError as exc:
        raise ModelFileError(f"model file {path} cannot be rebuilt: {_one_line(exc)}") from None
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise ModelFileError(f"model file {path} has a malformed architecture ({_one_line(exc)}).") from None
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
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise ModelFileError(
            f"model file {path} does not fit the model: missing weights {missing[:3]}, unexpected {extra[:3]}."
        )
    for k, target in own.items():
        if tuple(state[k].shape) != tuple(target.shape):
            raise ModelFileError(
                f"model file {path}: weight {k!r} has shape {tuple(state[k].shape)} but the model needs "
                f"{tuple(target.shape)}."
            )
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
    return model, doc.get("metadata", {})


def load_weights(model, path) -> dict:
    """Copy the weights of ``path`` into ``model``, which must have the same architecture.

    Returns the file's metadata.  A different architecture raises ModelFileError naming the difference.
    """
    doc, arrays = read_file(path)
    _check_architecture(path, doc, model)
    _load_state(path, model, arrays)
    return doc.get("metadata", {})


def _check_architecture(path, doc, model) -> None:
    if not getattr(model, "built", False):
        raise UsageError("load_weights needs a built model: give input_shape or run a batch through it first.")
    file_spec = doc.get("architecture") or {}
    try:
        same = _comparable(file_spec) == _comparable(model.spec())
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelFileError(f"model file {path} has a malformed architecture ({_one_line(exc)}).") from None
    if not same:
        raise ModelFileError(
            f"model file {path} holds a different architecture than the model given: "
            f"{_one_line(_describe_difference(file_spec, model.spec()))}."
        )
    if doc.get("dtype") != numpy.dtype(model.dtype).name:
        raise ModelFileError(
            f"model file {path} holds {doc.get('dtype')} weights but the model is {model.dtype}: "
            f"build the model with dtype {doc.get('dtype')} or use xpnet.load."
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
        return int(self.train_state.get("step", 0))


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
            raise ModelFileError(f"checkpoint {path}: {_one_line(exc)}") from None  # name the file
        except XpnetError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"checkpoint {path} has a malformed optimizer state ({_one_line(exc)}).") from None
    return Checkpoint(path, model, doc.get("metadata", {}), doc.get("train_state", {}), optim_meta, optim_arrays)


CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.npz$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{int(step):09d}.npz"


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
           "check_writable", "remove_stale_temp_files", "is_complete", "FORMAT_VERSION"]
