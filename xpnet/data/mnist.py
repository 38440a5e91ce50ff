"""MNIST from IDX files (gzipped or not) in a folder.  Nothing is downloaded.

    data = load_mnist("../shared/data/mnist")
    data.x_train  # (N, 1, 28, 28) uint8      data.y_train  # (N,) int64 in 0..9
    print(data.split)                       # which files and which split were used

Splits:
* the four standard files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
  ``.gz``; ``train-images.idx3-ubyte`` spellings are accepted too) -> the
  standard 60,000 / 10,000 split;
* only the ``t10k`` pair (the official test set, as in ``../shared/data/mnist``)
  -> its first 9,000 images for training and its last 1,000 for testing
  (``t10k_train`` sets the cut).  The last 1,000 are the harder writers.

Whether a file is gzipped is read from its first bytes, not its name.
Malformed files raise DataError naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy

from ..errors import DataError

_IDX_DTYPES = {0x08: numpy.uint8, 0x09: numpy.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> numpy.ndarray:
    """Read one IDX file (gzipped or not) into a NumPy array of its stored shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror or exc}.") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"IDX file {path} is a damaged gzip archive ({exc}): copy it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number): expected MNIST's idx1/idx3 format.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header.")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = numpy.dtype(_IDX_DTYPES[raw[2]])
    expected = int(numpy.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path} should hold {expected:,} data bytes for shape {shape} but holds "
            f"{len(raw) - header:,}: it is truncated or damaged."
        )
    return numpy.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, split: str, kind: str) -> Path | None:
    idx = "idx3" if kind == "images" else "idx1"
    for stem in (f"{split}-{kind}-{idx}-ubyte", f"{split}-{kind}.{idx}-ubyte"):
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def _pair(folder: Path, split: str):
    images, labels = _find(folder, split, "images"), _find(folder, split, "labels")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, need = (images, "labels") if labels is None else (labels, "images")
        raise DataError(f"{folder} has {have.name} but no matching {split} {need} file: copy the pair.")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1:
        raise DataError(f"{images.name} / {labels.name} have shapes {x.shape} / {y.shape}: expected (N, H, W) and (N,).")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{images.name} has {x.shape[0]} images but {labels.name} has {y.shape[0]} labels.")
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DataError(f"{labels.name} has labels outside 0..9: is it an MNIST label file?")
    return x[:, None, :, :].astype(numpy.uint8, copy=False), y.astype(numpy.int64), images, labels


@dataclass
class MNIST:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64, with a sentence saying which split."""

    x_train: numpy.ndarray
    y_train: numpy.ndarray
    x_test: numpy.ndarray
    y_test: numpy.ndarray
    split: str


def load_mnist(folder, t10k_train: int = 9000) -> MNIST:
    """Load MNIST from ``folder``: the standard split with all four files, else the t10k-only split."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"MNIST folder {folder} does not exist: give the folder holding the IDX files.")
    test = _pair(folder, "t10k")
    train = _pair(folder, "train")
    if test is None:
        raise DataError(
            f"{folder} has no t10k-images-idx3-ubyte[.gz] / t10k-labels-idx1-ubyte[.gz]: "
            "MNIST needs at least the test pair."
        )
    xt, yt, ti, tl = test
    if train is not None:
        xtr, ytr, tri, trl = train
        split = (f"standard split: {len(xtr):,} training images ({tri.name}) and {len(xt):,} test images "
                 f"({ti.name})")
        return MNIST(xtr, ytr, xt, yt, split)
    cut = int(t10k_train)
    if not 0 < cut < len(xt):
        raise DataError(f"t10k_train must be between 1 and {len(xt) - 1}, got {t10k_train}.")
    split = (f"t10k-only split: the first {cut:,} images of {ti.name} for training, the last "
             f"{len(xt) - cut:,} for testing (the official training files are not in {folder})")
    return MNIST(xt[:cut], yt[:cut], xt[cut:], yt[cut:], split)


__all__ = ["read_idx", "load_mnist", "MNIST"]
