"""Labels beside the images: a CSV file of ``file,label`` rows (the layout of most public sets).

    file,label
    0001.png,2A2X
    0002.png,7KQ3

The first row is a header when its first field is one of ``file``, ``filename``, ``image``,
``path`` or ``name`` (any case); otherwise it is data.  ``file`` is a name in the image
folder (a relative path is reduced to its base name); ``label`` is the text, kept as
written except for surrounding spaces.  A comma inside a field needs CSV quoting.

A folder that holds a file named ``labels.csv`` takes its labels from it when no other file is
given (``labels_in_folder``): its images' names are then usually numbers, not labels.

Nothing is dropped silently: ``read_labels`` returns, beside the labels, every row it
could not use with the reason (a row without two fields, an empty label, a file named
twice with different labels); ``load_folder`` adds the folder's images that have no row
and the rows whose file is not in the folder.
"""

from __future__ import annotations

import csv
import os

from ..errors import DataError

HEADER_NAMES = ("file", "filename", "image", "path", "name")
FOLDER_LABELS = "labels.csv"


def labels_in_folder(folder) -> str | None:
    """The folder's own labels file (``FOLDER_LABELS`` inside it), or None when it has none."""
    path = os.path.join(os.fspath(folder), FOLDER_LABELS)
    return path if os.path.isfile(path) else None


def labels_source(path, folder) -> str:
    """The line that says where a folder's labels come from: ``path``, the folder's own file or another."""
    own = path == labels_in_folder(folder)
    return f"labels from {path}" + (" (the folder's own; --labels FILE to take another)" if own else "")


def read_labels(path) -> tuple[dict, dict, list]:
    """``({file name: label}, {file name: line}, [(where, reason)])`` from a CSV of ``file,label`` rows.

    ``where`` is ``"labels.csv:LINE"``.  A file named twice with the same label is used
    once (the repeat is listed); with different labels it is not used at all (both rows
    listed).  A missing or unreadable file, or one without a single usable row, is a
    DataError naming it.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"labels file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read labels file {path} ({getattr(exc, 'strerror', None) or exc}): it must be "
                        f"a UTF-8 CSV of file,label rows.") from None
    labels: dict[str, str] = {}
    lines: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    conflicts: set[str] = set()
    for number, row in enumerate(rows, start=1):
        where = f"{name}:{number}"
        if not row or all(not field.strip() for field in row):
            continue  # blank lines carry nothing
        if number == 1 and row[0].strip().lower() in HEADER_NAMES:
            continue
        if len(row) < 2:
            problems.append((where, f"the row {','.join(row)!r} has no label (rows are file,label)"))
            continue
        file, label = os.path.basename(row[0].strip().replace("\\", "/")), row[1].strip()
        if not file:
            problems.append((where, "the row names no file"))
        elif not label:
            problems.append((where, f"the row gives {file} an empty label"))
        elif file in conflicts:
            problems.append((where, f"{file} is labelled again ({label!r}) after conflicting labels"))
        elif file in labels and labels[file] != label:
            problems.append((where, f"{file} is labelled {label!r} here but {labels[file]!r} on line "
                                    f"{lines[file]}: neither is used"))
            del labels[file]
            conflicts.add(file)
        elif file in labels:
            problems.append((where, f"{file} is labelled {label!r} again (line {lines[file]}): used once"))
        else:
            labels[file], lines[file] = label, number
    if not labels:
        shown = "; ".join(f"{w}: {r}" for w, r in problems[:3])
        raise DataError(f"labels file {path} has no usable file,label row" + (f" ({shown})" if shown else "") + ".")
    return labels, {f: lines[f] for f in labels}, problems


__all__ = ["read_labels", "HEADER_NAMES"]
