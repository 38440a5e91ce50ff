"""What a client sends the reading service: image bytes, alone or as multipart ``image`` fields.

``decode_image_bytes(data, preprocess)`` turns the bytes of one uploaded image into
the reader's (C, H, W) uint8 input with the very ``Preprocess`` that
``Recognizer.read_files`` applies to files, so a reading over HTTP equals the
reading of the same file.  It refuses, each with one ``RequestError`` sentence:
an empty body, bytes that are no image of an accepted format (``FORMATS``: EPS and
other formats that call external programs are never opened), a truncated image,
and an image whose header announces more than ``max_pixels`` pixels (a
decompression bomb: refused from the header, never decoded).

``image_fields(body, content_type)`` splits a ``multipart/form-data`` body into the
bytes of its ``image`` fields (other fields are refused, so a typo is not a
silent empty answer).
"""

from __future__ import annotations

import io
import warnings

import numpy
from PIL import Image

from ..data.images import Preprocess
from ..errors import UsageError

INSTALL_HINT = 'pip install "xpnet[serve]"'
# Formats Pillow decodes in-process; EPS (Ghostscript) and the like are not offered to strangers.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
DEFAULT_MAX_PIXELS = 4096 * 4096


class RequestError(Exception):
    """A request the service refuses: ``status`` (a 4xx) and one sentence for ``{"error": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def require_serve() -> None:
    """Nothing, or one UsageError sentence when the serve extra (starlette, uvicorn, python-multipart) is absent."""
    missing = []
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if _multipart_parser() is None:
        missing.append("python-multipart")
    if missing:
        raise UsageError(f"xpnet serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: {INSTALL_HINT}.")


def _multipart_parser():
    """python-multipart's MultipartParser (module ``python_multipart``, before 0.0.13 ``multipart``), or None."""
    try:
        from python_multipart.multipart import MultipartParser
    except ImportError:
        try:
            from multipart.multipart import MultipartParser
        except ImportError:
            return None
    return MultipartParser


def decode_image_bytes(data, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
                       what: str = "the image") -> numpy.ndarray:
    """The bytes of one image file -> (C, H, W) uint8 under ``preprocess``; RequestError (400 / 413) if unusable."""
    if not data:
        raise RequestError(400, f"{what} is empty (0 bytes): send the bytes of a PNG or JPEG file.")
    try:
        with warnings.catch_warnings():
            # Refused below at our own limit, from the header; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = image.size
            if w * h > max_pixels:
                raise RequestError(413, f"{what} is refused: its header says {w}x{h} = {w * h} pixels, more than "
                                        f"the service's limit of {max_pixels} (a possible decompression bomb).")
            if w < 1 or h < 1:
                raise RequestError(400, f"{what} has no pixels ({w}x{h}).")
            image.seek(0)
            image.load()
    except RequestError:
        raise
    except Image.UnidentifiedImageError:
        raise RequestError(400, f"{what} is not an image file the service reads ({', '.join(FORMATS)}).") from None
    except Image.DecompressionBombError as exc:  # Pillow's own limit, also from the header
        text = " ".join(str(exc).split()).rstrip(".")
        raise RequestError(413, f"{what} is refused as a possible decompression bomb ({text}).") from None
    except MemoryError:
        raise RequestError(413, f"{what} needs more memory to decode than the service has.") from None
    except Exception as exc:  # noqa: BLE001 -- decoders of hostile bytes raise anything
        if "truncated" in str(exc) or isinstance(exc, EOFError):
            raise RequestError(400, f"{what} is truncated: send the whole file.") from None
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise RequestError(400, f"{what} cannot be decoded ({text}).") from None
    try:
        return preprocess.to_array(image)
    except Exception as exc:  # noqa: BLE001 -- a decoded but exotic image
        raise RequestError(400, f"{what} cannot be converted ({type(exc).__name__}).") from None


def image_fields(body: bytes, content_type: str, max_images: int) -> list[bytes]:
    """The bytes of each ``image`` field of a multipart/form-data body, in order (RequestError 400 / 413)."""
    parser_type = _multipart_parser()
    if parser_type is None:
        raise RequestError(415, "this server cannot read multipart bodies (python-multipart is not installed): "
                                "send the image bytes as the body.")
    boundary = _boundary(content_type)
    parts: list[dict] = []
    header = {"field": bytearray(), "value": bytearray()}

    def on_part_begin():
        if len(parts) >= max_images:
            raise RequestError(413, f"the request has more than {max_images} parts: send at most {max_images} "
                                    f"images per request (--max-images).")
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data}
    try:
        parser = parser_type(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception:  # noqa: BLE001 -- python-multipart's parse errors
        raise RequestError(400, "the multipart/form-data body is malformed: send each image as a field "
                                "named 'image'.") from None
    images = []
    for n, part in enumerate(parts, 1):
        name = _field_name(part["headers"].get(b"content-disposition", b""))
        if name != "image":
            raise RequestError(400, f"multipart field {n} is named {name!r}: send each image as a field "
                                    f"named 'image'.")
        images.append(bytes(part["data"]))
    if not images:
        raise RequestError(400, "the multipart/form-data body has no field: send each image as a field named "
                                "'image'.")
    return images


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def _options(value: bytes | str) -> tuple[str, dict]:
    """``'type; a=1; b="x"'`` -> ('type', {'a': '1', 'b': 'x'}) (names lower-cased)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    head, *rest = value.split(";")
    opts = {}
    for item in rest:
        key, sep, val = item.partition("=")
        if sep:
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            opts[key.strip().lower()] = val
    return head.strip().lower(), opts


def _boundary(content_type: str) -> str:
    boundary = _options(content_type)[1].get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise RequestError(400, "the multipart/form-data Content-Type has no usable boundary.")
    return boundary


def _field_name(disposition: bytes) -> str:
    kind, opts = _options(disposition)
    return opts.get("name", "") if kind == "form-data" else ""


__all__ = ["RequestError", "decode_image_bytes", "image_fields", "is_multipart", "require_serve",
           "INSTALL_HINT", "FORMATS", "DEFAULT_MAX_PIXELS"]
