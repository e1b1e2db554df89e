"""Image decoding shared by every reader, in numpy and Pillow only: what meta-training saw is what
the device sees.

A *look* says how a file becomes the net's input, and travels from meta-training (the DataModule's
``look``) through the checkpoint into the exported artifact, which the device decodes by:

* ``ink`` (Omniglot): grayscale and inverted, ink 1.0 on paper 0.0; a non-square image is padded
  with paper to a square, keeping a glyph's proportions;
* ``gray``: grayscale photos as they are (white 1.0); ``rgb``: three colour channels. A non-square
  photo is centre-cropped to a square (the object keeps filling the frame and no border appears
  for the net to learn; mini-ImageNet's images are square already).

Every look flattens alpha onto white paper, scales 16-bit grays (``convert("L")`` would clip
them), applies EXIF rotation, then resizes with LANCZOS to ``image_size`` squared as the MAML
reference code does. The float input is ``pixels / 255``, less a per-channel mean and over a std
(:class:`Normalization`, computed on the meta-train images; Omniglot has none).

This module is the one implementation: meta-training, ``lthmaml-edge`` (through
:mod:`lthmaml.data.images`) and ``lthmaml-device`` (which loads no torch) all call it, so the
three see the same float32 input, bit for bit. It must import neither torch nor training code.
"""

from __future__ import annotations

import io
import math
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, get_args

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from lthmaml.errors import DataError

Look = Literal["ink", "gray", "rgb"]
LOOKS: tuple[str, ...] = get_args(Look)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""What is read as an image; other files (notes, thumbnails' databases) are ignored."""
COLOUR_SPREAD = 16
"""A file is in colour when some pixel's channels differ by more than this (of 255): a gray photo
saved as an RGB JPEG stays within a few levels."""
MIN_STD = 1 / 255
"""The floor of a normalisation std, so a constant channel does not divide by zero."""

_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_GRAY_MODES = ("1", "L", "LA", "La", "F", *_SIXTEEN_BIT)


def visible(name: str) -> bool:
    """Not a hidden file or a macOS archive's metadata."""
    return not name.startswith((".", "__MACOSX"))


def channels(look: str) -> int:
    return 3 if look == "rgb" else 1


def how_squared(look: str) -> str:
    """How a non-square image becomes square in ``look``, for log lines."""
    return "padded square with paper" if look == "ink" else "centre-cropped square"


class Decoded(NamedTuple):
    """One decoded file, with what the readers need to say what converting it did."""

    pixels: np.ndarray  # uint8 [C, image_size, image_size]: C = channels(look)
    mode: str  # the file's PIL mode ("RGB", "L", "P", ...)
    size: tuple[int, int]  # the file's width and height, EXIF rotation applied
    colour: bool  # its channels differ: a gray or ink look drops its colour
    warning: str = ""  # the first of Pillow's warnings on this file that may matter (see HARMLESS)


HARMLESS = re.compile(
    r"EXIF|XMP|Tag |tag |Truncated File Read|Metadata Warning|MPO|Palette images with Transparency|"
    r"palette entry for transparency|APNG"
)
"""Pillow's warnings about a file's metadata (a damaged EXIF block, a skipped TIFF tag, an MPO read
as its base JPEG, a palette's transparency, which every look flattens onto white anyway): the
pixels decode as they are, so they are not shown. Pillow's decompression-bomb warning for a large
photo is dropped too: it is resized to ``image_size``. Others are said once per set of files."""


_IN_MEMORY = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def unreadable_reason(error: BaseException) -> str:
    """Why a file could not be decoded, in one line without Pillow's ``<_io.BytesIO object at ...>``
    (the file is named beside it)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can read"
    text = " ".join(_IN_MEMORY.sub("", str(error)).split())
    return text or type(error).__name__


def _on_white(image: Image.Image) -> Optional[Image.Image]:
    """An image with alpha flattened onto opaque white paper (RGBA); None without alpha."""
    if "A" not in image.mode and "a" not in image.mode and "transparency" not in image.info:
        return None
    paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
    paper.alpha_composite(image.convert("RGBA"))
    return paper


def _grayscale(image: Image.Image) -> Image.Image:
    """8-bit ``L`` with ink dark."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    return (_on_white(image) or image).convert("L")


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit ``RGB``, alpha on white; a gray file gets its gray in every channel."""
    if image.mode in _GRAY_MODES:
        return _grayscale(image).convert("RGB")
    return (_on_white(image) or image).convert("RGB")


def _in_colour(rgb: Image.Image) -> bool:
    red, green, blue = rgb.split()
    pairs = ((red, green), (green, blue), (red, blue))
    return any(ImageChops.difference(a, b).getextrema()[1] > COLOUR_SPREAD for a, b in pairs)


def _square(image: Image.Image, look: str) -> Image.Image:
    if image.width == image.height:
        return image
    if look != "ink":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side))
    side = max(image.size)
    square = Image.new("L", (side, side), 255)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def decode_image(data: bytes, image_size: int, look: Look = "ink") -> Decoded:
    """Image bytes as the net sees them in ``look`` (uint8; ink 255 for ``ink``). Pillow's warnings
    are not printed: see :data:`HARMLESS`; the first other one is kept in ``Decoded.warning``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(io.BytesIO(data)) as file:
            image = ImageOps.exif_transpose(file)
            mode, size = file.mode, image.size
            colour_view = None if mode in _GRAY_MODES else _rgb(image)
            colour = colour_view is not None and _in_colour(colour_view)
            if look == "rgb":
                picture = colour_view if colour_view is not None else _rgb(image)
            else:
                picture = _grayscale(image)
    said = (
        str(w.message)
        for w in caught
        if not issubclass(w.category, Image.DecompressionBombWarning) and not HARMLESS.search(str(w.message))
    )
    warning = " ".join(next(said, "").split())
    picture = _square(picture, look)
    if picture.size != (image_size, image_size):
        picture = picture.resize((image_size, image_size), Image.Resampling.LANCZOS)
    array = np.array(picture, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    if look == "ink":
        array = 255 - array
    pixels = array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
    return Decoded(pixels, mode, size, colour, warning)


@dataclass
class DecodeTally:
    """What decoding a set of files met, so that each kind of conversion is said once."""

    look: str
    image_size: int
    sizes: set[tuple[int, int]] = field(default_factory=set)
    modes: set[str] = field(default_factory=set)
    total: int = 0
    colour: int = 0
    first_colour: str = ""
    first_gray: str = ""
    warned: int = 0
    first_warning: str = ""

    def add(self, name: str, decoded: Decoded) -> None:
        self.sizes.add(decoded.size)
        self.modes.add(decoded.mode)
        self.total += 1
        self.colour += decoded.colour
        if decoded.colour and not self.first_colour:
            self.first_colour = name
        elif not decoded.colour and not self.first_gray:
            self.first_gray = name
        if decoded.warning:
            self.warned += 1
            self.first_warning = self.first_warning or f"{name}: {decoded.warning}"

    def notes(self, where: str) -> list[str]:
        """One line per conversion: sizes or modes made uniform, colour dropped, gray repeated."""
        notes, side = [], self.image_size
        sizes = sorted(self.sizes, key=lambda size: (size[0] * size[1], size))
        if len(sizes) > 1 or len(self.modes) > 1 or any(width != height for width, height in sizes):
            shown = " to ".join(dict.fromkeys("x".join(map(str, size)) for size in (sizes[0], sizes[-1])))
            notes.append(
                f"{where}: images of {len(sizes)} size(s) ({shown}) and mode(s) "
                f"{', '.join(sorted(self.modes))} are each decoded as {self.look} {side}x{side} "
                f"({how_squared(self.look)})"
            )
        if self.look != "rgb" and self.colour:
            notes.append(
                f"{where}: {self.colour} of {self.total} images are in colour (first {self.first_colour}) "
                f"and look {self.look!r} converts them to grayscale: their colour is not used (look 'rgb' "
                "keeps it)"
            )
        gray = self.total - self.colour
        if self.look == "rgb" and gray:
            notes.append(
                f"{where}: {gray} of {self.total} images are gray (first {self.first_gray}) and look 'rgb' "
                "converts them to colour, the gray repeated in the three channels"
            )
        if self.warned:
            notes.append(
                f"{where}: Pillow warned while decoding {self.warned} of {self.total} images (first "
                f"{self.first_warning}): check that they show what they should"
            )
        return notes


def decode_file(path: Path, image_size: int, look: Look = "ink") -> Decoded:
    """One image file decoded in ``look``; an unreadable one is a DataError naming it."""
    try:
        return decode_image(path.read_bytes(), image_size, look)
    except Exception as error:  # any decoder failure (OSError, SyntaxError, zlib, bombs) = unreadable
        reason = unreadable_reason(error)
        raise DataError(f"cannot read image {path} ({reason}): replace or delete the file") from None


# ---------------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class Normalization:
    """The per-channel ``(pixels / 255 - mean) / std`` of the net's input. Meta-training computes
    it on the meta-train images; the checkpoint and the artifact carry it to the device."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def identity(cls, look: str = "ink") -> Normalization:
        return cls((0.0,) * channels(look), (1.0,) * channels(look))

    @classmethod
    def of(cls, pixels: Any, chunk: int = 1024) -> Normalization:
        """Mean and std of each channel of uint8 ``[images, C, H, W]`` (a numpy array or a CPU
        tensor), summed in float64 a chunk at a time (mini-ImageNet's meta-train is 38,400 images)."""
        pixels = np.asarray(pixels)
        sums = np.zeros(pixels.shape[1], dtype=np.float64)
        squares = np.zeros_like(sums)
        for start in range(0, len(pixels), chunk):
            x = pixels[start : start + chunk].astype(np.float64) / 255.0
            sums += x.sum((0, 2, 3))
            squares += np.square(x).sum((0, 2, 3))
        count = max(len(pixels) * pixels.shape[2] * pixels.shape[3], 1)
        mean = sums / count
        std = np.maximum(np.sqrt(np.maximum(squares / count - np.square(mean), 0)), MIN_STD)
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    def __str__(self) -> str:
        return f"mean {[round(m, 4) for m in self.mean]}, std {[round(s, 4) for s in self.std]}"

    @property
    def is_identity(self) -> bool:
        return all(m == 0.0 for m in self.mean) and all(s == 1.0 for s in self.std)

    def apply(self, pixels: Any) -> Any:
        """uint8 ``[..., C, H, W]`` pixels as the net's float32 input, by one float32 arithmetic for
        every reader: a numpy array gives a numpy array (the device), a CPU torch tensor gives a
        tensor (training and ``lthmaml-edge``, which hold their pixels as tensors)."""
        x = np.asarray(pixels).astype(np.float32) / np.float32(255.0)
        if not self.is_identity:
            mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
            x = (x - mean) / std
        if isinstance(pixels, np.ndarray):
            return x
        return sys.modules["torch"].from_numpy(x)  # a tensor came in, so torch is loaded

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def parse(cls, values: Optional[Mapping[str, Any]], look: str) -> Normalization:
        """From ``to_dict``'s form (None: the identity); ValueError saying what is wrong."""
        if values is None:
            return cls.identity(look)
        if not isinstance(values, Mapping) or set(values) != {"mean", "std"}:
            raise ValueError(f"normalization must be {{mean, std}}, got {values!r}")
        mean, std = values["mean"], values["std"]
        for name, numbers in (("mean", mean), ("std", std)):
            if not isinstance(numbers, (list, tuple)) or len(numbers) != channels(look):
                raise ValueError(f"normalization {name} must hold {channels(look)} numbers for look {look!r}")
            if any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                for v in numbers
            ):
                raise ValueError(f"normalization {name} must be finite numbers, got {numbers!r}")
        if any(v <= 0 for v in std):
            raise ValueError(f"normalization std must be > 0, got {std!r}")
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def model_look(
    look: Optional[str], normalization: Optional[Mapping[str, Any]], in_channels: Optional[int]
) -> tuple[Look, Normalization]:
    """The look and normalisation an artifact's net was meta-trained with, as a :class:`Look` and
    a :class:`Normalization`. Artifacts written before looks have neither: a 3-channel net is
    ``rgb``, any other ``ink`` (all there was); ValueError for a look the net cannot take."""
    if look is None:
        look = "rgb" if in_channels == 3 else "ink"
    if look not in LOOKS:
        raise ValueError(f"look must be one of {', '.join(LOOKS)}, got {look!r}")
    if in_channels is not None and in_channels != channels(look):
        raise ValueError(
            f"look {look!r} gives {channels(look)} channels but the net takes in_channels={in_channels}"
        )
    return look, Normalization.parse(normalization, look)
