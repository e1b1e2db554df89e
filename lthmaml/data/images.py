"""Image decoding for the torch side: :mod:`lthmaml.data.decode`'s one implementation, and files as
tensors.

The look, the squaring, the resizing and the normalisation live in :mod:`lthmaml.data.decode`
(numpy and Pillow only), which ``lthmaml-device`` calls without torch; meta-training and
``lthmaml-edge`` reach it through this module, so what meta-training decoded is what either
device path decodes, bit for bit. Device code imports this module: it must stay free of training
code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from lthmaml.data.decode import (  # noqa: F401  (the readers' names, defined once in decode)
    COLOUR_SPREAD,
    HARMLESS,
    IMAGE_SUFFIXES,
    LOOKS,
    MIN_STD,
    Decoded,
    DecodeTally,
    Look,
    Normalization,
    channels,
    decode_file,
    decode_image,
    how_squared,
    model_look,
    unreadable_reason,
    visible,
)

IMAGE_LOOK = "image_look"
"""The key of an image DataModule's checkpoint state holding its ``look`` and ``normalization``,
which ``lthmaml-export`` copies into the artifact's metadata for the device."""


def read_image(
    path: Union[str, Path],
    image_size: int = 28,
    look: Look = "ink",
    normalization: Optional[Normalization] = None,
) -> Tensor:
    """One image file as the net sees it: float ``[C, image_size, image_size]`` (``ink``: ink 1.0,
    paper 0.0), normalised as meta-training did."""
    pixels = torch.from_numpy(decode_file(Path(path), image_size, look).pixels)
    return (normalization or Normalization.identity(look)).apply(pixels)
