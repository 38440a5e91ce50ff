"""xpnet's CUDA kernels against the generic CuPy path, op by op and as training steps.

    python benchmarks/gpu_kernels_bench.py [--batch 500] [--max-duration 0.5] [--json FILE]

Shapes are captcha_net's at the given batch (input 3x32x80, float32).  Each
row times the generic ``xp`` code (kernels off) and the kernel path with
``cupyx.profiler.benchmark`` (GPU time, median of the repeats) and reports
the largest relative difference between their outputs.  The last rows time
whole training steps (forward, fused loss, backward, in-place SGD) with the
generic (``xpnet.reference_paths()``) and with the kernels behind ``xpnet.ops``, then
training steps of the CRNN reader captcha_crnn with BatchNorm (1x32x80, 36 classes + the
blank, CTC loss, Adam; batches 64 and 256) on NumPy (this machine's CPU cores) and on
CuPy (generic and kernels), same weights and batch, in the same run.  Finishes in well
under a minute on an H100.  Exits 3 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xpnet  # noqa: E402
from xpnet import backend, models, ops  # noqa: E402
from xpnet.captcha.heads import CTCLoss, ctc_targets  # noqa: E402
from xpnet.data import Charset  # noqa: E402
from xpnet.testing import max_rel_diff  # noqa: E402

CRNN_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def op_cases(cp, K, n, rng):
    """(name, shape text, generic fn, kernel fn) for captcha_net's layers at batch n."""
    f32 = np.float32

    def arr(*shape, tie_free=False):
        if tie_free:
            size = int(np.prod(shape))
            return cp.asarray((rng.permutation(size) * 1e-3).reshape(shape).astype(f32))
        return cp.asarray(rng.standard_normal(shape).astype(f32))

    cases = []
    convs = [("conv1", (n, 3, 32, 80), 32), ("conv2", (n, 32, 15, 39), 64), ("conv3", (n, 64, 6, 18), 128)]
    for name, shape, f in convs:
        x = arr(*shape)
        c = shape[1]
        oh, ow = shape[2] - 2, shape[3] - 2
        col = arr(n, oh, ow, c, 3, 3)
        colT = cp.ascontiguousarray(col.transpose(3, 4, 5, 0, 1, 2))
        cases.append((f"{name} im2col", str(shape), lambda x=x: ops.im2col(x, 3), lambda x=x: K.im2col(x, 3)))
        cases.append((f"{name} im2col (cnhw)", str(shape), lambda x=x: ops.im2col(x, 3).transpose(3, 4, 5, 0, 1, 2),
                      lambda x=x: K.im2col_cnhw(x, 3)))
        cases.append((f"{name} col2im", str(col.shape), lambda col=col, s=shape: ops.col2im(col, s, 3),
                      lambda col=col, s=shape: K.col2im(col, s, 3)))
        cases.append((f"{name} col2im (cnhw)", str(colT.shape), lambda col=col, s=shape: ops.col2im(col, s, 3),
                      lambda colT=colT, s=shape: K.col2im_cnhw(colT, s, 3)))
        y2, b = arr(n * oh * ow, f), arr(f)

        def generic_epilogue(y2=y2, b=b, s=(n, oh, ow, f)):
            y = cp.ascontiguousarray((y2 + b).reshape(s).transpose(0, 3, 1, 2))
            return cp.maximum(y, 0)

        cases.append((f"{name} bias+NCHW+ReLU", str((n, f, oh, ow)), generic_epilogue,
                      lambda y2=y2, b=b, s=(n, f, oh, ow): K.nhwc_to_nchw(y2, b, s, relu=True)))
        yT = arr(f, n * oh * ow)

        def generic_fnp(yT=yT, b=b, s=(f, n, oh, ow)):
            y = cp.ascontiguousarray(yT.reshape(s).transpose(1, 0, 2, 3)) + b.reshape(1, -1, 1, 1)
            return cp.maximum(y, 0)

        cases.append((f"{name} bias+FNP->NFP+ReLU", str((n, f, oh, ow)), generic_fnp,
                      lambda yT=yT, b=b, s=(n, f, oh, ow): K.fnp_to_nfp(yT, b, s, relu=True)))
    pools = [("pool1", (n, 32, 30, 78)), ("pool2", (n, 64, 13, 37)), ("pool3", (n, 128, 4, 16))]
    for name, shape in pools:
        x = arr(*shape, tie_free=True)
        with xpnet.reference_paths():  # the generic cache, even where xpnet.ops dispatches to kernels
            y, cache = ops.max_pool2d_forward(x, 2)
        _, idx = K.max_pool_forward(x, 2)
        dy = arr(*y.shape)
        cases.append((f"{name} max-pool fwd", str(shape), lambda x=x: ops.max_pool2d_forward(x, 2),
                      lambda x=x: K.max_pool_forward(x, 2)))
        cases.append((f"{name} max-pool bwd", str(y.shape), lambda dy=dy, c=cache: ops.max_pool2d_backward(dy, c),
                      lambda dy=dy, idx=idx, s=shape: K.max_pool_backward(dy, idx, s, 2)))
    a = cp.maximum(arr(n, 32, 30, 78), 0)
    dy = arr(n, 32, 30, 78)
    cases.append(("relu backward", str(a.shape), lambda: ops.relu_backward(dy, a), lambda: K.relu_backward(dy, a)))
    logits = arr(n, 144) * 4
    t = cp.asarray((rng.random((n, 144)) < 4 / 144).astype(f32))
    cases.append(("sigmoid+BCE fused", str(logits.shape), lambda: ops.sigmoid_bce_with_logits(logits, t)[1],
                  lambda: K.sigmoid_bce_with_logits(logits, t)[1]))
    return cases


def time_gpu(benchmark, fn, max_duration, n_repeat=200):
    r = benchmark(fn, n_repeat=n_repeat, n_warmup=3, max_duration=max_duration)
    return float(np.median(r.gpu_times[0])) * 1e3, float(np.median(r.cpu_times)) * 1e3


def training_step_fn(cp, model, n, rng, lr=1e-4):  # small lr: weights stay sane over the repeats
    x = cp.asarray(rng.standard_normal((n,) + model.input_shape).astype(np.float32))
    t = cp.zeros((n,) + model.output_shape, np.float32)
    t[cp.arange(n)[:, None], cp.asarray(np.arange(4) * 36 + rng.integers(0, 36, (n, 4)))] = 1

    def step():
        logits = model.forward(x, train=True)
        loss, d = ops.sigmoid_bce_with_logits(logits, t)
        model.backward(d)
        grads = model.gradients()
        for key, p in model.parameters().items():
            p -= np.float32(lr) * grads[key]
        return loss

    return step


def crnn_case(n, rng):
    """(model, x, y): captcha_crnn with BatchNorm on the current backend, float32 NumPy images
    (n, 1, 32, 80) and ``ctc_targets`` of n random labels of 4 to 6 characters."""
    model = models.captcha_crnn(n_classes=len(CRNN_CHARS), batchnorm=True)
    x = rng.standard_normal((n, 1, 32, 80)).astype(np.float32)
    texts = ["".join(CRNN_CHARS[i] for i in rng.integers(0, len(CRNN_CHARS), k)) for k in rng.integers(4, 7, n)]
    return model, x, ctc_targets(texts, Charset(CRNN_CHARS, 6, 4))


def crnn_step_fn(model, x, y, lr=1e-4):
    """One CRNN training step (forward, CTC loss, backward, Adam) on the backend of model, x and y."""
    opt, loss = xpnet.optim.Adam(model, lr=lr), CTCLoss()

    def step():
        value, d = loss(model.forward(x, train=True), y)
        model.backward(d)
        opt.step()
        return value

    return step


def time_host(fn, max_duration, n_repeat=20, min_repeat=3, n_warmup=1):
    """Median wall ms of fn() (a NumPy step: no device to wait for), after n_warmup untimed calls."""
    for _ in range(n_warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < n_repeat and (len(times) < min_repeat or time.perf_counter() - start < max_duration):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def crnn_rows(model, x, y, n, max_duration, timers):
    """The CRNN step timed on each path from the same weights and batch.

    ``timers`` maps a path name to (backend name, scope factory, timing function(step) -> ms);
    returns {"op", "path", "batch", "ms", "images_per_s", "vs_numpy", "first_loss"} rows in that
    order ("vs_numpy": the first path's ms over this one's; "first_loss": the CTC loss of the first
    step, taken from the shared weights, so it agrees across paths up to rounding).
    """
    rows = []
    for path, (where, scope, timer) in timers.items():
        m = model.clone(where)
        xb, yb = (x, y) if where == "numpy" else (backend.cupy.asarray(x), backend.cupy.asarray(y))
        step = crnn_step_fn(m, xb, yb)
        with scope():
            first_loss = float(step())  # from the shared weights: the same on every path
            ms = timer(step, max_duration)
        base = rows[0]["ms"] if rows else ms
        rows.append({"op": "captcha_crnn_bn training step", "path": path, "batch": n, "ms": ms,
                     "images_per_s": n / ms * 1e3, "vs_numpy": base / ms, "first_loss": first_loss})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--max-duration", type=float, default=0.5, help="seconds per timing at most")
    parser.add_argument("--crnn-batches", type=int, nargs="*", default=[64, 256],
                        help="batches of the CRNN training steps, NumPy vs CuPy (none: skip them)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not backend.has_cupy_gpu:
        print(f"gpu_kernels_bench: needs CuPy and a CUDA device: {backend.device_reason()}.", file=sys.stderr)
        return 3
    from cupyx.profiler import benchmark  # only reached with CuPy present

    from xpnet.cuda import kernels as K
    from xpnet.cuda import ops as cuda_ops

    cp = backend.cupy
    xpnet.use("cupy")
    info = backend.device_info()
    print(f"device: {info.get('name')}  CuPy {cp.__version__}  batch {args.batch}  float32")
    rng = np.random.default_rng(0)
    results = []
    header = f"{'op':<28}{'shape':<26}{'generic ms':>11}{'kernel ms':>11}{'speedup':>9}{'max rel diff':>14}"
    print(header)
    print("-" * len(header))
    for name, shape, generic, kernel in op_cases(cp, K, args.batch, rng):
        with xpnet.reference_paths():
            g_out = _first(generic())
            g_ms, _ = time_gpu(benchmark, generic, args.max_duration)
        k_out = _first(kernel())
        k_ms, _ = time_gpu(benchmark, kernel, args.max_duration)
        diff = max_rel_diff(k_out, g_out)
        results.append({"op": name, "shape": shape, "generic_ms": g_ms, "kernel_ms": k_ms, "max_rel_diff": diff})
        print(f"{name:<28}{shape:<26}{g_ms:>11.3f}{k_ms:>11.3f}{g_ms / k_ms:>8.2f}x{diff:>14.2e}")

    tf32 = os.environ.get("CUPY_TF32", "0")
    print(f"\nwhole training step (forward, fused loss, backward, SGD), float32, CUPY_TF32={tf32}:")
    print(f"{'model':<16}{'path':<22}{'ms/step':>9}{'images/s':>10}{'vs generic':>12}{'host ms':>9}")
    for name in ("captcha_net", "captcha_net_bn"):
        backend.seed(0)
        model = models.build(name)
        step = training_step_fn(cp, model, args.batch, rng)
        generic_ms = None
        for path in ("generic CuPy", "kernels, cnhw conv", "kernels, nhwc conv"):
            if path == "generic CuPy":
                scope = xpnet.reference_paths()
            else:
                layout = path.split(", ")[1].split()[0]
                scope = cuda_ops.registered(cuda_ops.KernelOps(K.CupyRuntime(), conv_layout=layout), "cupy",
                                            usable=K.usable, name=f"cuda kernels, {layout} conv")
            with scope:
                step()
                ms, host_ms = time_gpu(benchmark, step, 3 * args.max_duration, n_repeat=30)
            generic_ms = generic_ms or ms
            results.append({"op": f"{name} training step", "path": path, "batch": args.batch, "ms": ms,
                            "host_ms": host_ms, "images_per_s": args.batch / ms * 1e3})
            print(f"{name:<16}{path:<22}{ms:>9.2f}{args.batch / ms * 1e3:>10,.0f}{generic_ms / ms:>11.2f}x"
                  f"{host_ms:>9.2f}")

    if args.crnn_batches:
        import contextlib

        def gpu_timer(step, max_duration):
            return time_gpu(benchmark, step, 3 * max_duration, n_repeat=30)[0]

        threads = xpnet.get_num_threads()
        timers = {f"NumPy, {threads} threads": ("numpy", contextlib.nullcontext, lambda f, d: time_host(f, 3 * d, n_warmup=0)),
                  "generic CuPy": ("cupy", xpnet.reference_paths, gpu_timer),
                  "xpnet CUDA kernels": ("cupy", contextlib.nullcontext, gpu_timer)}
        print(f"\ncaptcha_crnn (BatchNorm) training step (forward, CTC loss, backward, Adam), 1x32x80, "
              f"36 classes + blank, labels of 4-6, float32, CUPY_TF32={tf32}:")
        print(f"{'model':<16}{'batch':>6}  {'path':<22}{'ms/step':>9}{'images/s':>10}{'vs NumPy':>10}{'1st loss':>10}")
        for n in args.crnn_batches:
            backend.seed(0)
            model, x, y = crnn_case(n, rng)
            for row in crnn_rows(model, x, y, n, args.max_duration, timers):
                results.append(row)
                print(f"{'captcha_crnn_bn':<16}{n:>6}  {row['path']:<22}{row['ms']:>9.2f}{row['images_per_s']:>10,.0f}"
                      f"{row['vs_numpy']:>9.2f}x{row['first_loss']:>10.4f}")
    payload = {"device": info.get("name"), "cupy": cp.__version__, "batch": args.batch, "results": results}
    print("RESULT_JSON " + json.dumps(payload))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
