"""Confirmation sweep for the 15-minute DEFAULT recipe at its exact CPU budget (not run yet: the
first H200 session's device time was spent on plan_gpu.py).  About 4 minutes on one H200:
    bash run_device.sh 300 plan_default

Budget (xpnet measured, speed_xpnet.py: seed net grey 1x32x80 batch 64 ~960 images/s; generation
~800 images/s on 2 cores): 100k distinct (125 s) + 570k samples (592 s) + test/eval ~10 s = ~730 s,
i.e. inside 15 minutes less a 15% margin.  X1 (this recipe with the prior bias, CPU) reached 0.910.
Two training seeds for the main candidates give the noise.
"""
from plan_gpu import base

D = dict(distinct=100000, samples=570000, lr=3e-3)
PLAN = [
    base("D_bce", **D),
    base("D_bce_s1", seed=1, **D),
    base("D_bce_prior", prior_bias=True, **D),
    base("D_bce_prior_s1", prior_bias=True, seed=1, **D),
    base("D_bce_prior_sm.1", prior_bias=True, smooth=0.1, **D),
    base("D_ce", loss="ce", **D),
    base("D_ce_s1", loss="ce", seed=1, **D),
    base("D_bce_prior_lr4e-3", prior_bias=True, **{**D, "lr": 4e-3}),
    base("D_bce_prior_lr5e-3", prior_bias=True, **{**D, "lr": 5e-3}),
    base("D_bce_prior_N120k_S540k", prior_bias=True, **{**D, "distinct": 120000, "samples": 540000}),
    base("D_bce_prior_N70k_S610k", prior_bias=True, **{**D, "distinct": 70000, "samples": 610000}),
    base("D_bce_prior_b32", prior_bias=True, batch=32, **D),
]
