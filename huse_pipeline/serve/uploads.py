"""Uploaded query images, refused unless safe: the request body is capped while it streams in (an
ASGI middleware, so an oversized upload is never read whole), and what arrives must decode with
PIL as one of a few ordinary image formats within a pixel budget (decompression bombs)."""
from __future__ import annotations

import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MULTIPART_SLACK = 64 << 10  # the multipart envelope around the file: boundaries, headers, small fields


class UploadRefused(Exception):
    """An upload that is not served: the HTTP status (413 or 415) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def open_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """The bytes of an uploaded file -> a decoded PIL image, or `UploadRefused`: 413 when over
    `max_bytes` or `max_pixels`, 415 when it is not a fully decodable image of UPLOAD_FORMATS."""
    if len(data) > max_bytes:
        raise UploadRefused(413, f"the image is larger than the {_mb(max_bytes)} limit")
    if not data:
        raise UploadRefused(415, "the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise UploadRefused(415, "the upload is not an image (JPEG, PNG, WebP, GIF or BMP)") from exc
        raise UploadRefused(413, "the image has too many pixels") from exc
    except Exception as exc:  # a broken header fails a format plugin in many ways
        raise UploadRefused(415, "the upload is not a readable image") from exc
    if im.format not in UPLOAD_FORMATS:
        raise UploadRefused(415, f"{im.format} images are not accepted; use JPEG, PNG, WebP, GIF or BMP")
    w, h = im.size
    if w * h > max_pixels:
        raise UploadRefused(413, f"the image is too large ({w} x {h} > {max_pixels} pixels)")
    try:
        im.load()  # decoding all of it is the verification: a truncated or corrupt file fails here
    except Exception as exc:
        raise UploadRefused(415, "the image is truncated or corrupt") from exc
    return im


def _mb(n: int) -> str:
    return f"{n / (1 << 20):g} MB"


class BodyLimit:
    """ASGI middleware: POST bodies to `paths` over `max_bytes` (+ the multipart envelope) get 413,
    from the Content-Length header before anything is read, or as soon as the streamed bytes exceed it."""

    def __init__(self, app: Any, max_bytes: int, paths: tuple[str, ...]) -> None:
        self.app = app
        self.limit = max_bytes + MULTIPART_SLACK
        self.max_bytes = max_bytes
        self.paths = paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        seen = 0

        async def capped_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, f"the upload is larger than the {_mb(self.max_bytes)} limit")
            return message

        await self.app(scope, capped_receive, send)

    async def _refuse(self, send: Any) -> None:
        import json

        body = json.dumps({"error": f"the upload is larger than the {_mb(self.max_bytes)} limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
