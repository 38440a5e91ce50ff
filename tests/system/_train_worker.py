"""A tiny, fast training run shared by tests/training/test_trainer.py, in-process and as a subprocess.

    python tests/system/_train_worker.py OUT_DIR [--epochs 4] [--resume] [--slow SECONDS]

The task: 6x6 uint8 images of 3 classes (which third of the image is bright), learnt by a
model with every kind of state that a resume must restore: BatchNorm running statistics,
Dropout (draws from xpnet's generator), AdamW moments and a one-cycle schedule, a random
brightness augmentation (xpnet's generator) and shuffling (the trainer's generator).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import xpnet  # noqa: E402
from xpnet import metrics
from xpnet.nn import optim  # noqa: E402
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU  # noqa: E402
from xpnet.nn.sequential import Sequential  # noqa: E402

N_TRAIN, BATCH = 96, 16
STEPS_PER_EPOCH = N_TRAIN // BATCH


def make_data(n=N_TRAIN, seed=5):
    """x (n, 1, 6, 6) uint8, targets (n, 3) uint8 one-hot."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    x = rng.integers(0, 90, size=(n, 1, 6, 6))
    for c in range(3):
        x[labels == c, 0, :, 2 * c:2 * c + 2] += 150
    return x.astype(np.uint8), np.eye(3, dtype=np.uint8)[labels]


def build(epochs, seed=7, dropout=0.2):
    xpnet.set_dtype("float32")
    xpnet.seed(seed)
    model = Sequential([Conv2D(4, 3, pad=1), BatchNorm(), ReLU(), MaxPool2D(2), Flatten(), Dropout(dropout), Dense(3)],
                       input_shape=(1, 6, 6), name="tiny")
    opt = optim.AdamW(model, lr=optim.OneCycle(0.05, total_steps=epochs * STEPS_PER_EPOCH), weight_decay=1e-3)
    return model, opt


def to_float(x, t):
    return x.astype(np.float32) * np.float32(1 / 255), t.astype(np.float32)


def jitter(x):
    """Per-image brightness offset in [-20, 20], drawn from xpnet's generator (saved in checkpoints)."""
    offsets = xpnet.backend.rng().integers(-20, 21, size=(x.shape[0], 1, 1, 1))
    xp = xpnet.get_array_module(x)
    return xp.clip(x.astype(np.int16) + xp.asarray(offsets, dtype=np.int16), 0, 255).astype(np.uint8)


def make_trainer(model, opt, out_dir, slow=0.0, **kwargs):
    def augment(x, t):
        if slow:
            time.sleep(slow)
        return to_float(jitter(x), t)

    options = dict(out_dir=out_dir, batch_size=BATCH, transform=augment, eval_transform=to_float,
                   metrics={"accuracy": metrics.accuracy}, seed=11, progress=False, log=None, plot=False,
                   checkpoint_every=1, log_every=3)
    options.update(kwargs)
    return xpnet.Trainer(model, opt, **options)


def run(out_dir, epochs=4, resume=False, slow=0.0, make_opt=None, dropout=0.2, **kwargs):
    model, opt = build(epochs, dropout=dropout)
    if make_opt is not None:
        opt = make_opt(model)
    trainer = make_trainer(model, opt, out_dir, slow, **kwargs)
    val = make_data(48, seed=6)
    trainer.fit(make_data(), epochs=epochs, val=val, resume=resume)
    return model, trainer


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow", type=float, default=0.0)
    args = p.parse_args(argv)
    xpnet.use("numpy")
    _, trainer = run(args.out_dir, args.epochs, args.resume, args.slow, log=print)
    print("finished at step", trainer.optimizer.step_count, flush=True)


if __name__ == "__main__":
    main()
