"""``xpnet predict MODEL IMAGE...``: the text and confidence a trained reader sees in each image."""

from __future__ import annotations

import json
import os
import sys

from .. import checks
from ..errors import DataError


def add_command(sub) -> None:
    """Register ``xpnet predict``."""
    p = sub.add_parser(
        "predict", help="read CAPTCHA images with a trained reader: text and confidence per image",
        description="Print one line per image: the path, the text read and its confidence (the product over the "
                    "characters of the sigmoid probability of each chosen character: near 1 = sure, under 0.5 = "
                    "a guess). A folder stands for its image files. When file names carry labels that fit the "
                    "model (2A2X.png, 2A2X_17.png), each line says whether the reading is right and the accuracy "
                    "is printed at the end. The model is loaded once, on the current backend (XPNET_BACKEND).")
    p.add_argument("model", metavar="MODEL", help="model file written by xpnet train (model.npz)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files or folders of images")
    p.add_argument("--skip-bad", action="store_true",
                   help="report unreadable images on stderr and go on (default: stop at the first one, exit 1)")
    p.add_argument("--batch-size", type=int, default=256, metavar="B",
                   help="images per forward pass (default: 256)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per image (path, text, confidence, label, right) (default: "
                        "tab-separated lines)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..captcha.recognizer import Recognizer, image_files

    checks.positive_int(args.batch_size, "--batch-size")
    reader = Recognizer.load(args.model, batch_size=args.batch_size)
    paths = []
    for item in args.images:
        if not os.path.exists(item):
            raise DataError(f"{item}: no such file or folder.")
        paths += image_files(item)
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
            _print_reading(reader, path, text, conf, tally, args.json)
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


def _print_reading(reader, path, text, conf, tally: _Tally, as_json: bool) -> None:
    from ..data.folder import label_from_name

    label = label_from_name(path) if reader.has_label(path) else None
    if label is not None:
        tally.add(text, label)
    if as_json:
        print(json.dumps({"path": path, "text": text, "confidence": round(conf, 6), "label": label,
                          "right": None if label is None else text == label}))
    else:
        mark = "" if label is None else ("\tright" if text == label else f"\tWRONG (label {label})")
        print(f"{path}\t{text}\t{conf:.4f}{mark}")
