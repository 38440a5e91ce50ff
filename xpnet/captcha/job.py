"""The CAPTCHA training job: data plan, network, trainer, held-out evaluation, the saved reader.

``train(options, out)`` is ``xpnet train`` without the command line;
``run(settings, out)`` trains with resolved ``Settings``.  A run writes into its
output folder: ``model.npz`` (the reader: weights + metadata), ``best.npz``,
``checkpoints/``, ``history.csv``/``.json``/``.png``, ``run.json`` and
``results.json``.  ``time_budget`` is wall-clock seconds for the whole job:
training gets what data preparation left, less ``final_reserve``.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy

from .. import backend, checks
from ..data import folder as data_folder
from ..errors import UsageError
from ..metrics import multilabel_metrics, wilson_interval
from ..nn import serialization as xio
from ..training.callbacks import StuckWatch
from ..training.trainer import Trainer
from .config import Settings, TrainOptions, merge_resume, resolve_settings, settings_for_head
from .heads import BCELoss, CTCLoss, ctc_metrics, text_lengths
from .pretrain import PRETRAINED_FILE, pretrain, wants_pretraining
from .pseudo import pseudo_label_rounds
from .network import build_model, make_transforms, set_prior_bias
from .plans import NO_EPOCH_LIMIT, DataPlan, FolderPlan, for_small_folder, prepare_data, stream_start
from .recognizer import Recognizer, metadata_for
from .run_folder import RESULTS_FILE, RUN_FILE, default_out, now, prepare_out, read_saved_settings, write_json

FOLDS_FILE = "folds.json"
from .schedule import build_optimizer


def _print(msg):
    print(msg, flush=True)


def train(options: TrainOptions | None = None, out=None, resume: bool = False, workers: int | None = None,
          progress: bool | None = None, log=None) -> dict:
    """Resolve ``options``, check the output folder ``out`` (default: a new ``runs/captcha-<time>``), run.

    ``resume`` continues the run in ``out`` with its saved settings.  Returns the results dict.
    """
    t0 = time.monotonic()
    log = log or _print
    options = options or TrainOptions()
    settings = resolve_settings(options)
    workers = checks.integer(workers, "--workers", 0, optional=True, what="0 (in this process) or more")
    if resume and not out:
        raise UsageError("--resume needs --out DIR, the folder of the run to continue.")
    if resume and settings.folds:
        raise UsageError("--resume continues one run: resume a fold of a k-fold run with --out DIR/fold-N "
                         "--resume (without --folds).")
    out = prepare_out(Path(out or default_out()), resume)
    if resume:
        settings = merge_resume(settings, read_saved_settings(out), options, where=str(out / RUN_FILE))
    if settings.folds:
        return cross_validate(settings, out, workers=workers, progress=progress, log=log)
    return run(settings, out, resume=resume, workers=workers, progress=progress, log=log, t0=t0)


def cross_validate(settings: Settings, out, workers=None, progress=None, log=print) -> dict:
    """K runs (``settings.folds``), run k testing on fold k of the folder, each in ``out/fold-<k>``.

    Every image is tested exactly once.  Returns (and writes to ``out/folds.json``) each fold's
    test results, the mean and spread of the whole-string accuracy over the folds, and the pooled
    accuracy over all images with its 95% interval.
    """
    out = Path(out)
    runs = []
    for k in range(settings.folds):
        log(f"--- fold {k + 1} of {settings.folds} ---")
        results = run(settings.replace(fold=k), out / f"fold-{k + 1}", workers=workers, progress=progress,
                      log=log)
        runs.append(results["test"])
    acc = numpy.array([r["string_accuracy"] for r in runs])
    n = numpy.array([r["n"] for r in runs])
    right = int(numpy.round(acc * n).sum())
    lo, hi = wilson_interval(right, int(n.sum()))
    summary = {
        "folds": settings.folds, "images": int(n.sum()),
        "string_accuracy": {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)), "min": float(acc.min()),
                            "max": float(acc.max()), "per_fold": acc.tolist()},
        "pooled_string_accuracy": right / int(n.sum()), "pooled_interval_95": [lo, hi],
        "char_accuracy_mean": float(numpy.mean([r["char_accuracy"] for r in runs])),
        "fold_results": runs, "finished": now(),
    }
    write_json(out / FOLDS_FILE, summary, "k-fold results")
    log(f"{settings.folds}-fold cross-validation over {int(n.sum()):,} images: whole-string accuracy mean "
        f"{acc.mean() * 100:.2f}%, standard deviation {acc.std(ddof=1) * 100:.2f}% (folds: "
        + ", ".join(f"{a * 100:.1f}%" for a in acc) + f"); all images pooled: {right / n.sum() * 100:.2f}% "
        f"(95% interval {lo * 100:.1f}-{hi * 100:.1f}%)")
    log(f"k-fold results: {out / FOLDS_FILE}")
    return summary


def run(settings: Settings, out, resume: bool = False, workers: int | None = None, progress: bool | None = None,
        log=print, t0: float | None = None) -> dict:
    """Train with resolved ``settings`` into folder ``out``; evaluate on the held-out test set; save.

    Returns the results (also in ``out/results.json`` and the model file's metadata).
    """
    t0 = time.monotonic() if t0 is None else t0
    out = xio.check_writable(Path(out))
    _log_start(settings, out, log)
    plan = prepare_data(settings, out, workers, progress, log)
    settings = settings_for_head(settings.replace(**plan.learned), plan.head)
    settings, said = for_small_folder(settings, plan.n_train)
    if said:
        log(said)
    run_doc = {"settings": settings.to_dict(), "data": plan.describe, "started": now(),
               "python": platform.python_version(), "backend": backend.current()}
    if not resume:
        write_json(out / RUN_FILE, run_doc, "run description")
    model, opt, schedule = _build_network(settings, plan, log, fresh=not resume)
    batch_size = _batch_size(settings, plan, log)
    spe = plan.steps_per_epoch(batch_size)
    epochs, patience = plan.epochs_and_patience(settings, spe)
    if settings.steps is not None and not settings.epochs:
        epochs = -(-settings.steps // spe)  # the step limit ends the last one
    metadata = metadata_for(plan.charset, plan.preprocess, model=settings.model, config=settings.config,
                            settings=settings.to_dict(), data=plan.describe)
    if plan.head == "ctc":
        metadata["head"] = "ctc"  # texts of any length, decoded from per-column scores (captcha.heads)
        metadata["lengths"] = text_lengths(plan.charset)  # read as texts of the lengths trained on
    if wants_pretraining(settings, plan, resume):
        def make(m, o, folder, s, p, budget):
            # no StuckWatch: it judges the folder's validation images, which look-alikes may not read yet
            # while they are learnt (a shuffled-label folder's pretraining was stopped so); pretraining
            # that reads none of them is dropped for fresh weights instead (captcha.pretrain)
            return _make_trainer(m, o, folder, s, p, batch_size, None, budget, metadata, progress, log,
                                 watch=False)
        run_doc["data"] = {**plan.describe, "pretrain": pretrain(model, settings, plan, out, make, log)}
        write_json(out / RUN_FILE, run_doc, "run description")
    train_budget = _training_budget(settings, t0)  # what data preparation and pretraining left
    hint = _labels_hint(run_doc["data"].get("pretrain"))
    trainer = _make_trainer(model, opt, out, settings, plan, batch_size, patience, train_budget, metadata,
                            progress, log, hint)
    schedule.progress = trainer.fraction_done
    _log_plan(model, settings, plan, batch_size, spe, epochs, patience, train_budget, log)
    _fit(trainer, plan, batch_size, spe, epochs, resume, out, log)
    if _stuck(trainer) and settings.stuck_retry and not resume:
        again = _start_again(trainer, settings, plan, out, run_doc, metadata, batch_size, spe, epochs, patience,
                             t0, progress, log, hint)
        if again is not None:
            settings, model, trainer = again
    # The model file holds the best weights (also when a resumed run had nothing left to do).
    xio.load_weights(model, out / "model.npz")
    if settings.unlabelled_dir and isinstance(plan, FolderPlan):
        def make(m, o, folder, s, p, n_epochs):
            return _make_trainer(m, o, folder, s, p, batch_size, None, None, metadata, progress, log)
        run_doc["data"] = {**run_doc["data"], "pseudo_labels": pseudo_label_rounds(model, settings, plan, metadata,
                                                                                     out, make, log)}
        write_json(out / RUN_FILE, run_doc, "run description")
    return _evaluate_and_save(model, trainer, plan, metadata, out, t0, log)


def _stuck(trainer) -> bool:
    return any(isinstance(c, StuckWatch) and c.stuck for c in trainer.callbacks)


def _start_again(stuck, settings, plan, out, run_doc, metadata, batch_size, spe, epochs, patience, t0, progress,
                 log, hint=""):
    """After a stuck attempt (trainer ``stuck``): set its files aside in ``out/stuck-1``, start once more from the same
    first weights (fresh, ``--init`` or pretrained) with a lower peak rate and a longer warm-up.
    Returns (settings, model, trainer) of the new attempt, or None where the time budget has less
    than a quarter left (the stuck attempt then stands, as it stopped)."""
    retry = settings.stuck_retry
    budget = settings.time_budget
    if budget and budget - (time.monotonic() - t0) - settings.final_reserve < 0.25 * budget:
        log("not starting again: less than a quarter of the time budget is left")
        return None
    aside = out / "stuck-1"
    aside.mkdir(exist_ok=True)
    for path in stuck.output_files:
        if path.exists():
            path.replace(aside / path.name)
    old_lr, old_warmup = settings.lr, settings.warmup_steps
    settings = settings.replace(lr=old_lr * float(retry["lr_factor"]),
                                warmup_steps=int(round(old_warmup * float(retry["warmup_factor"]))))
    tried = (f"the peak learning rate {old_lr:g} -> {settings.lr:g} and the warm-up {old_warmup} -> "
             f"{settings.warmup_steps} steps")
    log(f"starting once more with {tried} (a run stuck at the prior has usually started too fast); the stuck "
        f"attempt's files are in {aside}")
    model, opt, schedule = _build_network(settings, plan, log, fresh=True)
    if (out / PRETRAINED_FILE).exists():
        xio.load_weights(model, out / PRETRAINED_FILE)
    run_doc["settings"] = metadata["settings"] = settings.to_dict()
    run_doc["started_again"] = {"after": "nothing learned", "tried": tried, "first_attempt": aside.name}
    write_json(out / RUN_FILE, run_doc, "run description")
    trainer = _make_trainer(model, opt, out, settings, plan, batch_size, patience, _training_budget(settings, t0),
                            metadata, progress, log, hint)
    schedule.progress = trainer.fraction_done
    _fit(trainer, plan, batch_size, spe, epochs, False, out, log)
    if _stuck(trainer):
        log(f"stopped: still nothing learned after starting again with {tried}; {_stuck_advice(plan, hint)}")
    return settings, model, trainer


def _log_start(settings: Settings, out: Path, log) -> None:
    budget = settings.time_budget
    log(f"output folder: {out.resolve()}")
    model = (f"model {settings.model} ({settings.head} head)" if settings.head != "auto" else
             "the head and model as the labels say")
    log(f"configuration {settings.config!r}: {model}, "
        + (f"time budget {budget:.0f} s for the whole job" if budget else "no time budget")
        + f"; backend {backend.current()} ({backend.reason()}), {data_folder.cpu_count()} CPU core(s)")


def _build_network(settings: Settings, plan: DataPlan, log=print, fresh: bool = True):
    """(model, optimizer, schedule), the weights drawn from the run's seed, or (``--init``) loaded
    from another reader where the networks agree."""
    backend.seed(settings.seed)
    model = build_model(settings.model, plan.charset, plan.preprocess, **(settings.model_kwargs or {}))
    if settings.prior_bias and plan.head == "bce":
        set_prior_bias(model, plan.charset)
    if settings.init and fresh:  # a resumed run's checkpoint holds the weights
        loaded, kept, _ = xio.load_matching(model, settings.init)
        log(f"started from {settings.init}: {len(loaded)} of {len(loaded) + len(kept)} arrays loaded"
            + (f"; new: {', '.join(kept)} (shapes differ)" if kept else ""))
    opt, schedule = build_optimizer(settings, model)
    return model, opt, schedule


def _batch_size(settings: Settings, plan: DataPlan, log) -> int:
    batch_size = settings.batch_size
    if batch_size > plan.n_train and not plan.streams:
        log(f"batch size lowered from {batch_size} to {plan.n_train}, the size of the training set")
        batch_size = plan.n_train
    return batch_size


def _training_budget(settings: Settings, t0: float):
    """Seconds left for training: the budget less what preparation used and the final reserve (None: no budget)."""
    budget = settings.time_budget
    if not budget:
        return None
    used = time.monotonic() - t0
    train_budget = budget - used - settings.final_reserve
    if train_budget <= 0:
        raise UsageError(f"the time budget of {budget:.0f} s was used up by data preparation ({used:.0f} s) "
                         f"and the final reserve ({settings.final_reserve} s): give a larger --time-budget "
                         f"or fewer training images.")
    return train_budget


def _make_trainer(model, opt, out, settings, plan, batch_size, patience, train_budget, metadata, progress, log,
                  hint="", watch=True):
    """The trainer: best checkpoint by validation whole-string accuracy, ties broken by the lower loss."""
    ctc = plan.head == "ctc"
    train_t, eval_t = make_transforms(plan.preprocess, settings.max_shift, settings.max_scale,
                                      float_targets=not ctc, distort=settings.distort)
    metrics = ctc_metrics(plan.charset, text_lengths(plan.charset)) if ctc else multilabel_metrics(plan.charset.length)
    loss = (CTCLoss if ctc else BCELoss)(settings.label_smoothing)
    tie_break = "val_loss"
    if loss.smoothing:
        # The loss logged is the plain one (StuckWatch reads it); ties of the validation accuracy (often
        # 100% of a small folder's validation images) are broken by the smoothed objective, which
        # training lowers: the plain validation loss rises as smoothing makes readings less sure, and
        # would end such runs early (a development folder: 98.65% after 76 epochs, 99.85% after 200).
        # (its name holds "loss": EarlyStopping takes the lower value as the better tie-break)
        metrics["smoothed_loss"] = lambda logits, y: float(loss.objective(logits, y))
        tie_break = "val_smoothed_loss"
    return Trainer(model, opt, out_dir=out, batch_size=batch_size, eval_batch_size=max(256, 2 * batch_size),
                   loss=loss, metrics=metrics, monitor="val_string_accuracy", mode="max",
                   tie_break=tie_break, patience=patience, transform=train_t, eval_transform=eval_t,
                   seed=settings.seed, log_every=10,
                   progress=sys.stderr.isatty() if progress is None else bool(progress), log=log,
                   metadata=metadata, time_budget=train_budget, max_steps=settings.steps, restore_best=True,
                   plot=60.0, device_data_bytes=_device_data_bytes(),
                   callbacks=[_stuck_watch(plan, hint)] if watch else [])


def _stuck_watch(plan: DataPlan, hint: str = "") -> StuckWatch:
    """Ends a run stuck at the class prior (BCE) or at all-blank (CTC) after a quarter of its work."""
    return StuckWatch(monitor="val_string_accuracy", floor=0.0, advice=_stuck_advice(plan, hint))


def _stuck_advice(plan: DataPlan, hint: str = "") -> str:
    """What a stuck run is told to try; ``hint`` (``_labels_hint``) first."""
    other = "--head bce" if plan.head == "ctc" else "--head ctc"
    return ((hint + "; else " if hint else "")
            + f"try {other}, half the learning rate (--lr), a wider input (--width) if the characters are narrow, "
            f"or more labelled images")


def _labels_hint(pretrained) -> str:
    """Advice from look-alike pretraining that learnt its own images but read the folder's no better than
    chance (``pretrain.characters_read``): check the labels.  "" otherwise."""
    if not (pretrained or {}).get("at_chance"):
        return ""
    return ("check that the labels belong to their images: the look-alike pretraining learnt its own images but "
            "read the validation images no better than chance, as it does when labels are shuffled or a "
            "labels file is off by a row (compare a few images with their labels by eye)")


def _log_plan(model, settings, plan, batch_size, spe, epochs, patience, train_budget, log) -> None:
    limits = [f"{epochs} epoch(s)" if epochs < NO_EPOCH_LIMIT else None,
              f"{settings.steps} steps" if settings.steps else None,
              f"{train_budget:.0f} s" if train_budget else None]
    log(f"training {model.name} ({model.n_params():,} parameters, {plan.head} head) on {plan.n_train:,} "
        f"{'fresh images per epoch' if plan.streams else 'images'}"
        f", batch {batch_size}, {spe} steps per epoch, until "
        + " or ".join(x for x in limits if x) + (f", early stopping after {patience} epochs without progress"
                                                   if patience else ""))


def _fit(trainer, plan: DataPlan, batch_size, spe, epochs, resume, out, log) -> None:
    first = stream_start(trainer.checkpoint_dir) if plan.streams else 0
    source = plan.train_source(batch_size, first)
    try:
        trainer.fit(source, epochs=epochs, val=plan.val, steps_per_epoch=spe if plan.streams else None,
                    resume=resume)
    except KeyboardInterrupt:
        log(f"to continue this run: add --resume --out {out} to the same command")
        raise
    finally:
        if plan.streams:
            source.close()


def _evaluate_and_save(model, trainer, plan: DataPlan, metadata, out: Path, t0: float, log) -> dict:
    """Evaluate on the held-out test set (never seen in training, never used to choose anything); save."""
    train_seconds = trainer.elapsed()
    log(f"evaluating on the {plan.test_name} ...")
    reader = Recognizer(model, plan.charset, plan.preprocess, metadata)
    test_x, test_labels, test_paths = plan.test
    evaluation = reader.evaluate(test_x, test_labels, test_paths or None)
    h = trainer.history
    results = {
        "test": {k: v for k, v in evaluation.to_dict().items() if k != "mistakes"},
        "test_set": plan.test_name,
        "test_mistakes": evaluation.mistakes[:100],
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "steps": h[-1]["step"] if len(h) else 0,
        "epochs": len(h),
        "best_epoch": trainer.best_epoch,     # the weights evaluated (ties broken by validation loss)
        "val_string_accuracy": max((r.get("val_string_accuracy") or 0) for r in h.epochs) if len(h) else None,
        "finished": now(),
        "stuck": _stuck(trainer),
        "data_wait": _data_wait(h),  # share of the training time the loop waited for batches
    }
    metadata["results"] = {"test_string_accuracy": evaluation.string_accuracy,
                           "test_char_accuracy": evaluation.char_accuracy, "test_set": plan.test_name}
    xio.save(model, out / "model.npz", metadata)
    results["wall_seconds"] = round(time.monotonic() - t0, 1)
    write_json(out / RESULTS_FILE, results, "results")
    log(f"test ({plan.test_name}):")
    log("  " + evaluation.report(show_mistakes=5).replace("\n", "\n  "))
    waited = "" if results["data_wait"] is None else f", {results['data_wait']:.0%} of it waiting for data"
    log(f"wall time {results['wall_seconds']:.0f} s (training {train_seconds:.0f} s{waited})")
    log(f"model: {out / 'model.npz'}   history: {out / 'history.csv'}, {out / 'history.json'}   "
        f"plot: {out / 'history.png'}")
    log(f"output folder: {out.resolve()}")
    return results


def _data_wait(history):
    """The epochs' ``data_wait`` shares weighted by their seconds (None when no epoch recorded one)."""
    rows = [(r["data_wait"], r["seconds"]) for r in history.epochs if r.get("data_wait") is not None]
    seconds = sum(sec for _, sec in rows)
    return round(sum(w * sec for w, sec in rows) / seconds, 4) if seconds > 0 else None


def _device_data_bytes() -> int:
    """How many bytes of training data the trainer may keep on the device."""
    if backend.current() != "cupy":
        return 2 * 1024 ** 3
    from ..memory import free_memory

    try:
        free, _ = free_memory("cupy")
        return int(0.3 * free)
    except Exception:  # noqa: BLE001 -- a probe failure only means: keep the data on the host
        return 2 * 1024 ** 3


__all__ = ["train", "run", "cross_validate", "FOLDS_FILE"]
