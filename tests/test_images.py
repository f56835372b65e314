"""Images in the API: base64 as tools write it, only PNG, JPEG and WebP, and every bad file a clear 400."""

import base64
import io

import pytest
from PIL import Image

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.images import decode_image

LIMIT = 4096 * 4096


def encoded(fmt: str, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_even_with_line_breaks(fmt):
    wrapped = base64.encodebytes(encoded(fmt, (200, 120))).decode()
    assert "\n" in wrapped.strip(), "the `base64` tool's layout: 76-character lines"
    image = decode_image(wrapped, "image", LIMIT)
    assert image.size == (200, 120) and image.mode == "RGB"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt):
    with pytest.raises(InvalidRequestError) as caught:
        decode_image(base64.b64encode(encoded(fmt)).decode(), "image", LIMIT)
    assert caught.value.param == "image" and f"is a {fmt} image; send PNG, JPEG or WebP" in caught.value.message


@pytest.mark.parametrize(("payload", "says"), [
    (b"hello world, not an image", "is not a PNG, JPEG or WebP image"),
    (encoded("PNG", (300, 300))[:200], "is a damaged PNG image"),
    (encoded("JPEG", (300, 300))[:700], "is a damaged JPEG image"),
    (encoded("JPEG", (300, 300))[:100], "is not a PNG, JPEG or WebP image"),
])
def test_unreadable_files_are_a_clear_error_without_python_reprs(payload, says):
    with pytest.raises(InvalidRequestError) as caught:
        decode_image(base64.b64encode(payload).decode(), "init_image", LIMIT)
    assert caught.value.param == "init_image" and says in caught.value.message
    assert "<_io" not in caught.value.message and "object at 0x" not in caught.value.message


def test_only_the_png_jpeg_and_webp_parsers_ever_see_an_upload():
    """A parser registered with Pillow (as every one of its dozens of plugins is) whose signature matches the
    upload is never run: Image.open is limited to the three accepted formats."""
    from PIL import ImageFile

    opened = []

    class Spy(ImageFile.ImageFile):
        format = "SPY"

        def _open(self) -> None:
            opened.append(self.fp.read(8))
            self._size = (1, 1)
            self._mode = "RGB"
            self.tile = []

    Image.register_open("SPY", Spy, lambda prefix: prefix.startswith(b"SPYIMAGE"))
    try:
        with pytest.raises(InvalidRequestError) as caught:
            decode_image(base64.b64encode(b"SPYIMAGE" + bytes(64)).decode(), "image", LIMIT)
    finally:
        Image.OPEN.pop("SPY")
        Image.ID.remove("SPY")
    assert opened == [] and "is a SPY image; send PNG, JPEG or WebP" in caught.value.message
