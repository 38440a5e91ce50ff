"""Follow-up sweep for the LONG configuration (60-minute CPU, >= 95%) and the GPU 5-minute plan (>= 98%).

Not run yet (the first H200 session's device time went to plan_gpu.py, whose long runs were cut
by its deadline).  Run it on a GPU box with run_device.sh after replacing `plan_gpu` by `plan_long`
there (about 8 minutes on one H200 with 12 runs at a time; data as in plan_gpu: train_a + train_b).

The CPU budgets assume xpnet's measured speeds (speed_xpnet.py, batch 64, grey 1x32x80: seed net
~960 images/s; with BatchNorm ~440; generation ~800 images/s on 2 cores):
60 min = 3,600 s, 15% margin -> ~3,060 s: 300k distinct (375 s) + 2.5M samples (2,600 s).
"""
import os

from plan_gpu import AB, SEED, base

DATA = os.environ.get("RECIPE_DATA", "/tmp/recipe")
DEEP_BN = "C32-p-C64-C64-p-C128-C128-p-C128-C128-p-d512"  # xpnet's captcha_net_bn

PLAN = [
    # 60-minute CPU candidates: the default recipe, longer (batch 64, peak lr 3e-3, cosine to 0)
    base("L64_seed_2.5M", distinct=300000, samples=2500000, lr=3e-3, evals=20, prior_bias=True, **AB),
    base("L64_seed_2.5M_ce", distinct=300000, samples=2500000, lr=3e-3, evals=20, loss="ce", **AB),
    base("L64_seed_1.5M", distinct=300000, samples=1500000, lr=3e-3, evals=12, prior_bias=True, **AB),
    base("L64_seed_d1024_2.2M", arch="c32-p-c64-p-c128-p-d1024", distinct=300000, samples=2200000, lr=3e-3,
         evals=20, prior_bias=True, **AB),
    base("L64_seed_bn_1.2M", bn=True, distinct=300000, samples=1200000, lr=3e-3, evals=12, prior_bias=True, **AB),
    # GPU 5-minute candidates (BatchNorm is cheap there; generation on the box's cores is the limit)
    base("G_netbn_2M", arch=DEEP_BN, bn=True, dropout=0.25, distinct=400000, samples=2000000, lr=2e-3,
         evals=20, prior_bias=True, **AB),
    base("G_netbn_2M_b128", arch=DEEP_BN, bn=True, dropout=0.25, distinct=400000, samples=2000000, batch=128,
         lr=3e-3, evals=20, prior_bias=True, **AB),
    base("G_deep_bn_2M", arch="C32-p-C64-p-C128-C128-p-d256", bn=True, distinct=400000, samples=2000000,
         lr=3e-3, evals=20, prior_bias=True, **AB),
    base("G_seed_bn_40x100_2M", bn=True, H=40, W=100, distinct=160000, samples=2000000, lr=3e-3, evals=20,
         prior_bias=True),
]
