"""Research tool: xpnet (NumPy backend, from a given checkout) vs PyTorch CPU training-step throughput
for the recipe's candidate networks, side by side in one process, batch 64, grey 1x32x80, 2 threads.
Step = forward + sigmoid/BCE + backward + an Adam-style update (NumPy for xpnet, torch.optim.Adam).
usage: flock /tmp/xpnet-timing.lock python benchmarks/recipe/speed_xpnet.py /work/wt/speed [names]
"""
import os
import sys
import time

import numpy as np

XPNET_ROOT = sys.argv[1]
sys.path.insert(0, XPNET_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import xpnet  # noqa: E402
from xpnet import ops  # noqa: E402
from xpnet.nn.layers import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ReLU  # noqa: E402
from recipe_torch import DEFAULTS, build, loss_fn  # noqa: E402

NETS = {
    "seed": dict(arch="c32-p-c64-p-c128-p-d512"),
    "seed_bn": dict(arch="c32-p-c64-p-c128-p-d512", bn=True),
    "seed_d1024": dict(arch="c32-p-c64-p-c128-p-d1024"),
    "seed_40x100": dict(arch="c32-p-c64-p-c128-p-d512", H=40, W=100),
}


def xp_model(cfg):
    layers = []
    for tok in cfg["arch"].split("-"):
        k, n = tok[0], tok[1:]
        if k in "cC":
            layers.append(Conv2D(int(n), 3, pad="same" if k == "C" else 0, bias=not cfg["bn"]))
            if cfg["bn"]:
                layers.append(BatchNorm())
            layers.append(ReLU())
        elif k == "p":
            layers.append(MaxPool2D(2))
        elif k == "d":
            if not any(isinstance(l, Flatten) for l in layers):
                layers.append(Flatten())
            layers += [Dense(int(n)), ReLU()]
    layers.append(Dense(144))
    return xpnet.Sequential(layers, input_shape=(1, cfg["H"], cfg["W"]))


def time_it(step, n, seconds=6.0):
    for _ in range(3):
        step()
    k, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        step()
        k += 1
    return n * k / (time.perf_counter() - t)


def main():
    names = sys.argv[2:] or list(NETS)
    torch.set_num_threads(2)
    B = 64
    for name in names:
        cfg = {**DEFAULTS, **NETS[name]}
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, 1, cfg["H"], cfg["W"])).astype(np.float32)
        t = np.zeros((B, 144), np.float32)
        t[np.arange(B)[:, None], np.arange(4)[None, :] * 36 + rng.integers(0, 36, (B, 4))] = 1
        m = xp_model(cfg)
        params = list(m.parameters().values())
        mom = [np.zeros_like(p) for p in params]
        var = [np.zeros_like(p) for p in params]

        def xstep():
            logits = m.forward(x, train=True)
            _, d = ops.sigmoid_bce_with_logits(logits, t)
            m.backward(d)
            for p, g, mm, vv in zip(params, m.gradients().values(), mom, var):
                mm *= 0.9
                mm += 0.1 * g
                vv *= 0.999
                vv += 0.001 * g * g
                p -= 1e-3 * mm / (np.sqrt(vv) + 1e-8)
        net = build(cfg, 1)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        xt = torch.from_numpy(x)
        yt = torch.from_numpy(rng.integers(0, 36, (B, 4)))

        def tstep():
            loss = loss_fn(net(xt), yt, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        r = {}
        for rnd in range(2):  # alternate, twice, so drift in the machine's load hits both
            r.setdefault("xpnet", []).append(time_it(xstep, B))
            r.setdefault("torch", []).append(time_it(tstep, B))
        print(f"{name}: xpnet {max(r['xpnet']):.0f} img/s, torch {max(r['torch']):.0f} img/s "
              f"(runs {[round(v) for v in r['xpnet']]} / {[round(v) for v in r['torch']]})", flush=True)


if __name__ == "__main__":
    main()
