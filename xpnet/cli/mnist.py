"""The options of ``examples/train_mnist.py`` (an example script, not an ``xpnet`` subcommand)."""

from __future__ import annotations

import argparse


def build_mnist_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``examples/train_mnist.py``; every option's default is shown in ``--help``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="folder with the MNIST IDX files (gzipped or not)")
    p.add_argument("--out", default="runs/mnist", help="folder for checkpoints, history and plot")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW decoupled weight decay")
    p.add_argument("--shift", type=int, default=2, help="random shift augmentation in pixels (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    return p
