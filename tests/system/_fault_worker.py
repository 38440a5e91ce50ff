"""The victim of tests/test_faults.py: the tiny training run of _train_worker.py, resumable, with
test-only hooks that widen the windows a kill -9 should hit.

    python tests/system/_fault_worker.py OUT_DIR [--epochs 6] [--step-sleep S] [--write-sleep S]

* ``--write-sleep S``: each archive is handed to the file 1 KiB at a time, flushed, with a pause
  of S seconds after every chunk, so a checkpoint write lasts long enough to be killed in the
  middle (a half-written temporary file then stays on disk);
* ``--step-sleep S``: each training step pauses S seconds, so kills land between writes.

The hooks live here, in a test helper, never in library code a user runs.  Always resumes (a
first start finds no checkpoint and starts fresh); prints one line per event, unbuffered.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import xpnet  # noqa: E402
from xpnet.nn import serialization as xio  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_worker as W  # noqa: E402

CHUNK = 1024


def slow_writes(pause: float) -> None:
    real_write = xio._write_npz

    def dribble(f, arrays):
        buf = io.BytesIO()
        real_write(buf, arrays)
        data = buf.getvalue()
        for i in range(0, len(data), CHUNK):
            f.write(data[i:i + CHUNK])
            f.flush()
            time.sleep(pause)

    xio._write_npz = dribble


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--write-sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    xpnet.use("numpy")
    if args.write_sleep:
        slow_writes(args.write_sleep)
    print("started", flush=True)
    _, trainer = W.run(args.out_dir, args.epochs, resume=True, slow=args.step_sleep, log=print)
    print("finished at step", trainer.optimizer.step_count, flush=True)


if __name__ == "__main__":
    main()
