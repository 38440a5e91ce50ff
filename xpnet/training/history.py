"""``History``: the per-epoch records and step losses of a run, written as CSV, JSON and a PNG plot."""

from __future__ import annotations

import csv
import io
import json

from ..nn import serialization as xio


class History:
    """Per-epoch records and step losses; written as CSV, JSON and a PNG plot."""

    def __init__(self, epochs=None, steps=None):
        self.epochs: list[dict] = list(epochs or [])
        self.steps: list[list] = [list(s) for s in (steps or [])]  # [step, mean loss of the window]

    def to_dict(self):
        return {"epochs": self.epochs, "steps": self.steps}

    @classmethod
    def from_dict(cls, d):
        d = d or {}
        return cls(d.get("epochs"), d.get("steps"))

    def __eq__(self, other):
        return isinstance(other, History) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"History({len(self.epochs)} epoch(s), {len(self.steps)} step loss(es))"

    def column(self, key):
        return [r.get(key) for r in self.epochs]

    def __len__(self):
        return len(self.epochs)

    def __getitem__(self, i):
        return self.epochs[i]

    def write_json(self, path):
        data = json.dumps(self.to_dict(), indent=1, default=float).encode("utf-8")
        xio.atomic_write(path, lambda f: f.write(data), "history")

    def write_csv(self, path):
        keys = []
        for r in self.epochs:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        for r in self.epochs:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
        data = buf.getvalue().encode("utf-8")
        xio.atomic_write(path, lambda f: f.write(data), "history")

    def plot(self, path, title: str = ""):
        """Loss (left) and validation metrics (right) against epochs, as a PNG (no display used)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax_loss, ax_metric = fig.subplots(1, 2)
        spe = None
        if self.epochs and self.epochs[0].get("step"):
            spe = self.epochs[0]["step"] / max(1, self.epochs[0]["epoch"])
        if self.steps and spe:
            xs = [s / spe for s, _ in self.steps]
            ax_loss.plot(xs, [v for _, v in self.steps], color="0.75", lw=0.8, label="train (steps)")
        ep = self.column("epoch")
        for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
            vals = self.column(key)
            if any(v is not None for v in vals):
                ax_loss.plot(ep, vals, style, ms=3, label=key.replace("_", " "))
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("loss")
        ax_loss.set_yscale("log") if all((v or 1) > 0 for v in self.column("train_loss")) else None
        ax_loss.legend(fontsize=8)
        ax_loss.grid(alpha=0.3)
        metric_keys = []
        for r in self.epochs:
            metric_keys += [k for k in r if k.startswith(("val_", "train_")) and k not in ("val_loss", "train_loss")
                            and k not in metric_keys]
        for key in metric_keys:
            ax_metric.plot(ep, self.column(key), "o-", ms=3, label=key.replace("_", " "))
        ax_metric.set_xlabel("epoch")
        ax_metric.set_ylabel("metric")
        if metric_keys:
            ax_metric.legend(fontsize=8)
        else:
            ax_metric.text(0.5, 0.5, "no validation metrics", ha="center", va="center", transform=ax_metric.transAxes)
        ax_metric.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        data = buf.getvalue()
        xio.atomic_write(path, lambda f: f.write(data), "plot")
