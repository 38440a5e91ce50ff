"""Research tool: run a plan of recipe_torch configurations, K at a time, until a deadline.

Each configuration runs in its own process (`recipe_torch.py JSON --out DIR/NAME.json`), so a
crash or a kill loses one run only; every evaluation point is appended to DIR/NAME.json.progress
as it happens, so runs cut by the deadline still leave their learning curve.
A configuration may name `needs` (a file that must exist before it starts, e.g. a data set still
being generated); such runs wait in the queue and later ones go ahead.

usage: python sweep.py PLAN_MODULE --workers K --deadline SECONDS --out DIR [--device cuda] [--only a,b]
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--deadline", type=float, default=400)
    ap.add_argument("--out", default="/tmp/recipe/sweep")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's samples (smoke tests)")
    a = ap.parse_args()
    sys.path.insert(0, HERE)
    plan = importlib.import_module(a.plan).PLAN
    if a.only:
        keep = set(a.only.split(","))
        plan = [c for c in plan if c["name"] in keep]
    os.makedirs(a.out, exist_ok=True)
    queue = [dict(c) for c in plan]
    running = {}
    t0 = time.time()
    while queue or running:
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                print(f"{time.time() - t0:7.1f}s done {name} rc={proc.returncode} in {time.time() - start:.0f}s", flush=True)
                del running[name]
        if time.time() - t0 > a.deadline:
            for name, (proc, start, log) in running.items():
                proc.kill()
                print(f"{time.time() - t0:7.1f}s KILLED at deadline: {name}", flush=True)
            for c in queue:
                print(f"not started: {c['name']}", flush=True)
            break
        while queue and len(running) < a.workers:
            pick = next((c for c in queue if not c.get("needs") or os.path.exists(c["needs"])), None)
            if pick is None:
                break
            queue.remove(pick)
            cfg = {k: v for k, v in pick.items() if k != "needs"}
            cfg.setdefault("device", a.device)
            cfg["samples"] = int(cfg.get("samples", 400000) * a.scale)
            log = open(os.path.join(a.out, cfg["name"] + ".log"), "w")
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "recipe_torch.py"), json.dumps(cfg),
                                     "--out", os.path.join(a.out, cfg["name"] + ".json")],
                                    stdout=log, stderr=subprocess.STDOUT)
            running[cfg["name"]] = (proc, time.time(), log)
            print(f"{time.time() - t0:7.1f}s start {cfg['name']}", flush=True)
        time.sleep(1.0)
    print(f"sweep finished in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
