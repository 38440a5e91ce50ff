"""xpnet.captcha.service in-process (Starlette's TestClient, httpx's ASGI transport): readings equal to the
reader's own, several models, every refusal a 4xx with one JSON sentence, micro-batching of concurrent requests."""

import asyncio
import io
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest

import xpnet
from xpnet.captcha import Recognizer, metadata_for
from xpnet.captcha.batcher import MicroBatcher
from xpnet.data import Charset, Preprocess
from xpnet.errors import UsageError

pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
pytest.importorskip("httpx", reason="needs httpx (the dev extra)")
with warnings.catch_warnings():  # newer Starlette prefers httpx2 for its TestClient; httpx still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from xpnet.captcha.service import Limits, create_app, model_names  # noqa: E402
from xpnet.captcha.upload import decode_image_bytes, image_fields  # noqa: E402

CS = Charset("ABCD", 2)
PP = Preprocess(height=24, width=40, channels=1)


def make_reader(tmp_path, name="tiny", seed=0, charset=CS, pp=PP):
    xpnet.seed(seed)
    model = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=charset.n_outputs, filters=4, hidden=16)
    path = tmp_path / f"{name}.npz"
    xpnet.save(model, path, metadata_for(charset, pp))
    return Recognizer.load(path)


def png(seed, size=(60, 30), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width, height):
    """A PNG whose header announces width x height pixels, with no image data: refused unread, or 'truncated'."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.fixture
def reader(tmp_path):
    return make_reader(tmp_path)


@pytest.fixture
def client(reader):
    with TestClient(create_app({"tiny": reader}), raise_server_exceptions=False) as c:
        yield c


def expected(reader, tmp_path, data, name="x.png"):
    (tmp_path / name).write_bytes(data)
    return reader.predict_files([tmp_path / name])


def assert_refused(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    msg = body["error"]
    assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_a_raw_body_reads_like_the_file(client, reader, tmp_path):
    data = png(1)
    want = expected(reader, tmp_path, data)
    r = client.post("/predict", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    got = r.json()
    assert set(got) == {"text", "confidence", "model"}
    assert got["text"] == want.texts[0] and got["model"] == "tiny"
    assert got["confidence"] == pytest.approx(float(want.confidences[0]), abs=1e-6)


def test_chars_gives_each_characters_probability(client, reader, tmp_path):
    data = png(2)
    want = expected(reader, tmp_path, data)
    got = client.post("/predict?chars=1", content=data).json()
    assert [c["char"] for c in got["chars"]] == list(want.texts[0])
    np.testing.assert_allclose([c["confidence"] for c in got["chars"]], want.char_confidences[0], atol=1e-6)
    assert np.prod([c["confidence"] for c in got["chars"]]) == pytest.approx(got["confidence"], rel=1e-9)
    assert "chars" not in client.post("/predict?chars=0", content=data).json()


def test_multipart_image_fields_one_object_or_a_list_in_order(client, reader, tmp_path):
    datas = [png(3), png(4, size=(90, 20)), png(5, mode="L")]
    want = reader.predict_files([tmp_path.joinpath(f"{i}.png") for i in range(3)
                                 if tmp_path.joinpath(f"{i}.png").write_bytes(datas[i])])
    one = client.post("/predict", files={"image": ("a.png", datas[0], "image/png")}).json()
    assert one["text"] == want.texts[0]
    many = client.post("/predict", files=[("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(datas)])
    assert many.status_code == 200
    got = many.json()
    assert [g["text"] for g in got] == want.texts
    np.testing.assert_allclose([g["confidence"] for g in got], want.confidences, atol=1e-6)


def test_health_and_models_describe_the_service(client, reader):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ["tiny"]
    (m,) = client.get("/models").json()["models"]
    assert m["name"] == "tiny" and m["charset"] == "ABCD" and m["length"] == 2 and m["lengths"] == [2, 2]
    assert m["input"] == {"channels": 1, "height": 24, "width": 40} and m["file"] == "tiny.npz"
    assert Preprocess.from_dict(m["preprocess"]) == reader.preprocess


def test_several_models_need_a_name(tmp_path):
    a = make_reader(tmp_path, "a", seed=1)
    b = make_reader(tmp_path, "b", seed=2, charset=Charset("XYZ", 3), pp=Preprocess(height=20, width=30))
    data = png(6)
    with TestClient(create_app({"a": a, "b": b})) as c:
        assert_refused(c.post("/predict", content=data), 400, "2 models", "a, b", "?model=NAME")
        assert_refused(c.post("/predict?model=zz", content=data), 404, "'zz'", "a, b")
        ra, rb = c.post("/predict?model=a", content=data).json(), c.post("/predict?model=b", content=data).json()
        assert ra["model"] == "a" and len(ra["text"]) == 2 and set(ra["text"]) <= set("ABCD")
        assert rb["model"] == "b" and len(rb["text"]) == 3 and set(rb["text"]) <= set("XYZ")
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["a", "b"]


def test_bad_requests_are_4xx_sentences_and_the_service_goes_on(reader, tmp_path):
    good = png(7)
    want = expected(reader, tmp_path, good).texts[0]
    limits = Limits(max_bytes=20_000, max_pixels=300_000, max_images=3)
    bad = [
        (dict(content=b"hello, not an image"), 400, ["not an image"]),
        (dict(content=b""), 400, ["empty"]),
        (dict(content=good[:len(good) // 2]), 400, ["truncated"]),
        (dict(content=png_header_only(20_000, 20_000)), 413, ["400000000 pixels", "decompression bomb"]),
        (dict(content=png_header_only(1000, 1000)), 413, ["1000x1000", "300000"]),
        (dict(content=png_header_only(100, 100)), 400, ["truncated"]),   # under the limit: decoded, and cut
        (dict(content=b"\0" * 20_001), 413, ["20000 bytes", "--max-bytes"]),
        (dict(files=[("image", ("a.png", png(0, size=(8, 8)), "image/png"))] * 4), 413, ["at most 3"]),
        (dict(files={"picture": ("a.png", good, "image/png")}), 400, ["'picture'", "'image'"]),
        (dict(files=[("image", ("a.png", good, "image/png")), ("image", ("b", b"junk", "image/png"))]), 400,
         ["image 2 of 2", "not an image"]),
        (dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=y"}), 400,
         ["multipart"]),
        (dict(content=good, params={"model": "other"}), 404, ["'other'", "tiny"]),
        (dict(content=good, params={"colour": "red"}), 400, ["'colour'"]),
        (dict(content=good, params={"chars": "maybe"}), 400, ["chars"]),
    ]
    with TestClient(create_app({"tiny": reader}, limits), raise_server_exceptions=False) as c:
        for kwargs, status, words in bad:
            assert_refused(c.post("/predict", **kwargs), status, *words)
            assert c.post("/predict", content=good).json()["text"] == want
        assert_refused(c.get("/predict"), 405, "GET", "POST /predict")
        assert_refused(c.post("/health"), 405, "POST")
        assert_refused(c.get("/nowhere"), 404, "/nowhere", "GET /models")
        assert c.get("/health").json()["status"] == "ok"


def test_decode_image_bytes_is_the_files_preprocessing(reader, tmp_path):
    from xpnet.data import read_image

    for i, data in enumerate([png(8), png(9, size=(200, 50), mode="L")]):
        (tmp_path / f"{i}.png").write_bytes(data)
        np.testing.assert_array_equal(decode_image_bytes(data, PP), read_image(tmp_path / f"{i}.png", PP))


def test_an_eps_file_is_never_opened():
    # EPS would run Ghostscript: the service only opens in-process formats
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    from xpnet.captcha.upload import RequestError

    with pytest.raises(RequestError, match="not an image file"):
        decode_image_bytes(eps, PP)


def test_image_fields_parse_a_multipart_body():
    body = (b"--bnd\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nAAA\r\n"
            b"--bnd\r\nContent-Disposition: form-data; name=image\r\nContent-Type: image/png\r\n\r\nB\r\nB\r\n"
            b"--bnd--\r\n")
    assert image_fields(body, 'multipart/form-data; boundary="bnd"', 5) == [b"AAA", b"B\r\nB"]


def test_concurrent_requests_are_read_in_batches(reader, tmp_path):
    import httpx

    datas = [png(20 + i) for i in range(16)]
    want = reader.predict_files([p for i, d in enumerate(datas)
                                 if (p := tmp_path / f"{i}.png").write_bytes(d)]).texts
    app = create_app({"tiny": reader}, Limits(max_wait=0.5))

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            replies = await asyncio.gather(*[c.post("/predict", content=d) for d in datas])
            return [r.json()["text"] for r in replies], (await c.get("/health")).json()

    texts, health = asyncio.run(go())
    assert texts == want
    assert health["images"] == 16 and health["batches"] < 16


def test_micro_batcher_batches_bounds_and_survives_failures():
    from concurrent.futures import ThreadPoolExecutor

    calls, threads = [], set()

    def run(items):
        calls.append(list(items))
        threads.add(threading.get_ident())
        if "boom" in items:
            raise ValueError("boom")
        return [i * 10 for i in items]

    async def go():
        pool = ThreadPoolExecutor(1)
        b = MicroBatcher(run, pool, max_batch=4, max_wait=5.0)
        b.expect(10)
        out = await asyncio.gather(*[b.submit(i, expected=True) for i in range(10)])
        with pytest.raises(ValueError, match="boom"):
            await b.submit("boom")
        t0 = time.perf_counter()
        after = await b.submit(7)          # nothing expected: read at once, not after max_wait
        alone = time.perf_counter() - t0
        b.expect(2)                        # an expected item that comes late joins the waiting one
        first = b.put(1, expected=True)
        await asyncio.sleep(0.2)
        late = await asyncio.gather(first, b.submit(2, expected=True))
        await b.close()
        pool.shutdown()
        return out, after, alone, late, b

    loop_thread = threading.get_ident()
    out, after, alone, late, b = asyncio.run(go())
    assert out == [i * 10 for i in range(10)] and after == 70 and late == [10, 20]
    assert [len(c) for c in calls[:3]] == [4, 4, 2]       # max_batch bounds every batch
    assert calls[3:] == [["boom"], [7], [1, 2]]
    assert alone < 2.0
    assert loop_thread not in threads and len(threads) == 1   # off the event loop, on one thread
    assert b.batches == 5 and b.items == 13


def test_model_names_and_limits_are_checked(tmp_path):
    assert model_names(["runs/a/model.npz", "digits=runs/b/model.npz"]) == [
        ("model", "runs/a/model.npz"), ("digits", "runs/b/model.npz")]
    with pytest.raises(UsageError, match="two models would be named 'model'.*NAME=PATH"):
        model_names(["a/model.npz", "b/model.npz"])
    with pytest.raises(UsageError, match="--max-bytes"):
        Limits(max_bytes=0)
    with pytest.raises(UsageError, match="--max-wait-ms"):
        Limits(max_wait=-1)
    with pytest.raises(UsageError, match="at least one reader"):
        create_app({})


def test_the_page_posts_the_image_to_predict(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'id="drop"' in page and 'type="file"' in page and 'fetch(url, {method: "POST"' in page
    assert '"predict?chars=1"' in page and 'id="reading"' in page


def test_an_onnx_reader_is_served_like_its_npz(tmp_path):
    pytest.importorskip("onnx", reason='needs the onnx extra: pip install "xpnet[onnx]"')
    from xpnet.captcha.export import export_model_file

    npz = make_reader(tmp_path, "digits", seed=4)
    export_model_file(tmp_path / "digits.npz", tmp_path / "digits.onnx")
    onnx = Recognizer.load(tmp_path / "digits.onnx")
    datas = [png(40 + i) for i in range(3)]
    with TestClient(create_app({"npz": npz, "onnx": onnx})) as c:
        files = [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(datas)]
        a, b = c.post("/predict?model=npz", files=files).json(), c.post("/predict?model=onnx", files=files).json()
        assert [r["text"] for r in a] == [r["text"] for r in b]
        np.testing.assert_allclose([r["confidence"] for r in a], [r["confidence"] for r in b], atol=1e-4)
        assert [m["file"] for m in c.get("/models").json()["models"]] == ["digits.npz", "digits.onnx"]


def test_a_failing_model_is_a_sentence_not_a_traceback(reader, monkeypatch):
    from xpnet.memory import OutOfMemoryError

    def out_of_memory(images, paths=None):
        raise OutOfMemoryError("out of memory reading 1 image: use a smaller --max-batch.")

    with TestClient(create_app({"tiny": reader}), raise_server_exceptions=False) as c:
        monkeypatch.setattr(reader, "predict", out_of_memory)
        assert_refused(c.post("/predict", content=png(1)), 503, "out of memory", "--max-batch")
        monkeypatch.setattr(reader, "predict", lambda images, paths=None: 1 / 0)
        r = c.post("/predict", content=png(1))
        assert r.status_code == 500 and list(r.json()) == ["error"] and "bug in xpnet" in r.json()["error"]
        assert "ZeroDivisionError" not in r.text and "Traceback" not in r.text
        monkeypatch.undo()
        assert c.post("/predict", content=png(1)).status_code == 200
