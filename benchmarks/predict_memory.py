"""Peak memory of ``xpnet predict MODEL FOLDER --out readings.csv`` against the number of images.

    python benchmarks/predict_memory.py --images /tmp/captchas            # 1,000, 10,000 and 100,000 images
    python benchmarks/predict_memory.py --images /tmp/captchas --counts 500 2000 --out /tmp/pm.txt

The streaming reader should need the same memory for any folder size: this runs
the command once per count, in a fresh process, and records its wall time,
images/s and peak resident memory; the largest count runs last.

* Images: the PNG files of ``--images``; when it holds fewer than the largest
  count, they are made first with ``xpnet generate --count N --seed 7`` (160x60
  renders; 100,000 take several minutes).  A smaller count reads the first
  names (sorted) of that folder, through hard links in a temporary sibling folder.
* Reader: an untrained ``captcha_net`` for 4 characters of 0-9A-Z at 3x32x80,
  saved with ``metadata_for`` as ``xpnet train`` would (weights do not change
  the memory or the speed).
* Peak RSS of the predict process: ``ru_maxrss`` from ``wait4`` (kept by the
  kernel: the largest of the process and its decoding workers, each alone), and
  the whole process tree (the process plus its workers, summed), sampled every
  50 ms from /proc.  The load average before each run is recorded: the machine
  may be shared.

Results: ``benchmarks/results/predict_memory.txt`` (``--out``), written by this
program; no absolute path goes into it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 7


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of PNG captchas (made with xpnet generate if short)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000],
                    help="numbers of images to read, each in its own run (default: 1000 10000 100000)")
    ap.add_argument("--batch-size", type=int, default=256, help="xpnet predict --batch-size (default: 256)")
    ap.add_argument("--workers", type=int, default=None,
                    help="xpnet predict --workers (default: the command's own default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_memory.txt"),
                    help="results file (default: benchmarks/results/predict_memory.txt)")
    args = ap.parse_args(argv)
    counts = sorted(set(args.counts))
    if counts[0] < 1:
        ap.error("--counts must be positive")
    images = Path(args.images)
    names = ensure_images(images, counts[-1])
    work = Path(tempfile.mkdtemp(prefix="predict_memory_"))
    links = Path(tempfile.mkdtemp(prefix=".predict_memory_links_", dir=images.parent))
    rows = []
    try:
        model = make_reader(work / "reader.npz")
        for n in counts:
            folder = images if n == len(names) else subset(images, names[:n], links / str(n))
            rows.append(measure(model, folder, n, work / f"readings_{n}.csv", args))
            print(format_row(rows[-1]), flush=True)
            (work / f"readings_{n}.csv").unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(links, ignore_errors=True)
    text = report(rows, args, png_kib(images, names))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


def ensure_images(folder: Path, count: int) -> list[str]:
    """The sorted PNG names of ``folder``, generating ``count`` images first when it holds fewer."""
    names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".png")) if folder.is_dir() else []
    if len(names) < count:
        print(f"generating {count:,} images (xpnet generate --seed {SEED}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "xpnet", "generate", "--count", str(count), "--out", str(folder),
                        "--seed", str(SEED), "--force"], check=True, cwd=ROOT, env=_env())
        names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".png"))
    return names


def subset(images: Path, names, folder: Path) -> Path:
    """A folder holding ``names`` of ``images`` as hard links (symbolic links where those fail)."""
    folder.mkdir(parents=True)
    for name in names:
        try:
            os.link(images / name, folder / name)
        except OSError:
            os.symlink(images / name, folder / name)
    return folder


def make_reader(path: Path) -> Path:
    import xpnet
    from xpnet.captcha import metadata_for
    from xpnet.captcha.network import build_model
    from xpnet.data import Charset, Preprocess
    from xpnet.data.labels import DIGITS_UPPER

    cs, pp = Charset(DIGITS_UPPER, 4), Preprocess()
    xpnet.backend.use("numpy")
    xpnet.backend.seed(0)
    model = build_model("captcha_net", cs, pp)
    model.build(pp.shape)
    xpnet.save(model, path, metadata_for(cs, pp, model="captcha_net"))
    return path


def measure(model: Path, folder: Path, n: int, out: Path, args) -> dict:
    """Run ``xpnet predict`` on ``folder`` once: wall time, peak RSS (wait4 and process tree), its own rate."""
    cmd = [sys.executable, "-m", "xpnet", "predict", str(model), str(folder), "--out", str(out), "--no-progress",
           "--batch-size", str(args.batch_size)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    load = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak, processes, trace = 0, 0, []
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree, count, main_kib = tree_rss_kib(proc.pid)
        tree_peak, processes = max(tree_peak, tree), max(processes, count)
        trace.append((time.perf_counter() - t0, main_kib))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"xpnet predict failed (exit {proc.returncode}) on {n} images:\n{stderr}")
    with open(out, encoding="utf-8") as fh:
        lines = sum(1 for _ in fh)
    if lines != n + 1:
        raise SystemExit(f"{out.name} holds {lines - 1} rows for {n} images")
    rate = re.search(r"\(([\d.]+) s, (\d+) images/s\)", stdout)
    return {"n": n, "wall": wall, "rate": n / wall, "stream_s": float(rate.group(1)) if rate else None,
            "stream_rate": int(rate.group(2)) if rate else None, "maxrss_mib": usage.ru_maxrss / 1024,
            "tree_mib": tree_peak / 1024, "processes": processes, "load": load,
            "tenths": [max([k for t, k in trace if i * wall / 10 <= t < (i + 1) * wall / 10] or [0]) / 1024
                       for i in range(10)]}


def tree_rss_kib(pid: int) -> tuple[int, int, int]:
    """(resident KiB of ``pid`` and its descendants summed, how many processes, resident KiB of ``pid``)."""
    total, count, main, todo = 0, 0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            kib = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, AttributeError, ValueError):
            continue
        total, count, main = total + kib, count + 1, kib if p == pid else main
    return total, count, main


def png_kib(folder: Path, names) -> float:
    sample = names[:: max(1, len(names) // 200)]
    return sum(os.path.getsize(folder / n) for n in sample) / max(1, len(sample)) / 1024


def format_row(r: dict) -> str:
    stream = f"{r['stream_rate']:>10,}" if r["stream_rate"] is not None else f"{'?':>10}"
    return (f"{r['n']:>9,} {r['wall']:>8.1f} {r['rate']:>9.0f} {stream} {r['maxrss_mib']:>12.1f} "
            f"{r['tree_mib']:>9.1f} {r['processes']:>9}   {r['load'][0]:.2f} {r['load'][1]:.2f} {r['load'][2]:.2f}")


def report(rows, args, kib: float) -> str:
    import numpy

    import xpnet
    from xpnet.data.folder import cpu_count

    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "xpnet"))
    first, last = rows[0], rows[-1]
    growth = last["maxrss_mib"] - first["maxrss_mib"]
    lines = [
        "xpnet predict MODEL FOLDER --out readings.csv: peak memory against the number of images",
        f"written by benchmarks/predict_memory.py, {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.system()} {platform.machine()}, {_cpu_model()}, {cpu_count()} usable CPU core(s), "
        f"{_mem_gib():.1f} GiB RAM; Python {platform.python_version()}, NumPy {numpy.__version__}, "
        f"xpnet {getattr(xpnet, '__version__', '?')}",
        f"commit: {commit}" + (" (with uncommitted changes under xpnet/)" if dirty else ""),
        "reader: captcha_net, untrained (seed 0), 4 characters of 0-9A-Z, input 3x32x80, NumPy backend; "
        f"--batch-size {args.batch_size}, --workers {args.workers if args.workers is not None else 'default'}",
        f"images: PNG renders of `xpnet generate --seed {SEED}` (160x60, {kib:.1f} KiB on average); a smaller "
        "count reads the first names (sorted) of the same folder",
        "wall s: the whole process (start, model load, listing, reading, writing the CSV); stream img/s: as "
        "printed by xpnet predict (reading and writing only)",
        "peak RSS: wait4 ru_maxrss of the predict process (its largest single process); tree: the process plus "
        "its decoding workers, summed, sampled every 50 ms",
        "",
        f"{'images':>9} {'wall s':>8} {'images/s':>9} {'stream/s':>10} {'peak RSS MiB':>12} {'tree MiB':>9}"
        f" {'processes':>9}   load average before (1, 5, 15 min)",
    ]
    lines += [format_row(r) for r in rows]
    lines += ["", f"peak RSS at {last['n']:,} images minus at {first['n']:,}: {growth:+.1f} MiB "
                  f"({100 * growth / first['maxrss_mib']:+.1f}%)"]
    same = [r for r in rows if r["processes"] == last["processes"]]
    if len(same) > 1:
        lines.append(f"tree (the same {last['processes']} process(es)) at {last['n']:,} images minus at "
                     f"{same[0]['n']:,}: {last['tree_mib'] - same[0]['tree_mib']:+.1f} MiB")
    lines.append(f"RSS of the predict process during the {last['n']:,}-image run, largest in each tenth of "
                 f"its time (MiB): " + " ".join(f"{v:.0f}" for v in last["tenths"]))
    return "\n".join(lines) + "\n"


def _env() -> dict:
    return dict(os.environ, XPNET_BACKEND="numpy", PYTHONPATH=str(ROOT))


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"^model name\s*:\s*(.+)$", text, re.M).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def _mem_gib() -> float:
    try:
        kib = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
        return kib / 1024 ** 2
    except (OSError, AttributeError):
        return float("nan")


if __name__ == "__main__":
    sys.exit(main())
