"""Labels from a CSV file beside the images (xpnet.data.label_files and load_folder(labels=...))."""

import os

import numpy as np
import pytest
from PIL import Image

from xpnet.data import Preprocess, load_folder
from xpnet.data.label_files import read_labels
from xpnet.errors import DataError

PP = Preprocess(24, 48, channels=1)


def _png(path, value=128):
    Image.fromarray(np.full((20, 50), value, dtype=np.uint8)).save(path)


def test_read_labels_header_quoting_duplicates_and_conflicts(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("\ufeffFilename,Label\n"          # a spreadsheet's byte-order mark and header
                 "a.png,AB12\n"
                 "sub/b.png, CD34 \n"              # a path is reduced to its name; spaces trimmed
                 '"c,1.png",EF56\n'                # quoted comma
                 "a.png,AB12\n"                    # repeated with the same label: used once
                 "d.png,GH78\n"
                 "d.png,GH79\n"                    # conflicting: neither used
                 "e.png,\n"                        # empty label
                 "f.png\n"                         # no label field
                 "\n", encoding="utf-8")
    labels, lines, problems = read_labels(f)
    assert labels == {"a.png": "AB12", "b.png": "CD34", "c,1.png": "EF56"}
    assert lines == {"a.png": 2, "b.png": 3, "c,1.png": 4}
    reasons = dict(problems)
    assert reasons["labels.csv:5"] == "a.png is labelled 'AB12' again (line 2): used once"
    assert reasons["labels.csv:7"] == "d.png is labelled 'GH79' here but 'GH78' on line 6: neither is used"
    assert "empty label" in reasons["labels.csv:8"] and "no label" in reasons["labels.csv:9"]
    (tmp_path / "none.csv").write_text("file,label\nx.png,\n")
    with pytest.raises(DataError, match="no usable file,label row.*empty label"):
        read_labels(tmp_path / "none.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="cannot read labels file.*UTF-8 CSV"):
        read_labels(tmp_path / "bin.csv")


def test_load_folder_takes_labels_from_the_file_and_lists_the_rest(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("0001.png", "0002.png", "0003.png", "0004.png", "0005.png"):
        _png(imgs / name)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n0001.png,AB\n0002.png,BA\n0003.png,AAB\n0009.png,AB\n0004.png,A-\n")
    d = load_folder(imgs, charset="AB", preprocess=PP, labels=csv)
    assert sorted(zip(map(os.path.basename, d.paths), d.labels)) == [
        ("0001.png", "AB"), ("0002.png", "BA"), ("0003.png", "AAB")]
    assert d.charset.lengths == "2-3"
    skipped = {os.path.basename(p): r for p, r in d.skipped}
    assert skipped["labels.csv:5"].startswith("0009.png is not an image file in")
    assert skipped["0005.png"] == "no usable label for it in labels.csv"
    assert "outside the charset" in skipped["0004.png"]
    with pytest.raises(DataError, match="cannot be used"):
        load_folder(imgs, charset="AB", preprocess=PP, labels=csv, on_error="raise")
