"""Research tool (PyTorch stand-in): train one CAPTCHA-reader configuration, log its learning curve.

Every network here is expressible with xpnet's layers (Conv2D, MaxPool2D, Dense, ReLU,
Flatten, Dropout, BatchNorm) and the default loss is xpnet's: sigmoid + BCE summed over
the length*36 units, averaged over the batch, argmax per 36-block at prediction.
Accuracy is logged against the number of training samples processed and the number of
distinct images, never against wall time.

Architecture spec, tokens joined by '-':
  c32   conv 3x3 'valid' 32 channels (+BatchNorm if cfg bn) + ReLU
  C32   conv 3x3 'same'  32 channels (+BatchNorm if cfg bn) + ReLU
  p     max pool 2x2 stride 2
  d512  dense 512 + ReLU (+Dropout if cfg dropout > 0)
The final dense length*n_classes layer is implicit.  The seed's network is
"c32-p-c64-p-c128-p-d512".

usage: python recipe_torch.py '{"name": "seed", "arch": "c32-p-c64-p-c128-p-d512", ...}' [--out results.jsonl]
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA = os.environ.get("RECIPE_DATA", "/tmp/recipe")

DEFAULTS = dict(
    name="run", arch="c32-p-c64-p-c128-p-d512", bn=False, dropout=0.0,
    H=32, W=80, rgb=False, train_set="train", test_set="test",
    distinct=80000, samples=400000, batch=64,
    opt="adam", lr=1e-3, wd=0.0, momentum=0.9, nesterov=True, beta1=0.9,
    sched="const", warmup=0.0, start_div=25.0, final_div=1e4, exp_final=0.1,
    shift=0, scale=0.0, loss="bce", smooth=0.0,
    evals=10, seed=0, val_frac=0.0, patience=0, prior_bias=False, n_classes=36, length=4, device="cpu", threads=2,
)


def build(cfg, in_ch):
    layers, c, h, w = [], in_ch, cfg["H"], cfg["W"]
    for tok in cfg["arch"].split("-"):
        kind, n = tok[0], tok[1:]
        if kind in "cC":
            n = int(n)
            pad = 1 if kind == "C" else 0
            layers.append(nn.Conv2d(c, n, 3, padding=pad, bias=not cfg["bn"]))
            if cfg["bn"]:
                layers.append(nn.BatchNorm2d(n))
            layers.append(nn.ReLU())
            c = n
            if not pad:
                h, w = h - 2, w - 2
        elif kind == "p":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        elif kind == "d":
            if not any(isinstance(l, nn.Flatten) for l in layers):
                layers.append(nn.Flatten())
                c = c * h * w
            layers += [nn.Linear(c, int(n)), nn.ReLU()]
            c = int(n)
            if cfg["dropout"]:
                layers.append(nn.Dropout(cfg["dropout"]))
        else:
            raise ValueError(tok)
    if not any(isinstance(l, nn.Flatten) for l in layers):
        layers.append(nn.Flatten())
        c = c * h * w
    layers.append(nn.Linear(c, cfg["length"] * cfg["n_classes"]))
    net = nn.Sequential(*layers)
    for m in net.modules():  # xpnet's "he" init: N(0, 2/fan_in), zero bias
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if cfg["prior_bias"]:  # output bias = logit of the class prior 1/K: sigmoid starts at 1/K, not 1/2
        nn.init.constant_(layers[-1].bias, -math.log(cfg["n_classes"] - 1))
    return net


def load(set_name, cfg):
    """A cached set by name; "a+b" concatenates sets a and b."""
    suffix = "_rgb" if cfg["rgb"] else ""
    names = set_name.split("+")
    xs = [np.load(f"{DATA}/{n}_{cfg['H']}x{cfg['W']}{suffix}.npy", mmap_mode="r") for n in names]
    ys = [np.load(f"{DATA}/{n}_y.npy") for n in names]
    if len(names) == 1:
        return xs[0], ys[0]
    return np.concatenate(xs), np.concatenate(ys)


def to_input(xb, rgb):
    """uint8 (B,H,W) or (B,H,W,3) -> float (B,C,H,W) in [-1, 1]."""
    x = xb.float()
    x = x.permute(0, 3, 1, 2) if rgb else x.unsqueeze(1)
    return x * (2.0 / 255.0) - 1.0


def augment(x, shift, scale, gen):
    """Random per-sample translation (+-shift px, integer) and scale (1 +- scale), border replicated.

    Random numbers come from `gen`, which lives on x's device (no host round trip per step).
    """
    B, C, H, W = x.shape
    dev = x.device
    if scale:
        s = 1.0 + (torch.rand(B, generator=gen, device=dev) * 2 - 1) * scale
        zero = torch.zeros(B, device=dev)
        tx = torch.randint(-shift, shift + 1, (B,), generator=gen, device=dev).float() * 2 / W if shift else zero
        ty = torch.randint(-shift, shift + 1, (B,), generator=gen, device=dev).float() * 2 / H if shift else zero
        theta = torch.stack([torch.stack([1 / s, zero, tx], 1), torch.stack([zero, 1 / s, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if not shift:
        return x
    xp = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy = torch.randint(0, 2 * shift + 1, (B,), generator=gen, device=dev)
    dx = torch.randint(0, 2 * shift + 1, (B,), generator=gen, device=dev)
    rows = torch.arange(H, device=dev)[None, :] + dy[:, None]  # (B,H)
    cols = torch.arange(W, device=dev)[None, :] + dx[:, None]  # (B,W)
    b = torch.arange(B, device=dev)[:, None, None, None]
    c = torch.arange(C, device=dev)[None, :, None, None]
    return xp[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def lr_at(cfg, step, total):
    f = step / max(total, 1)
    lr, s = cfg["lr"], cfg["sched"]
    if s == "const":
        return lr
    if s == "exp":  # exponential decay from lr to lr*exp_final over the run
        return lr * cfg["exp_final"] ** f
    if s == "step":  # x0.1 at 50% and 75%
        return lr * (0.1 ** ((f >= 0.5) + (f >= 0.75)))
    if s in ("cos", "onecycle"):
        wu = cfg["warmup"] if s == "cos" else (cfg["warmup"] or 0.3)
        start = lr / cfg["start_div"] if s == "onecycle" else 0.0
        final = lr / cfg["final_div"] if s == "onecycle" else 0.0
        if f < wu:
            return start + (lr - start) * f / wu
        g = (f - wu) / max(1 - wu, 1e-9)
        return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * g))
    raise ValueError(s)


def loss_fn(logits, y, cfg):
    B = y.shape[0]
    L, K = cfg["length"], cfg["n_classes"]
    if cfg["loss"] == "ce":
        return F.cross_entropy(logits.view(B * L, K), y.view(-1), label_smoothing=cfg["smooth"]) * L
    t = F.one_hot(y, K).float().view(B, L * K)
    if cfg["smooth"]:
        t = t * (1 - cfg["smooth"]) + cfg["smooth"] / K
    return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / B


@torch.no_grad()
def evaluate(net, x, y, cfg, dev, batch=500):
    net.eval()
    preds = []
    for i in range(0, len(x), batch):
        xb = to_input(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(dev), cfg["rgb"])
        preds.append(net(xb).view(-1, cfg["length"], cfg["n_classes"]).argmax(-1).cpu())
    net.train()
    p = torch.cat(preds).numpy()
    ok = p == y
    return float(ok.all(1).mean()), float(ok.mean()), p


def run(cfg, out=None):
    cfg = {**DEFAULTS, **cfg}
    dev = torch.device(cfg["device"])
    if dev.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    else:
        torch.set_num_threads(1)  # many runs share the box's cores; the GPU does the work
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
    xtr, ytr = load(cfg["train_set"], cfg)
    xva = yva = None
    if cfg["val_frac"]:  # seeded validation split off the training set (early stopping, best checkpoint)
        order = np.random.default_rng(cfg["seed"]).permutation(len(ytr))
        n_va = max(1, int(round(len(ytr) * cfg["val_frac"])))
        xva, yva = np.asarray(xtr)[order[:n_va]], ytr[order[:n_va]]
        xtr, ytr = np.asarray(xtr)[order[n_va:]], ytr[order[n_va:]]
    N = min(cfg["distinct"], len(xtr))
    ytr = ytr[:N]
    xtr = torch.from_numpy(np.ascontiguousarray(xtr[:N])).to(dev)
    ytr_t = torch.from_numpy(ytr.astype(np.int64)).to(dev)
    xte, yte = load(cfg["test_set"], cfg)
    in_ch = 3 if cfg["rgb"] else 1
    net = build(cfg, in_ch).to(dev)
    params = sum(p.numel() for p in net.parameters())
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg["wd"]}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg["opt"] == "adam":
        opt = torch.optim.Adam(groups, lr=cfg["lr"], betas=(cfg["beta1"], 0.999))
    elif cfg["opt"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], 0.999))
    elif cfg["opt"] == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    else:
        raise ValueError(cfg["opt"])
    B = cfg["batch"]
    total = cfg["samples"] // B
    eval_steps = sorted({int(round(total * (k + 1) / cfg["evals"])) for k in range(cfg["evals"])})
    curve, perm, pos, run_loss, n_loss, t0 = [], None, N, 0.0, 0, time.time()
    best, best_state, since_best = (-1.0, -1.0), None, 0
    progress = open(out + ".progress", "a") if out else None
    for step in range(1, total + 1):
        if pos + B > N:
            perm = torch.randperm(N, generator=gen, device=dev)
            pos = 0
        idx = perm[pos:pos + B]
        pos += B
        xb = augment(to_input(xtr[idx], cfg["rgb"]), cfg["shift"], cfg["scale"], gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step - 1, total)
        loss = loss_fn(net(xb), ytr_t[idx], cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:  # sample the loss (a host sync every step would slow the GPU runs)
            run_loss += float(loss.detach())
            n_loss += 1
        if step in eval_steps:
            te, te_char, _ = evaluate(net, xte, yte, cfg, dev)
            ntr = min(2000, N)
            tr, _, _ = evaluate(net, xtr[:ntr].cpu().numpy(), ytr[:ntr], cfg, dev)
            point = dict(samples=step * B, epochs=round(step * B / N, 2), test=te, test_char=te_char,
                         train=tr, loss=round(run_loss / max(1, n_loss), 4),
                         step=step, wall=round(time.time() - t0, 1))
            run_loss, n_loss = 0.0, 0
            if xva is not None:
                va, va_char, _ = evaluate(net, xva, yva, cfg, dev)
                point.update(val=va, val_char=va_char)
                if (va, va_char) > best:
                    best, since_best = (va, va_char), 0
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    point["best"] = True
                else:
                    since_best += 1
            curve.append(point)
            print(f"[{cfg['name']}] {point}", flush=True)
            if progress:
                progress.write(json.dumps(dict(name=cfg["name"], **point)) + "\n")
                progress.flush()
            if cfg["patience"] and since_best >= cfg["patience"]:
                break
    if best_state is not None:  # the best checkpoint on validation is the one evaluated on the test set
        net.load_state_dict(best_state)
    te, te_char, pred = evaluate(net, xte, yte, cfg, dev)
    conf = {}
    from gen import CHARSET
    from prep_real import REAL_CHARSET
    CHARSET = REAL_CHARSET if cfg["n_classes"] == len(REAL_CHARSET) else CHARSET
    for t_, p_ in zip(yte.reshape(-1), pred.reshape(-1)):
        if t_ != p_:
            k = f"{CHARSET[t_]}->{CHARSET[p_]}"
            conf[k] = conf.get(k, 0) + 1
    top = sorted(conf.items(), key=lambda kv: -kv[1])[:15]
    res = dict(cfg=cfg, params=params, distinct=N, n_val=0 if yva is None else len(yva), best_val=best[0],
               stopped_at=curve[-1]["samples"], final_test=te, final_test_char=te_char,
               final_train=curve[-1]["train"], curve=curve, confusions=top, wall=round(time.time() - t0, 1))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res, net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="JSON dict of overrides")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    res, _ = run(json.loads(a.config), a.out)
    print(json.dumps({k: v for k, v in res.items() if k != "curve"}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
