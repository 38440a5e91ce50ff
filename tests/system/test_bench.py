"""The benchmark's own pieces: the seed-style reference computes the same network as
captcha_net, the analytic FLOP count, and one worker round trip."""

import json
import os
import sys

import numpy as np
import pytest

import xpnet
from xpnet import ops

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)
import bench  # noqa: E402
import seed_reference  # noqa: E402


def test_seed_reference_is_the_same_network_as_captcha_net(rng):
    xpnet.set_dtype("float64")
    m = xpnet.models.captcha_net(input_shape=(3, 32, 40))
    s = seed_reference.SeedCaptchaNet(input_shape=(3, 32, 40))
    names = ["conv1", "conv2", "conv3", "dense1", "dense2"]
    for i, name in enumerate(names, 1):
        s.params[f"W{i}"][...] = m.parameters()[f"{name}.W"]
        s.params[f"b{i}"][...] = m.parameters()[f"{name}.b"]
    x = rng.standard_normal((3, 3, 32, 40)) * 0.1
    t = (rng.random((3, 144)) < 0.1).astype(np.float64)
    logits = m.forward(x, train=True)
    np.testing.assert_allclose(s.predict(x), logits, rtol=1e-10, atol=1e-12)
    loss, d = ops.sigmoid_bce_with_logits(logits, t)
    m.backward(d)
    seed_loss = s.train_step(x, t, lr=0.0)
    # log(y + 1e-7) vs the exact fused loss: equal to ~1e-6 for moderate logits.
    assert abs(seed_loss - float(loss)) < 1e-3 * float(loss)
    layers = ["Conv1", "Conv2", "Conv3", "Affine1", "Affine2"]
    for layer, name in zip(layers, names):
        g = m.gradients()[f"{name}.W"]
        np.testing.assert_allclose(s.layers[layer].dW, g, rtol=0, atol=1e-4 * np.abs(g).max())


def test_step_flops_count_by_hand():
    # conv1 3->32 on 32x80 (30x78 out), conv2 32->64 on 15x39, conv3 64->128 on 6x18, dense 2048->512->144
    fwd = 2 * (30 * 78 * 27 * 32 + 13 * 37 * 288 * 64 + 4 * 16 * 576 * 128 + 2048 * 512 + 512 * 144)
    assert bench.step_flops("captcha_net", 1, train=False) == fwd
    assert bench.step_flops("captcha_net", 2, train=True) == 2 * (3 * fwd - 2 * 30 * 78 * 27 * 32)
    assert bench.step_flops("captcha_net_bn", 1, train=False) > 3 * fwd


def test_worker_round_trip(monkeypatch, capsys):
    cfg = dict(backend="xpnet", dtype="float32", device="cpu", kind="train", model="captcha_net", batch=4,
               warmup=1)
    lines = iter([json.dumps({"op": "time", "task": "step", "n": 2}) + "\n", json.dumps({"op": "exit"}) + "\n"])
    monkeypatch.setattr(sys, "stdin", lines)
    bench.worker_main(cfg)
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0]["ready"] and "step" in out[0]["first_call_s"]
    assert len(out[1]["times"]) == 2 and all(t > 0 for t in out[1]["times"])
    assert out[2]["maxrss_mb"] >= out[0]["rss_start_mb"]


def test_summary_and_targets_from_fake_results():
    class W:
        cfg = dict(backend="xpnet", dtype="float32", device="cpu", kind="train", model="captcha_net", batch=128)
        error = None
        ready = {"first_call_s": {"step": 1.0}, "rss_start_mb": 10, "rss_ready_mb": 20, "info": {}}
        times = {"step": [0.1, 0.1, 0.12, 0.1, 0.3]}

    class T(W):
        cfg = dict(W.cfg, backend="torch")
        times = {"step": [0.2] * 5}

    res = [bench.summarise(W, {"maxrss_mb": 100}), bench.summarise(T, {"maxrss_mb": 300})]
    assert res[0]["tasks"]["step"]["median_s"] == pytest.approx(0.1)
    groups = [{"title": "t", "kind": "train", "model": "captcha_net", "batch": 128, "results": res}]
    bench.enrich(groups, peak=200.0)
    st = res[0]["tasks"]["step"]
    assert st["vs_torch"] == pytest.approx(2.0) and st["images_per_s"] == pytest.approx(1280)
    assert st["peak_share"] == pytest.approx(bench.step_flops("captcha_net", 128) / 0.1 / 1e9 / 200)
    tg = {t["target"]: t for t in bench.targets(groups, 200.0)}
    assert tg["b128 train vs PyTorch CPU default"]["met"]


def test_workers_warm_up_one_at_a_time(monkeypatch):
    # Each worker's warm-up decides its steps per round; warming up beside the others
    # (all started at once) inflated it.  The next worker starts only once one is ready.
    events = []

    class FakeWorker:
        def __init__(self, cfg, env=None):
            self.cfg, self.error, self.times = cfg, None, {}
            events.append(("start", cfg["name"]))
            self.ready = {"estimate_s": {"step": 0.25}}

        def wait_ready(self):
            events.append(("ready", self.cfg["name"]))

        def time(self, task, n, skip=0):
            self.times.setdefault(task, []).extend([0.25] * n)

        def close(self):
            return {}

    monkeypatch.setattr(bench, "Worker", FakeWorker)
    monkeypatch.setattr(bench, "summarise", lambda w, end: {"n": len(w.times["step"])})
    res = bench.run_group([{"name": "a"}, {"name": "b"}, {"name": "c"}], rounds=3, min_round_s=0.6)
    assert events == [("start", "a"), ("ready", "a"), ("start", "b"), ("ready", "b"), ("start", "c"), ("ready", "c")]
    assert [r["n"] for r in res] == [9, 9, 9]  # ceil(0.6 / 0.25) = 3 timed steps per round
