"""Labelled image sets: load a folder whose file names carry the labels, split it, cache it.

The label rule (``label_from_name``): take the file name without its last
extension (the stem), then cut it at the first ``_`` or ``.``::

    2A2X.png      -> 2A2X
    2A2X_17.png   -> 2A2X      (a counter after '_' keeps repeated texts apart)
    2A2X.1.png    -> 2A2X
    2A2X_a_b.jpg  -> 2A2X

So labels themselves can never contain ``_`` or ``.``.  Case is kept.

A ``LabelledImages`` holds uint8 images (N, C, H, W), their text labels, the
``Charset`` and the ``Preprocess`` that made them, plus every file that was
skipped with the reason -- nothing is dropped silently.  ``save_npz`` /
``load_npz`` keep one in a compact ``.npz`` without pickle.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import warnings

import numpy
from PIL import Image

from ..errors import DataError, UsageError
from .images import ImageProblem, Preprocess, decode_to_array, image_size
from .labels import Charset, length_text, parse_length

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
ON_ERROR = ("report", "raise")
NPZ_FORMAT = "xpnet-labelled-images"
NPZ_VERSION = 1

# Below this many files one process decodes faster than starting workers would.
_PARALLEL_FROM = 3000
_CHUNK = 500


def label_from_name(name: str) -> str:
    """A file name (or path) -> its label: the stem cut at the first ``_`` or ``.``."""
    base = os.path.basename(os.fspath(name))
    stem = os.path.splitext(base)[0] if not base.startswith(".") else base
    for i, c in enumerate(stem):
        if c in "_.":
            return stem[:i]
    return stem


def cpu_count() -> int:
    """CPU cores this process may use (the affinity mask when the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(eq=False)
class LabelledImages:
    """Images with text labels.

    images      (N, C, H, W) uint8, made by ``preprocess``
    labels      N strings of ``charset.min_length`` to ``charset.length`` characters of ``charset.chars``
    charset     the ``Charset`` (characters and label length or lengths)
    preprocess  the ``Preprocess`` that made the images (store it with the model)
    paths       N source file paths ('' for generated images)
    skipped     (path, reason) for every file that was not used
    ignored     paths of entries that are not image files (other extensions, sub-folders)
    meta        free JSON-serialisable facts (generator seed, ...)
    """

    images: numpy.ndarray
    labels: list
    charset: Charset
    preprocess: Preprocess
    paths: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    ignored: list = dataclasses.field(default_factory=list)
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def targets(self, dtype=numpy.float32) -> numpy.ndarray:
        """(N, length * n_classes) multi-hot targets (NumPy)."""
        return self.charset.encode(self.labels, dtype)

    def indices(self) -> numpy.ndarray:
        """(N, length) int64 class indices."""
        return self.charset.indices(self.labels)

    def subset(self, idx) -> "LabelledImages":
        """The images at the integer indices ``idx`` (same charset and preprocessing)."""
        idx = numpy.asarray(idx, dtype=numpy.int64)
        return dataclasses.replace(
            self, images=self.images[idx], labels=[self.labels[i] for i in idx],
            paths=[self.paths[i] for i in idx] if self.paths else [], skipped=[], ignored=[])

    def split(self, val_fraction: float = 0.2, seed: int = 0):
        """(train, validation) subsets by ``split_indices`` (deterministic for a seed)."""
        tr, va = split_indices(len(self), val_fraction, seed)
        return self.subset(tr), self.subset(va)

    def summary(self) -> str:
        """One paragraph: what was loaded and every file that was skipped, with the reason."""
        c, h, w = self.images.shape[1:] if self.images.ndim == 4 else self.preprocess.shape
        lines = [f"{len(self)} images ({c}x{h}x{w}), labels of {self.charset.lengths} characters over "
                 f"{self.charset.n_classes} classes {self.charset.chars!r}"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped:")
            lines += [f"  {p}: {r}" for p, r in self.skipped]
        if self.ignored:
            shown = ", ".join(os.path.basename(p) for p in self.ignored[:5])
            more = f" and {len(self.ignored) - 5} more" if len(self.ignored) > 5 else ""
            lines.append(f"{len(self.ignored)} entry(ies) ignored, not image files: {shown}{more}")
        return "\n".join(lines)


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0):
    """Deterministic (train_idx, val_idx): sorted int64 index arrays that partition range(n).

    The validation part has ``round(n * val_fraction)`` items (at least 1 when
    ``0 < val_fraction`` and ``n >= 2``), chosen by a permutation from
    ``numpy.random.default_rng(seed)``: the same (n, fraction, seed) always
    gives the same split.
    """
    n = int(n)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise UsageError(f"validation fraction must be in [0, 1), got {val_fraction}.")
    if n < 0:
        raise UsageError(f"cannot split {n} items.")
    n_val = int(round(n * float(val_fraction)))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = numpy.random.default_rng(int(seed)).permutation(n)
    return numpy.sort(perm[n_val:]).astype(numpy.int64), numpy.sort(perm[:n_val]).astype(numpy.int64)


def fold_indices(n: int, fold: int, folds: int, seed: int = 0):
    """Deterministic (rest_idx, test_idx) of fold ``fold`` of ``folds``: sorted int64 arrays.

    One seeded permutation of range(n) is cut into ``folds`` nearly equal parts; part
    ``fold`` is the test set.  Over the folds every item is tested exactly once.
    """
    n, fold, folds = int(n), int(fold), int(folds)
    if folds < 2 or not 0 <= fold < folds:
        raise UsageError(f"fold {fold} of {folds}: need 2 or more folds and 0 <= fold < folds.")
    if n < folds:
        raise UsageError(f"cannot cut {n} items into {folds} folds.")
    parts = numpy.array_split(numpy.random.default_rng(int(seed)).permutation(n), folds)
    rest = numpy.concatenate([p for i, p in enumerate(parts) if i != fold])
    return numpy.sort(rest).astype(numpy.int64), numpy.sort(parts[fold]).astype(numpy.int64)


# --------------------------------------------------------------------------
# Loading a folder


def load_folder(path, charset=None, length=None, preprocess: Preprocess | None = None,
                on_error: str = "report", workers: int | None = None, progress: bool | None = None,
                labels=None) -> LabelledImages:
    """Load every labelled image in a folder (not its sub-folders).

    path        the folder; labels come from file names (``label_from_name``)
                unless ``labels`` is given
    labels      a CSV file of ``file,label`` rows (``xpnet.data.label_files``):
                images without a row, rows without an image, empty labels and
                conflicting rows are listed in ``.skipped`` (where: the file, or
                ``labels.csv:LINE``) and the rest is used
    charset     a ``Charset``, a string of characters, or None to infer the
                sorted set of characters used by the labels
    length      label length (4) or range of lengths ("4-6", (4, 6)); None: the
                charset's, else the shortest to the longest label found
    preprocess  a ``Preprocess`` (default ``Preprocess()``: 3 x 32 x 80, "fit")
    on_error    "report" (default): unreadable files and labels that do not fit
                are skipped and listed in ``.skipped`` with the reason;
                "raise": any of them raises a DataError naming them all
    workers     decoding processes (default: 1 below 3000 files, else the CPU count)
    progress    show a progress bar (default: when stderr is a terminal)

    Returns a ``LabelledImages`` (images (N, C, H, W) uint8).  A missing or
    empty folder, or one where no file is usable, is a DataError.
    """
    if on_error not in ON_ERROR:
        raise UsageError(f"on_error must be 'report' or 'raise', got {on_error!r}.")
    pp = preprocess or Preprocess()
    if not isinstance(pp, Preprocess):
        raise UsageError(f"preprocess must be an xpnet.data.Preprocess, got {type(pp).__name__}.")
    folder = os.fspath(path)
    candidates, ignored = _scan(folder)
    skipped: list[tuple[str, str]] = []

    chars, length = _charset_args(charset, length)
    named = _labels_from_file(labels, candidates, folder, skipped) if labels is not None else None
    keep = []
    for p in candidates:
        if named is not None and p not in named:
            continue  # listed by _labels_from_file
        label = named[p] if named is not None else label_from_name(p)
        reason = _label_problem(label, chars, length)
        if reason:
            skipped.append((p, reason))
        else:
            keep.append((p, label))
    if keep and length is None:
        found = [len(lab) for _, lab in keep]
        length = (min(found), max(found))

    images, ok, problems = _decode_all([p for p, _ in keep], pp, workers, progress)
    skipped += problems
    used = [keep[i] for i in ok]
    if on_error == "raise" and skipped:
        raise DataError(f"{len(skipped)} file(s) in {folder} cannot be used: " + _listing(skipped)
                        + " (use on_error='report' to skip them).")
    if not used:
        why = f": {_listing(skipped)}" if skipped else ""
        raise DataError(f"none of the {len(candidates)} image file(s) in {folder} can be used{why}.")
    labels = [lab for _, lab in used]
    cs = Charset(chars, length[1], length[0]) if chars is not None else Charset.infer(labels)
    skipped.sort()
    return LabelledImages(images=images, labels=labels, charset=cs, preprocess=pp,
                          paths=[p for p, _ in used], skipped=skipped, ignored=ignored)


def _labels_from_file(path, candidates, folder, skipped) -> dict:
    """{image path: label} from the CSV at ``path``; what cannot be used goes to ``skipped``."""
    from .label_files import read_labels

    table, lines, problems = read_labels(path)
    skipped += problems
    by_name = {os.path.basename(p): p for p in candidates}
    name = os.path.basename(os.fspath(path))
    for file in sorted(set(table) - set(by_name), key=lambda f: lines[f]):
        skipped.append((f"{name}:{lines[file]}", f"{file} is not an image file in {folder}"))
    for p in candidates:
        if os.path.basename(p) not in table:
            skipped.append((p, f"no usable label for it in {name}"))
    return {by_name[f]: label for f, label in table.items() if f in by_name}


def _scan(folder: str):
    if not os.path.exists(folder):
        raise DataError(f"image folder {folder} does not exist.")
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder: give the folder that holds the labelled images.")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list image folder {folder} ({exc.strerror or exc}).") from None
    candidates, ignored = [], []
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if not is_dir and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
            candidates.append(e.path)
        else:
            ignored.append(e.path)
    if not candidates:
        extra = f" ({len(ignored)} other entries ignored)" if ignored else ""
        raise DataError(f"image folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...)"
                        f"{extra}.")
    return candidates, ignored


def _charset_args(charset, length):
    """(chars or None, (shortest, longest) or None)."""
    if length is not None:
        length = parse_length(length, "label length")
    if charset is None:
        return None, length
    if isinstance(charset, Charset):
        if length is not None and length != (charset.min_length, charset.length):
            raise UsageError(f"length {length_text(*length)} contradicts the charset's length {charset.lengths}.")
        return charset.chars, (charset.min_length, charset.length)
    if isinstance(charset, str):
        Charset(charset, 1)  # validates: >= 2 characters, no repeats
        return charset, length
    raise UsageError(f"charset must be a string of characters or an xpnet.data.Charset, got {type(charset).__name__}.")


def _label_problem(label: str, chars, length) -> str | None:
    if not label:
        return "the file name gives an empty label"
    if length is not None and not length[0] <= len(label) <= length[1]:
        return f"label {label!r} has {len(label)} characters, expected {length_text(*length)}"
    if chars is not None:
        odd = "".join(sorted({c for c in label if c not in chars}))
        if odd:
            return f"label {label!r} has characters {odd!r} outside the charset {chars!r}"
    return None


def _listing(skipped, limit: int = 10) -> str:
    shown = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in skipped[:limit])
    return shown + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")


def _decode_all(paths, pp: Preprocess, workers, progress):
    """Decode ``paths`` -> (images (M, C, H, W) uint8, indices of the M decoded paths, problems)."""
    n = len(paths)
    if workers is None:
        workers = cpu_count() if n >= _PARALLEL_FROM else 1
    workers = max(1, min(int(workers), max(1, n // _CHUNK)))
    chunks = [(i, paths[i:i + _CHUNK]) for i in range(0, n, _CHUNK)]
    out = numpy.empty((n,) + pp.shape, dtype=numpy.uint8)
    good = numpy.zeros(n, dtype=bool)
    problems = []
    limit = Image.MAX_IMAGE_PIXELS  # workers start with Pillow's default: pass on the caller's setting
    bar = _progress_bar(n, "loading images", progress)
    try:
        if workers == 1:
            results = (_decode_chunk(start, chunk, pp.to_dict(), limit) for start, chunk in chunks)
            _collect(results, out, good, problems, bar)
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(_decode_chunk, start, chunk, pp.to_dict(), limit) for start, chunk in chunks]
                try:
                    _collect((f.result() for f in futures), out, good, problems, bar)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    ok = numpy.flatnonzero(good)
    return (out if len(ok) == n else out[ok]), ok.tolist(), problems


def _collect(results, out, good, problems, bar):
    for start, arrays, ok, probs in results:
        for j, k in enumerate(ok):
            out[start + k] = arrays[j]
            good[start + k] = True
        problems += probs
        bar.update(len(ok) + len(probs))


def _decode_chunk(start, paths, pp_dict, limit):
    """Worker: decode a chunk -> (start, stacked arrays, chunk offsets decoded, [(path, reason)])."""
    Image.MAX_IMAGE_PIXELS = limit
    pp = Preprocess.from_dict(pp_dict)
    arrays, ok, problems = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every problem is reported per file instead
        for k, p in enumerate(paths):
            try:
                arrays.append(decode_to_array(p, pp))
                ok.append(k)
            except ImageProblem as exc:
                problems.append((p, str(exc)))
    stack = numpy.stack(arrays) if arrays else numpy.empty((0,) + pp.shape, numpy.uint8)
    return start, stack, ok, problems


def _progress_bar(total, desc, progress):
    from tqdm import tqdm

    disable = None if progress is None else not progress  # None: only on a terminal
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False)


def suggest_preprocess(path, height: int = 32, channels: int = 3, multiple: int = 8, sample: int = 500
                       ) -> Preprocess:
    """A ``Preprocess`` whose width fits a folder's images at ``height`` (headers only, fast).

    width = the median aspect ratio of up to ``sample`` images times ``height``,
    rounded up to a multiple of ``multiple``: the 72x24 images of
    really_simple_4char give 32 x 96, so nothing is shrunk more than needed.
    """
    candidates, _ = _scan(os.fspath(path))
    step = max(1, len(candidates) // sample)
    ratios = [w / h for w, h in filter(None, (image_size(p) for p in candidates[::step])) if h > 0]
    if not ratios:
        raise DataError(f"none of the image files in {os.fspath(path)} has a readable header.")
    width = statistics.median(ratios) * height
    width = max(multiple, int(-(-round(width, 6) // multiple) * multiple))
    return Preprocess(height=height, width=width, channels=channels)


# --------------------------------------------------------------------------
# The .npz cache (no pickle: strings are stored as unicode arrays)


def save_npz(path, data: LabelledImages) -> str:
    """Write ``data`` to a compressed ``.npz`` (atomically: a temporary file, then rename)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    labels = numpy.array(data.labels, dtype=f"<U{max(1, data.charset.length)}")
    arrays = {
        "format": numpy.array(NPZ_FORMAT),
        "version": numpy.array(NPZ_VERSION, dtype=numpy.int64),
        "images": numpy.ascontiguousarray(data.images, dtype=numpy.uint8),
        "labels": labels,
        "charset": numpy.array(data.charset.chars),
        "length": numpy.array(data.charset.length, dtype=numpy.int64),
        "min_length": numpy.array(data.charset.min_length, dtype=numpy.int64),
        "preprocess": numpy.array(data.preprocess.to_json()),
        "meta": numpy.array(json.dumps(data.meta, sort_keys=True)),
    }
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            numpy.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        from ..errors import StorageError

        raise StorageError(f"cannot write {path} ({exc.strerror or exc}): check the folder exists, is "
                           f"writable and has free space.") from None
    return path


def load_npz(path) -> LabelledImages:
    """Read a ``save_npz`` file (``allow_pickle=False``); any damage is a DataError naming the file."""
    path = os.fspath(path)
    try:
        with numpy.load(path, allow_pickle=False) as z:
            fields = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file.") from None
    except Exception as exc:  # noqa: BLE001 -- zip, npy and pickle refusals all land here
        raise DataError(f"{path}: not a readable xpnet .npz image cache ({type(exc).__name__}: {exc}).") from None
    need = {"format", "version", "images", "labels", "charset", "length", "preprocess"}
    missing = sorted(need - set(fields))
    if missing or str(fields.get("format", "")) != NPZ_FORMAT:
        raise DataError(f"{path}: not an xpnet image cache (missing {', '.join(missing) or 'its format tag'}).")
    try:
        version = int(fields["version"])
    except (TypeError, ValueError):
        raise DataError(f"{path}: damaged image cache (version {fields['version']!r} is not a number).") from None
    if version > NPZ_VERSION:
        raise DataError(f"{path}: image cache version {version} is newer than this xpnet "
                        f"understands ({NPZ_VERSION}): upgrade xpnet.")
    images, labels = fields["images"], fields["labels"]
    try:
        lo = int(fields["min_length"]) if "min_length" in fields else None  # older caches: one length
        cs = Charset(str(fields["charset"]), int(fields["length"]), lo)
        pp = Preprocess.from_json(str(fields["preprocess"]))
        meta = json.loads(str(fields.get("meta", "{}")))
    except (UsageError, DataError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: damaged image cache ({exc}).") from None
    if images.dtype != numpy.uint8 or images.ndim != 4 or images.shape[1:] != pp.shape:
        raise DataError(f"{path}: images are {images.dtype} {images.shape}, expected uint8 (N,) + {pp.shape}.")
    if labels.ndim != 1 or labels.dtype.kind != "U" or len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images.")
    labels = labels.tolist()
    bad = cs.check(labels)
    if bad:
        raise DataError(f"{path}: {len(bad)} label(s) do not fit the stored charset, e.g. {bad[0]}.")
    return LabelledImages(images=images, labels=labels, charset=cs, preprocess=pp,
                          paths=[""] * len(labels), meta=meta if isinstance(meta, dict) else {})
