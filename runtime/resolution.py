"""An image size, `Resolution(width, height)` in pixels, with the one spelling every module and file uses:
WIDTHxHEIGHT (`512x768` is 512 wide, 768 high), as in the API's model list and the artifact folders."""

from __future__ import annotations

from typing import NamedTuple

from .errors import InvalidRequestError

VAE_SCALE = 8
SMALLEST_SIDE = 64


class Resolution(NamedTuple):
    """Width and height in pixels, both multiples of VAE_SCALE (one latent pixel is 8x8 image pixels)."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str, param: str = "resolution") -> Resolution:
        """'WIDTHxHEIGHT' -> Resolution; a malformed or unbuildable size is an InvalidRequestError on `param`."""
        try:
            width, height = (int(v) for v in text.lower().split("x"))
        except ValueError as exc:
            raise InvalidRequestError(f"{param} must look like 512x768, width x height (got {text!r})",
                                      param=param) from exc
        if width % VAE_SCALE or height % VAE_SCALE or min(width, height) < SMALLEST_SIDE:
            raise InvalidRequestError(
                f"{param} sides must be multiples of {VAE_SCALE}, at least {SMALLEST_SIDE} (got {text})", param=param)
        return cls(width, height)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def latent(self) -> tuple[int, int]:
        """(rows, columns) of the latent image, the UNet's spatial shape."""
        return self.height // VAE_SCALE, self.width // VAE_SCALE
