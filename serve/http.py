"""The HTTP side of the detection endpoint, kept free of Ray so it can be unit tested.

Everything a client sends passes through here before the model sees it: the body (raw bytes or
the multipart field ``image``), its size, the image format as PIL detects it (never the
Content-Type), the pixel count read from the header *before* any decoding, the decode itself
and the conversion to the model input (`larp.data.transforms`, the one preprocessing path).
Every failure becomes a `RequestError` with a status and a stable error code, so the server
answers ``{"error": code, "detail": message}`` and never a 500 for a client's input.
"""

from __future__ import annotations

import base64
import codecs
import io
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from larp.data.transforms import pil_to_tensor, to_rgb
from larp.visualize import heatmap_png

MB = 2**20

# PIL format ids accepted -> the name reported to clients. MPO is how PIL reports the JPEGs
# many phone cameras write (a JPEG with a multi-picture extension): it is a JPEG.
ALLOWED_FORMATS: dict[str, str] = {
    "PNG": "PNG",
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "BMP": "BMP",
    "TIFF": "TIFF",
}
ALLOWED_NAMES = ("PNG", "JPEG", "BMP", "TIFF")
_OPEN_PLUGINS = ["PNG", "JPEG", "BMP", "TIFF"]  # PIL plugin ids tried (JPEG also yields MPO)

# Formats PIL may not be built to open, recognised by signature only to say "415" clearly.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (8, b"WEBP", "WEBP"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"%PDF", "PDF"),
    (0, b"PK\x03\x04", "ZIP"),
    (0, b"\x1f\x8b", "GZIP"),
)

MAP_CHOICES = ("none", "png")
QUERY_PARAMS = ("map",)


class RequestError(Exception):
    """A client error: HTTP `status`, a stable machine-readable `code` and a message."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def body(self) -> dict[str, str]:
        return error_body(self.code, self.detail)


def error_body(code: str, detail: str) -> dict[str, str]:
    """The one JSON error shape of the API."""
    return {"error": code, "detail": detail}


@dataclass(frozen=True)
class Limits:
    """What one request may send: body bytes and decoded pixels (width x height)."""

    max_bytes: int = 20 * MB
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"limits must be positive, got {self}")


@dataclass(frozen=True)
class Query:
    """The parsed query string of `POST /detect`."""

    map: str = "none"


def parse_query(items: Iterable[tuple[str, str]]) -> Query:
    """`?map=png|none` (default none); an unknown parameter is a 422, not silently ignored."""
    values: dict[str, str] = {}
    for key, value in items:
        if key not in QUERY_PARAMS:
            raise RequestError(
                422,
                "invalid_parameter",
                f"unknown query parameter {key!r}; valid: {', '.join(QUERY_PARAMS)}",
            )
        if key in values and values[key] != value:
            raise RequestError(422, "invalid_parameter", f"query parameter {key!r} given twice")
        values[key] = value
    choice = values.get("map", "none").strip().lower()
    if choice not in MAP_CHOICES:
        raise RequestError(
            422,
            "invalid_parameter",
            f"map={values['map']!r} is not supported; use map=png or map=none",
        )
    return Query(map=choice)


# ---------------------------------------------------------------------------- body
async def read_body(
    chunks: AsyncIterable[bytes], content_length: str | None, max_bytes: int
) -> bytes:
    """Read a request body, refusing (413) as soon as it is known to exceed `max_bytes`:
    from the Content-Length header if sent, else while streaming, so an oversized upload is
    never held in memory whole."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, "bad_request", "Content-Length is not a number") from None
        if declared > max_bytes:
            raise _too_many_bytes(declared, max_bytes)
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise _too_many_bytes(total, max_bytes, at_least=True)
        parts.append(chunk)
    return b"".join(parts)


def _too_many_bytes(size: int, max_bytes: int, at_least: bool = False) -> RequestError:
    more = "at least " if at_least else ""
    return RequestError(
        413,
        "body_too_large",
        f"request body is {more}{size} bytes; this server accepts at most {max_bytes} bytes "
        f"({max_bytes / MB:g} MiB)",
    )


def is_multipart(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";")[0].strip().lower() == (
        "multipart/form-data"
    )


async def image_from_multipart(body: bytes, content_type: str, field: str = "image") -> bytes:
    """The bytes of multipart field `field` (a file part or a plain field)."""
    from starlette.requests import Request

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "query_string": b"",
        "headers": [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    request = Request(scope, receive)
    try:
        form = await request.form(max_files=4, max_fields=16)
    except Exception as exc:  # starlette's MultiPartException, a bad boundary, ...
        raise RequestError(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from exc
    try:
        if field not in form:
            names = ", ".join(repr(k) for k in form.keys()) or "none"
            raise RequestError(
                400,
                "missing_image",
                f"multipart body has no field {field!r} (fields sent: {names}); send the "
                f"image as -F {field}=@file.png",
            )
        value = form[field]
        if isinstance(value, str):
            return value.encode("utf-8")
        return await value.read()
    finally:
        await form.close()


# ---------------------------------------------------------------------------- decoding
def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> a fully decoded PIL image of an allowed format, within `limits`.

    Raises `RequestError`: 400 empty or undecodable, 413 too many bytes or pixels (checked on
    the header before decoding, see `pixel_cap`; PIL's DecompressionBombError, and its warning
    if warnings are errors, are 413s too), 415 a
    format outside PNG/JPEG/BMP/TIFF or not an image at all.
    """
    if not data:
        raise RequestError(
            400, "empty_body", "the request body is empty; send the image bytes or field 'image'"
        )
    if len(data) > limits.max_bytes:
        raise _too_many_bytes(len(data), limits.max_bytes)
    try:
        img = _open(data, _OPEN_PLUGINS, limits.max_pixels)
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    fmt = img.format or "?"
    if fmt not in ALLOWED_FORMATS:
        img.close()
        raise RequestError(
            415,
            "unsupported_media_type",
            f"{fmt} images are not supported; send {', '.join(ALLOWED_NAMES)}",
        )
    width, height = img.size
    cap = pixel_cap(limits)
    if width * height > cap:
        img.close()
        raise _too_many_pixels(width, height, cap)
    if width < 1 or height < 1:
        img.close()
        raise RequestError(400, "undecodable_image", f"the image has no pixels ({width}x{height})")
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        img.close()
        raise _bomb(exc, limits.max_pixels) from exc
    except Exception as exc:  # truncated data, bad chunk CRC, broken huffman tables, ...
        img.close()
        raise RequestError(
            400,
            "undecodable_image",
            f"cannot decode this {ALLOWED_FORMATS.get(fmt, fmt)} image: {exc}",
        ) from exc
    return img


def pixel_cap(limits: Limits) -> int:
    """The pixel limit applied: ours, and never above PIL's decompression-bomb threshold
    (`Image.MAX_IMAGE_PIXELS`, where PIL starts to warn). Comparing the header size with it
    here, rather than turning PIL's warning into an error with `warnings` filters (process-wide
    state, racy across the decode threads), makes every bomb a 413 deterministically."""
    pil = Image.MAX_IMAGE_PIXELS
    return limits.max_pixels if pil is None else min(limits.max_pixels, int(pil))


def _open(data: bytes, formats: list[str] | None, max_pixels: int) -> Image.Image:
    """`Image.open` (header only) with PIL's bomb check as a 413 and any parse error a 400."""
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, max_pixels) from exc
    except Exception as exc:  # a header a plugin recognised but could not parse
        raise RequestError(
            400, "undecodable_image", f"cannot read the image header: {exc}"
        ) from exc


def _bomb(exc: Exception, max_pixels: int) -> RequestError:
    """PIL's own decompression-bomb guard fired (its limit may sit below ours)."""
    return RequestError(
        413,
        "too_many_pixels",
        f"the image is too large to decode safely ({exc}); this server accepts at most "
        f"{max_pixels} pixels",
    )


def _unidentified(data: bytes) -> RequestError:
    """Not one of the allowed formats: name it when possible (415), else undecodable (400)."""
    other = _other_format(data)
    if other is not None:
        return RequestError(
            415,
            "unsupported_media_type",
            f"{other} images are not supported; send {', '.join(ALLOWED_NAMES)}",
        )
    if _looks_like_text(data):
        return RequestError(
            415,
            "unsupported_media_type",
            f"the body is text, not an image; send {', '.join(ALLOWED_NAMES)} bytes "
            "(with curl: --data-binary @file.png, not -d)",
        )
    return RequestError(
        400,
        "undecodable_image",
        f"the body is not a decodable image (expected {', '.join(ALLOWED_NAMES)})",
    )


def _other_format(data: bytes) -> str | None:
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    try:  # any other format this PIL knows; only the header is read, never decoded
        with Image.open(io.BytesIO(data)) as img:
            return img.format or "this"
    except Exception:
        return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:4096]
    if b"\x00" in sample:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _too_many_pixels(width: int, height: int, max_pixels: int) -> RequestError:
    return RequestError(
        413,
        "too_many_pixels",
        f"the image is {width}x{height} = {width * height} pixels; this server accepts at most "
        f"{max_pixels} ({max_pixels / 1e6:g} Mpx)",
    )


# ---------------------------------------------------------------------------- model input
@dataclass
class Prepared:
    """The model input of one upload and the size of the upright image it came from."""

    tensor: torch.Tensor  # [3, S, S]
    width: int
    height: int
    format: str


def prepare(img: Image.Image, size: int) -> Prepared:
    """Decoded image -> model input via `to_rgb`/`pil_to_tensor` (EXIF orientation, grayscale,
    alpha, 16-bit), the exact path `larp predict` and evaluation use. `width`/`height` are
    those of the upright image, the frame the anomaly map is drawn in."""
    fmt = ALLOWED_FORMATS.get(img.format or "", img.format or "?")
    try:
        rgb = to_rgb(img)
        tensor = pil_to_tensor(rgb, size)
    except Exception as exc:  # a mode PIL cannot convert, broken EXIF, ...
        raise RequestError(
            400, "undecodable_image", f"cannot convert this {fmt} image to RGB: {exc}"
        ) from exc
    finally:
        img.close()
    return Prepared(tensor=tensor, width=rgb.width, height=rgb.height, format=fmt)


def decode_request_image(data: bytes, limits: Limits, size: int) -> Prepared:
    """`decode_image` then `prepare`: what the server runs on every upload."""
    return prepare(decode_image(data, limits), size)


# ---------------------------------------------------------------------------- response
def heatmap_base64(anomaly_map: np.ndarray | torch.Tensor, width: int, height: int) -> str:
    """Base64 PNG of the heat map (absolute 0..1 colour scale) at the upload's size."""
    image = heatmap_png(anomaly_map)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3)
    return base64.b64encode(out.getvalue()).decode("ascii")


def decode_heatmap(b64: str) -> Image.Image:
    """The heat map PNG of a response back as an RGB image (what clients do)."""
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
