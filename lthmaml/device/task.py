"""A task folder as numpy arrays, decoded as the artifact's meta-training decoded its images."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lthmaml.data.affine import support_copies
from lthmaml.data.decode import DecodeTally, decode_file, model_look
from lthmaml.data.taskfiles import (
    UNLABELLED,
    SplitFiles,
    TaskFiles,
    check_model_fits,
    read_columns,
    scan_task,
)
from lthmaml.errors import ConfigError, DataError


@dataclass
class Split:
    """One split: ``x`` (float32 ``[n, C, H, W]`` images or ``[n, 1]`` points), ``y`` (int64 class
    indices, or float32 ``[n, 1]``), the names ``predictions.csv`` gives its examples."""

    x: np.ndarray
    y: np.ndarray
    files: list[str]
    labelled: bool

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class Task:
    files: TaskFiles
    splits: dict[str, Split]
    notes: list[str]

    @property
    def labels(self) -> list[str]:
        return self.files.labels


def read_task(root: str | Path, metadata: Any, source: str, image_size: Optional[int] = None) -> Task:
    """The task folder ``root`` read for the model of ``metadata`` (an object with the artifact
    metadata's fields): its look, normalisation and image size (``image_size``, the side its graph
    takes; default its architecture's); a one-line error if it does not fit."""
    try:
        files = scan_task(root)
        init_args = (metadata.architecture or {}).get("init_args", {})
        image_size = image_size or init_args.get("image_size") or 28
        check_model_fits(metadata, files.root, files.task, files.labels, image_size, source)
        if files.task == "regression":
            return Task(files, {name: _table(name, split) for name, split in files.splits.items()}, [])
        try:
            look, normalization = model_look(
                metadata.look, metadata.normalization, init_args.get("in_channels")
            )
        except ValueError as error:
            raise ConfigError(f"{source}: the model's metadata: {error}") from None
        tally = DecodeTally(look, image_size)
        splits = {}
        for name, split in files.splits.items():
            decoded = [decode_file(path, image_size, look) for _, path in split.images]
            for (_, path), image in zip(split.images, decoded):
                tally.add(str(path), image)
            x = normalization.apply(np.stack([d.pixels for d in decoded]))
            splits[name] = Split(x, _label_indices(split, files.labels), split.names, split.labelled)
        return Task(files, splits, tally.notes(f"task folder {files.root}"))
    except PermissionError as error:
        raise DataError(
            f"cannot read {error.filename or root} ({error.strerror}): fix its permissions"
        ) from None


def with_support_copies(task: Task, copies: int, seed: int) -> Task:
    """``task`` adapting on ``copies`` distorted copies of each support image besides the image
    (:func:`~lthmaml.data.affine.support_copies`), as ``lthmaml-edge``'s
    ``data.support_augmentation`` (seeded by ``data.val_seed``) makes them, so both paths adapt on
    the same images; a regression task is returned as it is, as there."""
    if not copies or task.files.task != "classification":
        return task
    support = task.splits["support"]
    times = copies + 1
    augmented = Split(
        support_copies(support.x, copies, seed),
        np.tile(support.y, times),
        support.files * times,
        support.labelled,
    )
    return replace(task, splits={**task.splits, "support": augmented})


def _label_indices(split: SplitFiles, labels: list[str]) -> np.ndarray:
    return np.array(
        [UNLABELLED if label is None else labels.index(label) for label, _ in split.images], dtype=np.int64
    )


def _table(name: str, split: SplitFiles) -> Split:
    xs, ys = read_columns(split.table, require_y=name != "query")
    x = np.asarray(xs, dtype=np.float32)[:, None]
    y = np.full_like(x, np.nan) if ys is None else np.asarray(ys, dtype=np.float32)[:, None]
    return Split(x, y, [f"row_{i}" for i in range(1, len(x) + 1)], ys is not None)
