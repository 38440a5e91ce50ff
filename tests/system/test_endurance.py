"""Endurance and determinism (issue 7), each run in FRESH processes (tests/system/_endurance_worker.py).

* determinism: the same seed on the same backend gives bit-identical weights and optimizer slots
  after N steps in two separate processes -- a quick version (tiny model, 20 steps) in the default
  run, a longer one (every layer type, 400 steps) marked slow;
* endurance (slow): 2,000 training steps with validation, checkpoints and a plot every epoch;
  the resident set size at the end is within 5% of the size after warm-up.

Run the slow ones with ``python -m pytest -m slow tests/test_endurance.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import gpu_param

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, str(ROOT / "tests" / "system" / "_endurance_worker.py")]


def _worker(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), XPNET_DTYPE="float32")
    env.pop("XPNET_BACKEND", None)
    r = subprocess.run(WORKER + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _same_in_two_processes(steps, model, backend):
    first = _worker("determinism", "--steps", steps, "--model", model, "--backend", backend)
    second = _worker("determinism", "--steps", steps, "--model", model, "--backend", backend)
    assert first["steps"] == second["steps"] == steps and first["backend"] == backend
    assert first["weights"] != first["init"], "the run must have changed the weights"
    assert first == second  # bit-identical weights and optimizer slots (sha256 of every array)


@pytest.mark.parametrize("backend", gpu_param())
def test_same_seed_gives_bit_identical_weights_in_two_fresh_processes(backend):
    _same_in_two_processes(20, "tiny", backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", gpu_param())
def test_same_seed_gives_bit_identical_weights_after_400_steps_with_every_layer_type(backend):
    _same_in_two_processes(400, "small", backend)


@pytest.mark.slow
def test_memory_does_not_grow_over_2000_steps(tmp_path):
    facts = _worker("endurance", tmp_path / "run", "--steps", 2000, "--warmup", 250)
    assert facts["steps"] == 2000 and facts["epochs"] == 16
    assert facts["val_accuracy"] > 0.9, facts  # it really trained
    growth = facts["end_rss"] / facts["warm_rss"] - 1
    print(f"\nRSS ({facts['rss_source']}) after warm-up (step 250): {facts['warm_rss'] / 2**20:.1f} MiB, "
          f"at step 2000: {facts['end_rss'] / 2**20:.1f} MiB ({100 * growth:+.2f}%); samples (step, MiB): "
          + ", ".join(f"{s}: {b / 2**20:.1f}" for s, b in facts["samples"]))
    assert growth <= 0.05, facts
