"""Throughput and latency of ``xpnet serve`` on loopback, with 1, 4 and 16 concurrent clients.

    python benchmarks/serve_bench.py                  # -> benchmarks/results/serve_cpu.txt
    python benchmarks/serve_bench.py --name serve_quiet --requests 3000

What is measured
* The server: ``xpnet serve`` in its own process, on 127.0.0.1 and a free port, reading with
  an untrained ``captcha_net`` (speed does not depend on the weights) saved as a reader of
  4 characters of 36 classes.  Its preprocessing is ``Preprocess()`` (3 x 32 x 80, the
  default of ``xpnet train``), which resizes the 160 x 60 CAPTCHAs; ``--input 60x160``
  makes a reader of the full-size images instead.
* The clients: ``--clients`` (default 1, 4, 16) asyncio connections in this process, each
  sending ``POST /predict`` with a 160 x 60 PNG CAPTCHA (made by ``xpnet.data``) as the body
  over one kept-alive connection, the next request as soon as the answer is in.  Requests
  are encoded once, before timing, so the client costs little of the shared cores.
* Per level: after a warm-up, ``--requests`` answered requests (each checked: 200 and a
  reading); requests/s over the wall time, latency p50 / p90 / p99 / max (send to last
  byte), and the mean batch the service read (its /health counters).
* The results file (the table, then the same numbers as JSON) records the machine, the load
  average at start and end, the commit and the versions; the target is >= 300 requests/s with
  p99 <= 100 ms at 16 clients.

Loopback only, a bounded number of requests; the server is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)

TARGET = {"clients": 16, "requests_per_s": 300.0, "p99_ms": 100.0}
START_LINE = re.compile(r"at http://127\.0\.0\.1:(\d+)/")


def make_reader(folder: str, input_hw) -> str:
    """An untrained captcha_net saved as a reader (4 of 36 characters); its path."""
    import xpnet
    from xpnet.captcha import metadata_for
    from xpnet.data import DIGITS_UPPER, Charset, Preprocess

    cs = Charset(DIGITS_UPPER, 4)
    pp = Preprocess(height=input_hw[0], width=input_hw[1])
    xpnet.seed(0)
    model = xpnet.models.captcha_net(4, cs.n_classes, input_shape=pp.shape)
    path = os.path.join(folder, "captcha_net.npz")
    xpnet.save(model, path, metadata_for(cs, pp, model="captcha_net"))
    return path


def make_pngs(count: int) -> list[bytes]:
    """``count`` distinct 160 x 60 PNG CAPTCHAs, as file bytes."""
    from xpnet.data import DIGITS_UPPER, Charset, render_captcha

    cs = Charset(DIGITS_UPPER, 4)
    out = []
    for i in range(count):
        _, image = render_captcha(7, i, cs)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def encode_requests(pngs, port: int) -> list[bytes]:
    return [(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
             f"Content-Length: {len(p)}\r\n\r\n").encode() + p for p in pngs]


async def _exchange(reader, writer, request: bytes) -> tuple[int, bytes]:
    """Send one request, read one response (Content-Length framed): (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    return status, body


async def run_level(port: int, requests, clients: int, total: int, warmup: int) -> dict:
    """``clients`` connections sharing ``total`` timed requests (after ``warmup`` each); latencies and rate."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    latencies: list[float] = []
    bad: list[str] = []
    counter = {"left": total, "next": 0}

    async def client(k, reader, writer, timed):
        i = k
        if not timed:
            for _ in range(warmup):
                await _exchange(reader, writer, requests[i % len(requests)])
                i += clients
            return
        while counter["left"] > 0:
            counter["left"] -= 1
            request = requests[counter["next"] % len(requests)]
            counter["next"] += 1
            t0 = time.perf_counter()
            status, body = await _exchange(reader, writer, request)
            latencies.append(time.perf_counter() - t0)
            if status != 200 or b'"text"' not in body:
                bad.append(f"{status} {body[:200]!r}")

    try:
        await asyncio.gather(*[client(k, r, w, False) for k, (r, w) in enumerate(conns)])
        t0 = time.perf_counter()
        await asyncio.gather(*[client(k, r, w, True) for k, (r, w) in enumerate(conns)])
        wall = time.perf_counter() - t0
    finally:
        for _, w in conns:
            w.close()
    if bad:
        raise SystemExit(f"serve_bench: {len(bad)} bad answers, the first: {bad[0]}")
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] * 1e3  # noqa: E731
    return {"clients": clients, "requests": len(lat), "wall_s": round(wall, 3),
            "requests_per_s": round(len(lat) / wall, 1), "p50_ms": round(q(0.50), 2), "p90_ms": round(q(0.90), 2),
            "p99_ms": round(q(0.99), 2), "max_ms": round(lat[-1] * 1e3, 2),
            "mean_ms": round(sum(lat) / len(lat) * 1e3, 2)}


async def health(port: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, body = await _exchange(reader, writer, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    finally:
        writer.close()
    return json.loads(body)


def start_server(model: str, extra) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-c", "import sys; from xpnet.cli import main; sys.exit(main())", "serve", model,
           "--host", "127.0.0.1", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = START_LINE.search(line)
        if m:
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"serve_bench: the server did not start: {line.strip() or 'no output'}")


def stop_server(proc: subprocess.Popen) -> int:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        info["tracked_files_modified"] = bool(dirty)
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "starlette", "uvicorn", "h11", "httptools", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    info["versions"] = versions
    info["uvicorn_http"] = "httptools" if versions["httptools"] else "h11"
    info["event_loop"] = "uvloop" if versions["uvloop"] else "asyncio"
    return info


def fmt(results: dict) -> str:
    m = results["machine"]
    lines = [f"xpnet serve benchmark '{results['name']}' ({m['date']}, commit {m.get('commit', '?')[:10]})",
             f"machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, load average at start "
             f"{m.get('loadavg_at_start')}, at end {m.get('loadavg_at_end')}",
             f"server: xpnet serve ({m['uvicorn_http']}, {m['event_loop']}), model {results['model']}, input "
             f"{results['input']}, PNG bodies of {results['png_bytes']} bytes (160x60)",
             f"{'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
             f"{'max ms':>8} {'batch':>6}"]
    for r in results["levels"]:
        lines.append(f"{r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.2f} "
                     f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.2f} {r['mean_batch']:>6.1f}")
    t = results["target"]
    lines.append(f"target at {t['clients']} clients: >= {t['requests_per_s']:.0f} requests/s with p99 <= "
                 f"{t['p99_ms']:.0f} ms: {'met' if t['met'] else 'NOT met' if t['met'] is False else 'not measured'}")
    lines.append(f"server stopped, exit code {results['server_exit_code']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--name", default="serve_cpu", help="results file name (benchmarks/results/NAME.txt)")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    ap.add_argument("--requests", type=int, default=2000, help="timed requests per level (at most 100000)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed requests per client before each level")
    ap.add_argument("--input", default="32x80", help="the reader's input HxW (the PNGs are always 160x60)")
    ap.add_argument("--images", type=int, default=64, help="distinct PNGs the clients cycle through")
    ap.add_argument("--no-save", action="store_true", help="print only; write no results file")
    ap.add_argument("serve_args", nargs="*", help="extra options for xpnet serve (after --)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if not 1 <= args.requests <= 100_000 or min(levels) < 1 or max(levels) > 256:
        ap.error("--requests must be 1..100000 and each client count 1..256")
    input_hw = tuple(int(v) for v in args.input.lower().split("x"))
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_reader(tmp, input_hw)
        pngs = make_pngs(args.images)
        proc, port = start_server(model, args.serve_args)
        try:
            requests = encode_requests(pngs, port)
            out = []
            for clients in levels:
                before = asyncio.run(health(port))
                level = asyncio.run(run_level(port, requests, clients, args.requests, args.warmup))
                after = asyncio.run(health(port))
                level["mean_batch"] = round((after["images"] - before["images"])
                                            / max(1, after["batches"] - before["batches"]), 2)
                print(f"{clients:>3} clients: {level['requests_per_s']:.1f} requests/s, p50 {level['p50_ms']:.1f} ms, "
                      f"p99 {level['p99_ms']:.1f} ms, mean batch {level['mean_batch']}", flush=True)
                out.append(level)
        finally:
            code = stop_server(proc)
    try:
        machine["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    at = next((r for r in out if r["clients"] == TARGET["clients"]), None)
    met = None if at is None else bool(at["requests_per_s"] >= TARGET["requests_per_s"]
                                       and at["p99_ms"] <= TARGET["p99_ms"])
    results = {"name": args.name, "machine": machine, "model": "captcha_net (untrained, 4 x 36 classes)",
               "input": f"3x{input_hw[0]}x{input_hw[1]}", "png_bytes": sum(map(len, pngs)) // len(pngs),
               "serve_args": args.serve_args, "server_exit_code": code, "levels": out,
               "target": {**TARGET, "met": met}}
    text = fmt(results)
    print(text)
    if not args.no_save:  # one file: the table, then every number as JSON
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, f"{args.name}.txt"), "w") as fh:
            fh.write(text + "\n\nresults as JSON:\n" + json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
