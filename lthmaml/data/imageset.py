"""Classes of image files for meta-training: finding them, decoding them once, splitting them.

What every reader (Omniglot's zips and folders, a class folder, mini-ImageNet's CSVs) shares:
files are :class:`ImageFile` lists per class; decoding (a progress bar on stderr for thousands of
images; mixed sizes, modes and colour said in a warning) gives uint8 pixels in the reader's look.
The result is cached twice: in memory per process, and on disk as a ``torch.save`` of uint8
tensors, counts and strings (loaded with ``weights_only=True``, never pickle), keyed by a digest
of the file list with sizes and CRCs or mtimes, the image size and the look. Class splits are a
seeded permutation of the classes (or of Omniglot's alphabets).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch
from PIL.Image import DecompressionBombError
from torch import Tensor

from lthmaml.data.images import DecodeTally, Look, channels, decode_image, unreadable_reason, visible
from lthmaml.data.tasks import SPLITS
from lthmaml.errors import ConfigError, DataError
from lthmaml.files import replacing

CACHE_ENV = "LTHMAML_CACHE"
CACHE_FORMAT = 1  # bump when the cached tensors change meaning (resampling, dtype, layout)
UNREADABLE = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    DecompressionBombError,
)
"""What a bad file raises while read or decoded (PIL's UnidentifiedImageError is an OSError)."""
PROGRESS_MIN = 1000
"""Decoding this many images or more shows a progress bar (on stderr)."""

SplitSpec = Sequence[Union[int, float]]
T = TypeVar("T")


@dataclass(frozen=True)
class ImageFile:
    """One image: a file under the root, or a member of a zip (``zip_path`` set)."""

    name: str  # path relative to the root, or the member name inside the zip
    size: int
    stamp: int  # CRC-32 in a zip, mtime in ns on disk: changes when the content does
    zip_path: Optional[Path] = None

    def describe(self, root: Path) -> str:
        """The file as a user finds it: ``root/a/c/x.png`` or ``zipname:member``."""
        return f"{self.zip_path}:{self.name}" if self.zip_path else str(root / self.name)


@dataclass(frozen=True)
class Reader:
    """Who reads a root: the name in its messages, its cache files' prefix, the fix of a bad file."""

    title: str  # "Omniglot": "cannot read Omniglot image ..."
    prefix: str  # cache files are <prefix>-<digest>.pt
    fix: str  # "replace or delete it"


@dataclass
class ClassPixels:
    """Decoded classes: ``pixels`` uint8 ``[images, C, H, W]``, class ``i`` the ``counts[i]`` rows
    from ``offsets[i]`` (classes may differ in size)."""

    pixels: Tensor
    counts: list[int]
    classes: list[str]

    @property
    def offsets(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int).tolist()

    def subset(self, indices: Sequence[int]) -> ClassPixels:
        """The classes ``indices`` (a view when they are consecutive, as a fixed split's are)."""
        offsets = self.offsets
        counts = [self.counts[i] for i in indices]
        consecutive = bool(indices) and list(indices) == list(range(indices[0], indices[0] + len(indices)))
        if consecutive:
            start = offsets[indices[0]]
            pixels = self.pixels[start : start + sum(counts)]
        else:
            rows = [torch.arange(offsets[i], offsets[i] + self.counts[i]) for i in indices]
            pixels = self.pixels[torch.cat(rows)] if rows else self.pixels[:0]
        return ClassPixels(pixels, counts, [self.classes[i] for i in indices])


# ---------------------------------------------------------------------------------- finding files
def scan_folder(
    base: Path, root: Path, depth: int, suffixes: Sequence[str], what: str
) -> dict[str, list[ImageFile]]:
    """``base/<d1>/.../<d_depth>/*<suffix>`` per class ``d1/.../d_depth``, sorted; an empty class
    folder is an error once any holds images (``what`` names them in the message: ``.png images``)."""
    classes: dict[str, list[ImageFile]] = {}
    empty: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        if level < depth:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir() and visible(p.name)):
                walk(sub, level + 1)
            return
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and visible(p.name))
        if not files:
            empty.append(folder)
            return
        stats = [p.stat() for p in files]
        classes[folder.relative_to(base).as_posix()] = [
            ImageFile(str(p.relative_to(root)), s.st_size, s.st_mtime_ns) for p, s in zip(files, stats)
        ]

    walk(base, 0)
    if classes and empty:
        raise DataError(f"class folder {empty[0]} holds no {what}: restore its images or remove it")
    return classes


def common_count(classes: dict[str, list[ImageFile]], root: Path, title: str) -> int:
    """The smallest class's image count, to which Omniglot truncates every class (with a warning)."""
    counts = {key: len(files) for key, files in classes.items()}
    examples = min(counts.values())
    if examples != max(counts.values()):
        smallest = min(counts, key=counts.get)
        warnings.warn(
            f"{title} classes under {root} have {examples} to {max(counts.values())} images; all are "
            f"truncated to {examples}, the count of {smallest}",
            stacklevel=3,
        )
    return examples


# ---------------------------------------------------------------------------------- decoding
def decode_all(
    root: Path, classes: dict[str, list[ImageFile]], image_size: int, look: Look, reader: Reader
) -> Tensor:
    """uint8 ``[images, C, H, W]`` of every listed file, class after class; each zip opened once."""
    from tqdm import tqdm

    total = sum(len(files) for files in classes.values())
    out = np.empty((total, channels(look), image_size, image_size), dtype=np.uint8)
    tally = DecodeTally(look, image_size)
    archives: dict[Path, zipfile.ZipFile] = {}
    bar = tqdm(
        total=total, desc=f"decoding {root}", unit="image", file=sys.stderr, disable=total < PROGRESS_MIN
    )
    row = 0
    try:
        for file in (file for files in classes.values() for file in files):
            try:
                if file.zip_path is None:
                    data = (root / file.name).read_bytes()
                else:
                    if file.zip_path not in archives:
                        archives[file.zip_path] = zipfile.ZipFile(file.zip_path)
                    data = archives[file.zip_path].read(file.name)
                decoded = decode_image(data, image_size, look)
            except UNREADABLE as error:
                reason = unreadable_reason(error)
                title = f"{reader.title} " if reader.title else ""
                raise DataError(
                    f"cannot read {title}image {file.describe(root)} ({reason}): {reader.fix}"
                ) from None
            out[row] = decoded.pixels
            row += 1
            tally.add(file.describe(root), decoded)
            bar.update()
    finally:
        bar.close()
        for archive in archives.values():
            archive.close()
    for note in tally.notes(f"{reader.title or 'image'} root {root}"):
        warnings.warn(note, stacklevel=3)
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------- caching
_MEMORY_CACHE: dict[tuple, tuple[str, Any]] = {}


def clear_memory_cache() -> None:
    """Forget decoded roots (tests; or to free memory)."""
    _MEMORY_CACHE.clear()


def remembered(key: tuple, digest: str, build: Callable[[], T]) -> T:
    """``build()``'s result, kept per ``key`` for this process while the files' ``digest`` holds."""
    cached = _MEMORY_CACHE.get(key)
    if cached is not None and cached[0] == digest:
        return cached[1]
    value = build()
    _MEMORY_CACHE[key] = (digest, value)
    return value


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lthmaml").expanduser()


def fingerprint(
    classes: dict[str, list[ImageFile]], examples: Optional[int], image_size: int, look: Look = "ink"
) -> str:
    """A digest of what decoding would read (the first ``examples`` files of each class; None:
    all), so any added, removed or changed file invalidates."""
    listing = [
        [key, [[f.zip_path.name if f.zip_path else "", f.name, f.size, f.stamp] for f in files[:examples]]]
        for key, files in classes.items()
    ]
    payload: list[Any] = [CACHE_FORMAT, image_size, examples, listing]
    if look != "ink":  # so Omniglot's caches written before looks stay valid
        payload.append(look)
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()[:20]


def _read_cache(
    path: Path, title: str, classes: list[str], counts: list[int], shape: tuple
) -> Optional[Tensor]:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        images = payload["images"]
        stored = payload.get("counts", counts)  # Omniglot's files before counts: [classes, examples, ...]
        if (
            payload["classes"] == classes
            and stored == counts
            and images.dtype == torch.uint8
            and images.numel() == int(np.prod(shape))
            and tuple(images.shape[-3:]) == shape[1:]
        ):
            return images.reshape(shape)
        warnings.warn(f"ignoring {title} cache {path}: it does not match the data", stacklevel=3)
    except Exception as error:  # a truncated or foreign file must only cost a re-decode
        warnings.warn(f"ignoring unreadable {title} cache {path} ({error})", stacklevel=3)
    return None


def _write_cache(path: Path, title: str, payload: dict[str, Any]) -> None:
    """Atomic (:func:`lthmaml.files.replacing`), so a concurrent run never loads half a file;
    best effort: a cache that cannot be written is a warning."""
    try:
        with replacing(path, f"the {title} cache") as tmp:
            torch.save(payload, tmp)
    except DataError as error:
        warnings.warn(f"{error} (or set {CACHE_ENV})", stacklevel=3)


def load_pixels(
    root: Path,
    classes: dict[str, list[ImageFile]],
    image_size: int,
    look: Look,
    reader: Reader,
    cache_dir: Union[str, Path, None] = None,
    digest: Optional[str] = None,
) -> ClassPixels:
    """Every listed file decoded in ``look``, from the disk cache when its digest matches.
    ``cache_dir`` defaults to ``$LTHMAML_CACHE`` or ``~/.cache/lthmaml``."""
    if image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
    names, counts = list(classes), [len(files) for files in classes.values()]
    digest = digest or fingerprint(classes, None, image_size, look)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{reader.prefix}-{digest}.pt"
    shape = (sum(counts), channels(look), image_size, image_size)
    images = _read_cache(path, reader.title or "image", names, counts, shape)
    if images is None:
        images = decode_all(root, classes, image_size, look, reader)
        _write_cache(path, reader.title or "image", {"images": images, "counts": counts, "classes": names})
    return ClassPixels(images, counts, names)


# ---------------------------------------------------------------------------------- class splits
def check_class_split(split: SplitSpec) -> None:
    """The form of ``data.class_split``, checkable before any data is read."""
    option = f"data.class_split={list(split)}"
    if len(split) != len(SPLITS) or any(isinstance(v, bool) or not v > 0 for v in split):
        raise ConfigError(
            f"{option}: give three positive train/val/test fractions (floats) or class counts (ints)"
        )
    if not all(isinstance(v, int) for v in split) and sum(split) > 1 + 1e-9:
        raise ConfigError(f"{option}: the fractions sum to {sum(split):g} > 1; make them sum to at most 1")


def split_sizes(split: SplitSpec, units: int, unit_name: str) -> list[int]:
    """Meta-train/val/test sizes from fractions (floats) or counts (ints) of ``units``."""
    check_class_split(split)
    option = f"data.class_split={list(split)}"
    if all(isinstance(v, int) for v in split):
        sizes = [int(v) for v in split]
        if sum(sizes) > units:
            raise ConfigError(
                f"{option} asks for {sum(sizes)} {unit_name} but there are {units}: lower the counts"
            )
        return sizes
    bounds = [0, *(round(float(c) * units) for c in np.cumsum(split))]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    for name, size in zip(SPLITS, sizes):
        if size < 1:
            raise ConfigError(
                f"{option} leaves the {name} split no {unit_name} (of {units}): give it a larger share"
            )
    return sizes


def split_classes(
    classes: Sequence[str], split: SplitSpec, seed: int = 0, by_alphabet: bool = False
) -> dict[str, list[int]]:
    """Class indices of meta-train, meta-val and meta-test: a seeded permutation of the classes, or
    of whole alphabets with ``by_alphabet`` (no alphabet seen in training is tested)."""
    alphabets = [name.split("/", 1)[0] for name in classes]
    units = sorted(set(alphabets)) if by_alphabet else list(classes)
    sizes = split_sizes(split, len(units), "alphabets" if by_alphabet else "classes")
    order = np.random.default_rng(seed).permutation(len(units))
    bounds = np.cumsum([0, *sizes])
    owner = {}
    for split_name, start, stop in zip(SPLITS, bounds, bounds[1:]):
        owner.update({units[i]: split_name for i in order[start:stop]})
    keys = alphabets if by_alphabet else list(classes)
    return {name: [i for i, key in enumerate(keys) if owner.get(key) == name] for name in SPLITS}
