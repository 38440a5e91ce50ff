"""The prepared GPU scripts behave on a machine without a GPU: the shell script
parses, runs every stage it can, reports the GPU stages as unavailable (not
crashed, not "passed") and writes at most 8 files.  The CRNN/CTC cases of the
Python scripts are run on NumPy alone (their CuPy side needs a GPU and is not
run here): the models, batches, losses and step timing they feed to CuPy work."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import xpnet
from xpnet import backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_gpu_check_script_parses():
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["gpu_parity.py", "gpu_kernels_bench.py"])
def test_gpu_python_scripts_say_why_they_cannot_run(script):
    if backend.has_cupy_gpu:
        pytest.skip("a GPU is usable here: the script would really run")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "needs CuPy and a CUDA device" in proc.stderr and proc.stderr.count("\n") == 1


def run_gpu_check_without_a_gpu(tmp_path, **env_extra):
    """Run gpu_check.sh on this GPU-less machine into tmp_path/out: (process, out folder, summary text)."""
    if backend.has_cupy_gpu:
        pytest.skip("a GPU is usable here: run benchmarks/gpu_check.sh itself")
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("bash and coreutils' timeout are needed")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, XPNET_DEPS_DIR=str(tmp_path / "deps"), **env_extra)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, out, (out / "summary.txt").read_text()


def test_gpu_check_runs_without_a_gpu_and_reports_stages_unavailable(tmp_path):
    proc, out, summary = run_gpu_check_without_a_gpu(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # GPU stages did not pass: not success
    assert "1 environment          ok" in summary
    for stage in ("2 gpu tests", "3 model parity", "4 kernel bench", "5 cross-backend bench", "6 captcha training",
                  "7 ctc training"):
        line = next(l for l in summary.splitlines() if l.startswith(stage))
        assert "UNAVAILABLE" in line, line
    assert "not run" not in summary and not (out / "bench_gpu.json").exists()
    assert "python -m xpnet info" in (out / "1_env.log").read_text()
    train_log = (out / "6_train.log").read_text()  # stage 7 appends its part, after a marker line
    assert train_log.count("needs CuPy and a CUDA device") == 2 and "--- stage 7" in train_log
    assert "ctc:" not in summary and "whole-string accuracy" not in summary  # nothing trained, nothing claimed
    assert len(list(out.iterdir())) <= 8


def test_gpu_check_runs_only_the_stages_asked_for(tmp_path):
    proc, _, summary = run_gpu_check_without_a_gpu(tmp_path, XPNET_GPU_STAGES="5 7")
    stages = [l.split()[0] for l in summary.splitlines() if l[:2] in ("1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 ")]
    assert stages == ["5", "7"] and proc.returncode == 1, summary


def test_gpu_check_leaves_stage_7_when_the_call_has_no_time_for_it(tmp_path):
    """A `date` that jumps 4,000 s after the start: stage 7 would pass the 600 s call, so it is
    listed as not run, with the rerun, and the summary is still written."""
    real_date = shutil.which("date")
    if real_date is None:
        pytest.skip("coreutils' date is needed")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "date").write_text(f"""#!/bin/sh
if [ "$1" = "+%s" ]; then
    if [ -e "{tmp_path}/started" ]; then echo 5000; else : > "{tmp_path}/started"; echo 1000; fi
else
    exec "{real_date}" "$@"
fi
""")
    (shim / "date").chmod(0o755)
    proc, _, summary = run_gpu_check_without_a_gpu(tmp_path, XPNET_GPU_STAGES="7",
                                                   PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    line = next(l for l in summary.splitlines() if l.startswith("7 ctc training"))
    assert "not run" in line and "XPNET_GPU_STAGES=7" in line, summary
    assert proc.returncode == 0, summary  # nothing that ran failed


def _load(script):
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "benchmarks", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_parity_cases_run_on_numpy(dtype):
    """Every case gpu_parity.py compares (the CTC-trained captcha_crnn_bn included) builds, and its
    batch, loss and backward work on NumPy; the CuPy side is left to the GPU."""
    parity = _load("gpu_parity.py")
    assert "captcha_crnn_bn" in parity.CASES
    for name, (build, make_batch, loss) in parity.CASES.items():
        xpnet.use("numpy")
        xpnet.set_dtype(dtype)
        backend.seed(0)
        model = build()
        x, t = make_batch(3, dtype, np.random.default_rng(1))
        a = x
        for layer in model.layers:  # layer by layer, as check_parity runs it
            a = layer.forward(a, train=True)
        value, d = loss(a, t.astype(a.dtype))  # check_parity hands the targets over in the model's dtype
        model.backward(d)
        assert np.isfinite(float(value)) and d.shape == a.shape and a.dtype == dtype, name
        assert all(np.isfinite(g).all() for g in model.gradients().values()), name
        if name == "captcha_crnn_bn":
            assert a.shape == (3, 20, 37) and any(layer.name.startswith("gru") for layer in model.layers)
            value2, _ = loss(model.clone("numpy").forward(x, train=True), t)  # integer targets, as the SGD rows use
            assert float(value2) == pytest.approx(float(value), rel=1e-4)


def test_gpu_kernels_bench_crnn_rows_run_on_numpy():
    """The CRNN step gpu_kernels_bench.py times (CTC loss, Adam) on two NumPy paths: every path
    starts from the same weights (same first loss) and the ratios are against the first path."""
    import contextlib

    bench = _load("gpu_kernels_bench.py")
    xpnet.use("numpy")
    xpnet.set_dtype(np.float32)
    backend.seed(0)
    model, x, y = bench.crnn_case(4, np.random.default_rng(0))
    assert x.shape == (4, 1, 32, 80) and y.shape[0] == 4 and set(y[:, 0]) <= {4, 5, 6}
    timer = lambda step, d: bench.time_host(step, d, n_repeat=2, min_repeat=1, n_warmup=0)  # noqa: E731
    timers = {"NumPy": ("numpy", contextlib.nullcontext, timer), "NumPy again": ("numpy", contextlib.nullcontext, timer)}
    rows = bench.crnn_rows(model, x, y, 4, 0.01, timers)
    assert [r["path"] for r in rows] == ["NumPy", "NumPy again"] and rows[0]["vs_numpy"] == 1.0
    assert rows[0]["first_loss"] == rows[1]["first_loss"] and np.isfinite(rows[0]["first_loss"])
    assert all(r["ms"] > 0 and r["batch"] == 4 and r["op"] == "captcha_crnn_bn training step" for r in rows)
