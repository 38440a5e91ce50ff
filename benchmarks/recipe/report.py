"""Research tool: tabulate a sweep directory (finished runs and the curves of cut ones) as Markdown,
and plot the learning curves.

usage: python report.py SWEEP_DIR [--plot curves.png] [--names a,b,c]
"""
import argparse
import glob
import json
import os


def load(d):
    runs = {}
    for f in sorted(glob.glob(os.path.join(d, "*.json"))):
        for line in open(f):
            r = json.loads(line)
            runs[r["cfg"]["name"]] = r
    for f in sorted(glob.glob(os.path.join(d, "*.json.progress"))):
        name = os.path.basename(f)[:-len(".json.progress")]
        if name in runs:
            continue
        curve = [json.loads(l) for l in open(f) if l.strip()]
        if curve:
            runs[name] = dict(cfg=dict(name=name), curve=curve, partial=True)
    return runs


def describe(c):
    bits = [c.get("arch", "?")]
    if c.get("bn"):
        bits.append("BN")
    if c.get("dropout"):
        bits.append(f"drop{c['dropout']}")
    bits.append(f"{'RGB' if c.get('rgb') else 'grey'} {c.get('H')}x{c.get('W')}")
    return " ".join(bits)


def row(name, r):
    c, cu = r["cfg"], r["curve"]
    last = cu[-1]
    if r.get("partial"):
        return f"| {name} | (cut at {last['samples']:,} samples) | | | | | {last['test']:.3f} | | {last['train']:.3f} | |"
    aug = f"shift {c['shift']}" + (f" scale {c['scale']}" if c.get("scale") else "") if c.get("shift") or c.get("scale") else "none"
    opt = f"{c['opt']} {c['lr']:g} {c['sched']}" + (f" wd {c['wd']}" if c.get("wd") else "")
    extra = []
    if c.get("loss") != "bce":
        extra.append(c["loss"])
    if c.get("smooth"):
        extra.append(f"smooth {c['smooth']}")
    if c.get("prior_bias"):
        extra.append("prior output bias")
    if r.get("n_val"):
        extra.append(f"best val {r['best_val']:.3f} @ {r['stopped_at']:,}")
    conf = ", ".join(f"{k} {v}" for k, v in r.get("confusions", [])[:4])
    return (f"| {name} | {describe(c)} | {r['distinct']:,} | {c['samples']:,} ({c['samples'] / r['distinct']:.1f} ep) | "
            f"{c['batch']} | {opt} | **{r['final_test']:.3f}** | {r['final_test_char']:.4f} | {r['final_train']:.3f} | "
            f"{aug}{'; ' + '; '.join(extra) if extra else ''} | {conf} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--names", default="")
    a = ap.parse_args()
    runs = {}
    for d in a.dirs:
        runs.update(load(d))
    names = a.names.split(",") if a.names else list(runs)
    print("| run | network, input | distinct | samples (epochs) | batch | optimizer | test whole | test char | train whole | aug / notes | top confusions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        if n in runs:
            print(row(n, runs[n]))
    print()
    print("Curves (samples processed -> test whole-string accuracy):")
    for n in names:
        if n in runs:
            pts = ", ".join(f"{p['samples'] // 1000}k:{p['test']:.3f}" for p in runs[n]["curve"])
            print(f"- {n}: {pts}")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(10, 6))
        colors = plt.get_cmap("tab20").colors
        for i, n in enumerate(x for x in names if x in runs):
            cu = runs[n]["curve"]
            ax.plot([p["samples"] for p in cu], [p["test"] for p in cu], marker=".", label=n,
                    color=colors[(2 * i) % 20 + (i // 10) % 2], linestyle="-" if i < 10 else "--")
        ax.set_xlabel("training samples processed")
        ax.set_ylabel("whole-string accuracy, 2,000 fresh held-out images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
