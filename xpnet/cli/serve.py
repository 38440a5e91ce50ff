"""``xpnet serve MODEL [MODEL...]``: trained readers behind HTTP (``xpnet.captcha.service`` on uvicorn)."""

from __future__ import annotations

import signal
import socket
import sys

from .. import checks
from ..errors import StorageError, UsageError, XpnetError


def add_command(sub) -> None:
    """Register ``xpnet serve``."""
    p = sub.add_parser(
        "serve", help="read CAPTCHA images over HTTP: POST /predict, a page at /",
        description="Serve trained readers over HTTP: POST /predict takes an image (the raw bytes as the body, or "
                    "multipart fields named 'image') and answers JSON {\"text\", \"confidence\", \"model\"} "
                    "(?chars=1 adds each character's probability; ?model=NAME picks a model when several are "
                    "loaded). GET / is a page to drop an image on, GET /models describes the models, GET /health "
                    "says the service is up. Images of concurrent requests are read in one batch. Ctrl-C stops. "
                    'Needs the serve extra: pip install "xpnet[serve]".')
    p.add_argument("models", metavar="MODEL", nargs="+",
                   help="model file written by xpnet train (model.npz) or xpnet export (.onnx); NAME=PATH names it "
                        "(default: the file name without its extension)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                        "network)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--max-bytes", type=int, default=1 << 20, metavar="N",
                   help="largest request body in bytes; larger ones get 413 (default: 1048576)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest image, by the size its header announces; larger ones are refused without being "
                        "decoded (default: 16777216)")
    p.add_argument("--max-images", type=int, default=64, metavar="N",
                   help="most images in one multipart request (default: 64)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N",
                   help="most images read in one forward pass (default: 64)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                   help="at most how long a batch waits for the images of requests still being decoded "
                        "(default: 2)")
    p.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="threads decoding images (default: the cores, at most 4)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="open connections at once; beyond it new requests get 503 (default: 256)")
    p.add_argument("--access-log", action="store_true", help="log every request on stderr (default: off)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..captcha.upload import require_serve

    require_serve()  # the missing extra is the first thing to say
    import uvicorn

    from ..captcha.recognizer import Recognizer
    from ..captcha.service import Limits, create_app, model_names

    port = checks.integer(args.port, "--port", 0, what="a port number from 0 to 65535")
    if port > 65535:
        raise UsageError(f"--port must be a port number from 0 to 65535, got {port}.")
    checks.positive_int(args.max_connections, "--max-connections")
    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_images=args.max_images,
                    max_batch=args.max_batch, max_wait=checks.number(args.max_wait_ms, "--max-wait-ms",
                                                                      allow_zero=True) / 1000.0,
                    **({"decode_threads": args.decode_threads} if args.decode_threads is not None else {}))
    readers = {name: Recognizer.load(path) for name, path in model_names(args.models)}
    app = create_app(readers, limits)
    app.state.service.warm_up()
    sock = _bind(args.host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=args.access_log, lifespan="on",
                            limit_concurrency=args.max_connections, timeout_keep_alive=5)
    host, bound = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"xpnet serve: reading with {', '.join(readers)} at http://{shown}:{bound}/ (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the signal again for the previous handler:
    # these handlers take it, so a stopped service exits 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        raise XpnetError("the HTTP server did not start (uvicorn's messages above say why).")
    print("xpnet serve: stopped", file=sys.stderr, flush=True)
    return 0


def _stopped(signum, frame) -> None:
    """The signal uvicorn raises again after its graceful shutdown: nothing left to do."""


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or one sentence saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host!r} is not an address of this machine ({exc}): use 127.0.0.1.") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise StorageError(f"cannot listen on {host} port {port} ({exc.strerror or exc}): choose another --port "
                           f"(0 picks a free one), or stop what uses it.") from None
    return sock
