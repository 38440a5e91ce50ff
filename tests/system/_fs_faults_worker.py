"""Real file-system faults for tests/test_robustness.py, run in a private mount namespace:

    unshare --mount --propagation private python tests/system/_fs_faults_worker.py WORK_DIR

* full disk: training writes a checkpoint every step into a 1 MiB tmpfs; during step 3 a filler
  file takes all the free space but a few pages, fewer than a checkpoint needs, so the kernel
  itself answers ENOSPC in the middle of writing ckpt 3.  Then the filler is removed and the run
  resumed to the end.
* read-only: a tmpfs mounted read-only as the output folder (EROFS).

Prints one JSON line of facts; the test asserts on them (the tmpfs vanishes with this process).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import xpnet  # noqa: E402
from xpnet.nn import serialization as xio  # noqa: E402
from xpnet.errors import XpnetError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_worker as W  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def weights(model) -> dict:
    return {k: np.array(v) for k, v in model.state_dict().items()}


def full_disk(base: Path) -> dict:
    reference, _ = W.run(base / "ref", epochs=2)

    disk = base / "full"
    mount_tmpfs(disk, "size=1m,mode=0755")
    run = disk / "run"
    facts: dict = {}
    model, opt = W.build(2)
    trainer = W.make_trainer(model, opt, run)
    inner, calls = trainer.transform, {"n": 0}

    def fill_the_disk_during_step_3(x, t):
        calls["n"] += 1
        if calls["n"] == 3:  # ckpt 1 and 2 are on disk; ckpt 3 is written at the end of this step
            ckpts = xio.list_checkpoints(run / "checkpoints")
            facts["names_before"] = [p.name for p in ckpts]
            facts["sha_before"] = {p.name: sha(p) for p in ckpts}
            size = ckpts[0].stat().st_size
            leave = max(PAGE, (size // 2) // PAGE * PAGE)  # room for part of a checkpoint only
            facts["checkpoint_bytes"], facts["free_left"] = size, leave
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * (free_bytes(disk) - leave))
            facts["free_measured"] = free_bytes(disk)
        return inner(x, t)

    real_write = xio._write_npz

    def observe(f, arrays):  # observation only: how many bytes the archive writer handed over
        try:
            real_write(f, arrays)
        finally:
            facts["attempted_bytes"] = f.tell()

    xio._write_npz = observe
    trainer.transform = fill_the_disk_during_step_3
    try:
        trainer.fit(W.make_data(), epochs=2, val=W.make_data(48, seed=6))
        facts["error"] = None
    except XpnetError as exc:
        facts["error"], facts["message"] = type(exc).__name__, str(exc)
    finally:
        xio._write_npz = real_write

    ckpts = xio.list_checkpoints(run / "checkpoints")
    facts["names_after"] = [p.name for p in ckpts]
    facts["bytes_unchanged"] = {p.name: sha(p) for p in ckpts} == facts.get("sha_before")
    facts["temp_files"] = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp"))
    facts["wrote_partially"] = facts.get("attempted_bytes", 0) > facts.get("free_measured", 0) > 0
    latest = xio.latest_checkpoint(run / "checkpoints")
    facts["latest_step"] = xpnet.load_checkpoint(latest).step if latest else None

    (disk / "filler").unlink()  # space again: the run resumes and ends as if nothing happened
    resumed, _ = W.run(run, epochs=2, resume=True)
    a, b = weights(resumed), weights(reference)
    facts["resumed_equals_uninterrupted"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return facts


def read_only(base: Path) -> dict:
    ro = base / "ro"
    mount_tmpfs(ro, "size=64k,ro")
    model, opt = W.build(1)
    out = {}
    for name, attempt in (("train", lambda: W.make_trainer(model, opt, ro / "run").fit(W.make_data(), epochs=1)),
                          ("save", lambda: xpnet.save(model, ro / "m.npz"))):
        try:
            attempt()
            out[name] = [None, False]
        except XpnetError as exc:
            out[name] = [type(exc).__name__, "read-only file system" in str(exc)]
    out["steps"] = opt.step_count
    return out


def main():
    xpnet.use("numpy")
    base = Path(sys.argv[1])
    print(json.dumps({"full_disk": full_disk(base), "read_only": read_only(base)}, default=str))


if __name__ == "__main__":
    main()
