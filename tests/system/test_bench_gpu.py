"""bench.py --gpu without a GPU: the CUDA rows a framework cannot run are dropped with the reason,
a run with no GPU row left measures nothing (exit 3) instead of passing CPU rows off as a GPU run,
and the GPU targets are computed from the rows that ran."""

import os
import sys
import types

import pytest

from xpnet import backend

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH)
import bench  # noqa: E402


def _gpu_plan():
    return bench.plan(types.SimpleNamespace(gpu=True, quick=False))


def _rows(groups):
    return [(kind, model, batch, c["backend"], c.get("device", "cpu"), c.get("tf32"))
            for kind, model, batch, cfgs in groups for c in cfgs]


def test_the_gpu_plan_has_pytorch_cuda_rows_with_and_without_tf32_at_batch_128_and_500():
    rows = _rows(_gpu_plan())
    for batch in (128, 500):
        assert ("train", "captcha_net", batch, "xpnet", "cuda", None) in rows
        assert ("train", "captcha_net", batch, "torch", "cuda", False) in rows
        assert ("train", "captcha_net", batch, "torch", "cuda", True) in rows
    assert ("train", "captcha_net", 500, "xpnet", "cpu", None) in rows  # the >= 20x target's reference


def test_pytorch_cuda_rows_are_skipped_with_the_reason_and_the_rest_kept():
    groups = _gpu_plan()
    kept, notes = bench.gpu_rows(groups, (False, "PyTorch 2.13.0+cpu is a CPU-only build"), (True, "GPU 0"))
    rows = _rows(kept)
    assert not [r for r in rows if r[3] == "torch" and r[4] == "cuda"]
    assert [r for r in rows if r[3] == "xpnet" and r[4] == "cuda"] == \
        [r for r in _rows(groups) if r[3] == "xpnet" and r[4] == "cuda"]
    assert [r for r in rows if r[4] == "cpu"] == [r for r in _rows(groups) if r[4] == "cpu"]
    assert notes == ["PyTorch CUDA rows skipped: PyTorch 2.13.0+cpu is a CPU-only build."]
    kept, notes = bench.gpu_rows(groups, (True, "ok"), (False, "CuPy is not installed"))
    assert not [r for r in _rows(kept) if r[3] == "xpnet" and r[4] == "cuda"]
    assert [r for r in _rows(kept) if r[3] == "torch" and r[4] == "cuda"]
    assert notes == ["xpnet CuPy rows skipped: CuPy is not installed."]


def test_the_torch_probe_says_why_pytorch_cannot_use_cuda_here():
    ok, reason = bench.torch_cuda_status()
    try:
        import torch
    except ImportError:
        assert not ok and "could not be imported" in reason
        return
    assert ok == torch.cuda.is_available()
    if not ok:
        assert torch.__version__ in reason
        assert ("CPU-only build" in reason) == (torch.version.cuda is None)
        assert "CPU-only build" in reason or "is_available() is False" in reason


def test_the_cupy_probe_agrees_with_the_backend():
    ok, reason = bench.cupy_gpu_status()
    assert ok == backend.has_cupy_gpu
    assert reason == backend.device_reason()


@pytest.mark.skipif(backend.has_cupy_gpu, reason="this machine has a CuPy GPU: the run would measure it")
def test_a_gpu_run_without_a_gpu_measures_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path))
    monkeypatch.setattr(bench, "measure_peak", lambda *a: pytest.fail("a CPU-only --gpu run must not measure"))
    assert bench.main(["--gpu", "--name", "nothing"]) == 3
    out = capsys.readouterr().out
    assert "xpnet CuPy rows skipped: " + backend.device_reason() in out
    assert "PyTorch CUDA rows skipped: " in out
    assert "no GPU row can run on this machine" in out
    assert os.listdir(tmp_path) == []


def _result(cfg, seconds):
    class W:
        error = None
        ready = {"first_call_s": {"step": 1.0}, "rss_start_mb": 10, "rss_ready_mb": 20, "info": {}}
        times = {"step": [seconds] * 5}
    W.cfg = dict(cfg, kind="train", model="captcha_net", batch=500)
    return bench.summarise(W, {})


def test_gpu_targets_from_fake_results():
    res = [_result(dict(backend="xpnet", dtype="float32", device="cuda"), 0.010),
           _result(dict(backend="torch", dtype="float32", device="cuda", tf32=False), 0.004),
           _result(dict(backend="torch", dtype="float32", device="cuda", tf32=True), 0.002),
           _result(dict(backend="xpnet", dtype="float32", device="cpu"), 0.5)]
    groups = [{"title": "t", "kind": "train", "model": "captcha_net", "batch": 500, "results": res}]
    bench.enrich(groups, peak=None)
    tg = {t["target"]: t for t in bench.gpu_targets(groups)}
    vs_torch = tg["b500 train CuPy vs PyTorch CUDA (cuDNN, no TF32)"]
    assert vs_torch["value"] == pytest.approx(0.4) and not vs_torch["met"]  # against TF32 off, not on
    vs_numpy = tg["b500 train CuPy vs xpnet NumPy (this CPU)"]
    assert vs_numpy["value"] == pytest.approx(50.0) and vs_numpy["met"]
    assert bench.gpu_targets([{**groups[0], "results": res[2:]}]) == []  # no CuPy row: no target
