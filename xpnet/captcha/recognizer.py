"""A trained CAPTCHA reader: load a model file, read images, report texts, confidences and accuracy.

    from xpnet.captcha import Recognizer
    reader = Recognizer.load("runs/captcha-.../model.npz")     # rebuilt on the current backend
    pred = reader.predict_files(["a.png", "b.png"])          # Prediction
    pred.texts, pred.confidences                              # ["2A2X", "K9PQ"], array([0.97, 0.41])
    result = reader.evaluate_folder("labelled/")              # Evaluation (labels from file names)
    print(result.report())

A model file is a reader when its metadata carries ``charset`` and
``preprocess`` (``metadata_for``; ``xpnet train`` writes them): prediction
applies exactly the preprocessing training used, to images of any size and mode.
Errors (a missing or damaged model file, missing metadata, an unreadable image)
are one ``XpnetError`` sentence naming the file.

The metadata's ``head`` says how outputs become texts (``xpnet.captcha.heads``): ``"bce"``
(the default when absent) reads ``charset.length`` characters, one sigmoid block per
position; ``"ctc"`` reads texts of any length over the charset from per-column scores
(greedy best-path decoding, blank at class 0).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import numpy

from .. import backend, checks
from ..nn import serialization as xio
from ..data.folder import IMAGE_EXTENSIONS, label_from_name, load_folder
from ..data.images import Preprocess, read_image
from ..data.labels import Charset
from ..errors import DataError, ModelFileError, UsageError
from ..memory import oom_guard
from ..metrics import wilson_interval
from .heads import HEADS, ctc_decode, edit_distances, head_of, read_lengths
from .onnx_reader import is_onnx_path, load_reader


def sigmoid(x):
    """Stable logistic function on NumPy float arrays (no overflow warnings)."""
    x = numpy.asarray(x, dtype=numpy.float64)
    e = numpy.exp(-numpy.abs(x))
    return numpy.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclasses.dataclass
class Prediction:
    """What the reader saw in N images.

    The outputs are independent sigmoid units, one block of K classes per
    character: the character read is the block's arg-max, its *character
    confidence* that unit's sigmoid probability, and the *text confidence* the
    product over the characters (the probability that every character is right
    if the positions were independent; 0.9 or more is usually right, under 0.5 a
    guess).  It is in [0, 1] and never NaN.

    texts             N strings of ``charset.length`` characters
    confidences       (N,) float64 in [0, 1]: product of the character confidences
    char_confidences  (N, length) float64: sigmoid probability of each chosen character
    indices           (N, length) int64 class indices

    A CTC reader (``head`` "ctc") reads texts of any length; its confidences are
    defined in ``xpnet.captcha.heads.ctc_decode``: ``indices`` (N, T) holds each text's
    class indices left-aligned and padded with -1 up to T, the model's number of columns
    (the most characters it can emit), and ``char_confidences`` (N, T) the characters'
    confidences padded with NaN.
    paths             N source paths ('' for in-memory images)
    skipped           (path, reason) of files that could not be read (``on_error="report"``)
    """

    texts: list
    confidences: numpy.ndarray
    char_confidences: numpy.ndarray
    indices: numpy.ndarray
    paths: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __len__(self):
        return len(self.texts)


@dataclasses.dataclass
class Evaluation:
    """Accuracy of a reader on labelled images.

    n                  images evaluated
    string_accuracy    fraction whose every character is right (the CAPTCHA is solved)
    char_accuracy      fraction of characters right (over n * length)
    position_accuracy  per-position character accuracy (list of length floats)
    confused           most frequent mistakes: (true char, read char, count), most first
    mistakes           (path or '#index', truth, read text, confidence) for every wrong image
    mean_confidence    mean text confidence on right and on wrong images (None when there are none)
    skipped            (path, reason) of files that could not be used
    char_error_rate    CTC readers: the summed edit distances between readings and labels over the
                       summed label lengths (None for a fixed-length reader)
    length_accuracy    CTC readers: fraction of readings as long as their label (None otherwise)
    string_accuracy_interval  the 95% Wilson interval of string_accuracy (small test sets are noisy)

    For a CTC reader ``char_accuracy`` is max(0, 1 - char_error_rate), ``position_accuracy``
    is empty and ``confused`` counts the substitutions in readings of the right length.
    """

    n: int
    string_accuracy: float
    char_accuracy: float
    position_accuracy: list
    confused: list
    mistakes: list
    mean_confidence: dict
    skipped: list = dataclasses.field(default_factory=list)
    char_error_rate: float | None = None
    length_accuracy: float | None = None

    @property
    def string_accuracy_interval(self) -> tuple[float, float]:
        """(low, high): the 95% Wilson interval of ``string_accuracy`` over the n images."""
        return wilson_interval(round(self.string_accuracy * self.n), self.n)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["string_accuracy_interval"] = list(self.string_accuracy_interval) if self.n else None
        return d

    def report(self, top: int = 10, show_mistakes: int = 10) -> str:
        """A few readable lines: accuracies, most confused characters, some mistakes."""
        lo, hi = self.string_accuracy_interval if self.n else (0.0, 0.0)
        lines = [f"{self.n} images: whole-string accuracy {self.string_accuracy * 100:.2f}%, "
                 f"per-character accuracy {self.char_accuracy * 100:.2f}% "
                 f"({round(self.string_accuracy * self.n)} of {self.n} read right; 95% interval of the "
                 f"whole-string accuracy {lo * 100:.1f}-{hi * 100:.1f}%)"]
        if self.char_error_rate is not None:
            lines.append(f"character error rate {self.char_error_rate * 100:.2f}%, length accuracy "
                         f"{self.length_accuracy * 100:.2f}%")
        if len(self.position_accuracy) > 1:
            lines.append("per position: " + "  ".join(f"{i + 1}: {a * 100:.1f}%"
                                                       for i, a in enumerate(self.position_accuracy)))
        mc = self.mean_confidence
        if mc.get("right") is not None or mc.get("wrong") is not None:
            parts = [f"{k} {v:.3f}" for k, v in mc.items() if v is not None]
            lines.append("mean confidence: " + ", ".join(parts))
        if self.confused:
            lines.append("most confused (true -> read: count): " + ", ".join(
                f"{t}->{p}: {c}" for t, p, c in self.confused[:top]))
        elif self.n:
            lines.append("no character was misread")
        if self.mistakes and show_mistakes:
            shown = ", ".join(f"{os.path.basename(p) or p} read {r!r} ({c:.2f})"
                              for p, _, r, c in self.mistakes[:show_mistakes])
            more = f" and {len(self.mistakes) - show_mistakes} more" if len(self.mistakes) > show_mistakes else ""
            lines.append(f"wrong: {shown}{more}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) skipped: " + "; ".join(
                f"{os.path.basename(p)}: {r}" for p, r in self.skipped[:10])
                + (f"; and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""))
        return "\n".join(lines)


def metadata_for(charset: Charset, preprocess: Preprocess, **extra) -> dict:
    """The metadata a model file needs to be a reader (plus any JSON-safe ``extra`` keys)."""
    return {"task": "captcha", "charset": charset.to_dict(), "length": charset.length,
            "preprocess": preprocess.to_dict(), "input_shape": list(preprocess.shape), **extra}


class Recognizer:
    """A model with its charset and preprocessing; reads images of any size and mode.

    ``batch_size`` bounds the images per forward pass (memory), not the number
    of images a call takes.
    """

    def __init__(self, model, charset: Charset, preprocess: Preprocess, metadata: dict | None = None,
                 batch_size: int = 256):
        if not isinstance(charset, Charset):
            raise UsageError(f"charset must be an xpnet.data.Charset, got {type(charset).__name__}.")
        if not isinstance(preprocess, Preprocess):
            raise UsageError(f"preprocess must be an xpnet.data.Preprocess, got {type(preprocess).__name__}.")
        batch_size = checks.positive_int(batch_size, "batch_size")
        if not model.built:
            model.build(preprocess.shape)
        out = model.output_shape
        if tuple(model.input_shape) != tuple(preprocess.shape):
            raise ModelFileError(f"the model takes inputs {tuple(model.input_shape)} but the preprocessing "
                                 f"makes {preprocess.shape}: the model file's metadata does not fit its network.")
        head = head_of(metadata)
        if head not in HEADS:
            raise ModelFileError(f"the model file has a {head!r} head, which this xpnet cannot decode "
                                 f"(it knows {', '.join(HEADS)}): upgrade xpnet.")
        if head == "ctc":
            units = int(numpy.prod(out)) if out is not None else 0
            if not units or units % (charset.n_classes + 1) or (len(out) == 2 and out[1] != charset.n_classes + 1):
                raise ModelFileError(f"the model has {out} outputs but a CTC reader of charset {charset.chars!r} "
                                     f"needs (T, {charset.n_classes + 1}): one score per character and the blank.")
        elif out is None or int(numpy.prod(out)) != charset.n_outputs:
            raise ModelFileError(f"the model has {out} outputs but charset {charset.chars!r} with length "
                                 f"{charset.length} needs {charset.n_outputs}.")
        self.model, self.charset, self.preprocess = model, charset, preprocess
        self.head = head
        self.metadata = dict(metadata or {})
        # a CTC reader of known text lengths reads the best path of such a length (heads.reading_path)
        self.lengths = read_lengths(self.metadata) if head == "ctc" else None
        self.batch_size = batch_size
        self.path = None

    @classmethod
    def load(cls, path, to: str | None = None, batch_size: int = 256) -> "Recognizer":
        """Read a model file written by ``xpnet train`` (or ``xpnet.save`` with ``metadata_for``).

        The network is rebuilt on backend ``to`` (default: the current one).  An ``.onnx`` file
        (``xpnet export``) runs in onnxruntime instead, with the same preprocessing and decoding.
        """
        if is_onnx_path(path):
            if to not in (None, "numpy"):
                raise UsageError(f"an ONNX reader runs on the CPU (onnxruntime), not on {to}: load the .npz "
                                 f"model to read on {to}.")
            reader = cls(*load_reader(path), batch_size=batch_size)
            reader.path = os.fspath(path)
            return reader
        model, meta = xio.load(path, to=to)
        try:
            cs = Charset.from_dict(meta["charset"])
            pp = Preprocess.from_dict(meta["preprocess"])
        except (KeyError, TypeError, DataError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ModelFileError(
                f"model file {path} is not a CAPTCHA reader ({what} in its metadata): train it with "
                f"`xpnet train`, or save it with metadata=xpnet.captcha.metadata_for(charset, preprocess)."
            ) from None
        reader = cls(model, cs, pp, meta, batch_size)
        reader.path = os.fspath(path)
        return reader

    # ------------------------------------------------------------------ reading
    @property
    def steps(self) -> int | None:
        """A CTC reader's number of columns T (the most characters it can read); None for "bce"."""
        if self.head != "ctc":
            return None
        return int(numpy.prod(self.model.output_shape)) // (self.charset.n_classes + 1)

    def logits(self, images):
        """(N, C, H, W) uint8 images (NumPy or on the model's backend) -> (N, length*K) logits (NumPy);
        (N, T, K + 1) for a CTC reader."""
        images = self._check_images(images)
        params = self.model.parameters()  # none in an ONNX network, which takes NumPy batches
        xp = backend.get_array_module(next(iter(params.values()))) if params else numpy
        parts = []
        for i in range(0, images.shape[0], self.batch_size):
            chunk = images[i:i + self.batch_size]
            chunk = xp.asarray(chunk) if xp is not numpy else backend.to_numpy(chunk)
            with oom_guard(self.model, int(chunk.shape[0]), what="prediction", train=False):
                x = self.preprocess.normalize_batch(chunk, dtype=self.model.dtype)
                parts.append(backend.to_numpy(self.model.forward(x, train=False)))
        if self.head == "ctc":
            shape = (self.steps, self.charset.n_classes + 1)
            if not parts:
                return numpy.zeros((0,) + shape, dtype=backend.get_dtype())
            parts = [p.reshape((p.shape[0],) + shape) for p in parts]
        if not parts:
            return numpy.zeros((0, self.charset.n_outputs), dtype=backend.get_dtype())
        return numpy.concatenate(parts) if len(parts) > 1 else parts[0]

    def predict(self, images, paths=None) -> Prediction:
        """(N, C, H, W) uint8 images, already preprocessed -> ``Prediction``."""
        logits = self.logits(images)
        return self.decode(logits, paths)

    def decode(self, logits, paths=None) -> Prediction:
        """(N, length*K) logits (any backend) -> ``Prediction`` (texts, confidences);
        (N, T, K + 1) logits for a CTC reader (``xpnet.captcha.heads.ctc_decode``)."""
        logits = backend.to_numpy(logits)
        n = logits.shape[0]
        if self.head == "ctc":
            texts, conf, char_conf, idx = ctc_decode(
                logits.reshape(n, self.steps, self.charset.n_classes + 1), self.charset, self.lengths)
            return Prediction(texts=texts, confidences=conf, char_confidences=char_conf, indices=idx,
                              paths=list(paths) if paths is not None else [""] * n)
        blocks = logits.reshape(n, self.charset.length, self.charset.n_classes)
        idx = blocks.argmax(axis=2)
        win = numpy.take_along_axis(blocks, idx[:, :, None], axis=2)[:, :, 0]
        char_conf = sigmoid(win)
        texts = self.charset.decode(idx) if n else []
        return Prediction(texts=texts, confidences=char_conf.prod(axis=1), char_confidences=char_conf,
                          indices=idx.astype(numpy.int64), paths=list(paths) if paths is not None else [""] * n)

    def read_files(self, paths, on_error: str = "raise"):
        """Image files -> ((M, C, H, W) uint8, the M paths read, [(path, reason)] skipped).

        ``on_error="raise"``: the first unreadable file raises a DataError naming it;
        ``"report"``: it is skipped and listed.
        """
        if on_error not in ("raise", "report"):
            raise UsageError(f"on_error must be 'raise' or 'report', got {on_error!r}.")
        paths = [os.fspath(p) for p in paths]
        out = numpy.empty((len(paths),) + self.preprocess.shape, dtype=numpy.uint8)
        used, skipped = [], []
        for p in paths:
            try:
                out[len(used)] = read_image(p, self.preprocess)
                used.append(p)
            except DataError as exc:
                if on_error == "raise":
                    raise
                skipped.append((p, str(exc).removeprefix(f"{p}: ").rstrip(".")))
        return out[:len(used)], used, skipped

    def predict_files(self, paths, on_error: str = "raise") -> Prediction:
        """Read and recognise image files (any size, mode, format Pillow reads)."""
        images, used, skipped = self.read_files(paths, on_error)
        pred = self.predict(images, used)
        pred.skipped = skipped
        return pred

    # --------------------------------------------------------------- evaluating
    def evaluate(self, images, labels, paths=None, skipped=None, top: int = 10) -> Evaluation:
        """Accuracy on (N, C, H, W) uint8 images with their text labels."""
        labels = list(labels)
        images = self._check_images(images)
        if images.shape[0] != len(labels):
            raise UsageError(f"{images.shape[0]} images but {len(labels)} labels.")
        truth = self._ctc_truth(labels) if self.head == "ctc" else self.charset.indices(labels)
        pred = self.predict(images, paths)
        return self.score(pred, truth, skipped, top)

    def score(self, pred: Prediction, truth, skipped=None, top: int = 10) -> Evaluation:
        """Compare a ``Prediction`` with the true (N, length) class indices (a CTC reader: the N
        true texts, or their class indices padded with -1)."""
        if self.head == "ctc":
            return self._score_ctc(pred, truth, skipped, top)
        truth = numpy.asarray(truth, dtype=numpy.int64)
        n = len(pred)
        if n == 0:
            raise DataError("there are no labelled images to evaluate.")
        right_chars = pred.indices == truth
        right = right_chars.all(axis=1)
        mistakes_count = Counter()
        for t, p in zip(truth[~right_chars].tolist(), pred.indices[~right_chars].tolist()):
            mistakes_count[(t, p)] += 1
        ordered = sorted(mistakes_count.items(), key=lambda kv: (-kv[1], kv[0]))
        confused = [(self.charset.chars[t], self.charset.chars[p], c) for (t, p), c in ordered[:top]]
        truth_text = self.charset.decode(truth)
        mistakes = [(pred.paths[i] if pred.paths and pred.paths[i] else f"#{i}", truth_text[i], pred.texts[i],
                     float(pred.confidences[i])) for i in numpy.flatnonzero(~right).tolist()]
        conf = pred.confidences
        return Evaluation(
            n=n, string_accuracy=float(right.mean()), char_accuracy=float(right_chars.mean()),
            position_accuracy=[float(v) for v in right_chars.mean(axis=0)], confused=confused, mistakes=mistakes,
            mean_confidence={"right": float(conf[right].mean()) if right.any() else None,
                             "wrong": float(conf[~right].mean()) if (~right).any() else None},
            skipped=list(skipped or []))

    def _ctc_truth(self, labels) -> list[str]:
        labels = [str(t) for t in labels]
        bad = [f"{t!r}" for t in labels if any(c not in self.charset.chars for c in t)]
        if bad:
            raise DataError(f"{len(bad)} label(s) have characters outside charset {self.charset.chars!r}: "
                            + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") + ".")
        return labels

    def _score_ctc(self, pred: Prediction, truth, skipped, top) -> Evaluation:
        n = len(pred)
        if n == 0:
            raise DataError("there are no labelled images to evaluate.")
        if isinstance(truth, numpy.ndarray) and truth.dtype.kind in "iu":
            table = numpy.array(list(self.charset.chars))
            truth = ["".join(table[row[row >= 0]]) for row in truth]
        truth = self._ctc_truth(truth)
        if len(truth) != n:
            raise UsageError(f"{n} readings but {len(truth)} labels.")
        dist = edit_distances(pred.texts, truth)
        right = numpy.array([p == t for p, t in zip(pred.texts, truth)], dtype=bool)
        same_len = numpy.array([len(p) == len(t) for p, t in zip(pred.texts, truth)], dtype=bool)
        cer = float(dist.sum() / max(1, sum(len(t) for t in truth)))
        mistakes_count = Counter((t, p) for i in numpy.flatnonzero(same_len & ~right).tolist()
                                 for t, p in zip(truth[i], pred.texts[i]) if t != p)
        confused = [(t, p, c) for (t, p), c in sorted(mistakes_count.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
        mistakes = [(pred.paths[i] if pred.paths and pred.paths[i] else f"#{i}", truth[i], pred.texts[i],
                     float(pred.confidences[i])) for i in numpy.flatnonzero(~right).tolist()]
        conf = pred.confidences
        return Evaluation(
            n=n, string_accuracy=float(right.mean()), char_accuracy=max(0.0, 1.0 - cer), position_accuracy=[],
            confused=confused, mistakes=mistakes,
            mean_confidence={"right": float(conf[right].mean()) if right.any() else None,
                             "wrong": float(conf[~right].mean()) if (~right).any() else None},
            skipped=list(skipped or []), char_error_rate=cer, length_accuracy=float(same_len.mean()))

    def evaluate_folder(self, folder, workers: int | None = None, progress: bool | None = None,
                        top: int = 10, labels=None) -> Evaluation:
        """Accuracy on a folder whose file names carry the labels (``xpnet.data.label_from_name``).

        Files that cannot be read, or whose label does not fit the reader's
        charset and length (a CTC reader: any length from 1 to its number of
        columns), are skipped and listed in ``Evaluation.skipped``.  ``labels``: a CSV of
        ``file,label`` rows to take the labels from instead (``xpnet.data.label_files``).
        """
        if self.head == "ctc":
            return self._evaluate_folder_ctc(folder, top, labels)
        data = load_folder(folder, charset=self.charset, preprocess=self.preprocess, on_error="report",
                           workers=workers, progress=progress, labels=labels)
        return self.evaluate(data.images, data.labels, data.paths, data.skipped, top)

    def _evaluate_folder_ctc(self, folder, top, labels_file=None) -> Evaluation:
        used, labels, skipped = [], [], []
        named = None
        if labels_file is not None:
            from ..data.label_files import read_labels

            named, lines, skipped = read_labels(labels_file)
            present = {os.path.basename(p) for p in image_files(folder)}
            name = os.path.basename(os.fspath(labels_file))
            skipped += [(f"{name}:{lines[f]}", f"{f} is not an image file in {folder}") for f in named
                        if f not in present]
        for path in image_files(folder):
            if named is not None and os.path.basename(path) not in named:
                skipped.append((path, f"no usable label for it in {os.path.basename(os.fspath(labels_file))}"))
                continue
            label = named[os.path.basename(path)] if named is not None else label_from_name(path)
            if self.can_read(label):
                used.append(path)
                labels.append(label)
            else:
                skipped.append((path, f"label {label!r} is not 1 to {self.steps} characters "
                                      f"of {self.charset.chars!r}"))
        images, read, unread = self.read_files(used, on_error="report")
        keep = set(read)
        labels = [t for p, t in zip(used, labels) if p in keep]
        if not read:
            raise DataError(f"folder {folder} holds no image this reader can evaluate "
                            f"({len(skipped) + len(unread)} skipped).")
        return self.evaluate(images, labels, read, skipped + unread, top)

    def has_label(self, path) -> bool:
        """Whether a file name carries a label this reader could produce (length and characters fit)."""
        return self.can_read(label_from_name(path))

    def can_read(self, label: str) -> bool:
        """Whether ``label`` is a text this reader could produce (length and characters fit)."""
        if self.head == "ctc":
            return 1 <= len(label) <= self.steps and all(c in self.charset.chars for c in label)
        return not self.charset.check([label])

    # ------------------------------------------------------------------ helpers
    def _check_images(self, images):
        shape = tuple(getattr(images, "shape", ()))
        if len(shape) != 4 or shape[1:] != self.preprocess.shape or getattr(images, "dtype", None) != numpy.uint8:
            raise UsageError(f"the reader takes uint8 images (N,) + {self.preprocess.shape} made by its "
                             f"preprocessing, got {getattr(images, 'dtype', type(images).__name__)} {shape}: "
                             f"use predict_files, or read_image(path, reader.preprocess).")
        return images

    def describe(self) -> str:
        pp = self.preprocess
        return (f"{self.model.name}: {self.charset.length} characters of {self.charset.chars!r}, input "
                f"{pp.channels}x{pp.height}x{pp.width} ({pp.resize}, {pp.normalize}), backend "
                f"{getattr(self.model, 'runtime', None) or self.model.backend or backend.current()}")


def image_files(path) -> list[str]:
    """The image files of a folder (sorted by name, sub-folders not entered), or ``[path]`` for a file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(e.path for e in os.scandir(path)
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...).")
        return files
    return [path]


__all__ = ["Recognizer", "Prediction", "Evaluation", "metadata_for", "image_files", "sigmoid"]
