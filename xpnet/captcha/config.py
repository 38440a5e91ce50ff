"""Named configurations of the CAPTCHA job and the resolved ``Settings`` of one run.

A configuration is plain data (``CONFIGS``); ``resolve_settings`` lays the
user's ``TrainOptions`` over one and returns a frozen ``Settings``, checked once.
Later changes (what the data showed, a resumed run's saved settings) make new
``Settings`` objects; none is ever changed in place.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy

from .. import checks
from ..data.captcha import make_charset
from ..data.distort import Distort, parse_distort
from ..data.label_files import labels_in_folder
from ..data.labels import DIGITS_UPPER, length_text, parse_length
from ..errors import UsageError
from ..nn import models

# --------------------------------------------------------------------------
# Named configurations: plain data.  Change values here to plug in a recipe.

_DEFAULT = {
    "description": "The README's main job on the 2-core CPU (benchmarks/RECIPE.md): synthetic 4-character "
                   "CAPTCHAs (36 classes), the seed's captcha_net at grey 1x32x80 with its output biases at the "
                   "class prior, Adam peaking at 3e-3 (3% warm-up, then cosine to ~0 as the budget runs out), "
                   "batch 64, +-2 px shifts, up to 100,000 pre-generated images; 14.5 minutes for the whole job.",
    # the network and its input
    "model": "captcha_net",        # a name from xpnet.models.MODELS
    "model_kwargs": {},            # extra arguments of that builder (e.g. {"width": 48} for captcha_net_bn)
    "height": 32,                  # input height in pixels
    "width": 80,                   # input width (synthetic); for --data: None = from the images' aspect ratio
    "channels": 1,                 # 1 grey, 3 RGB (grey: the same accuracy for a third of the first conv)
    # the task (synthetic data; a folder infers them unless --charset/--length are given)
    "charset": DIGITS_UPPER,
    "length": 4,                   # characters per label (the longest, when min_length is set)
    "min_length": None,            # the shortest label of a range (--length 4-6); None: one length
    # how outputs become texts: "bce" (one block of sigmoid units per character position, one length),
    # "ctc" (per-column scores, any length) or "auto": CTC for a range of lengths or a mixed-length folder,
    # else fixed_length_head
    "head": "auto",
    "fixed_length_head": "ctc",    # the head that read better at one length in the same budget: 96.70% against
                                   # 92.15% whole-string for 4 characters in 15 minutes (README)
    "ctc": {                       # these settings replace the ones above when the head is CTC
        "model": "captcha_crnn", "model_kwargs": {"batchnorm": True},  # a user's CTC model is kept
        "prior_bias": False,       # the prior is for per-position sigmoid blocks
        "lr": 5e-3,                # validation whole-string after 800 steps on 4-6 characters (quick data):
                                   # 1e-3 64.0%, 3e-3 80.2%, 6e-3 84.6%
    },
    # how long: seconds of wall clock for the whole job; None = until epochs/steps are done
    "time_budget": 870,
    "epochs": None,                # passes over the training set (None: as many as the budget allows)
    "steps": None,                 # optimizer steps in total (None: no step limit)
    "final_reserve": 25,           # seconds of the budget kept for the final evaluation and saving
    # synthetic data
    "data": "pool",                # "pool": pre-generate train_images, then epochs over them;
                                   # "stream": fresh images for every step (workers render them meanwhile)
    "train_images": {"max": 100_000, "budget_fraction": 0.2},
                                   # a count, or {"max": N, "budget_fraction": f}: generate until N images
                                   # or until f * time_budget seconds have gone, whichever comes first
    "stream_epoch_steps": 500,     # with data "stream": steps between validations ("epochs")
    "val_images": 1000,            # validation set (best checkpoint), its own seed
    "test_images": 2000,           # held-out test set (reported), its own seed
    # optimisation
    "batch_size": 64,              # 128 is faster per image in xpnet but learns less per image
    "optimizer": "adam",           # "adamw", "adam" or "sgd" (momentum 0.9, Nesterov)
    "lr": 3e-3,                    # peak learning rate (the best of 1e-3, 2e-3, 3e-3 in benchmarks/RECIPE.md)
    "weight_decay": 0.0,           # AdamW: decoupled; SGD/Adam: L2
    "pct_start": 0.03,             # share of the run spent warming up to the peak rate ...
    "warmup_steps": 250,           # ... and at least this many steps (else short runs stay at the prior)
    "stuck_retry": {"lr_factor": 0.25, "warmup_factor": 2.0},
                                   # a run that learns nothing (training.callbacks.StuckWatch) starts once more
                                   # with the peak rate times lr_factor and a warm-up warmup_factor times as
                                   # long: runs stuck at the prior start too fast ({}: stop instead)
    "div_factor": 25.0,            # start rate = lr / div_factor
    "final_div_factor": 1e4,       # end rate = start rate / final_div_factor
    "clip_norm": None,             # global gradient-norm clipping (None: off)
    "label_smoothing": 0.0,        # eps of captcha.heads.CTCLoss / BCELoss (0: none)
    "prior_bias": True,            # start the output biases at log(p / (1 - p)), p = 1 / n_classes, so that
                                   # the first steps need not learn "mostly no"
    # augmentation, per image, on the device (before normalising)
    "max_shift": 2,                # random shifts of up to this many pixels in x and y
    "max_scale": 0.0,              # random scales in [1 - s, 1 + s] about the centre (0: off)
    "distort": {},                 # stronger per-image distortions (xpnet.data.distort): rotate, shear,
                                   # elastic, noise, blur, contrast (none here: synthetic data is plentiful)
    # --data DIR
    "folder": {                    # these settings replace the ones above for --data runs (options still win)
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "pct_start": 0.03,
        "max_shift": 2, "max_scale": 0.05,   # real sets are small: a little more variety
        "fixed_length_head": "ctc",          # on a 1,000-image development folder of real images, validation
                                             # whole-string 86.3% bce, 100% ctc with look-alike pretraining
        "time_budget": 870,                  # the whole job (pretraining included) in 14.5 minutes; the
                                             # epochs rule (plans.folder_epochs) ends smaller folders first
    },
    "folder_small": {              # folders with fewer training images than "below" get, on top of "folder":
        "below": 5000,
        "batchnorm": True,         # captcha_net with BatchNorm (unless --model is given)
        "max_shift": 3, "max_scale": 0.1,
        "distort": {"rotate": 4, "shear": 0.15, "elastic": 0.8, "noise": 6, "blur": 0.2, "contrast": 0.2},
                                   # on the folder's images only (the look-alikes vary enough; distorted, they
                                   # were learnt slower). Development folders, read on 2,000 other images of their
                                   # kind: lines5 (216 training images) 99.60% against 98.85% without;
                                   # really_simple (144) 99.70% against 99.75% and 99.70% without
        "label_smoothing": 0.1,    # in pretraining and fine-tuning; lines5 (216): 99.85% and 99.90% against
                                   # 99.30% without in the same sitting; really_simple (144): 99.80% against
                                   # 99.70% (mean confidence of right readings ~0.6-0.7 instead of ~0.99)
    },
    "pretrain": {                  # folders with fewer training images than "below": first train on look-alikes
        "below": 5000,             # (xpnet.captcha.pretrain) for "seconds", then fine-tune on the folder
        "images": 20000, "seconds": 240, "lr": 3e-3,
        "budget_share": 0.3,       # never more than this share of the job's time budget
    },
    "pseudo": {                    # --unlabelled DIR: rounds of pseudo-labels (xpnet.captcha.pseudo); the
        "rounds": 2,               # confidence threshold is where validation readings are right >= precision
        "precision": 0.99, "min_count": 10, "epochs": 30, "lr": 1e-3,
    },
    "test_fraction": 0.2,          # held out, reported at the end, never used to choose anything
    "val_fraction": 0.1,           # of the rest: early stopping and the best checkpoint
    "folder_samples": 300_000,     # training samples to see in total (sets the number of epochs)
    "folder_min_epochs": 10,
    "folder_max_epochs": 200,
    "patience": "auto",            # epochs without improvement before stopping; "auto": max(15, epochs / 4)
}

CONFIGS: dict[str, dict] = {
    "default": _DEFAULT,
    "long": {
        **_DEFAULT,
        "description": "The longer recipe: the same network, input and schedule over a 59-minute budget on the 2-core "
                       "CPU (on a GPU: the same configuration with --time-budget 300).  Training images are "
                       "generated on every core until 12% of the budget has gone or 300,000 are made, so a GPU "
                       "box with many cores gets a large set quickly and the GPU never waits for data.",
        "time_budget": 3540,
        "train_images": {"max": 300_000, "budget_fraction": 0.12},
        "final_reserve": 30,
    },
    "quick": {
        **_DEFAULT,
        "description": "A 2-minute smoke run (8,000 images, 1,000 test images): checks the whole pipeline, "
                       "not a good reader.",
        "time_budget": 120,
        "train_images": 8000,
        "val_images": 500,
        "test_images": 1000,
        "final_reserve": 10,
    },
}

SEED_PURPOSES = {"validation": 1, "test": 2, "split": 3}
OPTIMIZERS = ("adamw", "adam", "sgd")
HEADS = ("bce", "ctc")


def get_config(name: str) -> dict:
    """A deep copy of the named configuration; UsageError naming the known ones."""
    if name not in CONFIGS:
        raise UsageError(f"unknown configuration {name!r}: choose one of {', '.join(CONFIGS)}.")
    return copy.deepcopy(CONFIGS[name])


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for ``purpose`` ("validation", "test", "split") derived from ``seed``, never equal to it."""
    s = int(numpy.random.SeedSequence([int(seed), SEED_PURPOSES[purpose]]).generate_state(1, numpy.uint32)[0])
    return s if s != int(seed) else s ^ 1


# --------------------------------------------------------------------------
# What the user asks for, and the settings of a run


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The user's choices on top of a named configuration; None keeps the configuration's value.

    The ``xpnet train`` options of the same names (``data`` is ``--data DIR``);
    messages about bad values name those options.
    """

    config: str = "default"
    data: str | None = None
    labels: str | None = None          # a CSV of file,label rows for --data (default: labels from file names)
    init: str | None = None            # a model file to start from where the networks agree
    folds: int | None = None           # k-fold cross-validation over a --data folder
    pretrain: float | None = None      # seconds of pretraining on look-alikes of a small folder (0: none)
    unlabelled: str | None = None      # a folder of unlabelled images of the same kind, for pseudo-labels
    model: str | None = None
    epochs: int | None = None
    steps: int | None = None
    time_budget: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    charset: str | None = None
    length: int | str | None = None    # 4, or a range "4-6"
    head: str | None = None            # "bce", "ctc"; None: the configuration's ("auto")
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    seed: int | None = None
    distort: str | None = None         # "rotate=4,shear=0.2,..." or "none" (xpnet.data.distort)
    label_smoothing: float | None = None  # eps of the loss's label smoothing (captcha.heads)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything one run uses: a configuration's keys (see ``CONFIGS``) plus the run's own.

    ``config`` names the configuration, ``data_dir`` is the labelled folder (None:
    synthetic data), ``seed`` seeds the training images, weights, order and
    augmentation, and ``train_images_made`` is how many training images a
    synthetic pool turned out to have (a resumed run remakes exactly those).
    ``to_dict()`` is what ``run.json`` and the model file keep.
    """

    description: str
    model: str
    model_kwargs: dict
    height: int
    width: int | None
    channels: int
    charset: str | None
    length: int | None
    time_budget: float | None
    epochs: int | None
    steps: int | None
    final_reserve: float
    data: str
    train_images: int | dict
    stream_epoch_steps: int
    val_images: int
    test_images: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    pct_start: float
    warmup_steps: int
    div_factor: float
    final_div_factor: float
    clip_norm: float | None
    prior_bias: bool
    max_shift: int
    max_scale: float
    folder: dict
    folder_small: dict
    test_fraction: float
    val_fraction: float
    folder_samples: int
    folder_min_epochs: int
    folder_max_epochs: int
    patience: int | str | None
    config: str = "default"
    data_dir: str | None = None
    seed: int = 0
    train_images_made: int | None = None
    min_length: int | None = None      # (keys of later versions: older run.json files lack them)
    head: str = "bce"                  # runs of versions before heads were bce runs (configurations say "auto")
    fixed_length_head: str = "bce"
    ctc: dict = dataclasses.field(default_factory=dict)
    chosen: list = dataclasses.field(default_factory=list)  # keys the user's options set (they always win)
    labels_file: str | None = None     # --labels: the folder's labels from a CSV instead of the file names
    init: str | None = None            # --init: the model file whose matching layers start the run
    folds: int | None = None           # --folds K: K runs, each testing on one K-th of the folder ...
    fold: int | None = None            # ... this run's (0-based)
    pretrain: dict = dataclasses.field(default_factory=dict)  # look-alike pretraining of small folders
    pseudo: dict = dataclasses.field(default_factory=dict)    # rounds of pseudo-labels (--unlabelled)
    unlabelled_dir: str | None = None
    distort: dict = dataclasses.field(default_factory=dict)  # xpnet.data.distort settings (empty: none)
    stuck_retry: dict = dataclasses.field(default_factory=dict)  # how a stuck run starts again (empty: it stops)
    label_smoothing: float = 0.0       # the loss's label smoothing (captcha.heads)

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def required_names(cls) -> set:
        """The fields without a default: every ``run.json`` has them."""
        return {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        """Settings from plain data (a configuration with its run keys, or ``run.json``'s settings)."""
        return cls(**copy.deepcopy(dict(values)))

    def to_dict(self) -> dict:
        """Plain, JSON-safe data; ``train_images_made`` only where a pool was made."""
        d = dataclasses.asdict(self)
        if d["train_images_made"] is None:
            del d["train_images_made"]
        return d

    def replace(self, **changes) -> "Settings":
        """A new ``Settings`` with ``changes``; this one is left as it is."""
        return dataclasses.replace(self, **copy.deepcopy(changes))


def resolve_settings(options: TrainOptions) -> Settings:
    """Configuration + the user's options -> the settings of a run (checked; UsageError on bad values).

    With ``options.data`` the configuration's ``folder`` settings replace its
    synthetic ones first (the options still win), and the charset, length and
    input width are left to the data unless given.
    """
    s = get_config(options.config)
    s["config"] = options.config
    s["data_dir"] = os.path.abspath(options.data) if options.data else None
    if s["data_dir"] is not None:
        s.update(s["folder"])
    if options.labels is not None:
        if s["data_dir"] is None:
            raise UsageError("--labels names the labels of a --data folder: give --data DIR as well.")
        s["labels_file"] = os.path.abspath(options.labels)
    elif s["data_dir"] is not None and labels_in_folder(s["data_dir"]):
        s["labels_file"] = labels_in_folder(s["data_dir"])  # the folder's own labels.csv
    if options.folds is not None:
        if s["data_dir"] is None:
            raise UsageError("--folds cross-validates a --data folder: give --data DIR as well.")
        s["folds"] = checks.integer(options.folds, "--folds", 2, what="at least 2")
    if options.unlabelled is not None:
        if s["data_dir"] is None:
            raise UsageError("--unlabelled adds pseudo-labelled images to a --data folder's run: give --data DIR.")
        if not os.path.isdir(options.unlabelled):
            raise UsageError(f"--unlabelled {options.unlabelled}: no such folder.")
        s["unlabelled_dir"] = os.path.abspath(options.unlabelled)
    if options.pretrain is not None:
        seconds = checks.number(options.pretrain, "--pretrain", allow_zero=True)
        s["pretrain"] = {**s["pretrain"], "seconds": seconds}
    if options.init is not None:
        if not os.path.isfile(options.init):
            raise UsageError(f"--init {options.init}: no such model file.")
        s["init"] = os.path.abspath(options.init)
    if options.model is not None:
        if options.model not in models.MODELS:
            raise UsageError(f"unknown model {options.model!r}: choose one of {', '.join(models.MODELS)}.")
        if options.model != s["model"]:
            s["model_kwargs"] = {}  # the configuration's arguments were for its own model
        s["model"] = options.model
        s["folder_small"] = {**s["folder_small"], "batchnorm": False}  # the user chose the network: keep it
    if options.length is not None:
        lo, hi = parse_length(options.length, "--length")
        s["length"], s["min_length"] = hi, (lo if lo < hi else None)
    for name in ("height", "width", "channels", "batch_size", "epochs", "steps"):
        value = getattr(options, name)
        if value is not None:
            s[name] = checks.positive_int(value, "--" + name.replace("_", "-"))
    if options.channels is not None and options.channels not in (1, 3):
        raise UsageError(f"--channels must be 1 (grey) or 3 (RGB), got {options.channels}.")
    if options.lr is not None:
        s["lr"] = checks.number(options.lr, "--lr")
    if options.distort is not None:
        s["distort"] = parse_distort(options.distort)
    if options.label_smoothing is not None:
        s["label_smoothing"] = checks.number(options.label_smoothing, "--label-smoothing", allow_zero=True)
        if s["label_smoothing"] >= 1:
            raise UsageError(f"--label-smoothing must be below 1, got {options.label_smoothing}.")
    s["seed"] = checks.integer(options.seed, "--seed", 0, optional=True, what="a non-negative integer") or 0
    if s["data_dir"] is not None:
        # a folder infers its task and input width unless told
        s["charset"] = options.charset
        if options.length is None:
            s["length"] = s["min_length"] = None
        if options.width is None:
            s["width"] = None
    elif options.charset is not None:
        s["charset"] = options.charset
    if options.charset is not None:
        make_charset(options.charset, s["length"] or 4)  # checks the characters
    s["chosen"] = sorted(f.name for f in dataclasses.fields(TrainOptions)
                         if f.name in s and f.name not in ("config", "data", "labels", "init", "folds", "pretrain",
                                                           "unlabelled")
                         and getattr(options, f.name) is not None)
    s["head"] = _resolve_head(s, options)
    if s["head"] != "auto":
        s = dict(settings_for_head(Settings.from_dict(s), s["head"]).to_dict())
    if options.epochs is not None or options.steps is not None:
        s["time_budget"] = None  # an explicit length replaces the budget ...
    if options.time_budget is not None:  # ... unless a budget is given as well
        s["time_budget"] = checks.number(options.time_budget, "--time-budget")
    _check_configuration(s, options.config)
    return Settings.from_dict(s)


def model_head(model: str) -> str:
    """The head a model of the zoo reads with ("bce" unless its builder says otherwise)."""
    return getattr(models.MODELS[model], "head", "bce")


def _resolve_head(s: dict, options: TrainOptions) -> str:
    """"bce", "ctc", or "auto" where only a folder's labels can tell (UsageError on contradictions)."""
    head = s.get("head", "auto") if options.head is None else options.head
    if head not in HEADS + ("auto",):
        raise UsageError(f"--head must be bce or ctc, got {head!r}.")
    if options.model is not None:
        own = model_head(options.model)
        if options.head is not None and options.head != own:
            others = [m for m in models.MODELS if model_head(m) == options.head]
            raise UsageError(f"--model {options.model} reads with the {own} head, not --head {options.head}: "
                             f"drop one of them (models for {options.head}: {', '.join(others)}).")
        head = own
    ranged = s["min_length"] is not None
    if head == "bce" and ranged:
        raise UsageError(f"--length {s['min_length']}-{s['length']} is a range of lengths, which the bce head "
                         f"cannot read (one block of outputs per character position): use --head ctc.")
    if head == "auto" and (s["data_dir"] is None or s["length"] is not None):
        head = "ctc" if ranged else s["fixed_length_head"]
    return head


def head_for_labels(settings: "Settings", charset) -> str:
    """The head of a run once its labels are known: the settings' unless "auto"; then CTC for a range
    of lengths, else the settings' ``fixed_length_head``.  UsageError for a bce head asked to read a range."""
    head = settings.head
    if head == "auto":
        head = settings.fixed_length_head if charset.fixed else "ctc"
    if head == "bce" and not charset.fixed:
        raise UsageError(f"the labels have {charset.lengths} characters, which the bce head cannot read (one "
                         f"block of outputs per character position): use --head ctc, or --length N to keep the "
                         f"labels of one length.")
    return head


def settings_for_head(settings: "Settings", head: str) -> "Settings":
    """``settings`` with its head decided: a CTC run takes the ``ctc`` settings (a CTC model the user
    chose is kept, and so is every other setting the user's options set).  Returns new settings."""
    changes = {"head": head}
    if head == "ctc":
        ctc = {k: v for k, v in (settings.ctc or {}).items() if k not in (settings.chosen or ())}
        if model_head(settings.model) == "ctc":  # the user's own CTC model: keep it and its arguments
            ctc.pop("model", None)
            ctc.pop("model_kwargs", None)
        changes.update(ctc)
    return settings.replace(**changes)


def _check_configuration(s: dict, name: str) -> None:
    if s["model"] not in models.MODELS:
        raise UsageError(f"configuration {name!r} names an unknown model {s['model']!r}: choose one of "
                         f"{', '.join(models.MODELS)}.")
    if s["optimizer"] not in OPTIMIZERS:
        raise UsageError(f"configuration {name!r} names an unknown optimizer {s['optimizer']!r}: "
                         "use adamw, adam or sgd.")
    if s["data"] not in ("pool", "stream"):
        raise UsageError(f"configuration {name!r} has data {s['data']!r}: use 'pool' or 'stream'.")
    Distort.from_dict(s.get("distort"))
    retry = s.get("stuck_retry") or {}
    if retry and not (set(retry) == {"lr_factor", "warmup_factor"} and 0 < float(retry["lr_factor"]) <= 1
                      and float(retry["warmup_factor"]) >= 1):
        raise UsageError(f"configuration {name!r} has stuck_retry {retry!r}: use {{}} or lr_factor in (0, 1] and "
                         "warmup_factor >= 1.")
    Distort.from_dict((s.get("folder_small") or {}).get("distort"))
    if not 0.0 <= float(s.get("label_smoothing") or 0.0) < 1.0:
        raise UsageError(f"configuration {name!r} has label_smoothing {s['label_smoothing']!r}: use a value in [0, 1).")


# Options that define a run: a resumed run must keep them (option name -> settings key).
_DEFINING = {"model": "model", "height": "height", "width": "width", "channels": "channels",
             "charset": "charset", "length": "length", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
             "data": "data_dir", "config": "config", "head": "head", "labels": "labels_file"}
_OPTION_NAMES = {"data": "--data", "batch_size": "--batch-size"}


def merge_resume(settings: Settings, saved: dict, options: TrainOptions, where: str = "run.json") -> Settings:
    """The settings of a resumed run: ``saved`` (its ``run.json`` settings), with raised limits.

    An option that would change the run (a model, input size, seed, ...) other
    than the saved one is refused; new ``--epochs``/``--steps``/``--time-budget``
    replace all three limits with ``settings``' (the freshly resolved ones).
    Neither argument is changed.
    """
    for option, key in _DEFINING.items():
        value = getattr(options, option)
        if option == "data":
            value = settings.data_dir if options.data else None
        elif option == "labels":
            value = settings.labels_file if options.labels else None
        elif option == "length" and value is not None:
            lo, hi = parse_length(value, "--length")
            if (saved.get("min_length") or saved.get("length"), saved.get("length")) == (lo, hi):
                continue
            value = length_text(lo, hi)
        elif option == "config" and value == "default":
            value = None
        if value is not None and saved.get(key) != value:
            name = _OPTION_NAMES.get(option, "--" + option)
            raise UsageError(f"{name} {value} differs from the run's {saved.get(key)!r} in {where}: drop it "
                             f"to resume, or start a new run in another folder.")
    merged = dict(saved)
    if options.epochs is not None or options.steps is not None or options.time_budget is not None:
        for key in ("time_budget", "epochs", "steps"):  # the limits may be raised on resume
            merged[key] = getattr(settings, key)
    return Settings.from_dict(merged)


__all__ = ["CONFIGS", "SEED_PURPOSES", "OPTIMIZERS", "HEADS", "model_head", "head_for_labels",
           "settings_for_head", "get_config", "derive_seed", "TrainOptions", "Settings",
           "resolve_settings", "merge_resume"]
