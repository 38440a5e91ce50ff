"""Research tool: render seeded CAPTCHA sets with `captcha` 0.7.1 and cache them as uint8 .npy.

captcha 0.7.1 draws from `secrets` (unseedable); here each worker chunk replaces
`captcha.image.secrets` with a `random.Random` seeded from (seed, chunk), which offers
the three calls the module uses (randbelow, randbits, choice).

Output for a set NAME: /tmp/recipe/NAME_{H}x{W}[_rgb].npy  (N, H, W[, 3]) uint8 and
NAME_y.npy (N, 4) uint8 class indices into CHARSET.
usage: python benchmarks/recipe/gen.py NAME COUNT SEED [--workers 2] [--sizes 32x80,40x100] [--rgb 32x80]
"""
import argparse
import os
import random
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image

CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LENGTH = 4
OUT = os.environ.get("RECIPE_DATA", "/tmp/recipe")


class SeededSecrets(random.Random):
    """Drop-in for the `secrets` functions captcha.image uses, from a seeded PRNG."""

    def randbelow(self, n):
        return self.randrange(n)

    def randbits(self, k):
        return self.getrandbits(k)


def _chunk(args):
    seed, chunk, count, sizes, rgb_sizes = args
    import captcha.image as ci
    rng = SeededSecrets((seed * 1_000_003 + chunk) & 0xFFFFFFFF)
    ci.secrets = rng
    gen = ci.ImageCaptcha(width=160, height=60)
    ys = np.array([[rng.randrange(len(CHARSET)) for _ in range(LENGTH)] for _ in range(count)], np.uint8)
    grey = {s: np.empty((count, s[0], s[1]), np.uint8) for s in sizes}
    col = {s: np.empty((count, s[0], s[1], 3), np.uint8) for s in rgb_sizes}
    for i in range(count):
        im = gen.generate_image("".join(CHARSET[k] for k in ys[i]))
        for (h, w), arr in col.items():
            arr[i] = np.asarray(im.resize((w, h), Image.BILINEAR))
        g = im.convert("L")
        for (h, w), arr in grey.items():
            arr[i] = np.asarray(g.resize((w, h), Image.BILINEAR))
    return ys, grey, col


def generate(count, seed, sizes=((32, 80),), rgb_sizes=(), workers=2, chunk=500):
    tasks = [(seed, c, min(chunk, count - c * chunk), tuple(sizes), tuple(rgb_sizes))
             for c in range((count + chunk - 1) // chunk)]
    with Pool(workers) as pool:
        parts = pool.map(_chunk, tasks, chunksize=1)
    ys = np.concatenate([p[0] for p in parts])
    grey = {s: np.concatenate([p[1][s] for p in parts]) for s in sizes}
    col = {s: np.concatenate([p[2][s] for p in parts]) for s in rgb_sizes}
    return ys, grey, col


def parse_sizes(text):
    return tuple(tuple(int(v) for v in s.split("x")) for s in text.split(",") if s)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("count", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sizes", default="32x80")
    ap.add_argument("--rgb", default="")
    a = ap.parse_args(argv)
    os.makedirs(OUT, exist_ok=True)
    t = time.time()
    ys, grey, col = generate(a.count, a.seed, parse_sizes(a.sizes), parse_sizes(a.rgb), a.workers)
    dt = time.time() - t
    def save(path, arr):  # write then rename, so a reader waiting for the file never sees half of it
        np.save(path + ".tmp.npy", arr)
        os.replace(path + ".tmp.npy", path)

    save(f"{OUT}/{a.name}_y.npy", ys)
    for (h, w), arr in col.items():
        save(f"{OUT}/{a.name}_{h}x{w}_rgb.npy", arr)
    for (h, w), arr in grey.items():  # the grey 32x80 file last: plans wait for it
        save(f"{OUT}/{a.name}_{h}x{w}.npy", arr)
    print(f"{a.name}: {a.count} images in {dt:.1f}s = {a.count / dt:.0f} img/s on {a.workers} workers", flush=True)


if __name__ == "__main__":
    main()
