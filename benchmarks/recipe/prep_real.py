"""Research tool: the real CAPTCHA folder -> uint8 .npy sets with a seeded 80/20 split.

Writes to $RECIPE_DATA (default /tmp/recipe), for each size HxW:
  real_tr_{H}x{W}.npy / real_tr_y.npy   80% for training (the harness splits off its own validation)
  real_te_{H}x{W}.npy / real_te_y.npy   20% held out (seed 0 permutation)
  real1k_tr_* : 1,000 images drawn (seeded) from the 80%: what a user with 1,000 labelled images has
Labels index REAL_CHARSET (32 classes).  Images are converted to grey ('L'), resized with PIL BILINEAR.
usage: python benchmarks/recipe/prep_real.py [FOLDER | archive.npz] [--sizes 24x72,32x96]
"""
import argparse
import os

import numpy as np
from PIL import Image

REAL_CHARSET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
OUT = os.environ.get("RECIPE_DATA", "/tmp/recipe")


def read_folder(folder):
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
    imgs = np.stack([np.asarray(Image.open(os.path.join(folder, f)).convert("L")) for f in names])
    labels = [os.path.splitext(f)[0] for f in names]
    return imgs, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?", default="/work/shared/data/captcha/really_simple_4char")
    ap.add_argument("--sizes", default="24x72,32x96")
    ap.add_argument("--archive", default=None, help="also save the raw images + labels to this .npz")
    a = ap.parse_args()
    if a.src.endswith(".npz"):
        z = np.load(a.src)
        imgs, labels = z["x"], [str(s) for s in z["labels"]]
    else:
        imgs, labels = read_folder(a.src)
    if a.archive:
        np.savez_compressed(a.archive, x=imgs, labels=np.array(labels))
    y = np.array([[REAL_CHARSET.index(c) for c in s] for s in labels], np.uint8)
    perm = np.random.default_rng(0).permutation(len(y))
    n_te = len(y) // 5
    te, tr = perm[:n_te], perm[n_te:]
    sub = np.random.default_rng(1).permutation(tr)[:1000]
    os.makedirs(OUT, exist_ok=True)
    for size in a.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        if (h, w) == imgs.shape[1:]:
            xs = imgs
        else:
            xs = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in imgs])
        for name, idx in (("real_tr", tr), ("real_te", te), ("real1k_tr", sub)):
            np.save(f"{OUT}/{name}_{h}x{w}.npy", xs[idx])
    for name, idx in (("real_tr", tr), ("real_te", te), ("real1k_tr", sub)):
        np.save(f"{OUT}/{name}_y.npy", y[idx])
    print(f"real: {len(y)} images {imgs.shape[1:]}, train {len(tr)}, test {len(te)}, 1k subset {len(sub)}")


if __name__ == "__main__":
    main()
