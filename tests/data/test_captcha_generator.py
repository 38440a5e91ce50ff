"""Synthetic CAPTCHAs: reproducible by seed whatever the workers, the training stream, clean shutdown."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from xpnet.data import (
    DIGITS_UPPER, CaptchaStream, Charset, Preprocess, generate_captchas, label_from_name, load_folder,
    read_image, render_captcha, write_captcha_pngs,
)
from xpnet.data.captcha import _safe_png_path, draw_text, image_rng
from xpnet.errors import DataError, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CS = Charset(DIGITS_UPPER, 4)


def _files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def _alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _wait_gone(pids, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


# ---------------------------------------------------------------- reproducibility


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    one = write_captcha_pngs(tmp_path / "one", 40, seed=7, workers=0, progress=False)
    two = write_captcha_pngs(tmp_path / "two", 40, seed=7, workers=2, progress=False)
    other = write_captcha_pngs(tmp_path / "other", 40, seed=8, workers=0, progress=False)
    a, b, c = _files(tmp_path / "one"), _files(tmp_path / "two"), _files(tmp_path / "other")
    assert len(a) == 40 and a == b                       # byte-identical, same names
    assert [os.path.basename(p) for p in one] == [os.path.basename(p) for p in two]
    assert all(os.path.basename(p).endswith(f"_{i}.png") for i, p in enumerate(one))
    assert set(a.values()).isdisjoint(c.values())        # another seed: every image differs
    # the in-memory path renders the same images: same labels, same pixels after preprocessing
    pp = Preprocess(32, 80)
    mem = generate_captchas(40, seed=7, workers=2, preprocess=pp, progress=False)
    assert mem.labels == [label_from_name(p) for p in one]
    assert all(np.array_equal(mem.images[i], read_image(p, pp)) for i, p in enumerate(one))
    # a slice starting elsewhere is the same images: each one depends on (seed, index) only
    part = generate_captchas(5, seed=7, start=30, workers=0, preprocess=pp, progress=False)
    assert part.labels == mem.labels[30:35] and np.array_equal(part.images, mem.images[30:35])
    loaded = load_folder(tmp_path / "one", charset=CS, preprocess=pp)
    assert sorted(loaded.labels) == sorted(mem.labels)


def test_render_is_thread_safe_and_leaves_the_real_module_alone():
    import secrets

    import captcha.image

    want = {s: [render_captcha(s, i, CS)[1].tobytes() for i in range(4)] for s in (1, 2)}
    got = {}

    def work(s):
        got[s] = [render_captcha(s, i, CS)[1].tobytes() for i in range(4)]
    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert captcha.image.secrets is secrets  # the package others use still draws from `secrets`
    real = captcha.image.ImageCaptcha(160, 60)
    assert real.generate_image("AB12").tobytes() != real.generate_image("AB12").tobytes()


def test_text_is_uniform_over_the_charset():
    counts = np.zeros(36)
    for i in range(3000):
        for c in draw_text(image_rng(11, i), CS):
            counts[DIGITS_UPPER.index(c)] += 1
    expected = 3000 * 4 / 36
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert counts.min() > 0 and chi2 < 80  # df = 35: p < 1e-5 for a fair die


def test_other_charsets_lengths_and_sizes(tmp_path):
    d = generate_captchas(6, seed=1, charset="abc", length=6, workers=0,
                          preprocess=Preprocess(24, 64, channels=1), progress=False)
    assert d.images.shape == (6, 1, 24, 64) and all(len(t) == 6 and set(t) <= set("abc") for t in d.labels)
    paths = write_captcha_pngs(tmp_path, 3, seed=1, charset="abc", length=2, workers=0, progress=False,
                               preprocess=Preprocess(24, 64, channels=1))
    from PIL import Image

    assert Image.open(paths[0]).size == (64, 24) and Image.open(paths[0]).mode == "L"
    with pytest.raises(UsageError, match="positive integer"):
        generate_captchas(0, seed=1)
    with pytest.raises(UsageError, match="label length"):
        generate_captchas(1, seed=1, length=0)
    with pytest.raises(UsageError, match="seed must be"):
        generate_captchas(1, seed=-1)


def test_a_range_of_lengths_is_uniform_and_reproducible(tmp_path):
    cs = Charset(DIGITS_UPPER, 6, min_length=4)
    lengths = np.bincount([len(draw_text(image_rng(3, i), cs)) for i in range(3000)], minlength=7)
    assert lengths[:4].sum() == 0 and all(900 < c < 1100 for c in lengths[4:])  # about 1000 each
    pp = Preprocess(32, 80, channels=1)
    mem = generate_captchas(30, seed=9, charset=DIGITS_UPPER, length="4-6", workers=2, preprocess=pp,
                            progress=False)
    assert mem.charset == cs and {len(t) for t in mem.labels} == {4, 5, 6}
    with CaptchaStream(10, seed=9, length=(4, 6), workers=1, preprocess=pp) as stream:
        images, labels = next(stream)
    assert labels == mem.labels[:10] and np.array_equal(images, mem.images[:10])
    paths = write_captcha_pngs(tmp_path, 12, seed=9, length="4-6", workers=0, progress=False)
    back = load_folder(tmp_path, preprocess=pp)  # mixed lengths: read as a range, no --length needed
    assert sorted(back.labels) == sorted(mem.labels[:12]) and len(paths) == 12
    assert (back.charset.min_length, back.charset.length) == (min(map(len, back.labels)), max(map(len, back.labels)))
    # a fixed length draws no length: the texts of earlier versions are kept
    assert draw_text(image_rng(3, 0), CS) == draw_text(image_rng(3, 0), Charset(DIGITS_UPPER, 4, 4))


@pytest.mark.parametrize("chars", ["AB/", "AB\\", "A\x00B", "AB.", "A_B", "AB\n"])
def test_unsafe_charsets_never_write_outside(tmp_path, chars):
    out = tmp_path / "out"
    with pytest.raises(UsageError):
        write_captcha_pngs(out, 5, seed=0, charset=chars, length=2, workers=0, progress=False)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == []


def test_png_name_guard():
    with pytest.raises(DataError, match="not a safe file name"):
        _safe_png_path("/tmp/x", "../AB", 0)
    with pytest.raises(DataError):
        _safe_png_path("/tmp/x", "A/B", 0)
    assert _safe_png_path("/tmp/x", "AB", 3) == os.path.join("/tmp/x", "AB_3.png")


# ---------------------------------------------------------------- the stream


def test_stream_matches_generation_and_shuts_down():
    pp = Preprocess(32, 80)
    ref = generate_captchas(48, seed=5, preprocess=pp, workers=0, progress=False)
    with CaptchaStream(16, seed=5, workers=2, prefetch=2, preprocess=pp) as stream:
        pids = stream.pids
        batches = [next(stream) for _ in range(3)]
    assert len(pids) == 2 and _wait_gone(pids, 5) == []
    for b, (images, labels) in enumerate(batches):
        assert images.shape == (16, 3, 32, 80) and images.dtype == np.uint8
        assert labels == ref.labels[16 * b:16 * b + 16]
        assert np.array_equal(images, ref.images[16 * b:16 * b + 16])
    # in-process (workers=0) and resumed (start_batch) streams give the same batches
    with CaptchaStream(16, seed=5, workers=0, preprocess=pp, start_batch=2) as stream:
        images, labels = next(stream)
    assert labels == ref.labels[32:] and np.array_equal(images, ref.images[32:])
    with pytest.raises(StopIteration):
        next(stream)


def test_stream_reports_a_dead_worker():
    stream = CaptchaStream(8, seed=1, workers=1, prefetch=1)
    try:
        next(stream)
        os.kill(stream.pids[0], signal.SIGKILL)
        with pytest.raises(DataError, match="worker 0 died unexpectedly"):
            for _ in range(5):  # at most one prefetched batch is still in the queue
                next(stream)
    finally:
        stream.close()
    assert _wait_gone(stream.pids, 5) == []


_CHILD = textwrap.dedent("""
    import sys, time
    from xpnet.data import CaptchaStream
    if __name__ == "__main__":
        stream = CaptchaStream(4, seed=0, workers=2, prefetch=1)
        next(stream)
        print(" ".join(map(str, stream.pids)), flush=True)
        if sys.argv[1] == "iterate":
            while True:
                next(stream)
        else:
            time.sleep(60)
""")


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_no_orphan_workers_on_ctrl_c_or_kill(tmp_path, how):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script), "iterate" if how == "ctrl-c" else "sleep"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # like a terminal: the whole process group gets it
            _, err = proc.communicate(timeout=20)
            assert "KeyboardInterrupt" in err and err.count("Traceback") == 1  # the workers stay quiet
        else:
            proc.kill()
            proc.wait(timeout=10)
        assert _wait_gone(pids, 10) == []  # workers watch their parent and leave
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_never_waits_on_a_half_written_message():
    """A stopping worker drops its unsent data, which can leave half a message in the queue's pipe;
    shutting the stream down must not read it (a blocking read there hung the caller for ever)."""
    import multiprocessing
    import struct
    import threading

    from xpnet.data.captcha import _shutdown

    class SlowToLeave:  # a worker that takes a few joins to exit
        def __init__(self):
            self.calls = 0

        def is_alive(self):
            self.calls += 1
            return self.calls < 6

        def join(self, timeout=None):
            pass

        terminate = kill = join

    q = multiprocessing.get_context("spawn").Queue()
    os.write(q._writer.fileno(), struct.pack("!i", 1 << 20) + b"only the start")  # header promises 1 MiB
    done = threading.Event()
    t = threading.Thread(target=lambda: (_shutdown(None, [SlowToLeave()], [q]), done.set()), daemon=True)
    t.start()
    assert done.wait(10), "shutdown blocked on a half-written message"
