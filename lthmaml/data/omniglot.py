"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawers each.

The reader takes a root folder holding the official zips (``images_background*.zip``,
``images_evaluation*.zip``, read in place), their unpacked folders, or directly the
``<alphabet>/<character>/*.png`` layout. A class is one ``alphabet/character``; the same class in
two sources (Greek and Latin are in both ``images_background_small*`` zips) is kept once.

Decoding 32k PNGs takes a while, so the result is cached in memory and on disk, keyed by the
file list (:mod:`lthmaml.data.imageset`, which every image reader shares). The look is ``ink``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Union

from torch import Tensor

from lthmaml.data.images import visible
from lthmaml.data.imageset import (  # noqa: F401 (split_classes, clear_memory_cache: their old home)
    ImageFile,
    Reader,
    SplitSpec,
    check_class_split,
    clear_memory_cache,
    common_count,
    fingerprint,
    load_pixels,
    remembered,
    scan_folder,
    split_classes,
)
from lthmaml.errors import DataError

SOURCE_PREFIXES = ("images_background", "images_evaluation")
DOWNLOAD_HINT = "download it with `lthmaml-data omniglot --root DIR` and pass --data.init_args.root DIR"
READER = Reader("Omniglot", "omniglot", f"replace or delete it, or {DOWNLOAD_HINT}")


@dataclass
class OmniglotImages:
    """All classes of a root: ``images`` is ``[classes, examples, 1, H, W]`` float, ink 1.0."""

    images: Tensor
    classes: list[str]  # "alphabet/character", sorted; row i of images

    @property
    def alphabets(self) -> list[str]:
        return [name.split("/", 1)[0] for name in self.classes]


# ---------------------------------------------------------------------------------- finding files
def _scan_folder(base: Path, root: Path) -> dict[str, list[ImageFile]]:
    """``base/<alphabet>/<character>/*.png``; an empty character folder is an error once any has images."""
    return scan_folder(base, root, 2, (".png",), ".png images")


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
        if not all(visible(part) for part in member.parts):
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


# ---------------------------------------------------------------------------------- loading
def load_omniglot(
    root: Union[str, Path], image_size: int = 28, cache_dir: Union[str, Path, None] = None
) -> OmniglotImages:
    """Every class under ``root`` as ``[classes, examples, 1, image_size, image_size]`` floats in [0, 1].

    Classes with more images than the smallest are truncated to its count (Omniglot has 20 each).
    ``cache_dir`` defaults to ``$LTHMAML_CACHE`` or ``~/.cache/lthmaml``.
    """
    root = Path(root).expanduser()
    classes = find_images(root)
    examples = common_count(classes, root, "Omniglot")
    digest = fingerprint(classes, examples, image_size)
    kept = {key: files[:examples] for key, files in classes.items()}

    def decode() -> OmniglotImages:
        pixels = load_pixels(root, kept, image_size, "ink", READER, cache_dir, digest).pixels
        images = pixels.view(len(kept), examples, *pixels.shape[1:]).float().div_(255.0)
        return OmniglotImages(images, list(kept))

    return remembered(("omniglot", str(root.resolve()), image_size), digest, decode)
