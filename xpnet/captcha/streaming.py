"""Read a folder of any size through a reader, batch by batch, in bounded memory.

    from xpnet.captcha import Recognizer
    from xpnet.captcha.streaming import FolderStream
    stream = FolderStream(Recognizer.load("model.npz"), "scans/", batch_size=256)
    len(stream)                                   # image files found (sorted by name)
    for batch in stream:                          # StreamBatch, in file-name order
        for name, text, confidence in batch.rows():
            ...
        batch.skipped                             # [(name, reason)]: unreadable files, never fatal

Why: ``Recognizer.predict_files`` decodes all the images it is given before the
first forward pass, so its memory grows with their number.  Here only the names
are listed up front -- ``os.scandir``, kept as one sorted NumPy bytes array
(about the length of a name per file, no Python object per file) -- and images
are decoded one batch at a time: (batch_size, C, H, W) uint8 in this process,
plus at most ``ahead`` batches decoding in worker processes.  The stream is a
generator: nothing is read before it is iterated, and this process decodes the
next batch only after the current one was taken.  Every forward pass takes
``min(batch_size, files)`` images (short batches are padded with blank images
whose readings are dropped), so the network's buffers are made once.

Each batch is read exactly as ``Recognizer.read_files(paths, "report")`` reads
it (same decoding, same skip reasons), so the texts and confidences equal those
of ``predict_files`` on the same files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import signal

import numpy
from PIL import Image

from .. import checks
from ..data.folder import IMAGE_EXTENSIONS, cpu_count
from ..data.images import Preprocess, read_image
from ..errors import DataError

# Below this many files one process is faster than starting workers.
PARALLEL_FROM = 5000


@dataclasses.dataclass
class StreamBatch:
    """What one batch of files gave.

    names       file names (relative to the folder) of the images read, in order
    prediction  ``Prediction`` for them (``paths`` are the full paths)
    skipped     (name, reason) for the files of the batch that could not be read
    size        files in the batch: ``len(names) + len(skipped)``
    """

    names: list
    prediction: object
    skipped: list

    @property
    def size(self) -> int:
        return len(self.names) + len(self.skipped)

    def rows(self):
        """(name, text, confidence as a float) for each image read."""
        return zip(self.names, self.prediction.texts, self.prediction.confidences.tolist())


def list_image_names(folder) -> tuple[numpy.ndarray, int]:
    """A folder -> (sorted names of its image files as a NumPy bytes array, entries ignored).

    Sub-folders are not entered; other files and sub-folders are counted as
    ignored.  Names are ``os.fsencode``d so that any name survives; sorted by
    their bytes (for UTF-8 names: by code point, like ``sorted``).
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise DataError(f"{folder}: no such file or folder.")
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is not a folder: give the folder that holds the images.")
    chunks, chunk, ignored = [], [], 0
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir or os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                chunk.append(os.fsencode(e.name))
                if len(chunk) == 4096:
                    chunks.append(numpy.array(chunk, dtype=bytes))
                    chunk = []
    except OSError as exc:
        raise DataError(f"cannot list folder {folder} ({exc.strerror or exc}).") from None
    if chunk:
        chunks.append(numpy.array(chunk, dtype=bytes))
    if not chunks:
        extra = f" ({ignored} other entries ignored)" if ignored else ""
        raise DataError(f"folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS[:5])}, ...){extra}.")
    return numpy.sort(numpy.concatenate(chunks)), ignored


class FolderStream:
    """The image files of ``folder`` read by ``reader`` in batches (iterate for ``StreamBatch``).

    reader      a ``Recognizer`` (``read_files``, ``predict``, ``preprocess``)
    batch_size  files per batch (default: the reader's ``batch_size``)
    workers     decoding processes; 0 decodes in this process (default: 0 below
                ``PARALLEL_FROM`` files, else one per CPU core less one for the forward pass, at least 1)
    ahead       batches decoding ahead in the workers (default: workers + 1)

    The folder is listed when the stream is made (a missing or empty folder is
    a DataError then); iterating reads it, once per iteration.
    """

    def __init__(self, reader, folder, batch_size: int | None = None, workers: int | None = None,
                 ahead: int | None = None):
        self.reader = reader
        self.folder = os.fspath(folder)
        self.batch_size = checks.positive_int(batch_size or reader.batch_size, "batch_size")
        self.names, self.ignored = list_image_names(self.folder)
        if workers is None:
            workers = max(1, cpu_count() - 1) if len(self.names) >= PARALLEL_FROM else 0
        self.workers = checks.integer(workers, "workers", 0, what="0 or more")
        self.ahead = checks.positive_int(ahead or self.workers + 1, "ahead")

    def __len__(self) -> int:
        return len(self.names)

    def batches(self):
        """The names of each batch, as a generator of lists of str."""
        for i in range(0, len(self.names), self.batch_size):
            yield [os.fsdecode(n) for n in self.names[i:i + self.batch_size].tolist()]

    def __iter__(self):
        if self.workers == 0:
            decoded = (self._read_here(names) for names in self.batches())
            yield from self._predict(decoded)
            return
        ctx = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_ignore_sigint)
        try:
            pp, limit = self.reader.preprocess.to_dict(), Image.MAX_IMAGE_PIXELS
            submit = lambda names: pool.submit(_read_batch, self.folder, names, pp, limit)  # noqa: E731
            yield from self._predict(bounded(submit, self.batches(), self.ahead))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_here(self, names):
        paths = [os.path.join(self.folder, n) for n in names]
        images, used, skipped = self.reader.read_files(paths, "report")
        return _relative(names, paths, images, used, skipped)

    def _predict(self, decoded):
        # Every forward pass gets the same number of images (a short batch -- the last one, or one
        # with unreadable files -- is padded with blank images whose readings are dropped): the fused
        # CPU path keeps its buffers per batch size, so one size means one set of buffers.
        full = min(self.batch_size, len(self.names))
        for names, images, paths, skipped in decoded:
            n = len(paths)
            if 0 < n < full:
                padded = numpy.zeros((full,) + images.shape[1:], dtype=images.dtype)
                padded[:n] = images
                images = padded
            prediction = self.reader.predict(images, None)
            del images  # the next batch is decoded only after this one is gone
            prediction = dataclasses.replace(
                prediction, texts=prediction.texts[:n], confidences=prediction.confidences[:n],
                char_confidences=prediction.char_confidences[:n], indices=prediction.indices[:n], paths=paths)
            yield StreamBatch(names=names, prediction=prediction, skipped=skipped)


def bounded(submit, items, ahead: int):
    """``submit(item).result()`` for each item in order, with at most ``ahead`` submitted and not yet taken.

    ``items`` is consumed lazily: the next item is submitted only when a result is
    taken.  When the generator is closed early, the waiting futures are cancelled.
    """
    pending = collections.deque()
    items = iter(items)
    try:
        for item in items:
            pending.append(submit(item))
            if len(pending) >= ahead:
                break
        while pending:
            future = pending.popleft()
            result = future.result()
            del future
            for item in items:
                pending.append(submit(item))
                break
            yield result
            del result
    finally:
        for future in pending:
            future.cancel()


def _relative(names, paths, images, used, skipped):
    """read_files' answer with the skipped paths turned back into names."""
    name_of = dict(zip(paths, names))
    kept = set(used)
    return ([n for n, p in zip(names, paths) if p in kept], images, used,
            [(name_of[p], reason) for p, reason in skipped])


def _read_batch(folder, names, pp_dict, limit):
    """Worker: read one batch the way ``Recognizer.read_files(paths, "report")`` does."""
    Image.MAX_IMAGE_PIXELS = limit
    pp = Preprocess.from_dict(pp_dict)
    paths = [os.path.join(folder, n) for n in names]
    out = numpy.empty((len(paths),) + pp.shape, dtype=numpy.uint8)
    used, skipped = [], []
    for p in paths:
        try:
            out[len(used)] = read_image(p, pp)
            used.append(p)
        except DataError as exc:
            skipped.append((p, str(exc).removeprefix(f"{p}: ").rstrip(".")))
    return _relative(names, paths, out[:len(used)], used, skipped)


def _ignore_sigint():
    """Workers leave Ctrl-C to the main process, which stops them cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


__all__ = ["FolderStream", "StreamBatch", "list_image_names", "bounded", "PARALLEL_FROM"]
