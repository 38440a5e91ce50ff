"""``xpnet predict MODEL IMAGE...``: the text and confidence a trained reader sees in each image.

Without ``--out`` each image gives one line on stdout.  ``xpnet predict MODEL
FOLDER --out readings.csv`` streams a folder of any size instead
(``xpnet.captcha.streaming``): batches of images in bounded memory,
``file,text,confidence`` rows written progressively to a hidden temporary file
that is renamed to the final name only when every file was read, so a crash
never leaves a complete-looking CSV.
"""

from __future__ import annotations

import json
import os
import sys

from .. import checks
from ..errors import DataError, UsageError


def add_command(sub) -> None:
    """Register ``xpnet predict``."""
    p = sub.add_parser(
        "predict", help="read CAPTCHA images with a trained reader: text and confidence per image",
        description="Print one line per image: the path, the text read and its confidence (the product over the "
                    "characters of the sigmoid probability of each chosen character: near 1 = sure, under 0.5 = "
                    "a guess). A folder stands for its image files. When file names carry labels that fit the "
                    "model (2A2X.png, 2A2X_17.png), or a folder has its own labels.csv (file,label rows: then its "
                    "files take their labels from it, not from their names), each line says whether the reading "
                    "is right and the accuracy is printed at the end. The model is loaded once, on the current "
                    "backend (XPNET_BACKEND). With --out CSV, one folder of any size is read in batches into a CSV "
                    "file instead.")
    p.add_argument("model", metavar="MODEL", help="model file written by xpnet train (model.npz)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders of images (with --out: one folder)")
    p.add_argument("--skip-bad", action="store_true",
                   help="report unreadable images on stderr and go on (default: stop at the first one, exit 1)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="images per forward pass (default: 256)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per image (path, text, confidence, label, right) (default: "
                        "tab-separated lines)")
    p.add_argument("--out", metavar="CSV", default=None,
                   help="stream one FOLDER of any size into this CSV file (header file,text,confidence; file "
                        "names relative to the folder, sorted), in batches with a progress bar and bounded memory. "
                        "Unreadable files are always skipped, listed on stderr and in NAME.skipped.csv (file,"
                        "reason), exit 1. The rows go to a hidden temporary file renamed to CSV at the end; on "
                        "Ctrl-C the rows so far are kept as CSV.partial (default: print lines instead)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: replace an existing CSV and its .skipped.csv (default: refuse)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="with --out: processes decoding images, 0 = none (default: 0 below 5,000 files, else "
                        "every CPU core but one, at least 1)")
    p.add_argument("--no-progress", action="store_true",
                   help="with --out: no progress bar (default: a bar on stderr when it is a terminal)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..captcha.recognizer import Recognizer, image_files

    checks.positive_int(args.batch_size, "--batch-size")
    if args.out is not None:
        return _run_to_csv(args)
    for flag, given in (("--overwrite", args.overwrite), ("--workers", args.workers is not None)):
        if given:
            raise UsageError(f"{flag} only applies with --out CSV: add --out, or drop {flag}.")
    reader = Recognizer.load(args.model, batch_size=args.batch_size)
    paths, listed = [], {}
    for item in args.images:
        if not os.path.exists(item):
            raise DataError(f"{item}: no such file or folder.")
        paths += image_files(item)
        if os.path.isdir(item):
            listed.update(_folder_labels(item))
    tally = _Tally()
    bad = []
    chunk = max(args.batch_size, 256)
    for i in range(0, len(paths), chunk):
        images, used, skipped = reader.read_files(paths[i:i + chunk], "report" if args.skip_bad else "raise")
        for p, reason in skipped:
            print(f"xpnet: skipped {p}: {reason}", file=sys.stderr)
        bad += skipped
        pred = reader.predict(images, used)
        for path, text, conf in zip(used, pred.texts, pred.confidences.tolist()):
            _print_reading(reader, path, text, conf, tally, args.json, listed)
    if tally.labelled and not args.json:
        print(f"accuracy on {tally.labelled} labelled image(s): whole-string "
              f"{100 * tally.right / tally.labelled:.2f}% ({tally.right} right), per-character "
              f"{100 * tally.chars_right / tally.chars:.2f}%")
    if bad:
        print(f"xpnet: {len(bad)} image(s) could not be read and were skipped", file=sys.stderr)
        return 1
    return 0


class _Tally:
    """Counts over the images whose file names carry a label the reader could produce."""

    def __init__(self):
        self.labelled = self.right = self.chars_right = self.chars = 0

    def add(self, text: str, label: str) -> None:
        self.labelled += 1
        self.right += text == label
        self.chars_right += sum(a == b for a, b in zip(text, label))
        self.chars += len(label)


def _folder_labels(folder) -> dict:
    """{the folder's path: {file name: label}} from its own labels.csv ({} without one).

    Says on stderr where the labels come from and which rows it could not use.
    """
    from ..data.label_files import labels_in_folder, read_labels

    path = labels_in_folder(folder)
    if path is None:
        return {}
    labels, _, problems = read_labels(path)
    print(f"labels from {path} (the folder's own): its files take their labels from it, not from their names",
          file=sys.stderr)
    if problems:
        where, reason = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"xpnet: {len(problems)} row(s) of {path} not used: {where}: {reason}{more}", file=sys.stderr)
    return {os.path.normpath(os.fspath(folder)): labels}


def _label_of(reader, path, listed: dict):
    """The label to check a reading of ``path`` against: from its folder's labels.csv when that folder
    has one (``listed``; a file it does not name has none), else from its name; None when there is none
    or the reader could not produce it."""
    from ..data.folder import label_from_name

    named = listed.get(os.path.normpath(os.path.dirname(os.fspath(path))))
    label = label_from_name(path) if named is None else named.get(os.path.basename(os.fspath(path)))
    return label if label is not None and reader.can_read(label) else None


def _print_reading(reader, path, text, conf, tally: _Tally, as_json: bool, listed: dict) -> None:
    label = _label_of(reader, path, listed)
    if label is not None:
        tally.add(text, label)
    if as_json:
        print(json.dumps({"path": path, "text": text, "confidence": round(conf, 6), "label": label,
                          "right": None if label is None else text == label}))
    else:
        mark = "" if label is None else ("\tright" if text == label else f"\tWRONG (label {label})")
        print(f"{path}\t{text}\t{conf:.4f}{mark}")


# --------------------------------------------------------------------------
# --out: a folder of any size into a CSV file


def skipped_path(out: str) -> str:
    """The side file listing unreadable files: readings.csv -> readings.skipped.csv."""
    return (out[:-4] if out.lower().endswith(".csv") else out) + ".skipped.csv"


class _CsvOut:
    """A CSV file written progressively under a hidden temporary name, renamed only when complete."""

    def __init__(self, path: str, header):
        import csv
        import secrets

        self.path = path
        folder, name = os.path.split(os.path.abspath(path))
        self.tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self.fh = open(self.tmp, "x", newline="", encoding="utf-8", errors="surrogateescape")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.writer.writerow(header)
        self.rows = 0

    def write(self, row) -> None:
        self.writer.writerow(row)
        self.rows += 1

    def finish(self, name: str) -> str:
        """Flush, close and rename to ``name`` (the final path, or the .partial one)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, name)
        return name

    def discard(self) -> None:
        self.fh.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def _check_csv_args(args) -> tuple[str, str, str]:
    """(folder, out, side file) after the checks that need no model: usage errors exit 2."""
    if args.json:
        raise UsageError("--json prints the readings and --out writes them to a CSV file: drop one of them.")
    if len(args.images) != 1:
        raise UsageError(f"--out reads one folder, got {len(args.images)} paths: give one FOLDER.")
    checks.integer(args.workers, "--workers", 0, optional=True, what="0 or more")
    folder, out = args.images[0], args.out
    if not os.path.exists(folder):
        raise DataError(f"{folder}: no such file or folder.")
    if not os.path.isdir(folder):
        raise UsageError(f"--out reads a folder and {folder} is a file: give its folder, or drop --out to print "
                         f"the reading.")
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a folder: give a file name such as {os.path.join(out, 'readings.csv')}.")
    side = skipped_path(out)
    for path in (out, side):
        if os.path.lexists(path) and not args.overwrite:
            raise UsageError(f"{path} already exists: add --overwrite to replace it, or choose another --out.")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        from ..errors import StorageError

        raise StorageError(f"cannot write {out}: the folder {parent} does not exist; create it first.")
    return folder, out, side


def _run_to_csv(args) -> int:
    import time

    from tqdm import tqdm

    from ..captcha.recognizer import Recognizer
    from ..captcha.streaming import FolderStream
    from ..errors import StorageError
    from ..storage import describe_oserror

    folder, out, side = _check_csv_args(args)
    reader = Recognizer.load(args.model, batch_size=args.batch_size)
    listed = _folder_labels(folder)
    stream = FolderStream(reader, folder, workers=args.workers)
    try:
        readings, skipped = _CsvOut(out, ("file", "text", "confidence")), _CsvOut(side, ("file", "reason"))
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {describe_oserror(exc)}; choose another --out.") from None
    tally = _Tally()
    bar = tqdm(total=len(stream), unit="img", desc="reading", file=sys.stderr, leave=False,
               disable=True if args.no_progress else None)
    t0, done, batches = time.perf_counter(), 0, iter(stream)
    try:
        for batch in batches:
            for name, reason in batch.skipped:
                skipped.write((name, reason))
                bar.write(f"xpnet: skipped {os.path.join(folder, name)}: {reason}", file=sys.stderr)
            for name, text, conf in batch.rows():
                readings.write((name, text, format(conf, ".6g")))
                label = _label_of(reader, os.path.join(folder, name), listed)
                if label is not None:
                    tally.add(text, label)
            done += batch.size
            bar.update(batch.size)
    except KeyboardInterrupt:
        batches.close()  # stops the decoding workers
        bar.close()
        kept = [readings.finish(out + ".partial")]
        if skipped.rows:
            kept.append(skipped.finish(side + ".partial"))
        else:
            skipped.discard()
        print(f"xpnet: interrupted after {done:,} of {len(stream):,} file(s): {readings.rows:,} row(s) written "
              f"to {kept[0]}" + (f", {skipped.rows:,} unreadable file(s) listed in {kept[1]}" if len(kept) > 1
                                 else "") + f"; {out} was not written.", file=sys.stderr)
        return 130
    except BaseException as exc:
        batches.close()
        bar.close()
        readings.discard()
        skipped.discard()
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(f"could not write {out}: {describe_oserror(exc)}; nothing was written as "
                               f"{out}.") from None
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    try:
        readings.finish(out)
        if skipped.rows:
            skipped.finish(side)
        else:
            skipped.discard()
            if os.path.lexists(side):  # an earlier run's list (--overwrite): it no longer applies
                os.unlink(side)
    except OSError as exc:
        readings.discard()
        skipped.discard()
        raise StorageError(f"could not write {out}: {describe_oserror(exc)}.") from None
    print(f"{readings.rows:,} reading(s) of {len(stream):,} image file(s) in {folder} written to {out} "
          f"({seconds:.1f} s, {done / max(seconds, 1e-9):.0f} images/s)")
    if tally.labelled:
        print(f"accuracy on {tally.labelled} labelled image(s): whole-string "
              f"{100 * tally.right / tally.labelled:.2f}% ({tally.right} right), per-character "
              f"{100 * tally.chars_right / tally.chars:.2f}%")
    if skipped.rows:
        print(f"xpnet: {skipped.rows} image(s) could not be read and were skipped: listed in {side}",
              file=sys.stderr)
        return 1
    return 0
