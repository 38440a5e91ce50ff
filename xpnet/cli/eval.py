"""``xpnet eval MODEL DIR``: accuracy of a trained reader on a folder of labelled images."""

from __future__ import annotations

import json
import sys

from .. import checks
from ..data.label_files import labels_in_folder, labels_source


def add_command(sub) -> None:
    """Register ``xpnet eval``."""
    p = sub.add_parser(
        "eval", help="accuracy of a trained reader on a folder of labelled images",
        description="Read every image of a folder whose file names carry the labels (2A2X.png, 2A2X_17.png: the "
                    "name up to '_' or '.') and report whole-string accuracy (every character right), "
                    "per-character accuracy, per-position accuracy and the most confused characters. Files that "
                    "cannot be read, or whose label does not fit the model, are skipped and listed.")
    p.add_argument("model", metavar="MODEL", help="model file written by xpnet train (model.npz)")
    p.add_argument("folder", metavar="DIR", help="folder of labelled images")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="a CSV of file,label rows giving the labels (default: the folder's own labels.csv if it has "
                        "one, else the file names)")
    p.add_argument("--top", type=int, default=10, metavar="K",
                   help="how many of the most confused character pairs to show (default: 10)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="processes decoding images (default: 1 below 3,000 files, else every CPU core)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="images per forward pass; lower it if memory runs out (default: 256)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON (default: readable lines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: on a terminal)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..captcha.recognizer import Recognizer

    checks.positive_int(args.top, "--top")
    checks.positive_int(args.batch_size, "--batch-size")
    checks.integer(args.workers, "--workers", 0, optional=True, what="0 or more")
    reader = Recognizer.load(args.model, batch_size=args.batch_size)
    labels = args.labels or labels_in_folder(args.folder)
    if labels and not args.labels:
        print(labels_source(labels, args.folder), file=sys.stderr)
    result = reader.evaluate_folder(args.folder, workers=args.workers or None,
                                    progress=False if args.no_progress else None, top=args.top,
                                    labels=labels)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(f"model {args.model}: {reader.describe()}")
        print(result.report(top=args.top))
    return 0
