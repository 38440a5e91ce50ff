"""benchmarks/serve_bench.py end to end on a few requests: it starts ``xpnet serve``, every answer is checked,
each level reports its rate and latencies, and the server is stopped cleanly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install "xpnet[serve]"')

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_runs_a_bounded_load_and_reports_it():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--no-save", "--requests", "40",
           "--clients", "1,4", "--warmup", "2", "--images", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), XPNET_BACKEND="numpy"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                      r.stdout, re.M)
    assert [(c, n) for c, n, *_ in rows] == [("1", "40"), ("4", "40")], r.stdout
    for _, _, rate, p50, p90, p99, worst, batch in rows:
        assert float(rate) > 0 and 0 < float(p50) <= float(p90) <= float(p99) <= float(worst)
        assert float(batch) >= 1
    assert "target at 16 clients" in r.stdout and "not measured" in r.stdout
    assert "server stopped, exit code 0" in r.stdout and "Traceback" not in r.stderr
