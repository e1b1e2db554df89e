"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawers each.

The reader takes a root folder holding the official zips (``images_background*.zip``,
``images_evaluation*.zip``, read in place), their unpacked folders, or directly the
``<alphabet>/<character>/*.png`` layout. A class is one ``alphabet/character``; the same class in
two sources (Greek and Latin are in both ``images_background_small*`` zips) is kept once.

Decoding 32k PNGs takes a while, so the result is cached twice: in memory per process, and on
disk as a ``torch.save`` of uint8 tensors and strings (loaded with ``weights_only=True``, never
pickle), keyed by a digest of the file list with sizes and CRCs or mtimes, and the image size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Union

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch import Tensor

from lthmaml.data.images import decode_image
from lthmaml.data.tasks import SPLITS
from lthmaml.errors import ConfigError, DataError

SOURCE_PREFIXES = ("images_background", "images_evaluation")
DOWNLOAD_HINT = "download it with `lthmaml-data omniglot --root DIR` and pass --data.init_args.root DIR"
CACHE_ENV = "LTHMAML_CACHE"
CACHE_FORMAT = 1  # bump when the cached tensors change meaning (resampling, dtype, layout)

SplitSpec = Sequence[Union[int, float]]


@dataclass(frozen=True)
class ImageFile:
    """One PNG: a file under the root, or a member of a zip (``zip_path`` set)."""

    name: str  # path relative to the root, or the member name inside the zip
    size: int
    stamp: int  # CRC-32 in a zip, mtime in ns on disk: changes when the content does
    zip_path: Optional[Path] = None

    def describe(self, root: Path) -> str:
        """The file as a user finds it: ``root/a/c/x.png`` or ``zipname:member``."""
        return f"{self.zip_path}:{self.name}" if self.zip_path else str(root / self.name)


@dataclass
class OmniglotImages:
    """All classes of a root: ``images`` is ``[classes, examples, 1, H, W]`` float, ink 1.0."""

    images: Tensor
    classes: list[str]  # "alphabet/character", sorted; row i of images

    @property
    def alphabets(self) -> list[str]:
        return [name.split("/", 1)[0] for name in self.classes]


# ---------------------------------------------------------------------------------- finding files
def _visible(name: str) -> bool:
    return not name.startswith((".", "__MACOSX"))


def _scan_folder(base: Path, root: Path) -> dict[str, list[ImageFile]]:
    """``base/<alphabet>/<character>/*.png``; an empty character folder is an error once any has images."""
    classes: dict[str, list[ImageFile]] = {}
    empty: list[Path] = []
    for alphabet in sorted(p for p in base.iterdir() if p.is_dir() and _visible(p.name)):
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir() and _visible(p.name)):
            pngs = sorted(p for p in character.iterdir() if p.suffix.lower() == ".png" and _visible(p.name))
            if not pngs:
                empty.append(character)
                continue
            stats = [p.stat() for p in pngs]
            classes[f"{alphabet.name}/{character.name}"] = [
                ImageFile(str(p.relative_to(root)), s.st_size, s.st_mtime_ns) for p, s in zip(pngs, stats)
            ]
    if classes and empty:
        raise DataError(f"class folder {empty[0]} holds no .png images: restore its images or remove it")
    return classes


def _scan_zip(path: Path) -> dict[str, list[ImageFile]]:
    """Members ``[top/]<alphabet>/<character>/*.png``; an empty character folder entry is an error."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"cannot open Omniglot zip {path} ({error}): delete it and {DOWNLOAD_HINT}") from None
    classes: dict[str, list[ImageFile]] = {}
    folders: set[PurePosixPath] = set()
    for info in infos:
        member = PurePosixPath(info.filename)
        if not all(_visible(part) for part in member.parts):
            continue
        if info.is_dir():
            folders.add(member)
        elif member.suffix.lower() == ".png" and len(member.parts) >= 3:
            key = f"{member.parts[-3]}/{member.parts[-2]}"
            classes.setdefault(key, []).append(ImageFile(info.filename, info.file_size, info.CRC, path))
    class_folders = {PurePosixPath(f.name).parent for files in classes.values() for f in files}
    depths = {len(folder.parts) for folder in class_folders}
    empty = sorted(f for f in folders if len(f.parts) in depths and f not in class_folders)
    if classes and empty:
        raise DataError(
            f"class folder {path}:{empty[0]}/ holds no .png images: delete the zip and {DOWNLOAD_HINT}"
        )
    return {key: sorted(files, key=lambda f: f.name) for key, files in sorted(classes.items())}


def find_images(root: Union[str, Path]) -> dict[str, list[ImageFile]]:
    """The PNGs of every class under ``root``, keyed ``alphabet/character`` in sorted order.

    Sources are the official zips and folders in ``root`` (a zip wins over its unpacked folder,
    which holds the same files), else ``root`` itself as ``<alphabet>/<character>/*.png``.
    The first source in name order keeps a class that several sources hold.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Omniglot root {root} does not exist or is not a folder: {DOWNLOAD_HINT}")
    entries = sorted(p for p in root.iterdir() if p.name.startswith(SOURCE_PREFIXES))
    zips = [p for p in entries if p.is_file() and p.suffix == ".zip"]
    zipped = {p.stem for p in zips}
    folders = [p for p in entries if p.is_dir() and p.name not in zipped]
    sources = sorted(zips + folders, key=lambda p: p.stem if p in zips else p.name)
    try:
        scans = [_scan_zip(p) if p in zips else _scan_folder(p, root) for p in sources]
        scans = scans or [_scan_folder(root, root)]
    except OSError as error:  # an unreadable folder while listing
        where = error.filename or root
        raise DataError(f"cannot list {where} ({error.strerror}): fix its permissions") from None
    classes: dict[str, list[ImageFile]] = {}
    for found in scans:
        for key, files in found.items():
            classes.setdefault(key, files)
    if not classes:
        raise DataError(
            f"Omniglot root {root} holds neither images_background*.zip / images_evaluation*.zip nor "
            f"<alphabet>/<character>/*.png folders: {DOWNLOAD_HINT}"
        )
    return dict(sorted(classes.items()))


# ---------------------------------------------------------------------------------- decoding
def _decode_all(root: Path, classes: dict[str, list[ImageFile]], examples: int, image_size: int) -> Tensor:
    """uint8 ``[classes, examples, 1, H, W]``; each zip is opened once."""
    out = np.empty((len(classes), examples, 1, image_size, image_size), dtype=np.uint8)
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for c, files in enumerate(classes.values()):
            for e, file in enumerate(files[:examples]):
                try:
                    if file.zip_path is None:
                        data = (root / file.name).read_bytes()
                    else:
                        if file.zip_path not in archives:
                            archives[file.zip_path] = zipfile.ZipFile(file.zip_path)
                        data = archives[file.zip_path].read(file.name)
                    out[c, e, 0] = decode_image(data, image_size)
                except (OSError, ValueError, UnidentifiedImageError, zipfile.BadZipFile, zlib.error) as error:
                    raise DataError(
                        f"cannot read Omniglot image {file.describe(root)} ({error}): "
                        f"replace or delete it, or {DOWNLOAD_HINT}"
                    ) from None
    finally:
        for archive in archives.values():
            archive.close()
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------- caching
_MEMORY_CACHE: dict[tuple[str, int], tuple[str, OmniglotImages]] = {}


def clear_memory_cache() -> None:
    """Forget decoded roots (tests; or to free memory)."""
    _MEMORY_CACHE.clear()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lthmaml").expanduser()


def fingerprint(classes: dict[str, list[ImageFile]], examples: int, image_size: int) -> str:
    """A digest of what decoding would read, so any added, removed or changed file invalidates."""
    listing = [
        [key, [[f.zip_path.name if f.zip_path else "", f.name, f.size, f.stamp] for f in files[:examples]]]
        for key, files in classes.items()
    ]
    payload = json.dumps([CACHE_FORMAT, image_size, examples, listing], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _read_cache(path: Path, classes: list[str], shape: tuple[int, ...]) -> Optional[Tensor]:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        images = payload["images"]
        if payload["classes"] == classes and tuple(images.shape) == shape and images.dtype == torch.uint8:
            return images
        warnings.warn(f"ignoring Omniglot cache {path}: it does not match the data", stacklevel=3)
    except Exception as error:  # a truncated or foreign file must only cost a re-decode
        warnings.warn(f"ignoring unreadable Omniglot cache {path} ({error})", stacklevel=3)
    return None


def _write_cache(path: Path, classes: list[str], images: Tensor) -> None:
    """Atomic (temporary file + rename), so a concurrent run never loads half a file; best effort."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp_name = tmp.name
            torch.save({"images": images, "classes": classes}, tmp)
        os.replace(tmp_name, path)
    except OSError as error:
        warnings.warn(f"could not write the Omniglot cache {path} ({error}); set {CACHE_ENV}", stacklevel=3)
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def load_omniglot(
    root: Union[str, Path], image_size: int = 28, cache_dir: Union[str, Path, None] = None
) -> OmniglotImages:
    """Every class under ``root`` as ``[classes, examples, 1, image_size, image_size]`` floats in [0, 1].

    Classes with more images than the smallest are truncated to its count (Omniglot has 20 each).
    ``cache_dir`` defaults to ``$LTHMAML_CACHE`` or ``~/.cache/lthmaml``.
    """
    if image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1, got {image_size}")
    root = Path(root).expanduser()
    classes = find_images(root)
    counts = {key: len(files) for key, files in classes.items()}
    examples = min(counts.values())
    if examples != max(counts.values()):
        smallest = min(counts, key=counts.get)
        warnings.warn(
            f"Omniglot classes under {root} have {examples} to {max(counts.values())} images; all are "
            f"truncated to {examples}, the count of {smallest}",
            stacklevel=2,
        )
    digest = fingerprint(classes, examples, image_size)
    memory_key = (str(root.resolve()), image_size)
    cached = _MEMORY_CACHE.get(memory_key)
    if cached is not None and cached[0] == digest:
        return cached[1]
    names = list(classes)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"omniglot-{digest}.pt"
    images = _read_cache(path, names, (len(names), examples, 1, image_size, image_size))
    if images is None:
        images = _decode_all(root, classes, examples, image_size)
        _write_cache(path, names, images)
    result = OmniglotImages(images.float().div_(255.0), names)
    _MEMORY_CACHE[memory_key] = (digest, result)
    return result


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
