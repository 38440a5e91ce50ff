"""xpnet.captcha.streaming: a folder read batch by batch gives what predict_files gives, in name order,
with unreadable files listed, and never more than one batch of decoded images at a time."""

import gc
import os
import weakref

import numpy as np
import pytest

import xpnet
from xpnet.captcha.recognizer import Recognizer, image_files, metadata_for
from xpnet.captcha.streaming import FolderStream, bounded, list_image_names
from xpnet.data import Charset, Preprocess, write_captcha_pngs
from xpnet.errors import DataError


@pytest.fixture(scope="module")
def reader_and_folder(tmp_path_factory):
    """A small untrained reader file and a folder of 23 labelled images, 2 bad files and 2 entries to ignore."""
    tmp = tmp_path_factory.mktemp("stream")
    cs, pp = Charset("ABCD", 2), Preprocess(height=24, width=48, channels=1)
    xpnet.backend.seed(4)
    model = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=cs.n_outputs, filters=4, hidden=16)
    xpnet.save(model, tmp / "reader.npz", metadata_for(cs, pp, model="simple_convnet"))
    folder = tmp / "imgs"
    write_captcha_pngs(folder, 23, seed=3, charset="ABCD", length=2, workers=0, progress=False)
    (folder / "BB_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "CC_empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()                   # a folder with an image-like name is not a file to read
    return tmp / "reader.npz", folder


def all_rows(stream):
    rows, skipped = [], []
    for batch in stream:
        assert batch.size == len(batch.names) + len(batch.skipped)
        rows += list(batch.rows())
        skipped += batch.skipped
    return rows, skipped


@pytest.mark.parametrize("workers", [0, 1])
def test_rows_equal_predict_files_in_name_order_and_bad_files_are_listed(reader_and_folder, workers):
    model_path, folder = reader_and_folder
    reader = Recognizer.load(model_path, batch_size=4)
    stream = FolderStream(reader, folder, batch_size=5, workers=workers)
    assert len(stream) == 25 and stream.ignored == 2
    rows, skipped = all_rows(stream)
    want = reader.predict_files(image_files(folder), on_error="report")
    assert [name for name, _, _ in rows] == [os.path.basename(p) for p in want.paths]
    assert [name for name, _, _ in rows] == sorted(name for name, _, _ in rows)
    assert [text for _, text, _ in rows] == want.texts
    np.testing.assert_allclose([c for _, _, c in rows], want.confidences, rtol=1e-6)
    assert skipped == [(os.path.basename(p), reason) for p, reason in want.skipped]
    assert [name for name, _ in skipped] == ["BB_garbage.png", "CC_empty.jpg"]
    assert "empty" in skipped[1][1]
    assert len(rows) == 23


def test_names_are_sorted_and_other_entries_ignored(tmp_path):
    for name in ["b.png", "B.png", "a_10.PNG", "a_9.png", "z.txt", "ü.png", "0.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    names, ignored = list_image_names(tmp_path)
    decoded = [os.fsdecode(n) for n in names.tolist()]
    assert decoded == sorted(["b.png", "B.png", "a_10.PNG", "a_9.png", "ü.png", "0.gif"]) and ignored == 2
    with pytest.raises(DataError, match="holds no image files"):
        list_image_names(tmp_path / "dir.png")
    with pytest.raises(DataError, match="no such file or folder"):
        list_image_names(tmp_path / "missing")
    with pytest.raises(DataError, match="is not a folder"):
        list_image_names(tmp_path / "b.png")


class CountingReader:
    """A Recognizer's read_files / predict, instrumented: what is read when, and which batches are alive."""

    def __init__(self, reader):
        self.reader, self.batch_size, self.preprocess = reader, reader.batch_size, reader.preprocess
        self.events, self.alive_at_read, self.arrays, self.largest, self.predict_sizes = [], [], [], 0, []

    def read_files(self, paths, on_error):
        gc.collect()
        self.alive_at_read.append(sum(ref() is not None for ref in self.arrays))
        images, used, skipped = self.reader.read_files(paths, on_error)
        self.arrays.append(weakref.ref(images))
        self.largest = max(self.largest, len(paths))
        self.events.append("read")
        return images, used, skipped

    def predict(self, images, paths):
        self.events.append("predict")
        self.predict_sizes.append(len(images))
        return self.reader.predict(images, paths)


def test_the_stream_is_lazy_and_holds_one_decoded_batch_at_a_time(reader_and_folder):
    model_path, folder = reader_and_folder
    reader = CountingReader(Recognizer.load(model_path))
    stream = FolderStream(reader, folder, batch_size=4, workers=0)
    assert reader.events == []                     # listing the folder decodes nothing
    batches = iter(stream)
    assert reader.events == []                     # nor does starting the iteration
    first = next(batches)
    assert reader.events == ["read", "predict"] and len(first.names) == 4
    n = 1
    for _ in batches:
        n += 1
        assert reader.events == ["read", "predict"] * n  # one batch read per batch taken, never ahead
    assert n == 7 and reader.largest == 4
    # every forward pass has 4 images, also the batches shortened by the 2 bad files and the last one (1 file)
    assert reader.predict_sizes == [4] * 7
    # when a batch is read, every earlier batch of decoded images has been let go
    assert reader.alive_at_read == [0] * 7


class FakeFuture:
    def __init__(self, pool, value):
        self.pool, self.value, self.cancelled = pool, value, False

    def result(self):
        self.pool.in_flight -= 1
        return self.value * 10

    def cancel(self):
        self.cancelled = True


class FakePool:
    def __init__(self):
        self.in_flight = self.most = 0
        self.futures = []

    def submit(self, item):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.futures.append(FakeFuture(self, item))
        return self.futures[-1]


def test_bounded_keeps_at_most_ahead_items_in_flight_in_order_and_pulls_items_lazily():
    pool, pulled = FakePool(), []

    def items():
        for i in range(10):
            pulled.append(i)
            yield i

    gen = bounded(pool.submit, items(), ahead=3)
    assert pulled == []
    out = []
    for value in gen:
        out.append(value)
        assert len(pulled) <= len(out) + 3        # never more than `ahead` items beyond those taken
    assert out == [i * 10 for i in range(10)] and pool.most == 3
    # closed early: the futures still waiting are cancelled
    pool = FakePool()
    gen = bounded(pool.submit, range(10), ahead=3)
    assert next(gen) == 0
    gen.close()
    assert [f.cancelled for f in pool.futures] == [False, True, True, True]
