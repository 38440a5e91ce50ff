"""Train a CAPTCHA reader end to end: ``xpnet train`` and ``examples/train.py``.

    python examples/train.py                       # synthetic data, the 'default' configuration
    python examples/train.py --data my_captchas/   # your own labelled images (file name = text)
    python examples/train.py --config long         # the 60-minute CPU recipe

Two pipelines share one model/optimizer/trainer set-up:

**Synthetic** (no ``--data``): images from the ``captcha`` package
(``xpnet.data``), reproducible by seed.  Three independent sets, each from
its own seed (``derive_seed``):

* training: images of seed ``S`` (``--seed``), pre-generated in parallel on
  every CPU core (``train_images``; a count, or sized to the time budget), or
  drawn fresh for every step (``data: "stream"``);
* validation (``val_images``, seed ``derive_seed(S, "validation")``): watched
  after every epoch, picks the best checkpoint (highest whole-string accuracy;
  among equals -- e.g. 100% -- the lowest validation loss);
* test (``test_images``, 2,000 by default, seed ``derive_seed(S, "test")``):
  never seen in training nor used to choose anything; whole-string and
  per-character accuracy on it are the reported result.

**A labelled folder** (``--data DIR``): ``xpnet.data.load_folder`` (label =
file name up to ``_`` or ``.``; charset and length inferred unless given;
every skipped file reported and listed in ``skipped.txt``), input size from
``suggest_preprocess`` (the configuration's height, the images' median aspect
ratio) unless ``--width`` is given, and a seeded split: ``test_fraction``
(20%) is held out and reported at the end only; ``val_fraction`` (10%) of the
rest is the validation set for early stopping and the best checkpoint.
The configuration's ``folder`` settings replace its synthetic ones (Adam 1e-3,
3% warm-up then cosine, shifts of up to 2 px and scales of up to 5% per image
on the device, no time budget), and training length scales with the data
(``folder_epochs``):

    epochs   = clamp(ceil(folder_samples / n_train), folder_min_epochs, folder_max_epochs)
    patience = max(15, ceil(epochs / 4))       (epochs without a better validation whole-string accuracy,
                                                or an equal one with a lower validation loss)

With the defaults (300,000 samples, 10..200 epochs): 1,000 images (720 of
them for training) train 200 epochs, 7,168 train 42 epochs, 100,000 (72,000)
10 epochs.  Below ``folder_small["below"]`` (5,000) training images the
default captcha_net gets BatchNorm (``captcha_net(batchnorm=True)``) and
stronger augmentation (shifts of up to 3 px, scales of up to 10%): small sets
need both (benchmarks/RECIPE.md; 1,000 real images: 79.0% whole-string with
BatchNorm and the large-set augmentation, 83.5% with both), large ones do as
well without them and train twice as fast.

Every run writes into its output folder (printed at the start and the end;
default ``runs/captcha-<timestamp>``, never an existing run unless
``--resume``): ``model.npz`` (the reader: weights + metadata -- charset,
length, preprocessing, model name, configuration, seeds, results),
``best.npz``, ``checkpoints/``, ``history.csv`` / ``history.json`` /
``history.png`` (per-epoch loss and validation accuracy, with elapsed time),
``run.json`` (the resolved settings) and ``results.json`` (the test
evaluation).

Time budget: ``time_budget`` is wall-clock seconds for the whole job (data
preparation, training, final evaluation).  Training gets what preparation
left, less ``final_reserve``; the learning rate follows a one-cycle schedule
over the *fraction of the budget used* (``ProgressOneCycle``), so the rate is
annealed exactly when the budget runs out whatever the machine's speed; the
trainer then stops cleanly, keeps the best checkpoint, evaluates and saves.
``--epochs``/``--steps`` replace the configuration's budget (add
``--time-budget`` to cap them too).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy

from .. import backend
from ..nn import models, optim
from ..nn import serialization as xio
from ..data import folder as data_folder
from ..data.augment import augment
from ..data.captcha import CaptchaStream, check_seed, generate_captchas, make_charset
from ..data.folder import load_folder, split_indices, suggest_preprocess
from ..data.images import Preprocess
from ..data.labels import DIGITS_UPPER, Charset
from ..errors import DataError, ShapeError, UsageError
from ..metrics import multilabel_metrics
from .recognizer import Recognizer, metadata_for
from ..training.trainer import Trainer

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
    "length": 4,
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
    "batch_size": 64,              # 128 is ~20% faster per image in xpnet but learns less per image
    "optimizer": "adam",           # "adamw", "adam" or "sgd" (momentum 0.9, Nesterov)
    "lr": 3e-3,                    # peak learning rate (1e-3 / 2e-3 / 3e-3 measured 0.79 / 0.86 / 0.88)
    "weight_decay": 0.0,           # AdamW: decoupled; SGD/Adam: L2
    "pct_start": 0.03,             # share of the run spent warming up to the peak rate ...
    "warmup_steps": 250,           # ... and at least this many steps (else short runs stay at the prior)
    "div_factor": 25.0,            # start rate = lr / div_factor
    "final_div_factor": 1e4,       # end rate = start rate / final_div_factor
    "clip_norm": None,             # global gradient-norm clipping (None: off)
    "prior_bias": True,            # start the output biases at log(p / (1 - p)), p = 1 / n_classes, so that
                                   # the first steps need not learn "mostly no" (0.910 against 0.899)
    # augmentation, per image, on the device (before normalising)
    "max_shift": 2,                # random shifts of up to this many pixels in x and y
    "max_scale": 0.0,              # random scales in [1 - s, 1 + s] about the centre (0: off)
    # --data DIR
    "folder": {                    # these settings replace the ones above for --data runs (options still win)
        "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "pct_start": 0.03,
        "max_shift": 2, "max_scale": 0.05,   # real sets are small: a little more variety
        "time_budget": None,                 # the epochs rule below decides
    },
    "folder_small": {              # folders with fewer training images than "below" get, on top of "folder":
        "below": 5000,
        "batchnorm": True,         # captcha_net with BatchNorm (unless --model is given)
        "max_shift": 3, "max_scale": 0.1,
    },
    "test_fraction": 0.2,          # held out, reported at the end, never used to choose anything
    "val_fraction": 0.1,           # of the rest: early stopping and the best checkpoint
    "folder_samples": 300_000,     # training samples to see in total (sets the number of epochs, see above)
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
RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
# Options that define a run: a resumed run must keep them.


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
# The learning-rate schedule that follows the budget


class ProgressOneCycle(optim.Schedule):
    """One-cycle learning rate over the *fraction of the run done* rather than a step count.

    ``progress()`` returns that fraction in [0, 1] (``Trainer.fraction_done``: the
    largest of steps / planned steps and time / time budget).  Rate: cosine
    rise from ``max_lr / div_factor`` to ``max_lr`` over the warm-up, then cosine
    fall to ``max_lr / div_factor / final_div_factor`` at 1.  With a time budget
    the rate is therefore annealed when the budget runs out, however fast the
    machine is.

    The warm-up lasts ``pct_start`` of the run **and at least ``warmup_steps``
    updates**: a short budget or a slow machine must not reach the peak rate in a
    few dozen steps, because then the network stays on the plateau where every
    output predicts the class prior (measured: 848 steps at 3e-3 reached after 30
    steps learned nothing; the same run with a 250-step warm-up reached 34%
    whole-string).  As a fraction of the run the warm-up is
    ``w = max(pct_start, warmup_steps * fraction / step)`` (the step count's share
    of the projected total), so the schedule needs no state beyond the step and
    the fraction, and a resumed run continues it exactly.  The warm-up never
    takes more than half the run (``MAX_WARMUP``), so a short run still anneals.
    """

    MAX_WARMUP = 0.5

    def __init__(self, max_lr: float, pct_start: float = 0.25, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, progress=None, warmup_steps: int = 0):
        self.max_lr = optim._positive(max_lr, "max_lr")
        self.pct_start = float(pct_start)
        if not 0.0 < self.pct_start < 1.0:
            raise UsageError(f"pct_start must be between 0 and 1 (exclusive), got {pct_start!r}.")
        self.div_factor = optim._positive(div_factor, "div_factor")
        self.final_div_factor = optim._positive(final_div_factor, "final_div_factor")
        self.warmup_steps = optim._count(warmup_steps, "warmup_steps", minimum=0)
        self.progress = progress

    def __call__(self, step):
        f = min(1.0, max(0.0, float(self.progress()))) if self.progress is not None else 0.0
        step = max(0, int(step))
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor
        up = f / self.pct_start
        w = self.pct_start
        if self.warmup_steps:
            # the slower of the two measures, but never past half the run
            up = max(min(up, step / self.warmup_steps), f / self.MAX_WARMUP)
            if step > 0:
                w = min(self.MAX_WARMUP, max(w, self.warmup_steps * f / step))
        if up < 1.0:
            return optim.OneCycle._anneal(start, self.max_lr, up)
        return optim.OneCycle._anneal(self.max_lr, end, (f - w) / (1.0 - w))

    def _config(self):
        return {"max_lr": self.max_lr, "pct_start": self.pct_start, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "warmup_steps": self.warmup_steps}


# --------------------------------------------------------------------------
# Command-line options (one parser for `xpnet train` and examples/train.py)


def _default_out() -> str:
    return os.path.join("runs", "captcha-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training option to ``p`` (used by ``xpnet train`` and ``examples/train.py``)."""
    d = CONFIGS["default"]
    p.add_argument("--data", metavar="DIR", default=None,
                   help="train on your own folder of labelled images (label = file name up to '_' or '.', e.g. "
                        "2A2X.png, 2A2X_17.png); split 80/20 into train/test, 10%% of train for validation "
                        "(default: generate synthetic CAPTCHAs)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder for the model, history, plot and checkpoints; an existing run is never "
                        "overwritten (default: runs/captcha-<date>-<time>, a new folder)")
    p.add_argument("--config", metavar="NAME", default="default",
                   help=f"named configuration: {', '.join(f'{k}' for k in CONFIGS)}; see "
                        f"xpnet.captcha_train.CONFIGS (default: default)")
    p.add_argument("--epochs", type=int, metavar="N", default=None,
                   help="passes over the training set; replaces the configuration's time budget (default: "
                        "synthetic: as many as the time budget allows; --data: by the data size, from "
                        f"{d['folder_min_epochs']} to {d['folder_max_epochs']} epochs)")
    p.add_argument("--steps", type=int, metavar="N", default=None,
                   help="optimizer steps in total; replaces the configuration's time budget (default: no limit)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", default=None,
                   help="wall-clock limit for the whole job (data, training, evaluation); training stops "
                        f"cleanly when it is reached (default: the configuration's, {d['time_budget']} s for "
                        "default; none for --data)")
    p.add_argument("--batch-size", type=int, metavar="B", default=None,
                   help=f"images per training step (default: the configuration's, {d['batch_size']} for default)")
    p.add_argument("--lr", type=float, metavar="LR", default=None,
                   help=f"peak learning rate of the one-cycle schedule (default: the configuration's, "
                        f"{d['lr']:g} for default, {d['folder']['lr']:g} with --data)")
    p.add_argument("--model", metavar="NAME", default=None,
                   help=f"network, one of {', '.join(models.MODELS)} (default: the configuration's, "
                        f"{d['model']} for default; captcha_net_bn is stronger but slower)")
    p.add_argument("--charset", metavar="CS", default=None,
                   help=f"characters of the labels (default: synthetic {d['charset']}; --data: inferred from "
                        "the file names)")
    p.add_argument("--length", type=int, metavar="L", default=None,
                   help=f"characters per label (default: synthetic {d['length']}; --data: inferred)")
    p.add_argument("--height", type=int, metavar="H", default=None,
                   help=f"model input height in pixels (default: the configuration's, {d['height']})")
    p.add_argument("--width", type=int, metavar="W", default=None,
                   help=f"model input width in pixels (default: synthetic {d['width']}; --data: the images' "
                        "median aspect ratio at the input height, rounded up to a multiple of 8)")
    p.add_argument("--channels", type=int, metavar="C", default=None,
                   help=f"1 for grey, 3 for RGB input (default: {d['channels']})")
    p.add_argument("--seed", type=int, metavar="S", default=None,
                   help="seed of the training images, weights, data order and augmentation; validation and test "
                        "images use seeds derived from it (default: 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (default: start a new run)")
    p.add_argument("--workers", type=int, metavar="W", default=None,
                   help=f"processes generating or decoding images (default: every usable CPU core, "
                        f"{data_folder.cpu_count()} here)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars, one line per epoch (default: progress bars on a terminal)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks on errors (default: one sentence)")
    return p


def build_train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The stand-alone parser of ``examples/train.py`` (the same options as ``xpnet train``)."""
    p = argparse.ArgumentParser(prog=prog, description=TRAIN_DESCRIPTION)
    return add_train_arguments(p)


TRAIN_DESCRIPTION = (
    "Train a CAPTCHA reader. With no options: generate synthetic CAPTCHAs, train the default model within the "
    "default configuration's time budget, and report whole-string and per-character accuracy on 2,000 held-out "
    "images from another seed. With --data DIR: train on your own labelled images.")


def add_train_command(sub) -> None:
    """Register ``xpnet train``."""
    p = sub.add_parser("train", help="train a CAPTCHA reader on synthetic images or a labelled folder",
                       description=TRAIN_DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    train_from_args(args)
    return 0


# --------------------------------------------------------------------------
# Settings: configuration + options


def _positive_int(v, option):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, numpy.integer)) or v < 1:
        raise UsageError(f"{option} must be a positive integer, got {v!r}.")
    return int(v)


def _positive_float(v, option):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise UsageError(f"{option} must be a positive number, got {v!r}.")
    return float(v)


def resolve_settings(args) -> dict:
    """Configuration + command-line options -> the settings of a run (checked; UsageError on bad values)."""
    s = get_config(args.config)
    s["config"] = args.config
    s["data_dir"] = os.path.abspath(args.data) if args.data else None
    if s["data_dir"] is not None:
        s.update(s["folder"])  # before the command-line options, which still win
    if args.model is not None:
        if args.model not in models.MODELS:
            raise UsageError(f"unknown model {args.model!r}: choose one of {', '.join(models.MODELS)}.")
        if args.model != s["model"]:
            s["model_kwargs"] = {}  # the configuration's arguments were for its own model
        s["model"] = args.model
        s["folder_small"] = {**s["folder_small"], "batchnorm": False}  # the user chose the network: keep it
    for opt in ("height", "width", "channels", "length", "batch_size", "epochs", "steps", "workers"):
        v = getattr(args, opt, None)
        if opt == "workers":
            if v is not None and (isinstance(v, bool) or v < 0):
                raise UsageError(f"--workers must be 0 (in this process) or more, got {v}.")
            continue
        if v is not None:
            s[opt] = _positive_int(v, "--" + opt.replace("_", "-"))
    if args.channels is not None and args.channels not in (1, 3):
        raise UsageError(f"--channels must be 1 (grey) or 3 (RGB), got {args.channels}.")
    if args.lr is not None:
        s["lr"] = _positive_float(args.lr, "--lr")
    if args.seed is not None:
        if args.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, got {args.seed}.")
    s["seed"] = int(args.seed or 0)
    if s["data_dir"] is not None:
        # a folder infers its task and input width unless told
        s["charset"] = args.charset
        s["length"] = args.length
        if args.width is None:
            s["width"] = None
    elif args.charset is not None:
        s["charset"] = args.charset
    if args.charset is not None:
        make_charset(args.charset, s["length"] or 4)  # validates the characters
    if args.epochs is not None or args.steps is not None:
        s["time_budget"] = None  # explicit length replaces the budget ...
    if args.time_budget is not None:  # ... unless a budget is given as well
        s["time_budget"] = _positive_float(args.time_budget, "--time-budget")
    if s["model"] not in models.MODELS:
        raise UsageError(f"configuration {args.config!r} names an unknown model {s['model']!r}: choose one of "
                         f"{', '.join(models.MODELS)}.")
    if s["optimizer"] not in ("adamw", "adam", "sgd"):
        raise UsageError(f"configuration {args.config!r} names an unknown optimizer {s['optimizer']!r}: "
                         "use adamw, adam or sgd.")
    if s["data"] not in ("pool", "stream"):
        raise UsageError(f"configuration {args.config!r} has data {s['data']!r}: use 'pool' or 'stream'.")
    return s


# --------------------------------------------------------------------------
# Output folder


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


def _write_json(path: Path, doc: dict, what: str) -> None:
    data = json.dumps(doc, indent=1, default=_json_safe).encode("utf-8")
    xio.atomic_write(path, lambda f: f.write(data), what)


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


def _merge_resume(settings: dict, args, out: Path) -> dict:
    """The saved settings of the run in ``out``; explicit options that would change the run are refused."""
    try:
        saved = json.loads((out / RUN_FILE).read_text("utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{out / RUN_FILE} is damaged ({type(exc).__name__}): cannot resume this run.") from None
    explicit = {"model": args.model, "height": args.height, "width": args.width, "channels": args.channels,
                "charset": args.charset, "length": args.length, "batch_size": args.batch_size, "lr": args.lr,
                "seed": args.seed, "data_dir": settings["data_dir"] if args.data else None,
                "config": args.config if args.config != "default" else None}
    for key, value in explicit.items():
        if value is not None and saved.get(key) != value:
            opt = {"data_dir": "--data", "batch_size": "--batch-size"}.get(key, "--" + key)
            raise UsageError(f"{opt} {value} differs from the run's {saved.get(key)!r} in {out / RUN_FILE}: drop it "
                             f"to resume, or start a new run in another folder.")
    merged = dict(saved)
    for key in ("time_budget", "epochs", "steps"):  # the limits may be raised on resume
        if args.epochs is not None or args.steps is not None or args.time_budget is not None:
            merged[key] = settings[key]
    return merged


# --------------------------------------------------------------------------
# Models, optimizers, transforms


def build_model(name: str, charset: Charset, pp: Preprocess, **extra):
    """The named network for ``charset`` (one block of classes per character) and input ``pp.shape``.

    ``extra`` goes to the builder (a configuration's ``model_kwargs``).
    """
    if name not in models.MODELS:
        raise UsageError(f"unknown model {name!r}: choose one of {', '.join(models.MODELS)}.")
    fn = models.MODELS[name]
    params = inspect.signature(fn).parameters
    unknown = sorted(set(extra) - set(params))
    if unknown:
        raise UsageError(f"model {name} has no argument(s) {', '.join(unknown)} (from model_kwargs).")
    kwargs = {"input_shape": pp.shape, **extra}
    if "length" in params:
        kwargs.update(length=charset.length, n_classes=charset.n_classes)
    else:  # a one-label network: one output per (position, class) unit
        kwargs["n_classes"] = charset.n_outputs
    try:
        return fn(**kwargs)
    except ShapeError as exc:
        raise UsageError(f"model {name} cannot take {pp.channels}x{pp.height}x{pp.width} inputs ({exc}): "
                         f"use a larger --height/--width.") from None


def set_prior_bias(model, charset: Charset) -> None:
    """Set the last layer's biases to the logit of the class prior 1 / n_classes (every output unit)."""
    last = [layer for layer in model.layers if "b" in layer.params][-1]
    b = last.params["b"]
    if b.shape[0] != charset.n_outputs:
        raise UsageError(f"prior_bias: the last biased layer of {model.name} has {b.shape[0]} units, "
                         f"not {charset.n_outputs}.")
    p = 1.0 / charset.n_classes
    b[...] = b.dtype.type(math.log(p / (1.0 - p)))


def build_optimizer(settings: dict, model):
    schedule = ProgressOneCycle(settings["lr"], settings["pct_start"], settings["div_factor"],
                                settings["final_div_factor"], warmup_steps=settings["warmup_steps"])
    kind, wd, clip = settings["optimizer"], settings["weight_decay"], settings["clip_norm"]
    if kind == "adamw":
        opt = optim.AdamW(model, lr=schedule, weight_decay=wd, clip_norm=clip)
    elif kind == "adam":
        opt = optim.Adam(model, lr=schedule, weight_decay=wd, clip_norm=clip)
    else:
        opt = optim.SGD(model, lr=schedule, momentum=0.9, nesterov=True, weight_decay=wd, clip_norm=clip)
    return opt, schedule


def make_transforms(pp: Preprocess, max_shift: int, max_scale: float):
    """(train_transform, eval_transform): uint8 (N, C, H, W) + uint8 targets -> floats, on the device.

    Training batches are shifted/scaled per image first (random numbers from
    ``xpnet.backend.rng()``, which checkpoints save), then normalised as ``pp`` says.
    """
    def eval_transform(x, y):
        dtype = backend.get_dtype()
        return pp.normalize_batch(x, dtype), y.astype(dtype)

    def train_transform(x, y):
        if max_shift or max_scale:
            x = augment(x, backend.rng(), max_shift, max_scale, fill="edge")
        return eval_transform(x, y)

    return train_transform, eval_transform


class StreamBatches:
    """Fresh synthetic batches for the trainer: ``(images uint8, multi-hot uint8 targets)`` forever."""

    def __init__(self, stream: CaptchaStream, charset: Charset):
        self.stream, self.charset = stream, charset

    def close(self):
        """Stop the stream's worker processes."""
        self.stream.close()

    def __iter__(self):
        return self

    def __next__(self):
        images, labels = next(self.stream)
        return images, self.charset.encode(labels, numpy.uint8)


# --------------------------------------------------------------------------
# Data


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
    from ..data.folder import LabelledImages

    n = len(labels)
    log(f"generated {n:,} training images in {time.monotonic() - t0:.0f} s "
        f"({'the limit' if n >= limit else f'{seconds:.0f} s of the budget'})")
    return LabelledImages(images=images[:n], labels=labels, charset=charset, preprocess=pp, paths=[""] * n,
                          meta={"seed": seed})


def _device_data_bytes() -> int:
    if backend.current() != "cupy":
        return 2 * 1024 ** 3
    from ..memory import free_memory

    try:
        free, _ = free_memory("cupy")
        return int(0.3 * free)
    except Exception:  # noqa: BLE001 -- a probe failure only means: keep the data on the host
        return 2 * 1024 ** 3


# --------------------------------------------------------------------------
# The job


def _print(msg):
    print(msg, flush=True)


def train_from_args(args, log=None) -> dict:
    """Run ``xpnet train`` / ``examples/train.py`` with parsed options; returns the results dict."""
    t0 = time.monotonic()
    log = log or _print
    settings = resolve_settings(args)
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR, the folder of the run to continue.")
    out = Path(args.out or _default_out())
    out = prepare_out(out, args.resume)
    if args.resume:
        settings = _merge_resume(settings, args, out)
    workers = args.workers
    progress = None if not args.no_progress else False
    return run(settings, out, resume=args.resume, workers=workers, progress=progress, log=log, t0=t0)


def run(settings: dict, out, resume: bool = False, workers: int | None = None, progress: bool | None = None,
        log=print, t0: float | None = None) -> dict:
    """Train with resolved ``settings`` into folder ``out``; evaluate on the held-out test set; save.

    Returns the results (also in ``out/results.json`` and the model file's metadata).
    """
    t0 = time.monotonic() if t0 is None else t0
    out = xio.check_writable(Path(out))
    budget = settings.get("time_budget")
    log(f"output folder: {out.resolve()}")
    log(f"configuration {settings['config']!r}: model {settings['model']}, "
        + (f"time budget {budget:.0f} s for the whole job" if budget else "no time budget")
        + f"; backend {backend.current()} ({backend.reason()}), {data_folder.cpu_count()} CPU core(s)")
    xpnet_seed = settings["seed"]
    if settings["data_dir"] is None:
        data = _synthetic_data(settings, workers, progress, log)
    else:
        data = _folder_data(settings, out, workers, progress, log)
    charset, pp = data["charset"], data["preprocess"]
    small = settings.get("folder_small") or {}
    if settings["data_dir"] is not None and small and data["n_train"] < small["below"]:
        settings["max_shift"], settings["max_scale"] = small["max_shift"], small["max_scale"]
        said = f"shifts of up to {small['max_shift']} px and scales of up to {small['max_scale']:.0%}"
        if (small["batchnorm"] and settings["model"] == "captcha_net"
                and "batchnorm" not in (settings.get("model_kwargs") or {})):
            settings["model_kwargs"] = {**(settings.get("model_kwargs") or {}), "batchnorm": True}
            said = ("captcha_net with BatchNorm (about twice the step time; --model captcha_net keeps it plain) "
                    "and " + said)
        log(f"fewer than {small['below']:,} training images: {said}")
    run_doc = {"settings": settings, "data": data["describe"], "started": _now(),
               "python": platform.python_version(), "backend": backend.current()}
    if not resume:
        _write_json(out / RUN_FILE, run_doc, "run description")

    backend.seed(xpnet_seed)
    model = build_model(settings["model"], charset, pp, **(settings.get("model_kwargs") or {}))
    if settings.get("prior_bias"):
        set_prior_bias(model, charset)
    opt, schedule = build_optimizer(settings, model)
    train_t, eval_t = make_transforms(pp, settings["max_shift"], settings["max_scale"])
    batch_size = settings["batch_size"]
    n_train = data["n_train"]
    stream_mode = settings["data"] == "stream" and settings["data_dir"] is None
    if batch_size > n_train and not stream_mode:
        log(f"batch size lowered from {batch_size} to {n_train}, the size of the training set")
        batch_size = n_train
    train_budget = None
    if budget:
        used = time.monotonic() - t0
        train_budget = budget - used - settings["final_reserve"]
        if train_budget <= 0:
            raise UsageError(f"the time budget of {budget:.0f} s was used up by data preparation ({used:.0f} s) "
                             f"and the final reserve ({settings['final_reserve']} s): give a larger --time-budget "
                             f"or fewer training images.")
    spe = data["steps_per_epoch"](batch_size)
    epochs, patience = data["epochs_rule"](spe)
    if settings["steps"] is not None and not settings["epochs"]:
        epochs = -(-settings["steps"] // spe)  # the step limit ends the last one
    metadata = metadata_for(charset, pp, model=settings["model"], config=settings["config"],
                            settings=settings, data=data["describe"])
    trainer = Trainer(model, opt, out_dir=out, batch_size=batch_size, eval_batch_size=max(256, 2 * batch_size),
                      metrics=multilabel_metrics(charset.length), monitor="val_string_accuracy", mode="max",
                      tie_break="val_loss",
                      patience=patience, transform=train_t, eval_transform=eval_t, seed=xpnet_seed,
                      log_every=10, progress=sys.stderr.isatty() if progress is None else bool(progress),
                      log=log, metadata=metadata,
                      time_budget=train_budget, max_steps=settings["steps"], restore_best=True, plot=60.0,
                      device_data_bytes=_device_data_bytes())
    schedule.progress = trainer.fraction_done
    limits = [f"{epochs} epoch(s)" if epochs < 10 ** 6 else None,
              f"{settings['steps']} steps" if settings["steps"] else None,
              f"{train_budget:.0f} s" if train_budget else None]
    log(f"training {model.name} ({model.n_params():,} parameters) on {n_train:,} "
        f"{'fresh images per epoch' if stream_mode else 'images'}"
        f", batch {batch_size}, {spe} steps per epoch, until "
        + " or ".join(x for x in limits if x) + (f", early stopping after {patience} epochs without progress"
                                                   if patience else ""))
    train_source = data["train"](batch_size, trainer)
    try:
        trainer.fit(train_source, epochs=epochs, val=data["val"],
                    steps_per_epoch=spe if isinstance(train_source, StreamBatches) else None, resume=resume)
    except KeyboardInterrupt:
        log(f"to continue this run: add --resume --out {out} to the same command")
        raise
    finally:
        if isinstance(train_source, StreamBatches):
            train_source.close()
    train_seconds = trainer.elapsed()
    # The model file holds the best weights (also when a resumed run had nothing left to do).
    xio.load_weights(model, out / "model.npz")

    # The held-out test set: never seen in training, never used to choose anything.
    log(f"evaluating on the {data['test_name']} ...")
    reader = Recognizer(model, charset, pp, metadata)
    test_x, test_labels, test_paths = data["test"]
    evaluation = reader.evaluate(test_x, test_labels, test_paths or None)
    h = trainer.history
    results = {
        "test": {k: v for k, v in evaluation.to_dict().items() if k != "mistakes"},
        "test_set": data["test_name"],
        "test_mistakes": evaluation.mistakes[:100],
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "steps": h[-1]["step"] if len(h) else 0,
        "epochs": len(h),
        "best_epoch": trainer.best_epoch,     # the weights evaluated (ties broken by validation loss)
        "val_string_accuracy": max((r.get("val_string_accuracy") or 0) for r in h.epochs) if len(h) else None,
        "finished": _now(),
    }
    metadata["results"] = {"test_string_accuracy": evaluation.string_accuracy,
                           "test_char_accuracy": evaluation.char_accuracy, "test_set": data["test_name"]}
    xio.save(model, out / "model.npz", metadata)
    results["wall_seconds"] = round(time.monotonic() - t0, 1)
    _write_json(out / RESULTS_FILE, results, "results")
    log(f"test ({data['test_name']}):")
    log("  " + evaluation.report(show_mistakes=5).replace("\n", "\n  "))
    log(f"wall time {results['wall_seconds']:.0f} s (training {train_seconds:.0f} s)")
    log(f"model: {out / 'model.npz'}   history: {out / 'history.csv'}, {out / 'history.json'}   "
        f"plot: {out / 'history.png'}")
    log(f"output folder: {out.resolve()}")
    return results


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _synthetic_data(settings, workers, progress, log) -> dict:
    cs = make_charset(settings["charset"], settings["length"])
    pp = Preprocess(height=settings["height"], width=settings["width"] or 80, channels=settings["channels"])
    seed = check_seed(settings["seed"])
    val_seed, test_seed = derive_seed(seed, "validation"), derive_seed(seed, "test")
    t = time.monotonic()
    stream_mode = settings["data"] == "stream"
    train = None
    if not stream_mode:
        spec = settings.get("train_images_made") or settings["train_images"]
        train = pregenerate(spec, seed, cs, pp, workers, progress, settings["time_budget"], log)
        settings["train_images_made"] = len(train)
    val = generate_captchas(settings["val_images"], val_seed, cs, preprocess=pp, workers=workers, progress=progress)
    test = generate_captchas(settings["test_images"], test_seed, cs, preprocess=pp, workers=workers,
                             progress=progress)
    n_train = len(train) if train is not None else settings["stream_epoch_steps"] * settings["batch_size"]
    log(f"synthetic {cs.length}-character CAPTCHAs over {cs.n_classes} classes at "
        f"{pp.channels}x{pp.height}x{pp.width}: "
        + (f"{len(train):,} training images (seed {seed})" if train is not None
           else f"fresh training images from seed {seed}")
        + f", {len(val):,} validation (seed {val_seed}), {len(test):,} test (seed {test_seed}); "
          f"{time.monotonic() - t:.0f} s")
    describe = {"kind": "synthetic", "generator": "captcha 0.7.1", "train_seed": seed, "val_seed": val_seed,
                "test_seed": test_seed, "train_images": len(train) if train is not None else "stream",
                "val_images": len(val), "test_images": len(test)}

    def train_source(batch_size, trainer):
        if stream_mode:
            start = _resume_step(trainer)
            stream = CaptchaStream(batch_size, seed, cs, preprocess=pp, workers=workers, start_batch=start)
            return StreamBatches(stream, cs)
        return train.images, train.targets(numpy.uint8)

    def steps_per_epoch(batch_size):
        if stream_mode:
            return int(settings["stream_epoch_steps"])
        return -(-n_train // batch_size)

    def epochs_rule(spe):
        if settings["epochs"]:
            return int(settings["epochs"]), None
        if settings["time_budget"] is None and settings["steps"] is None:
            raise UsageError("nothing limits this run: give --epochs, --steps or --time-budget.")
        return 10 ** 6, None  # the budget or the step limit ends it

    return {"charset": cs, "preprocess": pp, "n_train": n_train, "describe": describe,
            "val": (val.images, val.targets(numpy.uint8)),
            "test": (test.images, test.labels, None),
            "test_name": f"{len(test):,} held-out generated images, seed {test_seed}",
            "train": train_source, "steps_per_epoch": steps_per_epoch, "epochs_rule": epochs_rule}


def _resume_step(trainer) -> int:
    """The step of the newest checkpoint in the trainer's folder (0 when none): where a stream resumes."""
    path = xio.latest_checkpoint(trainer.checkpoint_dir) if trainer.checkpoint_dir else None
    if path is None:
        return 0
    return int((xio.read_header(path).get("train_state") or {}).get("step", 0))


def _folder_data(settings, out: Path, workers, progress, log) -> dict:
    folder = settings["data_dir"]
    t = time.monotonic()
    if settings["width"] is None:
        pp = suggest_preprocess(folder, height=settings["height"], channels=settings["channels"])
        settings["width"] = pp.width
    else:
        pp = Preprocess(height=settings["height"], width=settings["width"], channels=settings["channels"])
    data = load_folder(folder, charset=settings["charset"], length=settings["length"], preprocess=pp,
                       workers=workers, progress=progress)
    cs = data.charset
    settings["charset"], settings["length"] = cs.chars, cs.length
    summary = data.summary().splitlines()
    log("\n".join(summary[:12]) + (f"\n  ... ({len(summary) - 12} more lines in {out / 'skipped.txt'})"
                                   if len(summary) > 12 else ""))
    if data.skipped:
        text = "".join(f"{p}\t{r}\n" for p, r in data.skipped).encode("utf-8")
        xio.atomic_write(out / "skipped.txt", lambda f: f.write(text), "list of skipped files")
    n = len(data)
    if n < 10:
        raise DataError(f"only {n} usable labelled image(s) in {folder}: at least 10 are needed to train, "
                        f"validate and test.")
    split_seed = derive_seed(settings["seed"], "split")
    rest, test_idx = split_indices(n, settings["test_fraction"], split_seed)
    tr, va = split_indices(len(rest), settings["val_fraction"], split_seed + 1)
    train_idx, val_idx = rest[tr], rest[va]
    train, val, test = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)
    log(f"input {pp.channels}x{pp.height}x{pp.width}; split (seed {split_seed}): {len(train):,} train, "
        f"{len(val):,} validation, {len(test):,} test; {time.monotonic() - t:.0f} s")
    describe = {"kind": "folder", "folder": folder, "images": n, "skipped": len(data.skipped),
                "split_seed": split_seed, "train": len(train), "val": len(val), "test": len(test),
                "test_fraction": settings["test_fraction"], "val_fraction": settings["val_fraction"]}

    def epochs_rule(spe):
        epochs = settings["epochs"] or folder_epochs(len(train), settings)
        patience = folder_patience(epochs, settings)
        return epochs, patience

    return {"charset": cs, "preprocess": pp, "n_train": len(train), "describe": describe,
            "val": (val.images, val.targets(numpy.uint8)),
            "test": (test.images, test.labels, test.paths),
            "test_name": f"{len(test):,} held-out images of {folder} ({settings['test_fraction']:.0%} split)",
            "train": lambda bs, trainer: (train.images, train.targets(numpy.uint8)),
            "steps_per_epoch": lambda bs: -(-len(train) // bs), "epochs_rule": epochs_rule}


def folder_epochs(n_train: int, settings: dict | None = None) -> int:
    """Epochs for a folder of ``n_train`` training images: clamp(ceil(samples / n), min, max)."""
    s = settings or CONFIGS["default"]
    return int(min(s["folder_max_epochs"], max(s["folder_min_epochs"], -(-s["folder_samples"] // max(1, n_train)))))


def folder_patience(epochs: int, settings: dict | None = None):
    s = settings or CONFIGS["default"]
    p = s["patience"]
    if p is None:
        return None
    if p == "auto":
        return max(15, -(-int(epochs) // 4))
    return _positive_int(p, "patience")


__all__ = ["CONFIGS", "get_config", "derive_seed", "ProgressOneCycle", "add_train_arguments", "build_train_parser",
           "add_train_command", "resolve_settings", "run", "train_from_args", "build_model", "folder_epochs",
           "folder_patience", "pregenerate"]
