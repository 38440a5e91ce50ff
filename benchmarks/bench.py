"""Cross-backend benchmark: xpnet (NumPy float32/float64, CuPy), a seed-style NumPy
reference, and PyTorch (CPU, CUDA), side by side on the same networks and inputs.

    python benchmarks/bench.py            # the full CPU run (~10-15 min on 2 cores)
    python benchmarks/bench.py --quick    # the subset the speed targets need (~3 min)
    python benchmarks/bench.py --gpu      # on a CUDA machine: CuPy vs PyTorch CUDA vs NumPy (~3 min)

``--gpu``: captcha_net training at batch 128 and 500 (and captcha_net_bn at 500), xpnet
CuPy against PyTorch CUDA (cuDNN) with TF32 off and on, and xpnet NumPy on the same
machine's cores at 500; its targets: >= 0.5x PyTorch CUDA without TF32, >= 20x NumPy.
Rows of a framework that sees no CUDA device here are skipped, with the reason in the
notes (e.g. a CPU-only PyTorch build); with no GPU row left nothing is measured (exit 3).

What is measured
* training step (forward + fused sigmoid/BCE + backward + plain SGD update) of
  captcha_net at batch 32, 128 and 500, captcha_net_bn at 32, 64, 128 and 500;
* training step of the CRNN reader captcha_crnn (with BatchNorm; input 1x32x80,
  36 classes + the blank, CTC loss, Adam) at batch 64, against the same network
  in PyTorch (nn.GRU, nn.CTCLoss on log_softmax, input lengths = T = 20);
* inference: single-image latency and batch-256 throughput;
* per op, forward and backward, at batch 128 on captcha_net's shapes: im2col,
  col2im, the three convolutions, the fused conv->ReLU->pool blocks, max pool,
  dense, the loss.

How
* Every configuration runs in its own fresh subprocess (a "worker"); peak RSS
  is that process's peak (VmHWM) plus its live children's (xpnet's shard
  workers).  Workers of one comparison group start together, warm up, then
  are timed **round-robin** (one block of steps each, repeated), so a load
  change on the machine hits every backend alike.
* Median and spread (interquartile range, min-max) of per-step times after
  warm-up; images/s = batch / median.  GPU steps are timed with CUDA events;
  the first call (kernel compilation, autotuning) is reported separately.
* The matmul peak is measured in the same run (2048^3 float32 product with
  NumPy's BLAS on all threads, best of start and end); the share of it is
  (analytic matmul FLOPs of a step) / (step time) / peak.
* Results: a table on stdout, ``benchmarks/results/<name>.json`` and a bar chart
  ``<name>.png``, with machine, threads, library versions, commit and date.

``--raise-priority``: run every worker in its own session with a higher
scheduler-autogroup weight (root only).  Where the kernel groups processes by
session (``sched_autogroup_enabled``), other sessions' ``nice`` does not make
them yield, and a shared machine then measures its neighbours.  It changes no
ratio between backends: all get the same treatment.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

INPUT = (3, 32, 80)
OUTPUTS = 144  # 4 characters x 36 classes
# captcha_crnn (built with batchnorm=True): grey 32x80 images, 36 characters + the CTC
# blank, labels of CRNN_LABEL characters read from T = 80 / 4 = 20 columns.
CRNN_INPUT = (1, 32, 80)
CRNN_CLASSES = 36
CRNN_CHANNELS, CRNN_POOLS, CRNN_HIDDEN = (32, 64, 96), ((2, 2), (2, 2), (2, 1)), 96
CRNN_LABEL = 5
CRNN_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # xpnet.data.DIGITS_UPPER; class i + 1 is character i
LR = 1e-3      # small enough that the weights stay finite over a benchmark's steps

# --------------------------------------------------------------------------- FLOPs


def conv_flops(n, c, h, w, f, k=3, pad=0):
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    return 2 * n * oh * ow * c * k * k * f, (oh, ow)


def step_flops(model: str, n: int, train: bool = True) -> float:
    """Matrix-multiply FLOPs of one step, counted analytically for the network as defined
    (full convolutions, dx skipped for the first layer as every framework does)."""
    c, h, w = INPUT
    fwd = 0.0
    first = None
    if model == "captcha_crnn":
        c, h, w = CRNN_INPUT
        for f, (ph, pw) in zip(CRNN_CHANNELS, CRNN_POOLS):
            fl, (h, w) = conv_flops(n, c, h, w, f, pad=1)
            first = fl if first is None else first
            fwd += fl
            c, h, w = f, h // ph, w // pw
        t, feat, hid = w, c * h, CRNN_HIDDEN
        fwd += 2 * (2 * n * t * feat * 3 * hid + 2 * n * t * hid * 3 * hid)  # two directions: input, hidden
        fwd += 2 * n * t * 2 * hid * (CRNN_CLASSES + 1)
        return fwd if not train else 3 * fwd - first
    if model == "captcha_net":
        for f in (32, 64, 128):
            fl, (h, w) = conv_flops(n, c, h, w, f)
            first = fl if first is None else first
            fwd += fl
            c, h, w = f, h // 2, w // 2
        dims = [c * h * w, 512, OUTPUTS]
    elif model == "captcha_net_bn":
        for i, f in enumerate((32, 64, 128, 128)):
            for _ in range(1 if i == 0 else 2):
                fl, (h, w) = conv_flops(n, c, h, w, f, pad=1)
                first = fl if first is None else first
                fwd += fl
                c = f
            h, w = h // 2, w // 2
        dims = [c * h * w, 512, OUTPUTS]
    else:
        raise ValueError(model)
    for a, b in zip(dims[:-1], dims[1:]):
        fwd += 2 * n * a * b
    return fwd if not train else 3 * fwd - first


# --------------------------------------------------------------------------- workers


def _rss_now_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb(pid="self"):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM line")


def _maxrss_mb():
    """Peak resident memory of this process image, plus that of its live child processes
    (xpnet's CPU shard workers hold shards 1.. of every step).

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a worker
    would report its parent's peak when that was higher.  The shared memory the
    shard workers map is counted in each process: a bound from above.
    """
    try:
        total = _hwm_mb()
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as fh:
                for pid in fh.read().split():
                    try:
                        total += _hwm_mb(pid)
                    except OSError:  # exited meanwhile
                        pass
        return total
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Timer:
    """Per-call wall time; on CUDA, events recorded around the call, then a sync."""

    def __init__(self, new_event=None, elapsed=None):
        self.new_event, self.elapsed = new_event, elapsed

    def __call__(self, fn):
        if self.new_event is None:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = self.new_event(), self.new_event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self.elapsed(start, end)


def _data(n, dtype, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + INPUT).astype(dtype)
    t = (rng.random((n, OUTPUTS)) < 4 / 36).astype(dtype)
    return x, t


def _crnn_data(n, dtype, seed=0):
    """Images (n, 1, 32, 80) and n random labels of CRNN_LABEL characters (as class indices 1..36)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + CRNN_INPUT).astype(dtype)
    labels = rng.integers(0, CRNN_CLASSES, (n, CRNN_LABEL))
    return x, ["".join(CRNN_CHARS[i] for i in row) for row in labels]


def _xpnet_tasks(cfg):
    """Tasks for xpnet on NumPy or CuPy: name -> (callable, images per call)."""
    import numpy as np

    sys.path.insert(0, ROOT)
    import xpnet
    from xpnet import ops

    dev = cfg.get("device", "cpu")
    xpnet.use("cupy" if dev == "cuda" else "numpy")
    xpnet.set_dtype(cfg["dtype"])
    if cfg.get("plain"):
        xpnet.fast_paths(False)
    xpnet.seed(0)
    tasks = {}
    if cfg["model"] == "captcha_crnn" and cfg["kind"] == "train":
        from xpnet.captcha.heads import CTCLoss, ctc_targets
        from xpnet.data import Charset

        model = xpnet.models.captcha_crnn(n_classes=CRNN_CLASSES, input_shape=CRNN_INPUT, batchnorm=True)
        n = cfg["batch"]
        x, texts = _crnn_data(n, cfg["dtype"])
        x = xpnet.asarray(x)
        y = xpnet.asarray(ctc_targets(texts, Charset(CRNN_CHARS, CRNN_LABEL)))
        opt, loss = xpnet.optim.Adam(model, lr=LR), CTCLoss()

        def crnn_step():
            _, d = loss(model.forward(x, train=True), y)
            model.backward(d)
            opt.step()
        tasks["step"] = (crnn_step, n)
    elif cfg["kind"] in ("train", "infer"):
        model = xpnet.models.build(cfg["model"])
        n = cfg["batch"]
        x, t = _data(n, cfg["dtype"])
        x, t = xpnet.asarray(x), xpnet.asarray(t)
        if cfg["kind"] == "train":
            opt = xpnet.optim.SGD(model, lr=LR)  # as PyTorch's side uses torch.optim.SGD

            def step():
                logits = model.forward(x, train=True)
                _, d = ops.sigmoid_bce_with_logits(logits, t)
                model.backward(d)
                opt.step()
            tasks["step"] = (step, n)
        else:
            tasks["step"] = (lambda: model.forward(x, train=False), n)
    else:
        tasks.update(_xpnet_op_tasks(xpnet, ops, np, cfg))
    return tasks


def _captcha_shapes(n):
    """(input shape, out channels) of captcha_net's three convolutions at batch n."""
    return [((n, 3, 32, 80), 32), ((n, 32, 15, 39), 64), ((n, 64, 6, 18), 128)]


OP_BATCH = 128


def _xpnet_op_tasks(xpnet, ops, np, cfg):
    dt = cfg["dtype"]
    rng = np.random.default_rng(0)
    n = OP_BATCH

    def arr(*shape):
        return xpnet.asarray(rng.standard_normal(shape).astype(dt))

    tasks = {}
    for i, (shape, f) in enumerate(_captcha_shapes(n), 1):
        x = arr(*shape)
        w = arr(f, shape[1], 3, 3) * 0.1
        b = arr(f)
        y, cache = ops.conv2d_forward(x, w, b)
        dy = arr(*y.shape)
        col = ops.im2col(x, 3)
        tasks[f"im2col conv{i}"] = (lambda x=x: ops.im2col(x, 3), n)
        tasks[f"col2im conv{i}"] = (lambda col=col, s=shape: ops.col2im(col, s, 3), n)
        tasks[f"conv{i} fwd"] = (lambda x=x, w=w, b=b: ops.conv2d_forward(x, w, b), n)
        tasks[f"conv{i} bwd"] = (lambda dy=dy, c=cache, i=i: ops.conv2d_backward(dy, c, need_dx=i > 1), n)
        # The same conv -> ReLU -> pool as a 3-layer model: on NumPy the fused, threaded path.
        block = xpnet.Sequential([xpnet.Conv2D(f, 3), xpnet.ReLU(), xpnet.MaxPool2D(2)], input_shape=shape[1:])
        block.compute_input_grad = i > 1
        yb = block.forward(x, train=True)
        dyb = arr(*yb.shape)

        def block_bwd(block=block, x=x, dyb=dyb):
            block.forward(x, train=True)
            block.backward(dyb)

        tasks[f"block{i} fwd (conv+relu+pool)"] = (lambda block=block, x=x: block.forward(x, train=True), n)
        tasks[f"block{i} fwd+bwd"] = (block_bwd, n)
    xpool = arr(n, 32, 30, 78)
    yp, pc = ops.max_pool2d_forward(xpool, 2)
    dyp = arr(*yp.shape)
    tasks["pool1 fwd"] = (lambda: ops.max_pool2d_forward(xpool, 2), n)
    tasks["pool1 bwd"] = (lambda: ops.max_pool2d_backward(dyp, pc), n)
    xd, wd, bd = arr(n, 2048), arr(2048, 512) * 0.02, arr(512)
    yd, dc = ops.dense_forward(xd, wd, bd)
    dyd = arr(*yd.shape)
    tasks["dense1 fwd"] = (lambda: ops.dense_forward(xd, wd, bd), n)
    tasks["dense1 bwd"] = (lambda: ops.dense_backward(dyd, dc), n)
    logits = arr(n, OUTPUTS) * 3
    targets = xpnet.asarray((rng.random((n, OUTPUTS)) < 0.1).astype(dt))
    tasks["loss fwd+bwd"] = (lambda: ops.sigmoid_bce_with_logits(logits, targets), n)
    return tasks


def _seed_tasks(cfg):
    import numpy as np

    sys.path.insert(0, HERE)
    import seed_reference as sr

    tasks = {}
    if cfg["kind"] in ("train", "infer"):
        net = sr.SeedCaptchaNet(INPUT, OUTPUTS)
        n = cfg["batch"]
        x, t = _data(n, np.float64)
        if cfg["kind"] == "train":
            tasks["step"] = (lambda: net.train_step(x, t, lr=LR), n)
        else:
            tasks["step"] = (lambda: net.predict(x), n)
        return tasks
    rng = np.random.default_rng(0)
    n = OP_BATCH
    for i, (shape, f) in enumerate(_captcha_shapes(n), 1):
        x = rng.standard_normal(shape)
        conv = sr.Convolution(rng.standard_normal((f, shape[1], 3, 3)) * 0.1, rng.standard_normal(f))
        y = conv.forward(x)
        dy = rng.standard_normal(y.shape)
        col = sr.im2col(x, 3, 3)
        tasks[f"im2col conv{i}"] = (lambda x=x: sr.im2col(x, 3, 3), n)
        tasks[f"col2im conv{i}"] = (lambda col=col, s=shape: sr.col2im(col, s, 3, 3), n)
        tasks[f"conv{i} fwd"] = (lambda c=conv, x=x: c.forward(x), n)
        tasks[f"conv{i} bwd"] = (lambda c=conv, dy=dy: c.backward(dy), n)
        relu, pool = sr.Relu(), sr.Pooling(2, 2, 2)

        def block_fwd(c=conv, x=x, relu=relu, pool=pool):
            return pool.forward(relu.forward(c.forward(x)))

        yb = block_fwd()
        dyb = rng.standard_normal(yb.shape)

        def block_bwd(c=conv, relu=relu, pool=pool, dyb=dyb, fwd=block_fwd):
            fwd()
            c.backward(relu.backward(pool.backward(dyb)))

        tasks[f"block{i} fwd (conv+relu+pool)"] = (block_fwd, n)
        tasks[f"block{i} fwd+bwd"] = (block_bwd, n)
    pool = sr.Pooling(2, 2, 2)
    xpool = rng.standard_normal((n, 32, 30, 78))
    yp = pool.forward(xpool)
    dyp = rng.standard_normal(yp.shape)
    tasks["pool1 fwd"] = (lambda: pool.forward(xpool), n)
    tasks["pool1 bwd"] = (lambda: pool.backward(dyp), n)
    aff = sr.Affine(rng.standard_normal((2048, 512)) * 0.02, rng.standard_normal(512))
    xd = rng.standard_normal((n, 2048))
    yd = aff.forward(xd)
    dyd = rng.standard_normal(yd.shape)
    tasks["dense1 fwd"] = (lambda: aff.forward(xd), n)
    tasks["dense1 bwd"] = (lambda: aff.backward(dyd), n)
    loss = sr.SigmoidBCE()
    logits = rng.standard_normal((n, OUTPUTS)) * 3
    targets = (rng.random((n, OUTPUTS)) < 0.1).astype(np.float64)
    tasks["loss fwd+bwd"] = (lambda: (loss.forward(logits, targets), loss.backward()), n)
    return tasks


def _torch_crnn(torch):
    """captcha_crnn with BatchNorm in PyTorch: (conv, BN, ReLU, pool) x 3 -> columns -> GRU -> Linear."""
    nn = torch.nn

    class CRNN(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], CRNN_INPUT[0]
            for f, pool in zip(CRNN_CHANNELS, CRNN_POOLS):
                layers += [nn.Conv2d(c, f, 3, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU(), nn.MaxPool2d(pool)]
                c = f
            self.conv = nn.Sequential(*layers)
            h = CRNN_INPUT[1] // 8
            self.gru = nn.GRU(c * h, CRNN_HIDDEN, batch_first=True, bidirectional=True)
            self.out = nn.Linear(2 * CRNN_HIDDEN, CRNN_CLASSES + 1)

        def forward(self, x):
            f = self.conv(x)
            n, c, h, w = f.shape
            seq = f.permute(0, 3, 1, 2).reshape(n, w, c * h)  # feature c*H + h per column, as xpnet's Columns
            return self.out(self.gru(seq)[0])  # (N, T, K + 1)

    return CRNN()


def _torch_model(torch, name):
    nn = torch.nn
    layers = []
    if name == "captcha_crnn":
        return _torch_crnn(torch)
    if name == "captcha_net":
        c = INPUT[0]
        for f in (32, 64, 128):
            layers += [nn.Conv2d(c, f, 3), nn.ReLU(), nn.MaxPool2d(2)]
            c = f
        layers += [nn.Flatten(), nn.Linear(128 * 2 * 8, 512), nn.ReLU(), nn.Linear(512, OUTPUTS)]
    else:  # captcha_net_bn, as in xpnet.models
        c = INPUT[0]
        for i, f in enumerate((32, 64, 128, 128)):
            for _ in range(1 if i == 0 else 2):
                layers += [nn.Conv2d(c, f, 3, padding=1, bias=False), nn.BatchNorm2d(f), nn.ReLU()]
                c = f
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Flatten(), nn.Linear(128 * 2 * 5, 512), nn.ReLU(), nn.Dropout(0.25), nn.Linear(512, OUTPUTS)]
    return nn.Sequential(*layers)


def _torch_tasks(cfg):
    import numpy as np
    import torch

    dev = torch.device("cuda" if cfg.get("device") == "cuda" else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.get("tf32"))
        torch.backends.cudnn.allow_tf32 = bool(cfg.get("tf32"))
        torch.backends.cudnn.benchmark = True
    dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
    torch.manual_seed(0)
    tasks = {}
    if cfg["model"] == "captcha_crnn" and cfg["kind"] == "train":
        net = _torch_model(torch, cfg["model"]).to(dev, dtype)
        n = cfg["batch"]
        x, texts = _crnn_data(n, np.float32 if dtype == torch.float32 else np.float64)
        x = torch.from_numpy(x).to(dev)
        targets = torch.tensor([[CRNN_CHARS.index(ch) + 1 for ch in t] for t in texts], device=dev)  # 0: blank
        steps = CRNN_INPUT[2] // 4
        in_lens = torch.full((n,), steps, dtype=torch.long)
        tg_lens = torch.full((n,), CRNN_LABEL, dtype=torch.long)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=LR)
        lossf = torch.nn.CTCLoss(blank=0)  # mean over the batch of per-sample losses / target length

        def crnn_step():
            opt.zero_grad(set_to_none=True)
            logp = net(x).log_softmax(-1).transpose(0, 1)  # (T, N, K + 1)
            lossf(logp, targets, in_lens, tg_lens).backward()
            opt.step()
        tasks["step"] = (crnn_step, n)
        return tasks
    if cfg["kind"] in ("train", "infer"):
        net = _torch_model(torch, cfg["model"]).to(dev, dtype)
        n = cfg["batch"]
        x, t = _data(n, np.float32 if dtype == torch.float32 else np.float64)
        x, t = torch.from_numpy(x).to(dev), torch.from_numpy(t).to(dev)
        if cfg["kind"] == "train":
            net.train()
            opt = torch.optim.SGD(net.parameters(), lr=LR)
            lossf = torch.nn.BCEWithLogitsLoss(reduction="sum")

            def step():
                opt.zero_grad(set_to_none=True)
                loss = lossf(net(x), t) / n
                loss.backward()
                opt.step()
            tasks["step"] = (step, n)
        else:
            net.eval()

            def infer():
                with torch.inference_mode():
                    return net(x)
            tasks["step"] = (infer, n)
        return tasks
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    n = OP_BATCH

    def arr(*shape, grad=False):
        a = torch.randn(*shape, generator=g, dtype=dtype).to(dev)
        return a.requires_grad_(grad)

    for i, (shape, f) in enumerate(_captcha_shapes(n), 1):
        x = arr(*shape, grad=i > 1)
        w, b = arr(f, shape[1], 3, 3, grad=True), arr(f, grad=True)
        with torch.no_grad():
            col = F.unfold(x, 3)
        tasks[f"im2col conv{i}"] = (lambda x=x: F.unfold(x.detach(), 3), n)
        tasks[f"col2im conv{i}"] = (lambda col=col, s=shape: F.fold(col, s[2:], 3), n)

        def fwd(x=x, w=w, b=b):
            with torch.no_grad():
                return F.conv2d(x, w, b)
        y = F.conv2d(x, w, b)
        dy = torch.randn_like(y)
        inputs = (x, w, b) if i > 1 else (w, b)
        tasks[f"conv{i} fwd"] = (fwd, n)
        tasks[f"conv{i} bwd"] = (lambda y=y, dy=dy, inputs=inputs: torch.autograd.grad(y, inputs, dy, retain_graph=True), n)

        def block_fwd(x=x, w=w, b=b):
            with torch.no_grad():
                return F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)

        def block_fb(x=x, w=w, b=b, inputs=inputs):
            yb = F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)
            torch.autograd.grad(yb, inputs, torch.ones_like(yb))

        tasks[f"block{i} fwd (conv+relu+pool)"] = (block_fwd, n)
        tasks[f"block{i} fwd+bwd"] = (block_fb, n)
    xp_ = arr(n, 32, 30, 78, grad=True)
    yp = F.max_pool2d(xp_, 2)
    dyp = torch.randn_like(yp)
    tasks["pool1 fwd"] = (lambda: F.max_pool2d(xp_.detach(), 2), n)
    tasks["pool1 bwd"] = (lambda: torch.autograd.grad(yp, (xp_,), dyp, retain_graph=True), n)
    xd, wd, bd = arr(n, 2048, grad=True), arr(512, 2048, grad=True), arr(512, grad=True)
    yd = F.linear(xd, wd, bd)
    dyd = torch.randn_like(yd)

    def dense_fwd():
        with torch.no_grad():
            return F.linear(xd, wd, bd)
    tasks["dense1 fwd"] = (dense_fwd, n)
    tasks["dense1 bwd"] = (lambda: torch.autograd.grad(yd, (xd, wd, bd), dyd, retain_graph=True), n)
    logits = (arr(n, OUTPUTS) * 3).detach().requires_grad_(True)
    targets = (torch.rand(n, OUTPUTS, generator=g) < 0.1).to(dev, dtype)

    def loss_fb():
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / n
        torch.autograd.grad(loss, (logits,))
    tasks["loss fwd+bwd"] = (loss_fb, n)
    return tasks


PEAK_N = 2048


def _peak_tasks(cfg):
    """The matmul peak as a worker of its own, timed in the same rounds as the backends."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((PEAK_N, PEAK_N)).astype(np.float32)
    b = a.T.copy()
    c = a @ b
    return {"step": (lambda: np.matmul(a, b, out=c), 1)}


def worker_main(cfg):
    """One configuration, driven over stdin/stdout (JSON lines)."""
    if cfg.get("raise_priority"):
        _raise_priority()
    rss0 = _rss_now_mb()
    backend = cfg["backend"]
    timer = _Timer()
    if backend == "xpnet":
        tasks = _xpnet_tasks(cfg)
        if cfg.get("device") == "cuda":
            import cupy

            timer = _Timer(cupy.cuda.Event, lambda a, b: cupy.cuda.get_elapsed_time(a, b) / 1e3)
    elif backend == "seed":
        tasks = _seed_tasks(cfg)
    elif backend == "peak":
        tasks = _peak_tasks(cfg)
    elif backend == "torch":
        tasks = _torch_tasks(cfg)
        if cfg.get("device") == "cuda":
            import torch

            timer = _Timer(lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b) / 1e3)
    else:
        raise ValueError(backend)
    first = {name: timer(fn) for name, (fn, _) in tasks.items()}  # first call: compilation, allocation
    est = {}
    for name, (fn, _) in tasks.items():  # warm-up, and an estimate of the time per call
        ts = [timer(fn) for _ in range(cfg.get("warmup", 2))]
        est[name] = min(ts) if ts else first[name]
    _send({"ready": True, "first_call_s": first, "estimate_s": est, "rss_ready_mb": _rss_now_mb(),
           "rss_start_mb": rss0, "info": _worker_info(cfg)})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            fn = tasks[cmd["task"]][0]
            for _ in range(int(cmd.get("skip", 0))):  # back in the loop after another worker's turn
                fn()
            _send({"times": [timer(fn) for _ in range(int(cmd["n"]))]})
        elif cmd["op"] == "exit":
            extra = {}
            if cfg.get("device") == "cuda" and backend == "xpnet":
                import cupy

                extra["gpu_pool_bytes"] = cupy.get_default_memory_pool().total_bytes()
            if cfg.get("device") == "cuda" and backend == "torch":
                import torch

                extra["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
            _send({"maxrss_mb": _maxrss_mb(), **extra})
            return


def _worker_info(cfg):
    info = {}
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [{k: d.get(k) for k in ("internal_api", "num_threads", "version")}
                               for d in threadpool_info()]
    except Exception:
        pass
    if cfg["backend"] == "xpnet":
        import xpnet

        info["xpnet_threads"] = xpnet.get_num_threads()
        info["fast_paths"] = xpnet.fast_paths_enabled()
    if cfg["backend"] == "torch":
        import torch

        info["torch_threads"] = torch.get_num_threads()
    return info


def _send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _raise_priority():
    try:
        os.setsid()
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as fh:
            fh.write("-15")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- driver


class Worker:
    def __init__(self, cfg, env_extra=None):
        self.cfg = cfg
        env = dict(os.environ)
        env.update(env_extra or {})
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.ready = None
        self.times: dict = {}
        self.error = None

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {label(self.cfg)} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def send(self, obj):
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def wait_ready(self):
        try:
            self.ready = self.recv()
        except Exception as exc:
            self.error = str(exc)

    def time(self, task, n, skip=0):
        self.send({"op": "time", "task": task, "n": n, "skip": skip})
        self.times.setdefault(task, []).extend(self.recv()["times"])

    def close(self):
        if self.error:
            return {}
        try:
            self.send({"op": "exit"})
            out = self.recv()
        except Exception as exc:
            self.error = str(exc)
            out = {}
        self.proc.wait(timeout=60)
        return out


def label(cfg):
    if cfg["backend"] == "peak":
        return f"matmul peak {PEAK_N}^3 float32"
    parts = [cfg["backend"]]
    if cfg["backend"] == "xpnet":
        parts.append("cupy" if cfg.get("device") == "cuda" else "numpy")
        if cfg.get("plain"):
            parts.append("plain")
    if cfg["backend"] == "torch":
        parts.append(cfg.get("device", "cpu"))
        if cfg.get("thp"):
            parts.append("THP")
        if cfg.get("device") == "cuda":
            parts.append("TF32" if cfg.get("tf32") else "noTF32")
    parts.append(cfg["dtype"])
    return " ".join(parts)


def run_group(cfgs, rounds, min_round_s, max_steps_round=50, env_for=None, progress=None):
    """Start the workers of one comparison, then time them round-robin."""
    # One worker at a time: a worker times its warm-up steps to decide how many
    # steps it gets per round, and warming up beside five others (as when all
    # started at once) inflated that estimate -- at b500 to one timed step per round.
    workers = []
    for c in cfgs:
        w = Worker(c, env_for(c) if env_for else None)
        w.wait_ready()
        workers.append(w)
        if w.error:
            print(f"  ! {label(w.cfg)}: {w.error}", file=sys.stderr)
    live = [w for w in workers if not w.error]
    tasks = list(live[0].ready["estimate_s"]) if live else []
    for task in tasks:
        for r in range(rounds):
            order = live[r % len(live):] + live[:r % len(live)] if live else []
            for w in order:
                est = max(w.ready["estimate_s"].get(task, 1e-3), 1e-6)
                n = max(1, min(max_steps_round, math.ceil(min_round_s / est)))
                skip = 1 if est < 1.0 else 0  # one untimed step first: caches, threads, clocks
                try:
                    w.time(task, n, skip)
                except Exception as exc:
                    w.error = str(exc)
            live = [w for w in live if not w.error]
        if progress:
            progress(task)
    results = []
    for w in workers:
        end = w.close()
        results.append(summarise(w, end))
    return results


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(w, end):
    out = {"config": w.cfg, "label": label(w.cfg)}
    if w.error:
        out["error"] = w.error
        return out
    out["first_call_s"] = w.ready["first_call_s"]
    out["rss_start_mb"] = w.ready["rss_start_mb"]
    out["rss_ready_mb"] = w.ready["rss_ready_mb"]
    out["info"] = w.ready["info"]
    out.update(end)
    out["tasks"] = {}
    for task, ts in w.times.items():
        med = _quantile(ts, 0.5)
        out["tasks"][task] = {
            "n": len(ts), "median_s": med, "q25_s": _quantile(ts, 0.25), "q75_s": _quantile(ts, 0.75),
            "min_s": min(ts), "max_s": max(ts),
            "iqr_rel": (_quantile(ts, 0.75) - _quantile(ts, 0.25)) / med if med else float("nan"),
        }
    return out


def measure_peak(raise_priority):
    """2-thread (all-thread) float32 matmul GFLOP/s with NumPy's BLAS, in a fresh process."""
    code = (
        "import numpy as np, time, json, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import bench\n"
        f"if {bool(raise_priority)}: bench._raise_priority()\n"
        "a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32); b = a.T.copy()\n"
        "c = a @ b\n"
        "ts = []\n"
        "for _ in range(15):\n"
        "    t0 = time.perf_counter(); np.matmul(a, b, out=c); ts.append(time.perf_counter() - t0)\n"
        "ts.sort(); print(json.dumps({'median_gflops': 2 * 2048**3 / ts[len(ts)//2] / 1e9, "
        "'best_gflops': 2 * 2048**3 / ts[0] / 1e9}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        return {"error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- plans


def plan(args):
    """The comparison groups of this run: list of (title, kind, model, batch, [configs])."""
    cpu = dict(device="cpu")
    x32 = dict(backend="xpnet", dtype="float32", **cpu)
    x64 = dict(backend="xpnet", dtype="float64", **cpu)
    xplain = dict(backend="xpnet", dtype="float32", plain=True, **cpu)
    seed = dict(backend="seed", dtype="float64")
    th = dict(backend="torch", dtype="float32", **cpu)
    thp = dict(backend="torch", dtype="float32", thp=True, **cpu)
    groups = []

    peak = dict(backend="peak", dtype="float32")

    def g(kind, model, batch, cfgs):
        if kind == "train" and any(c.get("device", "cpu") == "cpu" and c["backend"] != "peak" for c in cfgs):
            cfgs = cfgs + [peak]  # the matmul peak, measured in the same rounds
        groups.append((kind, model, batch, [dict(c, kind=kind, model=model, batch=batch) for c in cfgs]))

    if args.gpu:
        gx = dict(backend="xpnet", dtype="float32", device="cuda")
        gt = dict(backend="torch", dtype="float32", device="cuda", tf32=False)
        gt32 = dict(backend="torch", dtype="float32", device="cuda", tf32=True)
        g("train", "captcha_net", 128, [gx, gt, gt32])
        g("train", "captcha_net", 500, [gx, gt, gt32, x32])  # x32: the same machine's CPU cores
        g("train", "captcha_net_bn", 500, [gx, gt, gt32])
        g("infer", "captcha_net", 1, [gx, gt, x32, th])
        g("ops", None, OP_BATCH, [gx, gt])
        return groups
    if args.quick:
        g("train", "captcha_net", 128, [x32, th, thp, seed])
        g("train", "captcha_net", 500, [x32, th, thp])
        g("train", "captcha_net_bn", 64, [x32, th])
        g("train", "captcha_net_bn", 128, [x32, th])
        g("infer", "captcha_net", 1, [x32, th])
        g("infer", "captcha_net", 256, [x32, th])
        g("train", "captcha_crnn", 64, [x32, th])
        g("ops", None, OP_BATCH, [x32, th])
        return groups
    for batch in (32, 128, 500):
        extra = [xplain] if batch == 128 else []
        g("train", "captcha_net", batch, [x32, x64] + extra + [seed, th, thp])
    for batch in (32, 64, 128, 500):
        g("train", "captcha_net_bn", batch, [x32, x64, th, thp])
    g("infer", "captcha_net", 1, [x32, x64, seed, th])
    g("infer", "captcha_net", 256, [x32, x64, seed, th])
    g("infer", "captcha_net_bn", 1, [x32, th])
    g("infer", "captcha_net_bn", 256, [x32, th])
    for batch in (64, 128):
        g("train", "captcha_crnn", batch, [x32, th])
    g("ops", None, OP_BATCH, [x32, x64, seed, th])
    return groups


# --------------------------------------------------------------------------- reporting


def is_ref(r, what, results=()):
    """The reference rows: PyTorch CPU default settings (else PyTorch CUDA without TF32), the seed code."""
    c = r["config"]
    if what == "torch":
        has_cpu = any(o["config"]["backend"] == "torch" and o["config"].get("device", "cpu") == "cpu"
                      for o in results)
        if has_cpu:
            return c["backend"] == "torch" and not c.get("thp") and c.get("device", "cpu") == "cpu"
        return c["backend"] == "torch" and c.get("device") == "cuda" and not c.get("tf32")
    if what == "seed":
        return c["backend"] == "seed"
    return False


def enrich(groups_out, peak):
    """Add images/s, ratios to PyTorch CPU default and to the seed reference, share of peak."""
    for grp in groups_out:
        res = grp["results"]
        grp_peak = peak
        for r in res:
            if r["config"]["backend"] == "peak" and "tasks" in r:
                st = r["tasks"]["step"]
                st["gflops"] = 2 * PEAK_N ** 3 / st["median_s"] / 1e9
                grp_peak = grp["peak_gflops"] = st["gflops"]
        for task in sorted({t for r in res for t in r.get("tasks", {})}):
            ref_t = next((r["tasks"][task]["median_s"] for r in res
                          if is_ref(r, "torch", res) and task in r.get("tasks", {})), None)
            ref_s = next((r["tasks"][task]["median_s"] for r in res if is_ref(r, "seed") and task in r.get("tasks", {})), None)
            for r in res:
                st = r.get("tasks", {}).get(task)
                if not st or r["config"]["backend"] == "peak":
                    continue
                c = r["config"]
                n = grp["batch"]
                st["images_per_s"] = n / st["median_s"]
                if ref_t:
                    st["vs_torch"] = ref_t / st["median_s"]
                if ref_s:
                    st["vs_seed"] = ref_s / st["median_s"]
                if grp["kind"] in ("train", "infer") and grp_peak and c.get("device", "cpu") == "cpu":
                    fl = step_flops(grp["model"], n, train=grp["kind"] == "train")
                    st["gflops"] = fl / st["median_s"] / 1e9
                    st["peak_share"] = st["gflops"] / grp_peak


def fmt_table(groups_out, peak):
    lines = []
    head = f"{'what':<34}{'backend':<30}{'median':>10}{'IQR%':>6}{'img/s':>9}{'xTorch':>8}{'xSeed':>8}{'peak%':>7}{'RSS MB':>8}"
    for grp in groups_out:
        title = grp["title"]
        lines.append("")
        lines.append(head)
        lines.append("-" * len(head))
        for r in grp["results"]:
            if "error" in r:
                lines.append(f"{title:<34}{r['label']:<30}  failed: {r['error'][:60]}")
                continue
            if r["config"]["backend"] == "peak":
                st = r["tasks"]["step"]
                lines.append(f"{title:<34}{r['label']:<30}{st['median_s'] * 1e3:>8.2f}ms{st['iqr_rel'] * 100:>6.1f}"
                             f"{st['gflops']:>9.0f} GFLOP/s (the peak of the peak% column)")
                continue
            for task, st in r["tasks"].items():
                what = title if task == "step" else task
                med = st["median_s"]
                medtxt = f"{med * 1e3:.2f}ms" if med >= 1e-3 else f"{med * 1e6:.0f}us"
                lines.append(
                    f"{what:<34}{r['label']:<30}{medtxt:>10}{st['iqr_rel'] * 100:>6.1f}"
                    f"{st['images_per_s']:>9.0f}"
                    f"{(format(st['vs_torch'], '.2f') if 'vs_torch' in st else ''):>8}"
                    f"{(format(st['vs_seed'], '.1f') if 'vs_seed' in st else ''):>8}"
                    f"{(format(st['peak_share'] * 100, '.0f') if 'peak_share' in st else ''):>7}"
                    f"{(format(r['maxrss_mb'], '.0f') if grp['kind'] != 'ops' and 'maxrss_mb' in r else ''):>8}")
    return "\n".join(lines)


def find(groups_out, kind, model, batch, pred):
    for grp in groups_out:
        if grp["kind"] == kind and grp["model"] == model and grp["batch"] == batch:
            for r in grp["results"]:
                if "error" not in r and pred(r["config"]):
                    return r
    return None


def targets(groups_out, peak):
    """The issue's CPU targets, checked on this run's numbers (None where not measured)."""
    xp32 = lambda c: c["backend"] == "xpnet" and c["dtype"] == "float32" and not c.get("plain") and c.get("device", "cpu") == "cpu"
    tdef = lambda c: c["backend"] == "torch" and not c.get("thp") and c.get("device", "cpu") == "cpu"
    tthp = lambda c: c["backend"] == "torch" and c.get("thp")
    seed = lambda c: c["backend"] == "seed"

    def ips(r):
        return r["tasks"]["step"]["images_per_s"] if r else None

    out = []

    def add(name, value, goal, ok):
        out.append({"target": name, "value": value, "goal": goal, "met": ok})

    a, b = find(groups_out, "train", "captcha_net", 128, xp32), find(groups_out, "train", "captcha_net", 128, tdef)
    if a and b:
        v = ips(a) / ips(b)
        add("b128 train vs PyTorch CPU default", v, ">= 1.5x", v >= 1.5)
    b = find(groups_out, "train", "captcha_net", 128, tthp)
    if a and b:
        v = ips(a) / ips(b)
        add("b128 train vs PyTorch CPU + THP", v, ">= 1.0x", v >= 1.0)
    a5, b5 = find(groups_out, "train", "captcha_net", 500, xp32), find(groups_out, "train", "captcha_net", 500, tdef)
    if a5 and b5:
        v = ips(a5) / ips(b5)
        add("b500 train vs PyTorch CPU default", v, ">= 2.0x", v >= 2.0)
    if a5 and a:
        v = ips(a5) / ips(a)
        add("b500 throughput / own b128 throughput", v, ">= 0.9", v >= 0.9)
    s = find(groups_out, "train", "captcha_net", 128, seed)
    if a and s:
        v = ips(a) / ips(s)
        add("b128 train vs seed-style reference", v, ">= 10x", v >= 10)
    if a and "peak_share" in a["tasks"]["step"]:
        v = a["tasks"]["step"]["peak_share"]
        add("b128 train share of matmul peak", v, ">= 45%", v >= 0.45)
    if a5 and b5 and "maxrss_mb" in a5 and "maxrss_mb" in b5:
        add("b500 peak RSS xpnet / PyTorch", a5["maxrss_mb"] / b5["maxrss_mb"], "<= 1.0",
            a5["maxrss_mb"] <= b5["maxrss_mb"])
    bn64 = [find(groups_out, "train", "captcha_net_bn", 64, p) for p in (xp32, tdef)]
    if all(bn64):
        v = ips(bn64[0]) / ips(bn64[1])
        add("captcha_net_bn b64 train vs PyTorch CPU default", v, ">= 1.5x", v >= 1.5)
    c64 = [find(groups_out, "train", "captcha_crnn", 64, p) for p in (xp32, tdef)]
    if all(c64):
        v = ips(c64[0]) / ips(c64[1])
        add("captcha_crnn b64 train vs PyTorch CPU default", v, ">= 1.5x", v >= 1.5)
    i1 = find(groups_out, "infer", "captcha_net", 1, xp32)
    if i1:
        v = i1["tasks"]["step"]["median_s"] * 1e3
        add("single-image inference median (ms)", v, "<= 1.5", v <= 1.5)
    return out


def gpu_targets(groups_out):
    """The issue's GPU targets on this run's numbers (float32, one device, ratios in one run)."""
    xcu = lambda c: c["backend"] == "xpnet" and c.get("device") == "cuda"
    tcu = lambda c: c["backend"] == "torch" and c.get("device") == "cuda" and not c.get("tf32")
    xcpu = lambda c: c["backend"] == "xpnet" and c.get("device", "cpu") == "cpu" and c["dtype"] == "float32"
    out = []
    a, t, n = (find(groups_out, "train", "captcha_net", 500, p) for p in (xcu, tcu, xcpu))
    ips = lambda r: r["tasks"]["step"]["images_per_s"]
    if a and t:
        v = ips(a) / ips(t)
        out.append({"target": "b500 train CuPy vs PyTorch CUDA (cuDNN, no TF32)", "value": v, "goal": ">= 0.5x",
                    "met": v >= 0.5})
    if a and n:
        v = ips(a) / ips(n)
        out.append({"target": "b500 train CuPy vs xpnet NumPy (this CPU)", "value": v, "goal": ">= 20x",
                    "met": v >= 20})
    return out


def _probe(code):
    """Run ``code`` in a fresh interpreter (this process imports no framework); its last line as JSON."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if out.returncode:
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def torch_cuda_status():
    """(usable, reason): whether PyTorch here can run on a CUDA device (torch.cuda.is_available())."""
    got, err = _probe("import json, torch; print(json.dumps([torch.cuda.is_available(), torch.__version__, "
                      "torch.version.cuda]))")
    if got is None:
        return False, f"PyTorch could not be imported ({err})"
    ok, version, cuda = got
    if ok:
        return True, f"PyTorch {version}, CUDA {cuda}"
    if cuda is None:
        return False, f"PyTorch {version} is a CPU-only build (torch.version.cuda is None)"
    return False, f"PyTorch {version} (CUDA {cuda}) sees no usable CUDA device (torch.cuda.is_available() is False)"


def cupy_gpu_status():
    """(usable, reason): whether xpnet's CuPy backend has a usable CUDA device here."""
    got, err = _probe("import json; from xpnet import backend; "
                      "print(json.dumps([backend.has_cupy_gpu, backend.device_reason()]))")
    if got is None:
        return False, f"xpnet could not be imported ({err})"
    return bool(got[0]), str(got[1])


def gpu_rows(groups, torch_status, cupy_status):
    """The --gpu groups without the CUDA rows that cannot run here, and a note saying why for each kind.

    ``torch_status`` / ``cupy_status``: (usable, reason) from ``torch_cuda_status`` / ``cupy_gpu_status``.
    """
    notes = []
    drop = set()
    if not torch_status[0]:
        drop.add("torch")
        notes.append(f"PyTorch CUDA rows skipped: {torch_status[1]}.")
    if not cupy_status[0]:
        drop.add("xpnet")
        notes.append(f"xpnet CuPy rows skipped: {cupy_status[1]}.")
    out = []
    for kind, model, batch, cfgs in groups:
        cfgs = [c for c in cfgs if not (c.get("device") == "cuda" and c["backend"] in drop)]
        out.append((kind, model, batch, cfgs))
    return out, notes


def machine_info():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as fh:
            info["sched_autogroup_enabled"] = fh.read().strip() == "1"
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    import importlib.metadata as md

    versions = {}
    for dist in ("numpy", "torch", "cupy-cuda12x", "cupy-cuda13x", "threadpoolctl", "scipy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info["versions"] = versions
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                            capture_output=True, text=True, cwd=ROOT).stdout.strip())
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def plot(groups_out, path, title):
    """One horizontal bar chart per training/inference comparison: images/s, linear scale,
    whiskers from the first to the third quartile of the step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [g for g in groups_out if g["kind"] in ("train", "infer")]
    if not bars:
        return
    heights = [0.9 + 0.32 * sum(1 for r in g["results"] if r["config"]["backend"] != "peak") for g in bars]
    fig, axes = plt.subplots(len(bars), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, grp in zip(axes[:, 0], bars):
        rows = [(r["label"], r["tasks"]["step"]) for r in grp["results"]
                if "error" not in r and "step" in r["tasks"] and r["config"]["backend"] != "peak"]
        names = [n for n, _ in rows]
        n = grp["batch"]
        vals = [st["images_per_s"] for _, st in rows]
        lo = [max(0.0, v - n / st["q75_s"]) for v, (_, st) in zip(vals, rows)]
        hi = [max(0.0, n / st["q25_s"] - v) for v, (_, st) in zip(vals, rows)]
        colors = ["#2b7bba" if n_.startswith("xpnet") else "#e07b39" if n_.startswith("torch") else "#888888"
                  for n_ in names]
        ax.barh(range(len(rows)), vals, xerr=[lo, hi], color=colors, error_kw={"elinewidth": 0.8})
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(v + h for v, h in zip(vals, hi)) * 1.15 if vals else 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(grp["title"] + "  (images/s)", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the subset the speed targets need (~3 min)")
    mode.add_argument("--gpu", action="store_true", help="CuPy vs PyTorch CUDA vs NumPy on a GPU machine (~3 min)")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds per comparison (default 7, quick 5)")
    ap.add_argument("--raise-priority", action="store_true",
                    help="run workers in their own session with a raised autogroup weight (root; see the docstring)")
    ap.add_argument("--name", default=None, help="results file name (default: cpu/quick/gpu + date)")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even when installed")
    ap.add_argument("--only", default=None, help="run only the comparisons whose title contains this text")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the bar chart of an earlier results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.plot_only:
        with open(args.plot_only) as fh:
            doc = json.load(fh)
        info = doc["machine"]
        plot(doc["groups"], os.path.splitext(args.plot_only)[0] + ".png",
             f"xpnet benchmark {doc['date']} ({info.get('cpu', '')}, {info.get('usable_cores')} cores)")
        return 0
    t_start = time.time()
    rounds = args.rounds or (5 if (args.quick or args.gpu) else 7)
    min_round_s = 0.6 if not (args.quick or args.gpu) else 0.4
    have_torch = not args.no_torch and _importable("torch")
    have_cupy = _importable("cupy")
    notes = []
    if not have_torch:
        notes.append("PyTorch not installed (or --no-torch): its rows are skipped.")
    groups = plan(args)
    if args.gpu:  # CUDA rows only where their framework sees a device; each kind skipped says why
        groups, gpu_notes = gpu_rows(
            groups, torch_cuda_status() if have_torch else (False, "PyTorch is not installed (or --no-torch)"),
            cupy_gpu_status() if have_cupy else (False, "CuPy is not installed"))
        notes += gpu_notes
        if not any(c.get("device") == "cuda" for _, _, _, cfgs in groups for c in cfgs):
            for n in notes:
                print("note:", n)
            print("bench.py --gpu: no GPU row can run on this machine, nothing measured.")
            return 3
    kept = []
    for kind, model, batch, cfgs in groups:
        cfgs = [c for c in cfgs if (c["backend"] != "torch" or have_torch)
                and not (c["backend"] == "xpnet" and c.get("device") == "cuda" and not have_cupy)]
        for c in cfgs:
            c["raise_priority"] = args.raise_priority
        title = _title(kind, model, batch)
        if cfgs and (not args.only or args.only in title):
            kept.append((kind, model, batch, cfgs))
    info = machine_info()
    print(f"xpnet benchmark ({'gpu' if args.gpu else 'quick' if args.quick else 'full'}): "
          f"{info.get('cpu', '?')}, {info.get('usable_cores', info['cpu_count'])} cores, "
          f"commit {info.get('commit', '?')[:10]}{' (dirty)' if info.get('dirty') else ''}", flush=True)
    peak_start = measure_peak(args.raise_priority)
    print(f"matmul peak (float32, all threads): {peak_start}", flush=True)

    def env_for(cfg):
        env = {"XPNET_BACKEND": "cupy" if cfg.get("device") == "cuda" and cfg["backend"] == "xpnet" else "numpy"}
        if cfg.get("thp"):
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        return env

    groups_out = []
    for kind, model, batch, cfgs in kept:
        title = _title(kind, model, batch)
        t0 = time.time()
        print(f"[{time.time() - t_start:6.0f}s] {title}: {', '.join(label(c) for c in cfgs)}", flush=True)
        n_rounds = rounds if kind != "ops" else max(3, rounds - 2)
        max_steps = 400 if (kind == "infer" and batch == 1) else 50
        results = run_group(cfgs, n_rounds, min_round_s if kind != "ops" else min_round_s / 2, max_steps, env_for)
        groups_out.append({"title": title, "kind": kind, "model": model, "batch": batch, "results": results,
                           "seconds": time.time() - t0})
    peak_end = measure_peak(args.raise_priority)
    peaks = [p.get("median_gflops") for p in (peak_start, peak_end) if "median_gflops" in p]
    peak = max(peaks) if peaks else None
    enrich(groups_out, peak)
    table = fmt_table(groups_out, peak)
    tg = targets(groups_out, peak) if not args.gpu else gpu_targets(groups_out)
    tg_lines = ["", "targets (float32; captcha_net; the BatchNorm and CRNN readers at batch 64):"] + [
        f"  {'MET ' if t['met'] else 'MISS'} {t['target']:<42} {t['value']:.3g} (goal {t['goal']})" for t in tg]
    summary = (f"matmul peak {peak:.0f} GFLOP/s (start {peak_start.get('median_gflops', float('nan')):.0f}, "
               f"end {peak_end.get('median_gflops', float('nan')):.0f})" if peak else "matmul peak not measured")
    print(table)
    print("\n" + summary)
    if tg:
        print("\n".join(tg_lines))
    for n in notes:
        print("note:", n)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M")
    name = args.name or f"{'gpu' if args.gpu else 'quick' if args.quick else 'cpu'}_{stamp}"
    doc = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "mode": "gpu" if args.gpu else
           "quick" if args.quick else "full", "machine": info, "matmul_peak_gflops": peak,
           "matmul_peak_start": peak_start, "matmul_peak_end": peak_end, "rounds": rounds,
           "raise_priority": args.raise_priority, "notes": notes, "groups": groups_out, "targets": tg,
           "command": "python benchmarks/bench.py " + " ".join(a for a in (argv or sys.argv[1:])),
           "seconds": time.time() - t_start}
    with open(os.path.join(RESULTS, name + ".json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(os.path.join(RESULTS, name + ".txt"), "w") as fh:
        fh.write(f"{doc['command']}\n{doc['date']}  commit {info.get('commit', '?')}"
                 f"{' (dirty)' if info.get('dirty') else ''}\n{info.get('cpu')}, "
                 f"{info.get('usable_cores')} cores, {summary}\n")
        fh.write(table + "\n")
        if tg:
            fh.write("\n".join(tg_lines) + "\n")
        for n in notes:
            fh.write(f"note: {n}\n")
    plot(groups_out, os.path.join(RESULTS, name + ".png"),
         f"xpnet benchmark {doc['date']} ({info.get('cpu', '')}, {info.get('usable_cores')} cores)")
    print(f"\nwrote {os.path.relpath(os.path.join(RESULTS, name), ROOT)}.{{json,txt,png}} "
          f"in {time.time() - t_start:.0f} s")
    return 0


def _title(kind, model, batch):
    if kind == "train":
        return f"train step {model} b={batch}"
    if kind == "infer":
        return f"inference {model} b={batch}"
    return f"ops b={batch}"


def _importable(mod):
    """Whether a module is installed, without importing it here (workers import what they use)."""
    import importlib.util

    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
