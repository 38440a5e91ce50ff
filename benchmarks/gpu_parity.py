"""Whole-model parity, NumPy vs CuPy, per layer: one training step and the weights after it.

    python benchmarks/gpu_parity.py [--batch 16] [--lr 0.1]

For captcha_net and captcha_net_bn (dropout off: the two backends draw their
masks from different generators) on sigmoid + BCE, and the CRNN reader
captcha_crnn with BatchNorm (1x32x80, 36 classes + the blank, labels of 4-6
characters) on the CTC loss: same weights and batch on both backends, every
layer's output (the CRNN's logits are its last), the loss, every gradient
(``xpnet.testing.check_parity``) and every parameter and BatchNorm statistic
after one in-place SGD step.  Run twice on the CuPy side: generic ``xp`` code
(kernels off) and with xpnet's CUDA kernels behind ``xpnet.ops``; in float32 and
in float64.  Prints one table per run; exits 1 when
``xpnet.testing.parity_verdict`` fails, 3 without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xpnet  # noqa: E402
from xpnet import backend, models, ops  # noqa: E402
from xpnet.captcha.heads import CTCLoss, ctc_targets  # noqa: E402
from xpnet.data import Charset  # noqa: E402
from xpnet.testing import _row, check_parity, format_parity, parity_verdict  # noqa: E402

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def bce_batch(batch, dtype, rng):
    """Images (batch, 3, 32, 80) and 4 one-hot blocks of 36: captcha_net's task."""
    x = rng.standard_normal((batch, 3, 32, 80)).astype(dtype)
    t = np.zeros((batch, 144), dtype)
    t[np.arange(batch)[:, None], np.arange(4) * 36 + rng.integers(0, 36, (batch, 4))] = 1
    return x, t


def ctc_batch(batch, dtype, rng):
    """Grey images (batch, 1, 32, 80) and ``ctc_targets`` of random labels of 4 to 6 characters."""
    x = rng.standard_normal((batch, 1, 32, 80)).astype(dtype)
    texts = ["".join(CHARS[i] for i in rng.integers(0, len(CHARS), n)) for n in rng.integers(4, 7, batch)]
    return x, ctc_targets(texts, Charset(CHARS, 6, 4))


# name -> (builder, batch maker, loss(logits, targets) -> (loss, dlogits))
CASES = {
    "captcha_net": (lambda: models.captcha_net(), bce_batch, ops.sigmoid_bce_with_logits),
    "captcha_net_bn": (lambda: models.captcha_net_bn(dropout=0.0), bce_batch, ops.sigmoid_bce_with_logits),
    "captcha_crnn_bn": (lambda: models.captcha_crnn(n_classes=len(CHARS), batchnorm=True), ctc_batch, CTCLoss()),
}


def sgd_step_rows(model, x, t, lr, loss=ops.sigmoid_bce_with_logits):
    """Rows comparing every parameter and buffer after one SGD step on each backend."""
    after = {}
    for name in ("numpy", "cupy"):
        m = model.clone(name)
        xb, tb = (x, t) if name == "numpy" else (backend.cupy.asarray(x), backend.cupy.asarray(t))
        logits = m.forward(xb, train=True)
        _, d = loss(logits, tb)
        m.backward(d)
        grads = m.gradients()
        for key, p in m.parameters().items():
            p -= p.dtype.type(lr) * grads[key]  # in place, as the optimizers do
        after[name] = m.state_dict()
    rows = []
    for key, v in after["numpy"].items():
        layer, what = key.split(".", 1)
        rows.append(_row(layer, "after SGD " + what, after["cupy"][key], v))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    if not backend.has_cupy_gpu:
        print(f"gpu_parity: needs CuPy and a CUDA device: {backend.device_reason()}.", file=sys.stderr)
        return 3
    import contextlib

    failures = []
    for dtype in (np.float32, np.float64):
        # one batch per task, shared by its models (seed 0: the batch of the first GPU runs)
        batches = {bce_batch: bce_batch(args.batch, dtype, np.random.default_rng(0)),
                   ctc_batch: ctc_batch(args.batch, dtype, np.random.default_rng(1))}
        for name in args.models:
            build, make_batch, loss = CASES[name]
            x, t = batches[make_batch]
            xpnet.use("numpy")
            xpnet.set_dtype(dtype)
            backend.seed(0)
            model = build()
            for mode, scope in (("generic CuPy", xpnet.reference_paths), ("xpnet CUDA kernels", contextlib.nullcontext)):
                with scope():
                    rows = check_parity(model, x, t, loss=loss) + sgd_step_rows(model, x, t, args.lr, loss)
                ok, worst, rule = parity_verdict(rows, dtype)
                label = np.dtype(dtype).name
                print(f"\n=== {name}, batch {args.batch}, {label}, CuPy side: {mode} ===")
                print(format_parity(rows))
                print(f"worst: {worst['layer']} {worst['what']} rel {worst['max_rel']:.3e} "
                      f"(L2 {worst['rel_l2']:.3e}; rule: {rule}): {'OK' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{name} {label} / {mode}: {worst['layer']} {worst['what']} "
                                    f"{worst['max_rel']:.3e}")
    print("\nPARITY " + ("OK" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
