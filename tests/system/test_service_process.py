"""``xpnet serve`` as a real process on a free 127.0.0.1 port, driven by httpx: readings equal to
``xpnet predict``'s, bad requests refused with a JSON sentence while the service stays up, concurrent
clients batched with flat memory, and a clean stop on SIGINT / SIGTERM."""

import asyncio
import io
import signal
import socket
import struct
import zlib

import pytest

import xpnet
from xpnet.captcha import Recognizer, metadata_for
from xpnet.data import Charset, Preprocess, render_captcha

pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install "xpnet[serve]"')
httpx = pytest.importorskip("httpx", reason="needs httpx (the dev extra)")

from ._service_server import ServeProcess  # noqa: E402

CS = Charset("23456789ABCDEFGHJKLMNPQRSTUVWXYZ", 4)
PP = Preprocess(height=24, width=64, channels=1)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "reader.npz"
    xpnet.seed(5)
    model = xpnet.models.simple_convnet(input_shape=PP.shape, n_classes=CS.n_outputs, filters=4, hidden=16)
    xpnet.save(model, path, metadata_for(CS, PP))
    return path


@pytest.fixture(scope="module")
def captchas(tmp_path_factory):
    """(PNG bytes, path) of 8 160x60 CAPTCHAs."""
    folder = tmp_path_factory.mktemp("pngs")
    out = []
    for i in range(8):
        text, image = render_captcha(11, i, CS)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        (folder / f"{text}_{i}.png").write_bytes(buf.getvalue())
        out.append((buf.getvalue(), folder / f"{text}_{i}.png"))
    return out


def header_only_png(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def refused(r, status, word):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"] and word in body["error"] and body["error"].endswith(".")
    assert "Traceback" not in r.text and "File \"" not in r.text


def test_a_served_reader_answers_survives_bad_requests_and_stops(model_file, captchas):
    reader = Recognizer.load(model_file)
    want = reader.predict_files([p for _, p in captchas])
    good, good_text = captchas[0][0], want.texts[0]
    with ServeProcess(model_file, "--max-bytes", "50000", "--max-pixels", "2000000") as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("health").json()["status"] == "ok"
            assert c.get("models").json()["models"][0]["name"] == "reader"
            for (data, _), text, conf in zip(captchas, want.texts, want.confidences):
                got = c.post("predict", content=data, headers={"content-type": "image/png"}).json()
                assert got["text"] == text and got["model"] == "reader"
                assert got["confidence"] == pytest.approx(float(conf), abs=1e-6)
            listed = c.post("predict", files=[("image", ("a.png", d, "image/png")) for d, _ in captchas[:3]]).json()
            assert [r["text"] for r in listed] == want.texts[:3]
            bad = [
                (lambda: c.post("predict", content=b"GIF89a but not really"), 400, "not an image"),
                (lambda: c.post("predict", content=b""), 400, "empty"),
                (lambda: c.post("predict", content=good[:len(good) // 3]), 400, "truncated"),
                (lambda: c.post("predict", content=header_only_png(30_000, 30_000)), 413, "decompression bomb"),
                (lambda: c.post("predict", content=header_only_png(2000, 2000)), 413, "2000x2000"),
                (lambda: c.post("predict", content=b"\xff" * 3_000_000), 413, "--max-bytes"),
                (lambda: c.post("predict?model=nope", content=good), 404, "'nope'"),
                (lambda: c.put("predict", content=good), 405, "PUT"),
                (lambda: c.get("predict"), 405, "GET"),
                (lambda: c.get("admin"), 404, "/admin"),
            ]
            for send, status, word in bad:
                refused(send(), status, word)
                assert c.get("health").json()["status"] == "ok"
                assert c.post("predict", content=good).json()["text"] == good_text
            # below HTTP: garbage, and a client that hangs up half-way through its body
            port = int(server.url.rsplit(":", 1)[1].strip("/"))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                assert raw.recv(100).startswith(b"HTTP/1.1 400")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n" + good[:500])
            assert c.post("predict", content=good).json()["text"] == good_text
        assert server.proc.poll() is None
        code = server.stop(signal.SIGINT)
    assert code == 0, server.stderr
    assert "xpnet serve: stopped" in server.stderr and "Traceback" not in server.stderr


def test_concurrent_clients_are_batched_and_memory_stays_flat(model_file, captchas):
    psutil = pytest.importorskip("psutil", reason="needs psutil (the dev extra) to read the server's memory")
    want = Recognizer.load(model_file).predict_files([p for _, p in captchas]).texts

    async def clients(url, n, per_client):
        """``n`` clients each posting ``per_client`` images one after the other: [(text read, text expected)]."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def one(k):
                out = []
                for i in range(per_client):
                    r = await c.post("predict?model=reader", content=captchas[(k + i) % 8][0])
                    assert r.status_code == 200, r.text
                    out.append((r.json()["text"], want[(k + i) % 8]))
                return out
            return [p for ps in await asyncio.gather(*[one(k) for k in range(n)]) for p in ps]

    async def burst(url, n):
        """``n`` requests sent at once: the replies and the health counters after them."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            replies = await asyncio.gather(*[c.post("predict?model=reader", content=captchas[i % 8][0])
                                             for i in range(n)])
            return replies, (await c.get("health")).json()

    with ServeProcess(model_file, "a=" + str(model_file), "--max-wait-ms", "5") as server:
        proc = psutil.Process(server.pid)
        pairs = asyncio.run(clients(server.url, 16, 10))           # also the warm-up: allocator, buffers
        assert all(got == exp for got, exp in pairs)
        rss_before = proc.memory_info().rss
        replies, health = asyncio.run(burst(server.url, 400))
        rss_after = proc.memory_info().rss
        assert [r.status_code for r in replies] == [200] * 400
        assert [r.json()["text"] for r in replies] == [want[i % 8] for i in range(400)]
        assert health["images"] == 560 and health["batches"] < 280    # read in batches, not one by one
        assert rss_after - rss_before < 40 * 2**20, (rss_before, rss_after)
        refused(httpx.post(server.url + "predict", content=captchas[0][0]), 400, "2 models")
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.stderr
    assert "Traceback" not in server.stderr
