"""Research tool: PyTorch-CPU training throughput (images/s, forward+backward+Adam step) per candidate
architecture, 2 threads.  Run at normal priority under the shared timing lock:
    flock /tmp/xpnet-timing.lock python benchmarks/recipe/speed_torch.py
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_torch import DEFAULTS, build, loss_fn  # noqa: E402

CANDIDATES = [
    ("seed_rgb", dict(arch="c32-p-c64-p-c128-p-d512", rgb=True)),
    ("seed", dict(arch="c32-p-c64-p-c128-p-d512")),
    ("seed_d256", dict(arch="c32-p-c64-p-c128-p-d256")),
    ("seed_bn", dict(arch="c32-p-c64-p-c128-p-d512", bn=True)),
    ("narrow", dict(arch="c16-p-c32-p-c64-p-d256")),
    ("mid", dict(arch="c24-p-c48-p-c96-p-d256")),
    ("same_d256", dict(arch="C32-p-C64-p-C128-p-d256")),
    ("same_bn_d256", dict(arch="C32-p-C64-p-C128-p-d256", bn=True)),
    ("seed_40x100", dict(arch="c32-p-c64-p-c128-p-d512", H=40, W=100)),
    ("seed_bn_40x100", dict(arch="c32-p-c64-p-c128-p-d512", H=40, W=100, bn=True)),
    ("deep_bn", dict(arch="C32-p-C64-p-C128-C128-p-d256", bn=True)),
    ("captcha_net_bn", dict(arch="C32-p-C64-C64-p-C128-C128-p-C128-C128-p-d512", bn=True, dropout=0.25)),
]


def speed(cfg, batch, seconds=4.0):
    torch.manual_seed(0)
    net = build(cfg, 3 if cfg["rgb"] else 1)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.randn(batch, 3 if cfg["rgb"] else 1, cfg["H"], cfg["W"])
    y = torch.randint(0, 36, (batch, 4))
    def step():
        loss = loss_fn(net(x), y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        step()
        n += 1
    dt = time.perf_counter() - t
    with torch.no_grad():
        net.eval()
        xe = torch.randn(500, *x.shape[1:])
        t2 = time.perf_counter()
        net(xe)
        inf = 500 / (time.perf_counter() - t2)
    return n * batch / dt, inf, sum(p.numel() for p in net.parameters())


if __name__ == "__main__":
    torch.set_num_threads(2)
    names = sys.argv[1:]
    for name, over in CANDIDATES:
        if names and name not in names:
            continue
        cfg = {**DEFAULTS, **over}
        row = {"name": name}
        for b in (64, 128):
            row[f"train_ips_b{b}"], row["infer_ips"], row["params"] = speed(cfg, b)
        print(json.dumps({k: (round(v) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
