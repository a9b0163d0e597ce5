"""What one request may hold, and turning its bytes into pictures without ever touching a path.

A limit that a request passes is answered as a whole (413, or 400 for a malformed request) with a
JSON error naming the limit's flag; an input that is merely undecodable gives that input an error
and the rest of the request goes on. Inputs are bytes only (multipart files, base64 strings):
nothing a client sends is ever opened as a server-side path or fetched as an address.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from navit.media.image import load_rgb


@dataclass(frozen=True)
class ServeLimits:
    """The bounds of one server; each is a ``navit serve`` flag of the same name."""

    max_body_mb: float = 32.0  # request body, in MiB
    max_pixels: int = 40_000_000  # width x height of one image (or clip frame)
    max_images: int = 64  # inputs in one request
    max_frames: int = 64  # frames of one clip, as its container reports them
    max_queue: int = 512  # images queued or in a forward, over all requests; more answer 503

    def __post_init__(self) -> None:
        for name in ("max_body_mb", "max_pixels", "max_images", "max_frames", "max_queue"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class ServeError(Exception):
    """An error answered to the whole request: ``status``, a one-line message and its ``cause``
    (the limit's flag, such as ``max-pixels``, or a word such as ``bad-request``)."""

    def __init__(self, status: int, cause: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.cause, self.message, self.headers = status, cause, message, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.cause, "status": self.status}}


def too_large(limit: str, message: str) -> ServeError:
    """A 413 naming the flag ``--limit`` that bounds it."""
    return ServeError(413, limit, f"{message}; the server's limit is --{limit}")


def bad_request(message: str) -> ServeError:
    return ServeError(400, "bad-request", message)


def from_base64(text: Any, what: str) -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix allowed); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not base64 (inputs are the file's bytes in base64, never a path or URL)") from None


def check_pixels(data: bytes, name: str, limits: ServeLimits) -> None:
    """Raise a 413 if the image's header promises more than ``max_pixels``; undecodable data is
    left for :func:`decode_image` to report on its own item."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return
    if width * height > limits.max_pixels:
        raise too_large("max-pixels", f"{name} is {width}x{height} = {width * height} pixels")


def decode_image(data: bytes, name: str) -> Image.Image:
    """An RGB picture from an image file's bytes, as files are read in training (EXIF turns,
    transparency on grey); ValueError naming the input when they are not an image."""
    try:
        return load_rgb(data, name=name)
    except (ValueError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(str(error)) from None
