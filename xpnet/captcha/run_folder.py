"""The output folder of a CAPTCHA run: checked before anything is written, and its JSON files.

``run.json`` holds the resolved settings (``settings``), the data (``data``),
the start time, Python version and backend; ``results.json`` the evaluation
on the held-out test set.  The trainer adds the model, checkpoints and history.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy

from ..errors import DataError, UsageError
from ..nn import serialization as xio
from .config import Settings

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"


def default_out() -> str:
    """``runs/captcha-<date>-<time>``: a new folder for every run."""
    return os.path.join("runs", "captcha-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def prepare_out(out, resume: bool) -> Path:
    """Check (and create) the output folder: a new run needs a new or empty folder, --resume an existing run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose a folder.")
    if resume:
        if not (out / RUN_FILE).is_file():
            raise UsageError(f"there is no run to resume in {out} (no {RUN_FILE}): drop --resume to start a new run.")
    elif out.is_dir() and any(out.iterdir()):
        held = "a run" if (out / RUN_FILE).exists() else "files"
        raise UsageError(f"output folder {out} already holds {held}: choose a new folder, or add --resume to "
                         f"continue the run in it.")
    xio.check_writable(out)
    return out


def read_saved_settings(out: Path) -> dict:
    """The settings in ``out/run.json`` as plain data; DataError when the file is damaged."""
    try:
        saved = json.loads((Path(out) / RUN_FILE).read_text("utf-8"))["settings"]
        keys = set(saved)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{Path(out) / RUN_FILE} is damaged ({type(exc).__name__}): cannot resume this run.") from None
    required = Settings.required_names()  # keys added later have defaults: older runs still resume
    if not required <= keys <= Settings.field_names():
        raise DataError(f"{Path(out) / RUN_FILE} is damaged (KeyError): cannot resume this run.")
    return saved


def write_json(path: Path, doc: dict, what: str) -> None:
    """Write ``doc`` atomically (NumPy numbers and paths as plain JSON)."""
    data = json.dumps(doc, indent=1, default=_json_safe).encode("utf-8")
    xio.atomic_write(path, lambda f: f.write(data), what)


def now() -> str:
    """The UTC time, as run.json and results.json write it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_safe(obj):
    if isinstance(obj, numpy.integer):
        return int(obj)
    if isinstance(obj, numpy.floating):
        return float(obj)
    if isinstance(obj, numpy.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


__all__ = ["RUN_FILE", "RESULTS_FILE", "default_out", "prepare_out", "read_saved_settings", "write_json", "now"]
