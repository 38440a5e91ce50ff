"""Data plans of the CAPTCHA job: where the training, validation and test images come from.

Synthetic (no ``--data``): three sets from seeds of their own (``derive_seed``):
training images pre-generated on every core (or streamed fresh for every step),
validation images that pick the best checkpoint, and held-out test images that
are evaluated once, at the end.  A labelled folder: a seeded split into
training, validation and held-out test parts, and a number of epochs and a
patience that scale with the data (``folder_epochs``, ``folder_patience``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy

from .. import checks
from ..data.captcha import CaptchaStream, check_seed, generate_captchas, make_charset
from ..data.folder import LabelledImages, fold_indices, load_folder, split_indices, suggest_preprocess
from ..data.images import Preprocess
from ..data.label_files import labels_source
from ..data.labels import Charset
from ..errors import DataError, UsageError
from ..nn import serialization as xio
from .config import CONFIGS, Settings, derive_seed, head_for_labels, settings_for_head
from .heads import columns_needed, ctc_targets
from .network import ctc_columns

NO_EPOCH_LIMIT = 10 ** 6   # "epochs" of a run that the budget or the step limit ends


@dataclasses.dataclass
class DataPlan:
    """The data of one run, ready for the trainer.

    charset, preprocess  the task and the model's input (C, H, W)
    n_train              training images (a stream: images per "epoch")
    describe             JSON-safe summary, kept in ``run.json`` as ``data``
    val                  (images uint8 (N, C, H, W), targets): multi-hot uint8 (N, length * K) for the
                         bce head, packed int64 (N, 1 + length) for CTC (``heads.ctc_targets``)
    test                 (images, labels, paths or None): held out, evaluated once at the end
    test_name            how the reports name the test set
    learned              settings the data decided (input width, charset, head, ...), for ``Settings.replace``
    streams              whether training batches are made fresh for every step
    head                 "bce" or "ctc": how the targets are coded
    """

    charset: Charset
    preprocess: Preprocess
    n_train: int
    describe: dict
    val: tuple
    test: tuple
    test_name: str
    learned: dict
    streams: bool = False
    head: str = "bce"
    val_labels: list | None = None        # the validation texts (for choosing pseudo-label thresholds)

    def targets(self, labels):
        """The training targets of text ``labels`` for this plan's head (NumPy)."""
        return targets_for(self.head, labels, self.charset)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.n_train // batch_size)

    def train_source(self, batch_size: int, first_batch: int = 0):
        """What ``Trainer.fit`` trains on: ``(images, targets)`` arrays, or an endless ``StreamBatches``."""
        raise NotImplementedError

    def epochs_and_patience(self, settings: Settings, steps_per_epoch: int):
        """(epochs, patience or None) of the run."""
        raise NotImplementedError


@dataclasses.dataclass
class SyntheticPlan(DataPlan):
    train: LabelledImages | None = None   # None: a stream
    seed: int = 0
    workers: int | None = None
    epoch_steps: int = 0                  # a stream's steps between validations

    def steps_per_epoch(self, batch_size: int) -> int:
        return int(self.epoch_steps) if self.streams else super().steps_per_epoch(batch_size)

    def train_source(self, batch_size: int, first_batch: int = 0):
        if self.streams:
            stream = CaptchaStream(batch_size, self.seed, self.charset, preprocess=self.preprocess,
                                   workers=self.workers, start_batch=first_batch)
            return StreamBatches(stream, self.targets)
        return self.train.images, self.targets(self.train.labels)

    def epochs_and_patience(self, settings: Settings, steps_per_epoch: int):
        if settings.epochs:
            return int(settings.epochs), None
        if settings.time_budget is None and settings.steps is None:
            raise UsageError("nothing limits this run: give --epochs, --steps or --time-budget.")
        return NO_EPOCH_LIMIT, None


@dataclasses.dataclass
class FolderPlan(DataPlan):
    train: LabelledImages | None = None

    def train_source(self, batch_size: int, first_batch: int = 0):
        return self.train.images, self.targets(self.train.labels)

    def epochs_and_patience(self, settings: Settings, steps_per_epoch: int):
        epochs = settings.epochs or folder_epochs(self.n_train, settings)
        return epochs, folder_patience(epochs, settings)


def prepare_data(settings: Settings, out: Path, workers=None, progress=None, log=print) -> DataPlan:
    """The plan of ``settings``: synthetic images, or the labelled folder ``settings.data_dir``."""
    if settings.data_dir is None:
        return prepare_synthetic(settings, workers, progress, log)
    return prepare_folder(settings, out, workers, progress, log)


def prepare_synthetic(settings: Settings, workers=None, progress=None, log=print) -> SyntheticPlan:
    """Generate the validation and test sets and (unless streaming) the training pool."""
    cs = make_charset(settings.charset, (settings.min_length or settings.length, settings.length))
    pp = Preprocess(height=settings.height, width=settings.width or 80, channels=settings.channels)
    head = head_for_labels(settings, cs)
    if head == "ctc":
        _check_ctc_fits(settings_for_head(settings, head), cs, pp)
    seed = check_seed(settings.seed)
    val_seed, test_seed = derive_seed(seed, "validation"), derive_seed(seed, "test")
    t = time.monotonic()
    streams = settings.data == "stream"
    train, learned = None, {}
    if not streams:
        spec = settings.train_images_made or settings.train_images
        train = pregenerate(spec, seed, cs, pp, workers, progress, settings.time_budget, log)
        learned["train_images_made"] = len(train)
    val = generate_captchas(settings.val_images, val_seed, cs, preprocess=pp, workers=workers, progress=progress)
    test = generate_captchas(settings.test_images, test_seed, cs, preprocess=pp, workers=workers,
                             progress=progress)
    n_train = len(train) if train is not None else settings.stream_epoch_steps * settings.batch_size
    log(f"synthetic {cs.lengths}-character CAPTCHAs over {cs.n_classes} classes at "
        f"{pp.channels}x{pp.height}x{pp.width}: "
        + (f"{len(train):,} training images (seed {seed})" if train is not None
           else f"fresh training images from seed {seed}")
        + f", {len(val):,} validation (seed {val_seed}), {len(test):,} test (seed {test_seed}); "
          f"{time.monotonic() - t:.0f} s")
    describe = {"kind": "synthetic", "generator": "captcha 0.7.1", "train_seed": seed, "val_seed": val_seed,
                "test_seed": test_seed, "train_images": len(train) if train is not None else "stream",
                "val_images": len(val), "test_images": len(test)}
    return SyntheticPlan(
        charset=cs, preprocess=pp, n_train=n_train, describe=describe,
        val=(val.images, targets_for(head, val.labels, cs)), test=(test.images, test.labels, None),
        test_name=f"{len(test):,} held-out generated images, seed {test_seed}", learned={**learned, "head": head},
        streams=streams, head=head, train=train, seed=seed, workers=workers, epoch_steps=settings.stream_epoch_steps)


def prepare_folder(settings: Settings, out: Path, workers=None, progress=None, log=print) -> FolderPlan:
    """Read the labelled folder, list what was skipped (``out/skipped.txt``) and split it by seed.

    Label = file name up to ``_`` or ``.``; charset and length inferred unless
    given; input width from the images' median aspect ratio unless given.
    ``test_fraction`` is held out; ``val_fraction`` of the rest picks the best
    checkpoint and stops early.
    """
    folder = settings.data_dir
    t = time.monotonic()
    if settings.width is None:
        pp = suggest_preprocess(folder, height=settings.height, channels=settings.channels)
    else:
        pp = Preprocess(height=settings.height, width=settings.width, channels=settings.channels)
    length = None if settings.length is None else (settings.min_length or settings.length, settings.length)
    if getattr(settings, "labels_file", None):
        log(labels_source(settings.labels_file, folder))
    data = load_folder(folder, charset=settings.charset, length=length, preprocess=pp,
                       workers=workers, progress=progress, labels=getattr(settings, "labels_file", None))
    cs = data.charset
    head = head_for_labels(settings, cs)
    if head == "ctc":
        data = _drop_unreadable(data, settings_for_head(settings, head), pp)
        cs = data.charset
    summary = data.summary().splitlines()
    log("\n".join(summary[:12]) + (f"\n  ... ({len(summary) - 12} more lines in {Path(out) / 'skipped.txt'})"
                                   if len(summary) > 12 else ""))
    if data.skipped:
        text = "".join(f"{p}\t{r}\n" for p, r in data.skipped).encode("utf-8")
        xio.atomic_write(Path(out) / "skipped.txt", lambda f: f.write(text), "list of skipped files")
    n = len(data)
    if n < 10:
        raise DataError(f"only {n} usable labelled image(s) in {folder}: at least 10 are needed to train, "
                        f"validate and test.")
    split_seed = derive_seed(settings.seed, "split")
    folds = getattr(settings, "folds", None)
    if folds:  # cross-validation: this run tests on its fold, one K-th of the folder
        rest, test_idx = fold_indices(n, settings.fold or 0, folds, split_seed)
    else:
        rest, test_idx = split_indices(n, settings.test_fraction, split_seed)
    tr, va = split_indices(len(rest), settings.val_fraction, split_seed + 1)
    train, val, test = data.subset(rest[tr]), data.subset(rest[va]), data.subset(test_idx)
    log(f"input {pp.channels}x{pp.height}x{pp.width}; split (seed {split_seed}): {len(train):,} train, "
        f"{len(val):,} validation, {len(test):,} test; {time.monotonic() - t:.0f} s")
    describe = {"kind": "folder", "folder": folder, "labels": settings.labels_file or "file names",
                "images": n, "skipped": len(data.skipped),
                "split_seed": split_seed, "train": len(train), "val": len(val), "test": len(test),
                "test_fraction": settings.test_fraction, "val_fraction": settings.val_fraction}
    if folds:
        describe.update(fold=(settings.fold or 0) + 1, folds=folds, test_fraction=len(test) / n)
    return FolderPlan(
        charset=cs, preprocess=pp, n_train=len(train), describe=describe,
        val=(val.images, targets_for(head, val.labels, cs)), test=(test.images, test.labels, test.paths),
        test_name=(f"{len(test):,} held-out images of {folder} (fold {(settings.fold or 0) + 1} of {folds})" if folds
                   else f"{len(test):,} held-out images of {folder} ({settings.test_fraction:.0%} split)"),
        learned={"width": pp.width, "charset": cs.chars, "length": cs.length,
                 "min_length": None if cs.fixed else cs.min_length, "head": head},
        head=head, train=train, val_labels=list(val.labels))


def targets_for(head: str, labels, charset: Charset):
    """Training targets of text ``labels``: multi-hot uint8 (N, length * K) for "bce", packed int64
    (N, 1 + length) for "ctc" (``heads.ctc_targets``)."""
    if head == "ctc":
        return ctc_targets(labels, charset, width=charset.length)
    return charset.encode(labels, numpy.uint8)


def _check_ctc_fits(settings: Settings, cs: Charset, pp: Preprocess) -> None:
    """Refuse synthetic labels that the CTC model could fail to emit (the longest with every
    neighbour repeated needs 2 * length - 1 columns)."""
    t = ctc_columns(settings.model, cs, pp, settings.model_kwargs)
    if 2 * cs.length - 1 > t:
        raise UsageError(f"labels of up to {cs.length} characters can need {2 * cs.length - 1} columns (repeated "
                         f"neighbours are kept apart by a blank), but {settings.model} reads {t} at input width "
                         f"{pp.width}: give a larger --width (or a shorter --length).")


def _drop_unreadable(data: LabelledImages, settings: Settings, pp: Preprocess) -> LabelledImages:
    """``data`` without the labels a CTC model over its columns cannot emit, each added to the skipped list."""
    t = ctc_columns(settings.model, data.charset, pp, settings.model_kwargs)
    need = numpy.array([columns_needed(text) for text in data.labels])
    bad = numpy.flatnonzero(need > t)
    if not len(bad):
        return data
    keep = numpy.flatnonzero(need <= t)
    if not len(keep):
        raise DataError(f"no label in {settings.data_dir} fits the {t} columns {settings.model} reads at input "
                        f"width {pp.width}: give a larger --width.")
    reasons = [(data.paths[i], f"label {data.labels[i]!r} needs {need[i]} columns but {settings.model} reads {t} "
                               f"at input width {pp.width} (give a larger --width to read it)") for i in bad]
    kept = data.subset(keep)
    kept.skipped = sorted(data.skipped + reasons)
    kept.ignored = data.ignored
    if settings.length is None:  # lengths inferred from the labels: from those kept
        found = [len(text) for text in kept.labels]
        kept.charset = Charset(data.charset.chars, max(found), min(found))
    return kept


# --------------------------------------------------------------------------
# Rules that scale with a folder's size


def _default_settings() -> Settings:
    return Settings.from_dict(CONFIGS["default"])


def folder_epochs(n_train: int, settings: Settings | None = None) -> int:
    """Epochs for ``n_train`` training images: clamp(ceil(folder_samples / n_train), min, max).

    With the defaults (300,000 samples, 10..200 epochs): 720 training images
    train 200 epochs, 7,168 train 42, 72,000 train 10.
    """
    s = settings or _default_settings()
    return int(min(s.folder_max_epochs, max(s.folder_min_epochs, -(-s.folder_samples // max(1, n_train)))))


def folder_patience(epochs: int, settings: Settings | None = None):
    """Epochs without a better validation result before stopping: ``patience``, "auto" = max(15, epochs / 4)."""
    s = settings or _default_settings()
    p = s.patience
    if p is None:
        return None
    if p == "auto":
        return max(15, -(-int(epochs) // 4))
    return checks.positive_int(p, "patience")


def for_small_folder(settings: Settings, n_train: int):
    """``(settings, message or None)``: a folder with fewer training images than ``folder_small["below"]``
    gets its stronger augmentation, label smoothing and, for a plain captcha_net, BatchNorm (small sets need
    them; large ones do as well without them and train faster).  Returns new settings; ``settings`` is unchanged."""
    small = settings.folder_small or {}
    if settings.data_dir is None or not small or n_train >= small["below"]:
        return settings, None
    changes = {"max_shift": small["max_shift"], "max_scale": small["max_scale"]}
    said = f"shifts of up to {small['max_shift']} px and scales of up to {small['max_scale']:.0%}"
    if small.get("distort") and "distort" not in (settings.chosen or ()):
        changes["distort"] = dict(small["distort"])
        said += ", distortions " + ", ".join(f"{k} {v:g}" for k, v in small["distort"].items())
    if small.get("label_smoothing") and "label_smoothing" not in (settings.chosen or ()):
        changes["label_smoothing"] = float(small["label_smoothing"])
        said += f", label smoothing {small['label_smoothing']:g}"
    kwargs = settings.model_kwargs or {}
    if small["batchnorm"] and settings.model == "captcha_net" and "batchnorm" not in kwargs:
        changes["model_kwargs"] = {**kwargs, "batchnorm": True}
        said = "captcha_net with BatchNorm (about twice the step time; --model captcha_net keeps it plain) and " + said
    return settings.replace(**changes), f"fewer than {small['below']:,} training images: {said}"


# --------------------------------------------------------------------------
# Training images


def pregenerate(spec, seed: int, charset: Charset, pp: Preprocess, workers, progress, time_budget, log,
                chunk: int = 256):
    """Training images of ``seed``: ``spec`` images, or ``{"max": N, "budget_fraction": f}``.

    With a dict, images are made on ``workers`` processes in chunks until N exist
    or ``f * time_budget`` seconds have gone; the set is images 0..M-1 of the seed
    whatever M is, so a resumed run regenerates exactly the same M images.  Workers
    render ``chunk`` images at a time (at least one chunk is made).
    """
    if isinstance(spec, dict):
        limit = int(spec["max"])
        seconds = None if time_budget is None else float(spec["budget_fraction"]) * float(time_budget)
    else:
        limit, seconds = int(spec), None
    if limit < 1:
        raise UsageError(f"train_images must be at least 1, got {limit}.")
    if seconds is None:
        return generate_captchas(limit, seed, charset, preprocess=pp, workers=workers, progress=progress)
    from tqdm import tqdm

    chunk = min(int(chunk), limit)
    images = numpy.empty((limit,) + pp.shape, dtype=numpy.uint8)
    labels: list[str] = []
    t0 = time.monotonic()
    disable = None if progress is None else not progress
    with CaptchaStream(chunk, seed, charset, preprocess=pp, workers=workers, prefetch=2) as stream, \
            tqdm(total=limit, desc="generating", unit="img", disable=disable, leave=False) as bar:
        while len(labels) < limit and (not labels or time.monotonic() - t0 < seconds):
            x, texts = next(stream)
            take = min(len(texts), limit - len(labels))
            images[len(labels):len(labels) + take] = x[:take]
            labels += texts[:take]
            bar.update(take)
    n = len(labels)
    log(f"generated {n:,} training images in {time.monotonic() - t0:.0f} s "
        f"({'the limit' if n >= limit else f'{seconds:.0f} s of the budget'})")
    return LabelledImages(images=images[:n], labels=labels, charset=charset, preprocess=pp, paths=[""] * n,
                          meta={"seed": seed})


class StreamBatches:
    """Fresh synthetic batches for the trainer: ``(images uint8, targets)`` forever."""

    def __init__(self, stream: CaptchaStream, targets):
        self.stream, self.targets = stream, targets  # targets: labels -> the head's target array

    def close(self):
        """Stop the stream's worker processes."""
        self.stream.close()

    def __iter__(self):
        return self

    def __next__(self):
        images, labels = next(self.stream)
        return images, self.targets(labels)


def stream_start(checkpoint_dir) -> int:
    """The step of the newest checkpoint in ``checkpoint_dir`` (0 when none): where a stream resumes."""
    path = xio.latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if path is None:
        return 0
    return int((xio.read_header(path).get("train_state") or {}).get("step", 0))


__all__ = ["DataPlan", "SyntheticPlan", "FolderPlan", "prepare_data", "prepare_synthetic", "prepare_folder",
           "folder_epochs", "folder_patience", "for_small_folder", "pregenerate", "StreamBatches", "stream_start",
           "NO_EPOCH_LIMIT", "targets_for"]
