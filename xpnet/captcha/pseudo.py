"""Unlabelled images help: pseudo-labels for the images the reader is confident about.

After the folder run has trained (and restored its best weights), each round reads the
unlabelled images with the current reader, keeps those whose reading is confident enough
and fits the task (charset, lengths), and trains on the labelled training part plus them,
keeping the weights that read the *validation* part best.  Every round reads all the
unlabelled images again, so a pseudo-label the improved reader no longer trusts drops out.

The confidence threshold is chosen on the validation part, never on test data: the lowest
confidence at which the validation readings at or above it are right at least
``precision`` of the time (at least ``min_count`` of them), so that pseudo-labels are about
as reliable as that.  A round whose best validation accuracy is below the previous one's
is undone (its weights are not kept).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy

from ..data.folder import LabelledImages
from ..errors import DataError
from ..nn import serialization as xio
from .config import Settings
from .plans import FolderPlan
from .recognizer import Recognizer, image_files


def confidence_threshold(confidences, right, precision: float, min_count: int = 10) -> float | None:
    """The lowest threshold t with accuracy >= ``precision`` among readings of confidence >= t.

    ``confidences`` (N,) and ``right`` (N,) bool are the validation readings.  None when no
    threshold keeps ``min_count`` readings at that precision.
    """
    conf = numpy.asarray(confidences, dtype=numpy.float64)
    right = numpy.asarray(right, dtype=bool)
    order = numpy.argsort(-conf, kind="stable")
    hits = numpy.cumsum(right[order])
    counts = numpy.arange(1, len(order) + 1)
    ok = (hits / counts >= precision) & (counts >= min_count)
    if not ok.any():
        return None
    k = int(numpy.flatnonzero(ok)[-1])  # the most readings kept at that precision
    return float(conf[order][k])


def read_unlabelled(folder, preprocess, log=print):
    """(N, C, H, W) uint8 images of every readable image file in ``folder`` (unreadable ones listed)."""
    from ..data.images import read_image

    paths = image_files(folder)
    if not paths:
        raise DataError(f"--unlabelled {folder} holds no image files.")
    images = numpy.empty((len(paths),) + preprocess.shape, dtype=numpy.uint8)
    n, bad = 0, []
    for p in paths:
        try:
            images[n] = read_image(p, preprocess)
            n += 1
        except DataError as exc:
            bad.append((p, str(exc)))
    if bad:
        log(f"{len(bad)} unlabelled file(s) could not be read and are left out, e.g. {bad[0][1]}")
    return images[:n]


def pseudo_label_rounds(model, settings: Settings, plan: FolderPlan, metadata, out: Path, make_trainer,
                        log=print) -> list:
    """Run ``settings.pseudo["rounds"]`` rounds (module docstring) on ``model`` in place; returns a summary
    per round for ``run.json``.  ``make_trainer(model, optimizer, out_dir, settings, plan, epochs)``
    builds the job's trainer."""
    from .schedule import build_optimizer

    p = settings.pseudo
    unlabelled = read_unlabelled(settings.unlabelled_dir, plan.preprocess, log)
    val_x, _ = plan.val
    val_texts = plan.val_labels
    rounds = []
    best = _val_accuracy(model, plan, metadata, val_x, val_texts)
    for r in range(1, int(p["rounds"]) + 1):
        t0 = time.monotonic()
        reader = Recognizer(model, plan.charset, plan.preprocess, metadata)
        val_pred = reader.predict(val_x)
        right = numpy.array([a == b for a, b in zip(val_pred.texts, val_texts)])
        threshold = confidence_threshold(val_pred.confidences, right, float(p["precision"]),
                                         int(p.get("min_count", 10)))
        if threshold is None:
            log(f"pseudo-labels, round {r}: no confidence level reads {float(p['precision']):.0%} of the "
                f"validation images right: none added")
            break
        pred = reader.predict(unlabelled)
        fits = numpy.array([not plan.charset.check([t]) and bool(t) for t in pred.texts])
        keep = numpy.flatnonzero((pred.confidences >= threshold) & fits)
        if not len(keep):
            log(f"pseudo-labels, round {r}: no unlabelled image read with confidence >= {threshold:.3f}")
            break
        texts = [pred.texts[i] for i in keep]
        train = plan.train
        data = LabelledImages(images=numpy.concatenate([train.images, unlabelled[keep]]),
                              labels=list(train.labels) + texts, charset=plan.charset, preprocess=plan.preprocess)
        round_plan = FolderPlan(charset=plan.charset, preprocess=plan.preprocess, n_train=len(data),
                                describe={}, val=plan.val, test=plan.test, test_name=plan.test_name, learned={},
                                head=plan.head, train=data)
        before = {k: v.copy() for k, v in model.state_dict().items()}
        opt, schedule = build_optimizer(settings.replace(lr=float(p.get("lr", settings.lr))), model)
        folder = Path(out) / f"pseudo-{r}"
        trainer = make_trainer(model, opt, folder, settings, round_plan, int(p["epochs"]))
        schedule.progress = trainer.fraction_done
        trainer.fit(round_plan.train_source(trainer.batch_size), epochs=int(p["epochs"]), val=plan.val)
        xio.load_weights(model, folder / "model.npz")
        now = _val_accuracy(model, plan, metadata, val_x, val_texts)
        kept = now >= best
        if not kept:
            model.load_state_dict(before)
        log(f"pseudo-labels, round {r}: {len(keep):,} of {len(unlabelled):,} unlabelled images read with "
            f"confidence >= {threshold:.3f} (validation readings that confident: {float(p['precision']):.0%} or "
            f"more right); validation whole-string {best * 100:.1f}% -> {now * 100:.1f}%"
            + ("" if kept else ": round undone") + f" ({time.monotonic() - t0:.0f} s)")
        rounds.append({"round": r, "threshold": threshold, "added": int(len(keep)), "unlabelled": len(unlabelled),
                       "val_before": best, "val_after": now, "kept": bool(kept)})
        if not kept:
            break
        best = now
    return rounds


def _val_accuracy(model, plan, metadata, val_x, val_texts) -> float:
    reader = Recognizer(model, plan.charset, plan.preprocess, metadata)
    texts = reader.predict(val_x).texts
    return float(numpy.mean([a == b for a, b in zip(texts, val_texts)]))


__all__ = ["confidence_threshold", "read_unlabelled", "pseudo_label_rounds"]
