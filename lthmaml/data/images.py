"""Image decoding shared by every reader: what meta-training saw is what the device sees.

Omniglot is black ink on white paper; the nets see ink 1.0 on paper 0.0, at ``image_size``
squared. Files from elsewhere (a phone's camera roll, a scanner) come in other modes and shapes:
alpha is flattened onto white paper, 16-bit grays are scaled (``convert("L")`` would clip them),
EXIF rotation is applied, and non-square images are padded with paper to a square, keeping a
glyph's proportions, before the LANCZOS resize of the MAML reference code.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _grayscale(image: Image.Image) -> Image.Image:
    """8-bit ``L`` with ink dark."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        paper.alpha_composite(image.convert("RGBA"))
        return paper.convert("L")
    return image.convert("L")


def _square(gray: Image.Image) -> Image.Image:
    if gray.width == gray.height:
        return gray
    side = max(gray.size)
    square = Image.new("L", (side, side), 255)
    square.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
    return square


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Image bytes to an ``[image_size, image_size]`` uint8 array with ink 255."""
    with Image.open(io.BytesIO(data)) as image:
        gray = _square(_grayscale(ImageOps.exif_transpose(image)))
    if gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(gray, dtype=np.uint8)
