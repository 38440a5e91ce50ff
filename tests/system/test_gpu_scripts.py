"""The prepared GPU scripts behave on a machine without a GPU: the shell script
parses, runs every stage it can, reports the GPU stages as unavailable (not
crashed, not "passed") and writes at most 8 files."""

import os
import shutil
import subprocess
import sys

import pytest

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
    for stage in ("2 gpu tests", "3 model parity", "4 kernel bench", "5 cross-backend bench", "6 captcha training"):
        line = next(l for l in summary.splitlines() if l.startswith(stage))
        assert "UNAVAILABLE" in line, line
    assert "not run" not in summary and not (out / "bench_gpu.json").exists()
    assert "python -m xpnet info" in (out / "1_env.log").read_text()
    assert len(list(out.iterdir())) <= 8


def test_gpu_check_runs_only_the_stages_asked_for(tmp_path):
    proc, _, summary = run_gpu_check_without_a_gpu(tmp_path, XPNET_GPU_STAGES="5 6")
    stages = [l.split()[0] for l in summary.splitlines() if l[:2] in ("1 ", "2 ", "3 ", "4 ", "5 ", "6 ")]
    assert stages == ["5", "6"] and proc.returncode == 1, summary
