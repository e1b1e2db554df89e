"""One's own few-shot images for meta-training: a folder of class folders, fixed split folders, or
the mini-ImageNet layout, decoded in a look (``ink``, ``gray``, ``rgb``) and normalised with the
statistics of the meta-train images.

Layouts (``layout: auto`` takes the first that fits the root):

* ``miniimagenet``: ``root/images/*.jpg`` with Ravi & Larochelle's split files
  ``root/{train,val,test}.csv`` (header ``filename,label``, as published: 64/16/20 classes of 600
  84x84 images); the split is theirs;
* ``split_folders``: ``root/{train,val,test}/<class>/*.jpg``; the split is the folders';
* ``classes``: ``root/<class>/*.{png,jpg,jpeg,webp,bmp}`` (GIF and TIFF too); ``class_split``
  splits the classes by a seeded permutation, as Omniglot's are.

Classes may hold different numbers of images (each task draws from what its classes have), but
every class must hold ``shots`` + query images. Decoding goes through :mod:`lthmaml.data.imageset`:
a progress bar for thousands of images, mixed sizes, modes or colour said in one warning, and the
decoded uint8 pixels cached on disk keyed by the file list, the image size and the look.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal, Optional, get_args

from lthmaml.data.datamodule import ImageTasksDataModule
from lthmaml.data.fewshot import FewShotTasks
from lthmaml.data.images import IMAGE_SUFFIXES, LOOKS, Look, Normalization, visible
from lthmaml.data.imageset import (
    ClassPixels,
    ImageFile,
    Reader,
    SplitSpec,
    check_class_split,
    fingerprint,
    load_pixels,
    remembered,
    scan_folder,
    split_classes,
)
from lthmaml.data.tasks import SPLITS
from lthmaml.errors import ConfigError, DataError

Layout = Literal["auto", "classes", "split_folders", "miniimagenet"]
Augment = Literal["none", "rotations", "flips"]
READER = Reader("", "images", "replace or delete the file")
DEFAULT_SPLIT = (0.6, 0.2, 0.2)
HINT = (
    "lay it out as <root>/<class>/*.jpg, <root>/{train,val,test}/<class>/*.jpg, or mini-ImageNet's "
    "<root>/images/*.jpg with train.csv, val.csv, test.csv"
)


# ---------------------------------------------------------------------------------- layouts
def detect_layout(root: Path) -> str:
    """The layout of ``root`` (see the module docstring); a half-made fixed split is an error."""
    if any((root / f"{split}.csv").is_file() for split in SPLITS) or (
        (root / "images").is_dir()
        and any(p.suffix.lower() in IMAGE_SUFFIXES for p in (root / "images").iterdir())
    ):
        return "miniimagenet"
    present = [split for split in SPLITS if (root / split).is_dir()]
    if present and len(present) < len(SPLITS):
        missing = ", ".join(f"{s}/" for s in SPLITS if s not in present)
        raise DataError(
            f"{root} has {', '.join(f'{s}/' for s in present)} but no {missing}: give all three for a "
            "fixed split, or pass --data.init_args.layout classes if those are class names"
        )
    return "split_folders" if present else "classes"


def _class_folders(base: Path, root: Path) -> dict[str, list[ImageFile]]:
    """``base/<class>/*`` images per class; an image outside a class folder is an error."""
    loose = sorted(
        p for p in base.iterdir() if p.is_file() and visible(p.name) and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if loose:
        raise DataError(
            f"{loose[0]} is not inside a class folder: move the images of {base} into {base}/<class>/ "
            "folders, one per class"
        )
    classes = scan_folder(base, root, 1, IMAGE_SUFFIXES, "images")
    if not classes:
        raise DataError(f"{base} holds no <class>/ folders of images: {HINT}")
    return classes


def _split_file(path: Path, root: Path, split: str) -> dict[str, list[ImageFile]]:
    """The images a mini-ImageNet split file lists, per ``split/label``, in its order."""
    if not path.is_file():
        raise DataError(
            f"{path} is missing: the mini-ImageNet layout has train.csv, val.csv and test.csv (Ravi & "
            "Larochelle's split files) beside images/; add it, or pass --data.init_args.layout classes "
            "if images/ is a class"
        )
    images, classes = root / "images", {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle)
        header = [cell.strip().lower() for cell in next(rows, [])]
        if "filename" not in header or "label" not in header:
            raise DataError(
                f"{path} has the header {','.join(header)!r}: its first row must be filename,label"
            )
        at, label_at = header.index("filename"), header.index("label")
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(at, label_at):
                raise DataError(
                    f"{path} line {rows.line_num} has no filename or label: fix or delete the row"
                )
            name, label = row[at].strip(), row[label_at].strip()
            file = images / name
            if not file.is_file() and (images / label / name).is_file():
                file = images / label / name  # a copy unpacked into one folder per class
            try:
                stat = file.stat()
            except FileNotFoundError:
                raise DataError(
                    f"{path} line {rows.line_num} names {file}, which does not exist: restore the image "
                    "or delete the row"
                ) from None
            entry = ImageFile(str(file.relative_to(root)), stat.st_size, stat.st_mtime_ns)
            classes.setdefault(f"{split}/{label}", []).append(entry)
    if not classes:
        raise DataError(f"{path} lists no images: give one filename,label row per image")
    return classes


def find_classes(root: Path, layout: str) -> tuple[str, dict[str, list[ImageFile]]]:
    """The layout (``auto`` resolved) and the image files per class; a class of a fixed split is
    keyed ``split/class`` and the classes come split by split, so each split's are consecutive."""
    if not root.is_dir():
        raise DataError(f"image root {root} does not exist or is not a folder: {HINT}")
    try:
        layout = detect_layout(root) if layout == "auto" else layout
        if layout == "classes":
            return layout, _class_folders(root, root)
        classes: dict[str, list[ImageFile]] = {}
        for split in SPLITS:
            if layout == "miniimagenet":
                found = _split_file(root / f"{split}.csv", root, split)
            elif not (root / split).is_dir():
                raise DataError(
                    f"{root / split} is missing: the split_folders layout has train/, val/ and test/"
                )
            else:
                found = {f"{split}/{k}": v for k, v in _class_folders(root / split, root).items()}
            for key in found:
                label = key.split("/", 1)[1]
                other = next((k for k in classes if k.split("/", 1)[1] == label), None)
                if other is not None:
                    raise DataError(
                        f"class {label} is in both {other.split('/')[0]} and {split} of {root}: a class "
                        "belongs to one split, or a meta-test task holds a class meta-training saw"
                    )
            classes.update(found)
        return layout, classes
    except PermissionError as error:
        raise DataError(
            f"cannot read {error.filename or root} ({error.strerror}): fix its permissions"
        ) from None


# ---------------------------------------------------------------------------------- the module
class ImageFolderDataModule(ImageTasksDataModule):
    """N-way K-shot classification on one's own images (see the module docstring for the layouts).

    Images are read in :meth:`setup`; the normalisation is computed there on the meta-train
    images (per channel) and goes into the checkpoint with the look, and from there into the
    exported artifact, so the device decodes its photos as meta-training did.

    Args:
        root: the data folder.
        layout: ``auto``, ``classes``, ``split_folders`` or ``miniimagenet``.
        look: ``rgb`` (colour photos), ``gray`` (grayscale photos) or ``ink`` (Omniglot-like
            glyphs: grayscale inverted, ink 1.0); the net's ``in_channels`` is 3 for ``rgb``, else 1.
        image_size: images are made square (centre-cropped; ``ink`` pads) and resized to this (84
            for mini-ImageNet).
        ways, shots, query_shots, eval_query_shots: the episode shape, as for Omniglot.
        class_split: for the ``classes`` layout, the meta-train/val/test shares of the classes
            (fractions or counts; default ``[0.6, 0.2, 0.2]``); a fixed-split layout takes none.
        split_seed: keys the class permutation.
        augment: on meta-train, ``rotations`` (each class at 90/180/270 degrees is a new class,
            as Omniglot's), ``flips`` (each image mirrored with probability 1/2) or ``none``.
        normalize: normalise each channel by the meta-train images' mean and std (false: inputs
            are ``pixels / 255``).
        cache_dir: where decoded images are cached (default ``$LTHMAML_CACHE`` or ``~/.cache/lthmaml``).
        **kwargs: :class:`~lthmaml.data.datamodule.EpisodicDataModule` arguments.
    """

    def __init__(
        self,
        root: str,
        layout: Layout = "auto",
        look: Look = "rgb",
        image_size: int = 84,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        eval_query_shots: Optional[int] = 15,
        class_split: Optional[SplitSpec] = None,
        split_seed: int = 0,
        augment: Augment = "none",
        normalize: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ) -> None:
        super().__init__(ways, shots, query_shots, image_size, eval_query_shots=eval_query_shots, **kwargs)
        for option, value, allowed in (
            ("layout", layout, get_args(Layout)),
            ("look", look, LOOKS),
            ("augment", augment, get_args(Augment)),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"data.init_args.{option} must be one of {', '.join(allowed)}, got {value!r}"
                )
        if image_size < 1:
            raise ConfigError(f"data.init_args.image_size must be >= 1, got {image_size}")
        if class_split is not None:
            check_class_split(class_split)
        self.root, self.layout, self.look = root, layout, look
        self.class_split = None if class_split is None else list(class_split)
        self.split_seed, self.augment, self.normalize = split_seed, augment, normalize
        self.cache_dir = cache_dir
        self.normalization = Normalization.identity(look)
        self.files: Optional[dict[str, list[ImageFile]]] = None  # per class, once setup found them
        self.found_layout = layout
        self.pixels: Optional[ClassPixels] = None

    def setup(self, stage: Optional[str] = None) -> None:
        root = Path(self.root).expanduser()
        if self.files is None:
            self.found_layout, classes = find_classes(root, self.layout)
            names = list(classes)
            if self.found_layout == "classes":
                self.class_indices = split_classes(names, self.class_split or DEFAULT_SPLIT, self.split_seed)
            elif self.class_split is not None:
                raise ConfigError(
                    f"the {self.found_layout} layout of {root} fixes the class split: drop "
                    "data.init_args.class_split"
                )
            else:
                self.class_indices = {
                    s: [i for i, k in enumerate(names) if k.split("/")[0] == s] for s in SPLITS
                }
            self._check_counts(root, self.found_layout, classes)
            self.files = classes
        self.check_splits(stage, [len(files) for files in self.files.values()])  # before decoding
        if self.pixels is None:
            digest = fingerprint(self.files, None, self.image_size, self.look)
            key = ("images", str(root.resolve()), self.image_size, self.look)
            self.pixels = remembered(
                key,
                digest,
                lambda: load_pixels(
                    root, self.files, self.image_size, self.look, READER, self.cache_dir, digest
                ),
            )
            if self.normalize:
                self.normalization = Normalization.of(self.pixels.subset(self.class_indices["train"]).pixels)
        self.check_net_channels()

    def split_rotations(self, split: str) -> bool:
        return split == "train" and self.augment == "rotations"

    def more_classes(self, split: str) -> str:
        if self.found_layout == "classes":
            return self.class_split_fix(split, len(self.files))
        where = f"{split}.csv" if self.found_layout == "miniimagenet" else f"{split}/"
        return f"add classes to {Path(self.root).expanduser() / where}"

    def _check_counts(self, root: Path, layout: str, classes: dict[str, list[ImageFile]]) -> None:
        """Every class holds an episode's images: a DataError naming the smallest class that does not."""
        names = list(classes)
        for split, indices in self.class_indices.items():
            option = "query_shots" if split == "train" else "eval_query_shots"
            need = self.shots + self.split_query_shots(split)
            short = [names[i] for i in indices if len(classes[names[i]]) < need]
            if not short:
                continue
            key = min(short, key=lambda k: len(classes[k]))
            label = key.split("/", 1)[-1]
            where = (
                f"class {label} of {root / (split + '.csv')}"
                if layout == "miniimagenet"
                else f"class folder {root / key}"
            )
            raise DataError(
                f"{where} holds {len(classes[key])} images but a {split} episode takes "
                f"data.init_args.shots + {option} = {need} of each class: add images to it, remove it, "
                f"or lower {option}"
            )

    def split_tasks(self, split: str) -> FewShotTasks:
        part = self.pixels.subset(self.class_indices[split])
        train = split == "train"
        return FewShotTasks(
            part.pixels,
            self.split_ways(split),
            self.shots,
            self.split_query_shots(split),
            rotations=self.split_rotations(split),
            name=split,
            counts=part.counts,
            flips=train and self.augment == "flips",
            prepare=self.to_input,
            **self.split_augmentation(split),
        )
