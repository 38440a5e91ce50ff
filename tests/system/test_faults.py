"""Faults during training (issue 7): kill -9 at random moments, during steps and in the middle of
checkpoint writes, then resume.

The slow test (``pytest -m slow``) kills tests/system/_fault_worker.py 24 times in one run folder and
checks after every kill that

* every file listed as a checkpoint is complete (CRC of every member checked) -- nothing
  half-written is ever listed or picked up, whatever was on disk when the process died;
* the newest checkpoint loads, and the step never goes back;
* the next start resumes from exactly that checkpoint, and removes the temporary files that
  killed writers left behind;

and, at the end, that the run finishes with the same weights, bit for bit, as a run that was
never interrupted.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xpnet
from xpnet.nn import serialization as xio

from tests.system import _train_worker as W

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, str(ROOT / "tests" / "system" / "_fault_worker.py")]
TEMP = re.compile(r"^\..+\.tmp$")


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", XPNET_BACKEND="numpy",
                XPNET_DTYPE="float32")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # gone (and reaped): no process has this id until the system reuses it


def test_temporary_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    W.run(tmp_path, epochs=1)
    ckpts = tmp_path / "checkpoints"
    dead = _dead_pid()
    stale = [ckpts / f".ckpt-000000009.npz.{dead}.0123abcd.tmp", tmp_path / f".model.npz.{dead}.89abcdef.tmp"]
    live = ckpts / f".ckpt-000000010.npz.{os.getppid()}.0123abcd.tmp"  # a writer that is still running
    for p in stale + [live]:
        p.write_bytes(b"PK\x03\x04 half an archive")
    before = sorted(p.name for p in xio.list_checkpoints(ckpts))
    assert xio.remove_stale_temp_files(ckpts) == [stale[0]]
    assert live.exists() and sorted(p.name for p in xio.list_checkpoints(ckpts)) == before
    W.run(tmp_path, epochs=1, resume=True)  # finished already: the trainer still cleans its folders first
    assert not stale[1].exists() and live.exists()


def _step_of(path) -> int:
    return int(xio.CHECKPOINT_RE.match(Path(path).name).group(1))


@pytest.mark.slow
def test_kill_minus_9_at_random_moments_then_resume(tmp_path):
    epochs = 40  # 240 steps: longer than 24 short lives
    total = epochs * W.STEPS_PER_EPOCH
    ref = subprocess.run(WORKER + [str(tmp_path / "ref"), "--epochs", str(epochs)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    assert f"finished at step {total}" in ref.stdout

    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    chance = random.Random(20240607)
    hits = {"write": 0, "step": 0}
    last_step, expected_resume, log = 0, None, []
    trials = 24
    for trial in range(trials):
        # Even trials: slow checkpoint writes (kills land mid-write); odd: slow steps (kills land between).
        hooks = ["--write-sleep", "0.01"] if trial % 2 == 0 else ["--step-sleep", "0.04"]
        out_path = tmp_path / f"trial-{trial}.out"
        with open(out_path, "w") as out:
            victim = subprocess.Popen(WORKER + [str(run_dir), "--epochs", str(epochs)] + hooks, env=_env(),
                                      stdout=out, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 120
                while "started" not in out_path.read_text():  # imports done: now it loads or trains
                    assert victim.poll() is None, out_path.read_text()
                    assert time.monotonic() < deadline, "the worker did not start"
                    time.sleep(0.01)
                time.sleep(chance.uniform(0.05, 0.8))
            finally:
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=60)
        text = out_path.read_text()
        assert victim.returncode == -signal.SIGKILL, f"trial {trial} ended on its own: the run is too short\n{text}"

        # The previous kill's newest checkpoint is exactly where this start resumed.
        if expected_resume is not None and "resumed from" in text:
            assert f"resumed from {expected_resume} (step {_step_of(expected_resume)}," in text, text

        names = sorted(p.name for p in ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []
        temps = [n for n in names if TEMP.match(n)]
        hits["write" if any(f".{victim.pid}." in n for n in temps) else "step"] += 1
        # At most the temporary file of this kill: older ones were cleaned up by the resume.
        assert len(temps) <= 1, names
        listed = xio.list_checkpoints(ckpt_dir)
        assert all(not TEMP.match(p.name) for p in listed)
        for p in listed:  # nothing half-written is ever listed as a checkpoint
            assert xio.is_complete(p), f"trial {trial}: {p.name} is listed but incomplete"
        latest = xio.latest_checkpoint(ckpt_dir)
        if latest is not None:
            assert latest == listed[0]
            step = xpnet.load_checkpoint(latest).step
            assert step == _step_of(latest) >= last_step
            last_step, expected_resume = step, latest
        log.append((trial, hooks[0], last_step, temps))

    assert hits["write"] >= 5 and hits["step"] >= 5, (hits, log)
    assert last_step > 0, log

    done = subprocess.run(WORKER + [str(run_dir), "--epochs", str(epochs)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {expected_resume} (step {last_step}," in done.stdout
    assert f"finished at step {total}" in done.stdout
    assert [n for n in os.listdir(ckpt_dir) if TEMP.match(n)] == []  # the last stale file is gone too
    a, _ = xpnet.load(tmp_path / "ref" / "model.npz")
    b, _ = xpnet.load(run_dir / "model.npz")
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)
    print(f"\n{trials} kills: {hits['write']} with a half-written temporary file, {hits['step']} between writes; "
          f"steps reached after each kill: {[s for _, _, s, _ in log]}")
