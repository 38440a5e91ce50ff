"""Long and repeated training runs for tests/test_endurance.py, each in a FRESH process.

    python tests/system/_endurance_worker.py determinism --steps N [--model tiny|small] [--backend numpy|cupy]
    python tests/system/_endurance_worker.py endurance OUT_DIR --steps 2000 --warmup 250

Prints one JSON line:
* determinism: sha256 of every weight and optimizer slot after N steps (and of the initial
  weights, so a run that trained nothing cannot pass);
* endurance: the resident set size (RSS) sampled along the run, after warm-up and at the end.

The "small" model has every kind of state (BatchNorm statistics, Dropout drawing from xpnet's
generator, AdamW moments, a one-cycle schedule) and trains on 1 x 16 x 16 images with random
shifts drawn from xpnet's generator, shuffled by the trainer's generator.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import xpnet  # noqa: E402
from xpnet import metrics
from xpnet.nn import optim  # noqa: E402
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU  # noqa: E402
from xpnet.nn.sequential import Sequential  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_worker as W  # noqa: E402


def rss_bytes() -> int:
    """Resident set size of this process: psutil when installed (the dev extra), else /proc/self/statm."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def small_data(n, seed):
    """(n, 1, 16, 16) uint8 images of 4 classes (which quadrant is bright) and one-hot targets."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    x = rng.integers(0, 80, size=(n, 1, 16, 16))
    for c in range(4):
        r, q = divmod(c, 2)
        x[labels == c, 0, 8 * r:8 * r + 8, 8 * q:8 * q + 8] += 150
    return x.astype(np.uint8), np.eye(4, dtype=np.uint8)[labels]


def small_model(total_steps):
    xpnet.seed(3)
    model = Sequential([Conv2D(8, 3, pad=1), BatchNorm(), ReLU(), MaxPool2D(2), Conv2D(8, 3), ReLU(), MaxPool2D(2),
                        Flatten(), Dropout(0.2), Dense(32), ReLU(), Dense(4)], input_shape=(1, 16, 16), name="small")
    opt = optim.AdamW(model, lr=optim.OneCycle(3e-3, total_steps=total_steps), weight_decay=1e-4)
    return model, opt


def shift_and_scale(x, t):
    """A random +-1 pixel roll per batch (xpnet's generator), then floats in [0, 1]."""
    dy, dx = (int(v) for v in xpnet.backend.rng().integers(-1, 2, size=2))
    xp = xpnet.get_array_module(x)
    x = xp.roll(x, (dy, dx), axis=(2, 3))
    return x.astype(np.float32) * np.float32(1 / 255), t.astype(np.float32)


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(xpnet.to_numpy(arrays[k]))
        h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def determinism(steps, model_name):
    if model_name == "tiny":
        model, opt = W.build(-(-steps // W.STEPS_PER_EPOCH))
        x, t = W.make_data()
        trainer = W.make_trainer(model, opt, None)
        batch = W.BATCH
    else:
        model, opt = small_model(steps)
        x, t = small_data(512, seed=1)
        batch = 32
        trainer = xpnet.Trainer(model, opt, batch_size=batch, transform=shift_and_scale, seed=5, progress=False,
                                log=None, log_every=10)
    init = digest(model.state_dict())
    spe = -(-len(x) // batch)
    epochs = -(-steps // spe)
    # Stop after exactly `steps` steps: a transform that raises a private signal at step steps + 1.
    inner, count = trainer.transform, {"n": 0}

    class Done(Exception):
        pass

    def stop_after(xb, tb):
        count["n"] += 1
        if count["n"] > steps:
            raise Done
        return inner(xb, tb)

    trainer.transform = stop_after
    try:
        trainer.fit((x, t), epochs=epochs)
    except Done:
        pass
    meta, slots = opt.state_dict()
    return {"steps": opt.step_count, "init": init, "weights": digest(model.state_dict()),
            "optimizer": digest(slots), "backend": model.backend}


def endurance(out_dir, steps, warmup):
    x, t = small_data(2000, seed=1)
    val = small_data(200, seed=2)
    model, opt = small_model(steps)
    samples, count = [], {"n": 0}

    def measured(xb, tb):
        count["n"] += 1
        if count["n"] % 125 == 0 or count["n"] == warmup:
            gc.collect()
            samples.append([count["n"], rss_bytes()])
        return shift_and_scale(xb, tb)

    trainer = xpnet.Trainer(model, opt, out_dir=out_dir, batch_size=16, transform=measured,
                            eval_transform=lambda xb, tb: (xb.astype(np.float32) / 255, tb.astype(np.float32)),
                            metrics={"accuracy": metrics.accuracy}, checkpoint_every=200, checkpoint_seconds=None,
                            progress=False, log=None, plot=True, seed=4)
    epochs = steps // 125
    trainer.fit((x, t), epochs=epochs, val=val)
    gc.collect()
    end = rss_bytes()
    warm = dict(samples)[warmup]
    return {"steps": opt.step_count, "warm_rss": warm, "end_rss": end, "samples": samples,
            "val_accuracy": trainer.history[-1]["val_accuracy"], "epochs": len(trainer.history),
            "rss_source": "psutil" if _has_psutil() else "/proc/self/statm"}


def _has_psutil():
    try:
        import psutil  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("determinism", "endurance"))
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--backend", default="numpy")
    args = p.parse_args()
    xpnet.use(args.backend)
    xpnet.set_dtype("float32")
    if args.mode == "determinism":
        out = determinism(args.steps, args.model)
    else:
        out = endurance(args.out_dir, args.steps, args.warmup)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
