"""Image bytes in and out of the API: base64 (raw or data URL) decoding with a pixel limit, and encoding."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequestError

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def decode_image(data: str, param: str, max_pixels: int) -> Image.Image:
    """Decode a base64 image; its size is checked from the header before any pixel is decoded."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError("is not valid base64", param=param) from exc
    try:
        img = Image.open(io.BytesIO(raw))
        width, height = img.size
        if width * height > max_pixels:
            raise InvalidRequestError(f"image is {width}x{height}, over the limit of {max_pixels} pixels",
                                      param=param)
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(f"is not a readable image ({exc})", param=param) from exc


def encode_image(img: Image.Image, fmt: str) -> str:
    """Base64 of the image in the requested format (png, jpeg, webp)."""
    buf = io.BytesIO()
    img.save(buf, format=FORMATS[fmt])
    return base64.b64encode(buf.getvalue()).decode()
