"""Pretraining a small folder's reader on synthetic look-alikes of it (``xpnet.data.lookalike``).

A few hundred labelled images are too few to learn glyph shapes from; generated images of
the same charset, lengths, aspect ratio and grey levels, drawn with many fonts, teach them
first.  ``pretrain`` trains the run's own network (same head, same input) on look-alikes for
a time budget, keeping the weights that read the folder's *validation* part best, and saves
them as ``pretrained.npz`` (a reader: ``--init`` starts other runs from it).  The folder run
then fine-tunes those weights -- unless they read none of the validation images, when it starts
from its fresh weights as without pretraining.  The style is matched to the training part only.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..data.lookalike import lookalikes, style_of
from ..nn import serialization as xio
from .config import Settings
from .heads import text_lengths
from .plans import NO_EPOCH_LIMIT, FolderPlan, SyntheticPlan
from .recognizer import metadata_for
from .schedule import build_optimizer

PRETRAINED_FILE = "pretrained.npz"


def wants_pretraining(settings: Settings, plan, resume: bool) -> bool:
    """Pretrain when the run is a fresh folder run with fewer training images than ``pretrain["below"]``,
    not started from ``--init``, and the budget is above 0."""
    p = settings.pretrain or {}
    return (isinstance(plan, FolderPlan) and not resume and not settings.init and bool(p)
            and float(p.get("seconds") or 0) > 0 and plan.n_train < int(p.get("below", 0)))


def pretrain_seconds(settings: Settings) -> float:
    """Seconds of pretraining: ``pretrain["seconds"]``, but at most ``pretrain["budget_share"]`` of the
    job's time budget when it has one (a short ``--time-budget`` must leave time to fine-tune)."""
    p = settings.pretrain
    seconds = float(p["seconds"])
    if settings.time_budget:
        seconds = min(seconds, float(p.get("budget_share", 1.0)) * float(settings.time_budget))
    return seconds


def pretrain(model, settings: Settings, plan: FolderPlan, out: Path, make_trainer, log=print) -> dict:
    """Train ``model`` in place on look-alikes of ``plan``'s folder; returns a summary for ``run.json``.

    ``make_trainer(model, optimizer, out_dir, settings, plan, time_budget)`` builds the trainer (the
    job's, so that the head, loss, metrics and transforms are the run's).
    """
    p = settings.pretrain
    seconds = pretrain_seconds(settings)
    t0 = time.monotonic()
    fresh = {k: v.copy() for k, v in model.state_dict().items()}  # to go back to if pretraining reads nothing
    style = style_of(plan.train)
    count = int(p["images"])
    data = lookalikes(count, settings.seed, plan.charset, plan.preprocess, style)
    made = time.monotonic() - t0
    log(f"pretraining on {count:,} look-alikes of the folder ({len(style.fonts)} fonts, background grey "
        f"{style.background[0]}-{style.background[1]}, ink {style.ink[0]}-{style.ink[1]}; made in {made:.0f} s) "
        f"for {seconds:.0f} s, keeping the weights that read the validation part best")
    synthetic = SyntheticPlan(charset=plan.charset, preprocess=plan.preprocess, n_train=count, describe={},
                              val=plan.val, test=plan.test, test_name="", learned={}, head=plan.head, train=data)
    # No distortions here: the look-alikes vary enough by construction, and distorted they were learnt
    # slower in the same seconds (a 200-image development folder: 93.05% against 99.75% after fine-tuning).
    pre_settings = settings.replace(lr=float(p.get("lr", settings.lr)), epochs=None, steps=None, distort={})
    opt, schedule = build_optimizer(pre_settings, model)
    folder = Path(out) / "pretrain"
    trainer = make_trainer(model, opt, folder, pre_settings, synthetic, seconds)
    schedule.progress = trainer.fraction_done
    trainer.fit(synthetic.train_source(trainer.batch_size), epochs=NO_EPOCH_LIMIT, val=plan.val)
    h = trainer.history
    best = max((r.get("val_string_accuracy") or 0) for r in h.epochs) if len(h) else 0.0
    summary = {"images": count, "val_string_accuracy": best, "style": style.to_dict(),
               "steps": h[-1]["step"] if len(h) else 0, **characters_read(h, len(plan.charset.chars))}
    if not best:
        # Weights that read none of the folder's validation images are no better a start than fresh ones
        # (and a run stuck at the class prior can leave them worse): fine-tune from the fresh weights.
        model.load_state_dict(fresh)
        log(f"pretraining read none of the validation images ({time.monotonic() - t0:.0f} s"
            + (f"; {summary['evidence']}" if summary.get("evidence") else "")
            + "): fine-tuning starts from fresh weights")
        return {**summary, "used": False, "seconds": round(time.monotonic() - t0, 1)}
    xio.load_weights(model, folder / "model.npz")  # the best by validation
    metadata = metadata_for(plan.charset, plan.preprocess, model=settings.model, pretrained_on="lookalikes",
                            style=style.to_dict())
    if plan.head == "ctc":
        metadata["head"] = "ctc"
        metadata["lengths"] = text_lengths(plan.charset)
    xio.save(model, Path(out) / PRETRAINED_FILE, metadata)
    log(f"pretrained: validation whole-string accuracy {best * 100:.1f}% before fine-tuning "
        f"({time.monotonic() - t0:.0f} s); weights in {Path(out) / PRETRAINED_FILE}")
    return {**summary, "used": True, "seconds": round(time.monotonic() - t0, 1)}


# A reader whose best character error rate stays at or above this reads characters no better than
# chance (a CTC reader of a 5-character development folder whose labels were shuffled: 0.93-0.97;
# an empty reading: 1.0); for the bce head, a per-character accuracy at most twice 1 / K.
CHANCE_CHAR_ERROR_RATE = 0.9


def characters_read(history, n_classes: int) -> dict:
    """How well a trainer's validation passes read single characters, against chance.

    Returns ``{"val_char_error_rate" or "val_char_accuracy": best, "at_chance": bool, "evidence":
    sentence}`` ({} without such records).  At chance while the training loss fell to less than half
    its first epoch's (the network learnt its own images: 13.5 -> 3.5 with label smoothing, 15.4 -> 0.3
    without, on a development folder; a run stuck at the prior levels out far higher), a reader of
    look-alikes that reads the folder's images no better than random texts is what labels that do not
    belong to their images look like.
    """
    epochs = history.epochs
    cer = [r["val_char_error_rate"] for r in epochs if r.get("val_char_error_rate") is not None]
    acc = [r["val_char_accuracy"] for r in epochs if r.get("val_char_accuracy") is not None]
    if cer:
        key, best = "val_char_error_rate", min(cer)
        at_chance, shown = best >= CHANCE_CHAR_ERROR_RATE, f"best character error rate {best:.2f}"
    elif acc:
        key, best = "val_char_accuracy", max(acc)
        at_chance = best <= 2.0 / n_classes
        shown = f"best per-character accuracy {best:.1%}, chance {1 / n_classes:.1%}"
    else:
        return {}
    losses = [r["train_loss"] for r in epochs if r.get("train_loss") is not None]
    learnt = len(losses) >= 2 and losses[-1] < 0.5 * losses[0]
    evidence = ""
    if at_chance and learnt:
        evidence = (f"it learnt its look-alikes (training loss {losses[0]:.3g} -> {losses[-1]:.3g}) but read the "
                    f"folder's validation images no better than chance ({shown})")
    return {key: round(float(best), 4), "at_chance": bool(at_chance and learnt), "evidence": evidence}


__all__ = ["wants_pretraining", "pretrain", "characters_read", "PRETRAINED_FILE"]
