"""Synthetic CAPTCHAs from the ``captcha`` package (0.7.1), reproducible by seed.

Every image is a pure function of ``(seed, index)``: its text and its drawing
come from a generator seeded by ``numpy.random.SeedSequence(seed,
spawn_key=(index,))``.  So the same seed gives byte-identical images whatever
the number of worker processes or the order they run in, and image ``i`` of a
``CaptchaStream`` is image ``i`` of ``generate_captchas`` with the same seed.

Why this needs care: captcha 0.7.1 draws every random choice from the
``secrets`` module, which cannot be seeded.  We load a *private* copy of
``captcha.image`` (the installed file, executed into a fresh module object that
is not registered in ``sys.modules``) and give that copy a stand-in for
``secrets`` whose ``randbelow``/``randbits``/``choice`` draw from the calling
thread's seeded ``random.Random``.  The real ``captcha.image`` module and the
real ``secrets`` module are never touched, so other code in the process keeps
its cryptographic randomness; the stand-in is per thread, and each worker
process has its own copy.

Images are rendered at the library's 160 x 60 (smaller renders clip the
glyphs) and then resized by a ``Preprocess`` (default 3 x 32 x 80).

Three ways out:

* ``generate_captchas(count, seed=...)`` -> ``LabelledImages`` in memory
  (``save_npz`` makes the compact uint8 cache);
* ``write_captcha_pngs(out, count, seed=...)`` -> ``LABEL_INDEX.png`` files;
* ``CaptchaStream(batch_size, seed=...)`` -> an endless iterator of fresh
  ``(images, labels)`` batches made by worker processes ahead of the trainer.

All parallel work uses CPU worker processes (``workers``, default: every core
this process may use) and shows a progress bar.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import importlib.util
import itertools
import multiprocessing
import os
import queue
import random
import signal
import threading
import time
import weakref

import numpy

from .. import checks
from ..checks import integer
from ..errors import DataError, StorageError, UsageError
from .folder import LabelledImages, cpu_count, label_from_name
from .images import Preprocess
from .labels import DIGITS_UPPER, Charset, parse_length

RENDER_WIDTH, RENDER_HEIGHT = 160, 60
CAPTCHA_VERSION = "0.7.1"
# Characters a PNG file name must not carry: path separators, the label
# separators '_' and '.', and characters that Windows refuses in names.
UNSAFE_NAME_CHARS = set('/\\:*?"<>|_.')
_CHUNK = 32  # images per task handed to a worker process


# --------------------------------------------------------------------------
# A seedable stand-in for ``secrets``, given only to our private captcha.image


class _Random(random.Random):
    """``random.Random`` plus the ``secrets`` functions that captcha 0.7.1 calls."""

    def randbelow(self, n: int) -> int:
        if n <= 0:
            raise ValueError("Upper bound must be positive.")
        k = n.bit_length()
        r = self.getrandbits(k)
        while r >= n:  # rejection sampling: uniform, and stable across Python versions
            r = self.getrandbits(k)
        return r

    def randbits(self, k: int) -> int:
        return self.getrandbits(k)

    def choice(self, seq):
        return seq[self.randbelow(len(seq))]


class _SeededSecrets:
    """Stands in for ``secrets`` inside our copy of captcha.image: each thread draws
    from the generator it installed with ``seeded(rng)``; outside that, it refuses."""

    def __init__(self):
        self._local = threading.local()

    def _rng(self) -> _Random:
        rng = getattr(self._local, "rng", None)
        if rng is None:
            raise RuntimeError("xpnet's private captcha module was used outside _SECRETS.seeded().")
        return rng

    def randbelow(self, n):
        return self._rng().randbelow(n)

    def randbits(self, k):
        return self._rng().randbits(k)

    def choice(self, seq):
        return self._rng().choice(seq)

    @contextlib.contextmanager
    def seeded(self, rng: _Random):
        previous = getattr(self._local, "rng", None)
        self._local.rng = rng
        try:
            yield rng
        finally:
            self._local.rng = previous


_SECRETS = _SeededSecrets()
_module = None
_module_lock = threading.Lock()
_thread_state = threading.local()


def _captcha_module():
    """Our private copy of captcha.image, its ``secrets`` replaced by ``_SECRETS``."""
    global _module
    with _module_lock:
        if _module is None:
            spec = importlib.util.find_spec("captcha.image")
            if spec is None or spec.loader is None:
                raise DataError('the "captcha" package is not installed: pip install "captcha==0.7.1".')
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            if not hasattr(mod, "secrets") or not hasattr(mod, "ImageCaptcha"):
                raise DataError(f"captcha.image is not the expected version {CAPTCHA_VERSION}: "
                                f'pip install "captcha=={CAPTCHA_VERSION}".')
            mod.secrets = _SECRETS
            _module = mod
        return _module


def _renderer():
    """One ImageCaptcha per thread (its fonts are loaded once, then reused)."""
    r = getattr(_thread_state, "renderer", None)
    if r is None:
        r = _captcha_module().ImageCaptcha(width=RENDER_WIDTH, height=RENDER_HEIGHT)
        _thread_state.renderer = r
    return r


def image_rng(seed: int, index: int) -> _Random:
    """The generator of image ``index`` for ``seed``: independent of every other image."""
    state = numpy.random.SeedSequence(int(seed), spawn_key=(int(index),)).generate_state(4, numpy.uint32)
    return _Random(int.from_bytes(state.tobytes(), "little"))


def draw_text(rng: _Random, charset: Charset) -> str:
    """Characters drawn uniformly and independently from ``charset.chars``: ``charset.length`` of them,
    or for a range of lengths a number drawn uniformly from ``min_length .. length`` first (a
    fixed-length charset draws no length, so its texts are those of earlier versions)."""
    n = charset.length
    if not charset.fixed:
        n = charset.min_length + rng.randbelow(charset.length - charset.min_length + 1)
    return "".join(charset.chars[rng.randbelow(charset.n_classes)] for _ in range(n))


def render_captcha(seed: int, index: int, charset: Charset):
    """(text, PIL RGB image 160 x 60) of image ``index`` for ``seed``.

    The text's characters are drawn uniformly from ``charset.chars`` by the
    image's own generator, which then draws the picture.
    """
    rng = image_rng(seed, index)
    text = draw_text(rng, charset)
    with _SECRETS.seeded(rng):
        image = _renderer().generate_image(text)
    return text, image


# --------------------------------------------------------------------------
# Checking arguments (library and CLI share these; all raise UsageError)


def check_seed(seed) -> int:
    return integer(seed, "seed", 0, what="a non-negative integer")


def fresh_seed() -> int:
    """A random seed for when the user gives none (print it so the set can be remade)."""
    return int.from_bytes(os.urandom(4), "little")


def _check_count(count) -> int:
    return checks.integer(count, "the number of images", what="a positive integer")


def _check_workers(workers) -> int:
    if workers is None:
        return cpu_count()
    return checks.integer(workers, "workers", 0, what="0 (in this process) or a positive integer")


def make_charset(charset=DIGITS_UPPER, length=None) -> Charset:
    """A ``Charset`` from a string and a length (default 4) or a range of lengths (``"4-6"``, ``(4, 6)``),
    or a given Charset (``length`` must agree)."""
    if isinstance(charset, Charset):
        if length is not None and parse_length(length, "label length") != (charset.min_length, charset.length):
            raise UsageError(f"length {length} contradicts the charset's length {charset.lengths}.")
        return charset
    lo, hi = parse_length(4 if length is None else length, "label length")
    if not isinstance(charset, str):
        raise UsageError(f"charset must be a string of characters, got {type(charset).__name__}.")
    bad = sorted({c for c in charset if not c.isprintable() or c.isspace()})
    if bad:
        raise UsageError(f"charset {charset!r} has non-printable or space characters {bad}: use visible "
                         f"characters only.")
    return Charset(charset, hi, lo)


def check_filename_safe(charset: Charset) -> None:
    """Refuse characters that would make ``LABEL_INDEX.png`` unsafe or unparseable."""
    bad = sorted(set(charset.chars) & UNSAFE_NAME_CHARS)
    if bad:
        raise UsageError(
            f"charset {charset.chars!r} has characters {''.join(bad)!r} that cannot be used in PNG file "
            f"names (path separators, the label separators '_' and '.', or characters Windows refuses): "
            f"drop them, or write an .npz cache instead (--format npz).")


def _safe_png_path(folder: str, label: str, index: int) -> str:
    """``folder/LABEL_INDEX.png``, refusing any name that would leave ``folder``."""
    name = f"{label}_{index}.png"
    path = os.path.join(folder, name)
    if (os.path.basename(name) != name or os.sep in name or (os.altsep and os.altsep in name)
            or "\0" in name or os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder)
            or label_from_name(name) != label):
        raise DataError(f"refusing to write {name!r}: the label {label!r} is not a safe file name.")
    return path


# --------------------------------------------------------------------------
# Batch generation (in memory or to PNG files), over worker processes


def generate_captchas(count: int, seed: int, charset=DIGITS_UPPER, length: int | None = None,
                      preprocess: Preprocess | None = None, workers: int | None = None, start: int = 0,
                      progress: bool | None = None, png_dir=None) -> LabelledImages:
    """Render images ``start .. start+count-1`` of ``seed`` -> ``LabelledImages`` (uint8 (N, C, H, W)).

    ``charset`` is a string of characters (default digits + uppercase, 36) or a
    ``Charset``; ``length`` the characters per image (default 4, or the
    Charset's).  ``preprocess`` (default ``Preprocess()``, 3 x 32 x 80) resizes
    the 160 x 60 renders.  ``workers`` processes (default: all cores; 0 or 1:
    this process).  With ``png_dir`` each 160 x 60 render is also written there as
    ``LABEL_INDEX.png`` (one rendering pass for both outputs).
    """
    count, seed, cs = _check_count(count), check_seed(seed), make_charset(charset, length)
    pp = preprocess or Preprocess()
    folder = _png_folder(png_dir, cs) if png_dir is not None else None
    images = numpy.empty((count,) + pp.shape, dtype=numpy.uint8)
    labels = [""] * count
    task = ("array", seed, cs.chars, (cs.min_length, cs.length), pp.to_dict(), folder)
    for first, texts, arrays in _run_tasks(task, start, count, _check_workers(workers), progress, "generating"):
        labels[first - start:first - start + len(texts)] = texts
        images[first - start:first - start + len(texts)] = arrays
    meta = {"generator": f"captcha {CAPTCHA_VERSION}", "seed": seed, "start": int(start),
            "render": [RENDER_HEIGHT, RENDER_WIDTH]}
    return LabelledImages(images=images, labels=labels, charset=cs, preprocess=pp,
                          paths=[""] * count, meta=meta)


def write_captcha_pngs(out, count: int, seed: int, charset=DIGITS_UPPER, length: int | None = None,
                       preprocess: Preprocess | None = None, workers: int | None = None, start: int = 0,
                       progress: bool | None = None) -> list[str]:
    """Write images ``start .. start+count-1`` of ``seed`` as ``out/LABEL_INDEX.png``; returns the paths.

    Without ``preprocess`` the PNGs are the 160 x 60 renders (any preprocessing
    can be chosen at load time); with one, they are the resized images.  The
    index in the name keeps repeated texts apart, and ``load_folder`` reads the
    label back from the name.  Characters unsafe in file names are refused
    (``UsageError``); existing files of the same name are replaced.
    """
    count, seed, cs = _check_count(count), check_seed(seed), make_charset(charset, length)
    folder = _png_folder(out, cs)
    task = ("png", seed, cs.chars, (cs.min_length, cs.length), preprocess.to_dict() if preprocess else None, folder)
    paths = [""] * count
    for first, texts, _ in _run_tasks(task, start, count, _check_workers(workers), progress, "writing PNGs"):
        for j, text in enumerate(texts):
            paths[first - start + j] = os.path.join(folder, f"{text}_{first + j}.png")
    return paths


def _png_folder(out, cs: Charset) -> str:
    check_filename_safe(cs)
    folder = os.path.abspath(os.fspath(out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create output folder {folder} ({exc.strerror or exc}).") from None
    return folder


def _run_tasks(task, start, count, workers, progress, desc):
    """Yield (first index, texts, arrays) for chunks covering [start, start+count), in order."""
    from tqdm import tqdm

    spans = [(i, min(_CHUNK, start + count - i)) for i in range(start, start + count, _CHUNK)]
    workers = min(workers, len(spans))
    disable = None if progress is None else not progress
    with tqdm(total=count, desc=desc, unit="img", disable=disable, leave=False) as bar:
        if workers <= 1:
            for first, n in spans:
                res = _do_chunk(task, first, n)
                bar.update(n)
                yield res
            return
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        pending = collections.deque()
        todo = iter(spans)
        try:
            # A bounded window of chunks in flight keeps memory flat and results in order.
            with _children_start_deaf_to_ctrl_c():  # the worker processes are spawned by these submits
                for first, n in itertools.islice(todo, 4 * workers):
                    pending.append(pool.submit(_do_chunk, task, first, n))
            while pending:
                res = pending.popleft().result()
                for first, n in itertools.islice(todo, 1):
                    pending.append(pool.submit(_do_chunk, task, first, n))
                bar.update(len(res[1]))
                yield res
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError(
                "a CAPTCHA worker process died or could not start: if you run from standard input or a "
                "script without `if __name__ == \"__main__\":`, add that guard, or pass workers=0 to work "
                "in this process.") from None
        finally:
            # On Ctrl-C or an error: drop the queued chunks, let running ones finish, join every worker.
            pool.shutdown(wait=True, cancel_futures=True)


def _worker_init():
    # Ctrl-C goes to the whole process group: let only the parent handle it, so
    # it can shut the workers down cleanly instead of every worker printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked since birth (see below): ignored from now on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def _children_start_deaf_to_ctrl_c():
    """Start worker processes with SIGINT blocked.

    A spawned worker spends its first second importing; a Ctrl-C then would print a
    KeyboardInterrupt traceback from inside its imports, before ``_worker_init`` ignores
    SIGINT.  The signal mask survives fork and exec, so workers started inside this block
    cannot be interrupted until ``_worker_init`` has ignored SIGINT and unblocked it.  In this
    process the block only defers a Ctrl-C to the end of the block (it stays pending).
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _do_chunk(task, first, n):
    """Render images first .. first+n-1: (first, texts, (n, C, H, W) uint8 or None), writing PNGs if asked."""
    kind, seed, chars, length, pp_dict, folder = task
    cs = Charset(chars, length[1], length[0])
    pp = Preprocess.from_dict(pp_dict) if pp_dict else None
    texts, arrays = [], None
    if kind == "array":
        arrays = numpy.empty((n,) + pp.shape, dtype=numpy.uint8)
    for j in range(n):
        text, image = render_captcha(seed, first + j, cs)
        texts.append(text)
        if kind == "array":
            arrays[j] = pp.to_array(image)
        if folder is not None:
            if kind == "png" and pp is not None:
                image = pp._resize(_to_pp_mode(image, pp))
            path = _safe_png_path(folder, text, first + j)
            tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
            try:  # write then rename: a killed run never leaves a half-written LABEL_INDEX.png
                image.save(tmp, format="PNG")
                os.replace(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StorageError(f"cannot write {path} ({exc.strerror or exc}): check the folder is "
                                   f"writable and has free space.") from None
    return first, texts, arrays


def _to_pp_mode(image, pp: Preprocess):
    from .images import to_mode

    return to_mode(image, "RGB" if pp.channels == 3 else "L")


# --------------------------------------------------------------------------
# The endless training stream


class CaptchaStream:
    """An endless iterator of fresh ``(images, labels)`` batches, made ahead of time.

    images  (batch_size, C, H, W) uint8 under ``preprocess`` (default 3 x 32 x 80)
    labels  list of batch_size strings

    Batch ``b`` holds images ``b*batch_size .. (b+1)*batch_size - 1`` of
    ``seed`` (the same images ``generate_captchas`` gives), so a stream is
    reproducible by seed and resumable with ``start_batch``.  ``workers``
    processes (default: all cores; 0: generate in this process, on demand)
    each keep up to ``prefetch`` batches ready in a bounded queue.

    Use it as a context manager, or call ``close()``: workers stop at once.
    They also stop on their own if this process dies (they watch it), and
    ignore Ctrl-C so that only this process handles it.  A failing worker's
    error is re-raised here as a DataError.
    """

    def __init__(self, batch_size: int, seed: int, charset=DIGITS_UPPER, length: int | None = None,
                 preprocess: Preprocess | None = None, workers: int | None = None, prefetch: int = 4,
                 start_batch: int = 0):
        integer(batch_size, "batch size")
        integer(prefetch, "prefetch")
        integer(start_batch, "start_batch", 0, what="a non-negative integer")
        self.batch_size = int(batch_size)
        self.seed = check_seed(seed)
        self.charset = make_charset(charset, length)
        self.preprocess = preprocess or Preprocess()
        self.workers = _check_workers(workers)
        self.prefetch = int(prefetch)
        self.next_batch = int(start_batch)
        self._start = int(start_batch)
        self._closed = False
        self._procs: list = []
        self._queues: list = []
        self._stop = None
        self._config = (self.seed, self.charset.chars, (self.charset.min_length, self.charset.length),
                        self.preprocess.to_dict(),
                        self.batch_size)
        if self.workers > 0:
            self._start_workers()
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._procs, self._queues)

    def _start_workers(self):
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        try:
            with _children_start_deaf_to_ctrl_c():
                for w in range(self.workers):
                    q = ctx.Queue(maxsize=self.prefetch)
                    p = ctx.Process(target=_stream_worker, name=f"xpnet-captcha-{w}", daemon=True,
                                    args=(w, self.workers, self._start, self._config, q, self._stop))
                    self._queues.append(q)
                    self._procs.append(p)
                    p.start()
        except BaseException:
            _shutdown(self._stop, self._procs, self._queues)
            raise

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        b = self.next_batch
        if self.workers == 0:
            seed, chars, length, pp_dict, bs = self._config
            cs = Charset(chars, length[1], length[0])
            item = _make_batch(seed, cs, Preprocess.from_dict(pp_dict), bs, b)
        else:
            item = self._receive(b)
        self.next_batch = b + 1
        return item

    def _receive(self, b):
        w = (b - self._start) % self.workers
        q, proc = self._queues[w], self._procs[w]
        while True:
            try:
                msg = q.get(timeout=0.5)
                break
            except queue.Empty:
                if not proc.is_alive():
                    try:
                        msg = q.get(timeout=0.5)
                        break
                    except queue.Empty:
                        code = proc.exitcode
                        self.close()
                        raise DataError(
                            f"CAPTCHA stream worker {w} died unexpectedly (exit code {code}): it was killed or ran "
                            f"out of memory, or, if it died at start, the script that makes the stream lacks "
                            f"`if __name__ == \"__main__\":` (or pass workers=0).") from None
        kind, got, *rest = msg
        if kind == "error":
            self.close()
            raise DataError(f"CAPTCHA stream worker {w} failed while making batch {got}: {rest[0]}")
        if got != b:  # cannot happen: each worker makes its own batches in order
            self.close()
            raise DataError(f"CAPTCHA stream out of order: expected batch {b}, got {got}.")
        return rest[0], rest[1]

    def close(self):
        """Stop and join the workers (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def pids(self) -> list[int]:
        """The worker process ids (for tests and monitoring)."""
        return [p.pid for p in self._procs]


def _shutdown(stop, procs, queues):
    if stop is not None:
        stop.set()
    deadline = time.monotonic() + 5.0
    # No draining: a worker puts with a timeout and checks the stop flag between tries (and
    # between images), so it leaves by itself; reading the queue here could block for ever on
    # a message whose writer left half-way (a worker drops its unsent data when it stops).
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        for p in procs:
            p.join(timeout=0.05)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)
    for q in queues:
        with contextlib.suppress(Exception):
            q.close()
            q.cancel_join_thread()


def _make_batch(seed, cs, pp, bs, b, stop=None):
    images = numpy.empty((bs,) + pp.shape, dtype=numpy.uint8)
    labels = []
    for j in range(bs):
        if stop is not None and stop.is_set():
            return None
        text, image = render_captcha(seed, b * bs + j, cs)
        labels.append(text)
        images[j] = pp.to_array(image)
    return images, labels


def _stream_worker(w, nworkers, start, config, q, stop):
    _worker_init()
    seed, chars, length, pp_dict, bs = config
    parent = multiprocessing.parent_process()
    b = start + w
    try:
        cs, pp = Charset(chars, length[1], length[0]), Preprocess.from_dict(pp_dict)
        while not stop.is_set():
            batch = _make_batch(seed, cs, pp, bs, b, stop)
            if batch is None:
                break
            msg = ("ok", b, batch[0], batch[1])
            while True:
                try:
                    q.put(msg, timeout=0.2)
                    break
                except queue.Full:
                    if stop.is_set() or (parent is not None and not parent.is_alive()):
                        q.cancel_join_thread()
                        return
            b += nworkers
        q.cancel_join_thread()  # stopping: whatever is still buffered is not wanted
    except BaseException as exc:  # report it to the consumer, who re-raises it
        with contextlib.suppress(Exception):
            q.put(("error", b, f"{type(exc).__name__}: {exc}"), timeout=5)
