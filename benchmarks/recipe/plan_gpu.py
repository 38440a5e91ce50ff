"""The sweep run on the lent GPU box (accuracy against samples processed; hardware-independent).

Data (generated there by gen.py, 16 workers): test = 2,000 images seed 999; train_a = 160,000
seed 1 (grey 32x80 and 40x100, RGB 32x80); train_b = 240,000 seed 2 (grey 32x80).  Real data
from prep_real.py.  Order = priority: the runs the 15-minute default depends on come first.
"""
import os

DATA = os.environ.get("RECIPE_DATA", "/tmp/recipe")
SEED = "c32-p-c64-p-c128-p-d512"
AB = dict(train_set="train_a+train_b", needs=f"{DATA}/train_b.done")


def base(name, **kw):
    cfg = dict(name=name, arch=SEED, train_set="train_a", distinct=120000, samples=500000, batch=64,
               opt="adam", lr=2e-3, sched="cos", warmup=0.03, shift=2)
    cfg.update(kw)
    return cfg


SYNTH = [
    # --- the reference and what each change alone does (seed network, 80k images, 600k samples)
    base("ref_exp_noaug", distinct=80000, samples=600000, lr=1e-3, sched="exp", warmup=0.0, shift=0),
    base("ref_exp_shift2", distinct=80000, samples=600000, lr=1e-3, sched="exp", warmup=0.0),
    base("ref_cos_noaug", distinct=80000, samples=600000, lr=1e-3, shift=0),
    base("ref_cos_shift2", distinct=80000, samples=600000, lr=1e-3),
    # --- the main candidate family: seed net, 120k distinct, 500k samples
    base("s_lr2e-3"),
    base("s_lr1e-3", lr=1e-3),
    base("s_lr3e-3", lr=3e-3),
    base("s_onecycle3e-3", sched="onecycle", lr=3e-3),
    base("s_shift3", shift=3),
    base("s_shift2_scale.1", scale=0.1),
    base("s_shift4", shift=4),
    base("s_b128_lr3e-3", batch=128, lr=3e-3),
    base("s_b128_lr2e-3", batch=128, lr=2e-3),
    base("s_drop.3", dropout=0.3),
    base("s_d256", arch="c32-p-c64-p-c128-p-d256"),
    base("s_bn", bn=True),
    base("s_ce", loss="ce"),
    base("s_smooth.1", smooth=0.1),
    base("s_rgb", rgb=True),
    base("s_adamw.05", opt="adamw", wd=0.05),
    base("s_sgd.05", opt="sgd", lr=0.05, warmup=0.05),
    # --- architectures (160k distinct, budgets that roughly match their relative CPU cost)
    base("a_narrow_1M", arch="c16-p-c32-p-c64-p-d256", distinct=160000, samples=1000000),
    base("a_mid_800k", arch="c24-p-c48-p-c96-p-d256", distinct=160000, samples=800000),
    base("a_narrow_600k", arch="c16-p-c32-p-c64-p-d256", distinct=160000, samples=600000),
    base("a_mid_500k", arch="c24-p-c48-p-c96-p-d256", distinct=160000, samples=500000),
    base("a_same_400k", arch="C32-p-C64-p-C128-p-d256", distinct=160000, samples=400000),
    base("a_same_bn_400k", arch="C32-p-C64-p-C128-p-d256", bn=True, distinct=160000, samples=400000),
    base("a_40x100_400k", H=40, W=100, distinct=160000, samples=400000),
    base("a_40x100_bn_300k", H=40, W=100, bn=True, distinct=160000, samples=300000),
    base("a_deep_bn_300k", arch="C32-p-C64-p-C128-C128-p-d256", bn=True, distinct=160000, samples=300000),
    base("a_seed_bn_300k", bn=True, distinct=160000, samples=300000),
    base("a_mid_bn_500k", arch="c24-p-c48-p-c96-p-d256", bn=True, distinct=160000, samples=500000),
    # --- distinct images x samples (seed net, lr 2e-3 cos, shift 2)
    base("n40k_s300k", distinct=40000, samples=300000),
    base("n80k_s300k", distinct=80000, samples=300000),
    base("n160k_s300k", distinct=160000, samples=300000),
    base("n40k_s600k", distinct=40000, samples=600000),
    base("n80k_s600k", distinct=80000, samples=600000),
    base("n160k_s600k", distinct=160000, samples=600000),
    base("n160k_s900k", distinct=160000, samples=900000),
    base("n300k_s300k", distinct=300000, samples=300000, **AB),
    base("n300k_s600k", distinct=300000, samples=600000, **AB),
    base("n300k_s900k", distinct=300000, samples=900000, **AB),
    # --- long configurations (60-minute CPU candidates, GPU plan)
    base("L_seed_2M", distinct=400000, samples=2000000, batch=128, lr=3e-3, evals=16, **AB),
    base("L_seed_bn_1.5M", bn=True, distinct=400000, samples=1500000, batch=128, lr=3e-3, evals=16, **AB),
    base("L_deep_bn_1.5M", arch="C32-p-C64-p-C128-C128-p-d256", bn=True, distinct=400000, samples=1500000,
         batch=128, lr=3e-3, evals=16, **AB),
    base("L_mid_2M", arch="c24-p-c48-p-c96-p-d256", distinct=400000, samples=2000000, batch=128, lr=3e-3,
         evals=16, **AB),
    base("L_netbn_1M", arch="C32-p-C64-C64-p-C128-C128-p-C128-C128-p-d512", bn=True, dropout=0.25,
         distinct=400000, samples=1000000, batch=128, lr=2e-3, evals=16, **AB),
]

# --- real images: 80% train (10% of it split off for validation / best checkpoint), 20% test
REAL = dict(train_set="real_tr", test_set="real_te", n_classes=32, val_frac=0.1, arch=SEED,
            opt="adam", lr=1e-3, sched="cos", warmup=0.03, batch=64, shift=2, distinct=10**9)
REAL1K = dict(REAL, train_set="real1k_tr")
REAL_RUNS = [
    dict(REAL, name="r_seed_32x96", H=32, W=96, samples=7168 * 40, evals=20),
    dict(REAL, name="r_seed_24x72", H=24, W=72, samples=7168 * 40, evals=20),
    dict(REAL, name="r_seed_32x96_noaug", H=32, W=96, shift=0, samples=7168 * 40, evals=20),
    dict(REAL, name="r_seedbn_32x96", H=32, W=96, bn=True, samples=7168 * 40, evals=20),
    dict(REAL1K, name="r1k_seed_32x96", H=32, W=96, samples=900 * 200, evals=40),
    dict(REAL1K, name="r1k_seed_32x96_noaug", H=32, W=96, shift=0, samples=900 * 200, evals=40),
    dict(REAL1K, name="r1k_seed_32x96_s3sc.1", H=32, W=96, shift=3, scale=0.1, samples=900 * 200, evals=40),
    dict(REAL1K, name="r1k_seedbn_32x96", H=32, W=96, bn=True, samples=900 * 200, evals=40),
    dict(REAL1K, name="r1k_seed_32x96_drop.3", H=32, W=96, dropout=0.3, samples=900 * 200, evals=40),
]

# priority order: reference, main family, real data, architectures, then (once train_b exists) long runs
# and the distinct x samples grid
_main = [c for c in SYNTH if c["name"].startswith(("ref_", "s_"))]
_rest = [c for c in SYNTH if c not in _main]
PLAN = _main + REAL_RUNS + [c for c in _rest if c["name"].startswith("a_")] + \
    [c for c in _rest if c["name"].startswith("L_")] + [c for c in _rest if c["name"].startswith("n")]
