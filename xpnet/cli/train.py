"""``xpnet train`` and ``examples/train.py``: one set of options, each with its default in ``--help``."""

from __future__ import annotations

import argparse
import dataclasses

from ..captcha.config import CONFIGS, HEADS, TrainOptions
from ..data.folder import cpu_count
from ..nn import models

DESCRIPTION = (
    "Train a CAPTCHA reader. With no options: generate synthetic CAPTCHAs, train the default model within the "
    "default configuration's time budget, and report whole-string and per-character accuracy on 2,000 held-out "
    "images from another seed. With --data DIR: train on your own labelled images.")


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training option to ``p`` (used by ``xpnet train`` and ``examples/train.py``)."""
    d = CONFIGS["default"]
    p.add_argument("--data", metavar="DIR", default=None,
                   help="train on your own folder of labelled images (label = file name up to '_' or '.', e.g. "
                        "2A2X.png, 2A2X_17.png); split 80/20 into train/test, 10%% of train for validation "
                        "(default: generate synthetic CAPTCHAs)")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="with --data: a CSV of file,label rows (a header row file,label is optional) giving the "
                        "labels instead of the file names; images without a row, rows without an image, empty and "
                        "conflicting labels are listed in skipped.txt and the rest is used (default: the folder's own "
                        "labels.csv if it has one, else the file names)")
    p.add_argument("--folds", type=int, metavar="K", default=None,
                   help="with --data: K-fold cross-validation, K runs each testing on one K-th of the folder "
                        "(every image tested once; runs in --out/fold-1 .. fold-K), reporting the mean and "
                        "spread of the test accuracy and the pooled accuracy with its 95%% interval (default: one "
                        "run with a 20%% test split)")
    p.add_argument("--pretrain", type=float, metavar="SECONDS", default=None,
                   help=f"with --data: seconds of pretraining on synthetic look-alikes of a folder with fewer than "
                        f"{d['pretrain']['below']:,} training images (its charset, lengths, aspect and grey levels, "
                        f"local fonts), before fine-tuning on it; 0: none (default: {d['pretrain']['seconds']})")
    p.add_argument("--unlabelled", metavar="DIR", default=None,
                   help=f"with --data: a folder of unlabelled images of the same kind; after training, "
                        f"{d['pseudo']['rounds']} rounds add those read with a confidence at which the validation "
                        f"readings are >= {d['pseudo']['precision'] * 100:g}%% right, and train on them too (a round that "
                        f"lowers the validation accuracy is undone) (default: none)")
    p.add_argument("--distort", metavar="SPEC", default=None,
                   help="stronger per-image augmentation of training batches: name=value pairs of rotate "
                        "(degrees), shear, elastic (pixels), noise (grey levels), blur (probability), contrast "
                        "(e.g. rotate=4,noise=6), or none (default: the configuration's; none for synthetic "
                        "data; below "
                        f"{d['folder_small']['below']:,} training images "
                        + (",".join(f"{k}={v:g}" for k, v in d["folder_small"]["distort"].items()) or "none")
                        + ", on the folder's images only, never on the look-alikes)")
    p.add_argument("--label-smoothing", type=float, metavar="EPS", default=None,
                   help="label smoothing of the loss, in [0, 1): ctc mixes in each column's cross-entropy against "
                        "uniform scores, bce pulls its targets towards 1/2 (default: the configuration's; 0 for "
                        f"synthetic data; below {d['folder_small']['below']:,} training images "
                        f"{d['folder_small'].get('label_smoothing', 0):g})")
    p.add_argument("--init", metavar="MODEL", default=None,
                   help="start from a saved reader (model.npz): its layers whose names and shapes match are "
                        "loaded, the others (an output layer for another charset or length) start fresh "
                        "(default: fresh weights from --seed)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder for the model, history, plot and checkpoints; an existing run is never "
                        "overwritten (default: runs/captcha-<date>-<time>, a new folder)")
    p.add_argument("--config", metavar="NAME", default="default",
                   help=f"named configuration: {', '.join(f'{k}' for k in CONFIGS)}; see "
                        f"xpnet.captcha.config.CONFIGS (default: default)")
    p.add_argument("--epochs", type=int, metavar="N", default=None,
                   help="passes over the training set; replaces the configuration's time budget (default: "
                        "synthetic: as many as the time budget allows; --data: by the data size, from "
                        f"{d['folder_min_epochs']} to {d['folder_max_epochs']} epochs)")
    p.add_argument("--steps", type=int, metavar="N", default=None,
                   help="optimizer steps in total; replaces the configuration's time budget (default: no limit)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", default=None,
                   help="wall-clock limit for the whole job (data, training, evaluation); training stops "
                        f"cleanly when it is reached (default: the configuration's, {d['time_budget']} s for "
                        "default and for --data)")
    p.add_argument("--batch-size", type=int, metavar="B", default=None,
                   help=f"images per training step (default: the configuration's, {d['batch_size']} for default)")
    p.add_argument("--lr", type=float, metavar="LR", default=None,
                   help=f"peak learning rate of the one-cycle schedule (default: the configuration's: "
                        f"{d['ctc']['lr']:g} for the ctc head; bce: {d['lr']:g}, {d['folder']['lr']:g} with --data)")
    p.add_argument("--model", metavar="NAME", default=None,
                   help=f"network, one of {', '.join(models.MODELS)} (default: the configuration's, "
                        f"{d['model']} for the bce head, {d['ctc']['model']} for ctc; captcha_net_bn is stronger "
                        f"but slower)")
    p.add_argument("--charset", metavar="CS", default=None,
                   help=f"characters of the labels (default: synthetic {d['charset']}; --data: inferred from "
                        "the file names)")
    p.add_argument("--length", metavar="L", default=None,
                   help=f"characters per label, or a range such as 4-6 (read with a CTC head) (default: synthetic "
                        f"{d['length']}; --data: inferred from the file names, a range when they differ)")
    p.add_argument("--head", choices=HEADS, default=None,
                   help="how outputs become texts: ctc (per-column scores, texts of any length; model "
                        f"{d['ctc']['model']}) or bce (one block of outputs per character position, one length) "
                        f"(default: ctc for a range of lengths or a mixed-length folder; for one length "
                        f"{d['fixed_length_head']}, with --data {d['folder']['fixed_length_head']})")
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
                        f"{cpu_count()} here)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars, one line per epoch (default: progress bars on a terminal)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks on errors (default: one sentence)")
    return p


def build_train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """The stand-alone parser of ``examples/train.py`` (the same options as ``xpnet train``)."""
    return add_train_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def add_command(sub) -> None:
    """Register ``xpnet train``."""
    p = sub.add_parser("train", help="train a CAPTCHA reader on synthetic images or a labelled folder",
                       description=DESCRIPTION)
    add_train_arguments(p)
    p.set_defaults(func=run)


def options_from_args(args) -> TrainOptions:
    """The ``TrainOptions`` of parsed arguments (``--data DIR`` is ``data``)."""
    return TrainOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)})


def run(args) -> int:
    """Train as the parsed options say (``xpnet train``, ``examples/train.py``)."""
    from ..captcha.job import train

    train(options_from_args(args), out=args.out, resume=args.resume, workers=args.workers,
          progress=False if args.no_progress else None)
    return 0
