"""The reading service: CAPTCHA readers behind HTTP (a Starlette ASGI application; ``xpnet serve`` runs it on uvicorn).

    app = create_app({"digits": Recognizer.load("model.npz")})
    GET  /          a page to drop or choose an image and see the reading
    GET  /health    {"status": "ok", "models": [...], "batches": B, "images": N}
    GET  /models    {"models": [{"name", "charset", "length", "lengths", "input", "preprocess", "file"}]}
    POST /predict   the image bytes as the body, or multipart ``image`` fields
                    -> {"text", "confidence", "model"} (several fields: a list of them);
                    ?model=NAME (needed when several models are loaded), ?chars=1 adds
                    "chars": [{"char", "confidence"}, ...] (each character's sigmoid probability)

How a request is read: the body is read up to ``max_bytes`` (413 beyond it); each image
is decoded and preprocessed in a small pool of decoding threads (``decode_image_bytes``:
the reader's own ``Preprocess``), then handed to the model's ``MicroBatcher``, which reads
the images of concurrent requests in one forward pass on the single inference thread.
The event loop only moves bytes, so one slow decode or forward pass never stalls the
other connections, and memory is bounded by the batch and body limits.

Every refusal is a 4xx with ``{"error": "one sentence"}``; an unexpected failure is a 500
with a sentence (its traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .. import checks
from ..errors import UsageError, XpnetError
from .batcher import MicroBatcher
from .recognizer import Recognizer
from .service_page import PAGE
from .upload import DEFAULT_MAX_PIXELS, RequestError, decode_image_bytes, image_fields, is_multipart

log = logging.getLogger("xpnet.serve")
ROUTES = "GET /, GET /health, GET /models and POST /predict"
QUERY = ("model", "chars")
FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask and how requests are batched; each checked on construction.

    max_bytes       largest request body (413 beyond it)
    max_pixels      largest image, by the pixels its header announces (413 beyond it; never decoded)
    max_images      most ``image`` fields in one multipart request (413 beyond it)
    max_batch       most images in one forward pass
    max_wait        seconds an idle model waits for more images before it reads a batch
    decode_threads  threads that decode images (off the event loop)
    """

    max_bytes: int = 1 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 64
    max_batch: int = 64
    max_wait: float = 0.002
    decode_threads: int = min(4, os.cpu_count() or 1)

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_images", "max_batch", "decode_threads"):
            checks.positive_int(getattr(self, name), f"--{name.replace('_', '-')}")
        checks.number(self.max_wait, "--max-wait-ms", allow_zero=True)


class _Model:
    """A reader, its name and its batcher."""

    def __init__(self, name: str, reader: Recognizer, executor, limits: Limits):
        self.name, self.reader = name, reader
        self.batcher = MicroBatcher(self._read, executor, limits.max_batch, limits.max_wait)

    def _read(self, arrays) -> list[dict]:
        """(C, H, W) uint8 images -> one result each (runs on the inference thread)."""
        pred = self.reader.predict(numpy.stack(arrays))
        return [{"text": text, "confidence": float(conf), "model": self.name,
                 "chars": [{"char": c, "confidence": float(p)} for c, p in zip(text, probs)]}
                for text, conf, probs in zip(pred.texts, pred.confidences.tolist(), pred.char_confidences.tolist())]

    def describe(self) -> dict:
        cs, pp = self.reader.charset, self.reader.preprocess
        return {"name": self.name, "charset": cs.chars, "length": cs.length, "lengths": [cs.length, cs.length],
                "input": {"channels": pp.channels, "height": pp.height, "width": pp.width},
                "preprocess": pp.to_dict(),
                "file": os.path.basename(self.reader.path) if self.reader.path else None}


class ReadingService:
    """The models, the threads and the request handlers behind ``create_app``."""

    def __init__(self, readers: dict, limits: Limits | None = None):
        if not isinstance(readers, dict) or not readers:
            raise UsageError("the service needs at least one reader: pass {name: Recognizer}.")
        self.limits = limits or Limits()
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="xpnet-infer")
        self.decoding = ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="xpnet-decode")
        self.models = {}
        for name, reader in readers.items():
            if not isinstance(reader, Recognizer):
                raise UsageError(f"model {name!r} must be an xpnet Recognizer, got {type(reader).__name__}.")
            self.models[str(name)] = _Model(str(name), reader, self.inference, self.limits)

    def warm_up(self) -> None:
        """One forward pass per model, so the first request does not pay for workspaces and threads."""
        for m in self.models.values():
            m.reader.predict(numpy.zeros((1,) + m.reader.preprocess.shape, dtype=numpy.uint8))

    async def close(self) -> None:
        for m in self.models.values():
            await m.batcher.close()
        self.inference.shutdown(wait=False, cancel_futures=True)
        self.decoding.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ handlers
    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(self.models),
                             "batches": sum(m.batcher.batches for m in self.models.values()),
                             "images": sum(m.batcher.items for m in self.models.values())})

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"models": [m.describe() for m in self.models.values()]})

    async def predict(self, request: Request) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - set(QUERY))
        if unknown:
            raise RequestError(400, f"unknown query parameter {unknown[0]!r}: /predict takes ?model=NAME and "
                                    f"?chars=1.")
        model = self._model(params.get("model"))
        chars = FLAGS.get(params.get("chars", "").lower())
        if chars is None:
            raise RequestError(400, f"chars must be 1 or 0, got {params.get('chars')!r}.")
        body = await self._body(request)
        content_type = request.headers.get("content-type", "")
        loop = asyncio.get_running_loop()
        if is_multipart(content_type):
            blobs = await loop.run_in_executor(self.decoding, image_fields, body, content_type,
                                               self.limits.max_images)
        else:
            blobs = [body]
        del body
        pp, limit = model.reader.preprocess, self.limits.max_pixels
        model.batcher.expect(len(blobs))  # a batch about to run waits (briefly) for these images
        try:
            arrays = await asyncio.gather(*[
                loop.run_in_executor(self.decoding, decode_image_bytes, blob, pp, limit,
                                     "the image" if len(blobs) == 1 else f"image {n} of {len(blobs)}")
                for n, blob in enumerate(blobs, 1)])
        except BaseException:
            model.batcher.withdraw(len(blobs))
            raise
        del blobs
        try:
            results = await asyncio.gather(*[model.batcher.put(a, expected=True) for a in arrays])
        except XpnetError as exc:  # the model could not read the batch (out of memory, ...)
            log.error("xpnet serve: model %s could not read a batch: %s", model.name, exc)
            return JSONResponse({"error": str(exc)}, status_code=503)
        if not chars:
            results = [{k: v for k, v in r.items() if k != "chars"} for r in results]
        return JSONResponse(results if len(results) > 1 else results[0])

    # ------------------------------------------------------------------ helpers
    def _model(self, name) -> _Model:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise RequestError(400, f"{len(self.models)} models are loaded ({', '.join(self.models)}): name one "
                                    f"with ?model=NAME.")
        if name not in self.models:
            raise RequestError(404, f"no model named {name!r} is loaded: choose one of {', '.join(self.models)}.")
        return self.models[name]

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, _too_large(int(declared), limit))
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestError(413, _too_large(None, limit))
        except ClientDisconnect:
            raise RequestError(400, "the client closed the connection before the body was sent.") from None
        request.state.body_read = True
        return bytes(body)


def _too_large(size, limit) -> str:
    what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return f"the request body is {what}, over the service's limit of {limit} bytes (--max-bytes)."


async def _drain(request: Request, cap: int) -> None:
    """Read and drop what is left of a refused request's body (up to ``cap`` bytes), so the client reads the answer."""
    if getattr(request.state, "body_read", False):
        return
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                break


def create_app(readers: dict, limits: Limits | None = None) -> Starlette:
    """A Starlette application reading with ``readers`` ({name: Recognizer}); see the module docstring."""
    service = ReadingService(readers, limits)
    drain_cap = max(16 << 20, 4 * service.limits.max_bytes)

    async def refused(request: Request, exc: RequestError) -> Response:
        await _drain(request, drain_cap)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        await _drain(request, drain_cap)
        if exc.status_code == 404:
            message = f"there is no {request.url.path}: the service answers {ROUTES}."
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: the service answers {ROUTES}."
        else:
            message = f"{exc.detail}."
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "internal error while answering this request: this is a bug in xpnet, "
                                      "the server's log has the details."}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await service.close()

    routes = [Route("/", service.page, methods=["GET"]), Route("/health", service.health, methods=["GET"]),
              Route("/models", service.list_models, methods=["GET"]),
              Route("/predict", service.predict, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={RequestError: refused, HTTPException: http_error,
                                        Exception: internal_error})
    app.state.service = service
    return app


def model_names(specs) -> list[tuple[str, str]]:
    """``MODEL`` arguments (``PATH`` or ``NAME=PATH``) -> [(name, path)]; a name is the file's stem unless given."""
    out, seen = [], {}
    for spec in specs:
        spec = os.fspath(spec)
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec) or not name or "/" in name or os.sep in name:
            name, path = os.path.splitext(os.path.basename(spec))[0], spec
        if not name:
            raise UsageError(f"cannot name the model {spec!r}: give it as NAME=PATH.")
        if name in seen:
            raise UsageError(f"two models would be named {name!r} ({seen[name]} and {path}): give each a name "
                             f"as NAME=PATH.")
        seen[name] = path
        out.append((name, path))
    return out


__all__ = ["create_app", "ReadingService", "Limits", "model_names", "ROUTES"]
