"""The seed's first experiment, made right: MNIST with sigmoid + BCE (one "character" of 10 classes).

    python examples/train_mnist.py --data ../shared/data/mnist

Network: ``xpnet.models.simple_convnet`` (conv 5x5 30 -> ReLU -> pool 2x2 -> dense 100 -> ReLU ->
dense 10), every layer trained, loss = sigmoid + binary cross-entropy on the 10 outputs (the
seed's multi-label method; prediction = argmax).  Training: AdamW with a one-cycle learning rate,
random shifts of up to +-2 pixels (vectorised, on the device), batch 128.

With only the t10k files (as in ../shared/data/mnist) the first 9,000 images train and the last
1,000 test; with the four standard files, the usual 60,000 / 10,000 split is used.  The test set is
evaluated after every epoch for the plot only: nothing is selected on it (the final weights are
reported, not the best epoch's).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np  # noqa: E402

import xpnet  # noqa: E402
from xpnet import metrics  # noqa: E402
from xpnet.cli.mnist import build_mnist_parser  # noqa: E402
from xpnet.nn import optim  # noqa: E402
from xpnet.data.mnist import load_mnist  # noqa: E402
from xpnet.errors import XpnetError  # noqa: E402


# Kept here rather than xpnet.data.augment (which draws its offsets in another order), so that the recorded
# MNIST results stay reproducible: a strided view of the padded batch, one gather, no loop over images.
def random_shift(x, max_shift: int = 2, rng=None, fill=0):
    """Shift each image of x (N, C, H, W) by integers dy, dx drawn uniformly from [-max_shift, max_shift].

    Pixels shifted in are ``fill``.  Returns a new array of x's shape, dtype and
    backend.  Cost: one padded copy and one gather of N*C*H*W elements (the
    windows are a strided view of the padded batch).
    """
    if getattr(x, "ndim", None) != 4:
        raise xpnet.errors.ShapeError(
            f"random_shift needs images of shape (N, C, H, W), got {getattr(x, 'shape', None)}.")
    s = int(max_shift)
    if s < 0:
        raise xpnet.errors.UsageError(f"max_shift must be >= 0, got {max_shift}.")
    n, c, h, w = x.shape
    if s == 0 or n == 0:
        return x.copy()
    rng = rng if rng is not None else xpnet.backend.rng()
    offsets = rng.integers(0, 2 * s + 1, size=(2, n))  # crop start in the padded image; s = no shift
    xp = xpnet.get_array_module(x)
    padded = xp.pad(x, ((0, 0), (0, 0), (s, s), (s, s)), mode="constant", constant_values=fill)
    sn, sc, sh, sw = padded.strides
    # windows[n, c, i, j] is the H x W crop starting at row i, column j of the padded image.
    windows = xp.lib.stride_tricks.as_strided(
        padded, shape=(n, c, 2 * s + 1, 2 * s + 1, h, w), strides=(sn, sc, sh, sw, sh, sw))
    if xp is not np:
        offsets = xp.asarray(offsets)
    rows = xp.arange(n)[:, None]
    chans = xp.arange(c)[None, :]
    # A crop starting at row i moves the content down by s - i rows (uniform in [-s, s]).
    return windows[rows, chans, offsets[0][:, None], offsets[1][:, None]]


def parse_args(argv=None):
    return build_mnist_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = load_mnist(args.data)
    x_train, y_train = data.x_train, data.y_train
    if args.train_limit:
        x_train, y_train = x_train[:args.train_limit], y_train[:args.train_limit]
    print(f"MNIST: {data.split}")
    if args.train_limit:
        print(f"       training on the first {len(x_train):,} of them (--train-limit)")
    print(f"backend {xpnet.backend.current()} ({xpnet.backend.reason()}), dtype {xpnet.get_dtype()}")

    charset = xpnet.data.Charset("0123456789", 1)
    # Targets stay uint8 until they reach the device, like the images: a quarter of the bytes to move.
    t_train = charset.one_hot(y_train[:, None], dtype=np.uint8)
    t_test = charset.one_hot(data.y_test[:, None], dtype=np.uint8)
    dtype = xpnet.get_dtype()

    def to_float(x, t):
        return x.astype(dtype) * dtype.type(1 / 255), t.astype(dtype)

    def augment(x, t):
        if args.shift:
            x = random_shift(x, args.shift)
        return to_float(x, t)

    xpnet.seed(args.seed)
    model = xpnet.models.simple_convnet()
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    opt = optim.AdamW(model, lr=optim.OneCycle(args.lr, total_steps=steps), weight_decay=args.weight_decay)
    trainer = xpnet.Trainer(
        model, opt, out_dir=args.out, batch_size=args.batch_size, transform=augment, eval_transform=to_float,
        metrics={"accuracy": metrics.accuracy}, seed=args.seed, progress=not args.no_progress,
        restore_best=False, log_every=10,
        metadata={"task": "mnist", "charset": charset.to_dict(), "input_shape": [1, 28, 28],
                  "preprocessing": {"scale": "x / 255", "layout": "N, 1, 28, 28"}})
    trainer.fit((x_train, t_train), epochs=args.epochs, val=(data.x_test, t_test), resume=args.resume)
    result = trainer.evaluate((data.x_test, t_test))
    wall = time.perf_counter() - t0
    print(f"test accuracy {result['accuracy'] * 100:.2f}% on {len(data.x_test):,} test images "
          f"(test loss {result['loss']:.4f}); wall time {wall:.0f} s; model saved to {Path(args.out) / 'model.npz'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except XpnetError as exc:
        print(f"train_mnist: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("train_mnist: interrupted (resume with --resume)", file=sys.stderr)
        sys.exit(130)
