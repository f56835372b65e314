"""Image bytes in and out of the API: base64 (raw or data URL) decoding with a pixel limit, and encoding."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from .errors import InvalidRequestError

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
ACCEPTED = tuple(FORMATS.values())


def decode_image(data: str, param: str, max_pixels: int) -> Image.Image:
    """Decode a base64 PNG, JPEG or WebP image (line breaks allowed, as the `base64` tool writes them); its
    format and size are checked from the header before any pixel is decoded. Only those three parsers ever
    see the bytes: Pillow's others (dozens, some rarely exercised) are never tried on a client's upload."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError("is not valid base64", param=param) from exc
    try:
        img = Image.open(io.BytesIO(raw), formats=ACCEPTED)
    except Exception as exc:  # Pillow raises many types for bytes that are no image it knows
        other = sniffed_format(raw)
        if other is not None:
            raise InvalidRequestError(f"is a {other} image; send PNG, JPEG or WebP", param=param) from exc
        raise InvalidRequestError("is not a PNG, JPEG or WebP image", param=param) from exc
    width, height = img.size
    if width * height > max_pixels:
        raise InvalidRequestError(f"image is {width}x{height}, over the limit of {max_pixels} pixels", param=param)
    try:
        img.load()
        return img.convert("RGB")
    except Exception as exc:  # a truncated or corrupt file fails only when its pixels are decoded
        raise InvalidRequestError(f"is a damaged {img.format} image ({type(exc).__name__})", param=param) from exc


def sniffed_format(raw: bytes) -> str | None:
    """The name of the refused image format whose signature `raw` starts with, for the error message: only
    Pillow's signature checks (a comparison of the first bytes) run, never a parser."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if name not in ACCEPTED and accept is not None and accept(raw[:64]):
                return name
        except Exception:  # a signature check that cannot read this prefix says "no"
            continue
    return None


def encode_image(img: Image.Image, fmt: str) -> str:
    """Base64 of the image in the requested format (png, jpeg, webp)."""
    buf = io.BytesIO()
    img.save(buf, format=FORMATS[fmt])
    return base64.b64encode(buf.getvalue()).decode()
