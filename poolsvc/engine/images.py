"""Image inputs: checked, decoded and preprocessed off the event loop, before anything queues."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from poolsvc.engine.errors import InvalidInputError, OverloadedError, TooLargeError, quoted

# The MIME types that name the formats served.
_MIME = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


@dataclass(frozen=True)
class ImageInput:
    """An encoded image (PNG, JPEG or WebP bytes), or an already decoded PIL image (offline)."""

    data: Any
    mime_type: str = ""


def sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(image: ImageInput, index: int, max_bytes: int | None, max_pixels: int | None):
    """The RGB PIL image of input `index`; limits are checked before the pixels are decoded
    (a few kilobytes of PNG can claim gigapixels: a decompression bomb)."""
    from PIL import Image

    if isinstance(image.data, Image.Image):
        picture = image.data
        _check_pixels(picture.size, index, max_pixels)
        return picture.convert("RGB")
    data = bytes(image.data)
    if not data:
        raise InvalidInputError(f"input {index} is an empty image")
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLargeError(f"input {index} is a {len(data)}-byte image, more than the server's "
                              f"limit of {max_bytes} bytes (--max-image-bytes)")
    kind = sniff(data)
    if kind is None:
        raise InvalidInputError(f"input {index} is not a PNG, JPEG or WebP image")
    if image.mime_type:
        named = _MIME.get(image.mime_type.lower())
        if named is None:
            raise InvalidInputError(f"input {index} has MIME type {quoted(image.mime_type)}; "
                                    "supported: image/png, image/jpeg, image/webp")
        if named != kind:
            raise InvalidInputError(f"input {index} is labelled {image.mime_type} but its bytes "
                                    f"are {kind}")
    try:
        picture = Image.open(io.BytesIO(data), formats=[kind])  # reads the header only
        _check_pixels(picture.size, index, max_pixels)
        picture.load()
        return picture.convert("RGB")
    except (InvalidInputError, OverloadedError):
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard, far above ours, fired first
        raise TooLargeError(f"input {index} claims far too many pixels (a decompression "
                              f"bomb; --max-image-pixels): {exc}") from None
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        raise InvalidInputError(f"input {index}: the {kind} image is corrupt or truncated "
                                f"({exc})") from None


def _check_pixels(size: tuple[int, int], index: int, max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise TooLargeError(f"input {index} is a {width}x{height} image, more than the server's "
                              f"limit of {max_pixels} pixels (--max-image-pixels)")
    if width < 1 or height < 1:
        raise InvalidInputError(f"input {index} is an image with no pixels")
