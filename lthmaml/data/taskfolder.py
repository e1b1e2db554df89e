"""A few-shot task folder: the handful of local examples a device fine-tunes on, and what it predicts.

Classification (images)::

    root/support/<label>/*.png      the labelled examples to fine-tune on (required)
    root/val/<label>/*.png          optional held-out labelled examples (early stopping)
    root/query/<label>/*.png        optional: labelled query, accuracy can be reported
    root/query/*.png                or: unlabelled query, only predictions

Regression (CSV with a header)::

    root/support.csv   x,y          required
    root/val.csv       x,y          optional
    root/query.csv     x[,y]        optional; without a y column it is unlabelled

Labels are the sorted names of the ``support/`` folders; label ``i`` is class ``i`` of the net.
The layout is parsed by :mod:`lthmaml.data.taskfiles`, which ``lthmaml-device`` reads it with too.
Images are preprocessed exactly as in meta-training, in the look the model was meta-trained with
(the artifact's ``look`` and ``normalization``; :mod:`lthmaml.data.images`): ``ink`` (Omniglot:
grayscale, padded square, ink 1.0 on paper 0.0), ``gray`` or ``rgb`` (centre-cropped square), all
with alpha on white paper, EXIF rotation, LANCZOS to ``image_size`` squared, then the meta-train
normalisation. An image that disagrees with the look (a colour photo for a gray model, a gray one
for a colour model) is converted, and the log says so. JPEG, BMP, GIF, WebP and TIFF are read
too: a phone camera does not write PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lthmaml.data.affine import support_copies
from lthmaml.data.images import DecodeTally, Look, Normalization, decode_file, model_look
from lthmaml.data.tables import read_csv
from lthmaml.data.taskfiles import UNLABELLED, SplitFiles, TaskFiles, check_model_fits, scan_task
from lthmaml.data.validation import Validation, derive_validation
from lthmaml.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------- the module
DEFAULT_IMAGE_SIZE = 28
"""The image size of a folder read before (or without) a model that names one: Omniglot's."""


@dataclass
class TaskSplit:
    """One split: ``x`` and ``y`` as the loaders serve them, and the file (or CSV row) of each example."""

    x: Tensor
    y: Tensor
    files: list[str]
    labelled: bool = True

    def __len__(self) -> int:
        return len(self.files)


def collate_pair(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack into an ``(x, y)`` tuple (the default collate would make a list)."""
    xs, ys = zip(*items)
    return torch.stack(xs), torch.stack(ys)


class TaskFolderDataModule(pl.LightningDataModule):
    """The few-shot task of a folder (see the module docstring for the layout), for fine-tuning.

    Every loader yields ``(x, y)`` tuples:

    * classification: ``x`` float32 ``[B, C, image_size, image_size]`` as meta-training's input
      (:attr:`look`: C is 3 for ``rgb``, else 1; Omniglot's ``ink``: in [0, 1], ink 1.0), ``y``
      int64 ``[B]`` indices into :attr:`labels`; ``-1`` for an unlabelled query image.
      ``image_size`` None (the default): the model's, once :meth:`follow` knows it (28 before).
    * regression: ``x`` float32 ``[B, 1]``, ``y`` float32 ``[B, 1]``; NaN for an unlabelled query row.

    ``train_dataloader`` is the support set, shuffled (one full batch when it holds at most
    ``batch_size`` examples); ``val_dataloader`` the val set in file order, or ``[]`` (Lightning then
    skips validation) without one; ``test_dataloader`` the labelled query; ``predict_dataloader`` the
    query, labelled or not, in the order of :attr:`query_files`.

    Attributes (after :meth:`setup`): ``task`` ("classification" or "regression"), ``labels``
    (sorted support folder names; ``[]`` for regression), ``ways`` (``len(labels)``, None for
    regression), ``has_val``, ``has_query``, ``query_labelled``, ``query_files`` (file paths
    relative to ``query/``, e.g. ``cat/1.png`` or ``1.png``; ``row_<i>`` for CSV rows, from 1),
    ``splits`` (:class:`TaskSplit` per present split), ``validation_source``.

    For a fine-tune, :meth:`prepare_validation` finds the val split (``validation``: see
    :data:`lthmaml.data.validation.Validation`): ``val/`` (``val.csv``) by default; ``holdout``:
    ``val_per_class`` examples per class held out of the support set; ``augment``: ``val_copies``
    camera-jittered copies of each support image, seeded by ``val_seed``.

    ``support_augmentation: k`` adds k randomly distorted copies of each support image (Koch et
    al.'s affine ranges, seeded by ``val_seed``) to what adaptation trains on or computes its
    prototypes from (:meth:`support_split`), after any holdout, so a held-out image never has a
    copy in training; ``lthmaml-device --support_augmentation k --seed val_seed`` makes the same copies.
    """

    def __init__(
        self,
        root: str,
        image_size: Optional[int] = None,
        batch_size: int = 32,
        num_workers: int = 0,
        validation: Validation = "auto",
        val_per_class: int = 1,
        val_copies: int = 4,
        val_seed: int = 0,
        support_augmentation: int = 0,
    ) -> None:
        super().__init__()
        size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        counts = {"image_size": size, "batch_size": batch_size, "num_workers": num_workers}
        counts.update(val_per_class=val_per_class, val_copies=val_copies)
        counts.update(support_augmentation=support_augmentation)
        for name, value in counts.items():
            if value < (least := 0 if name in ("num_workers", "support_augmentation") else 1):
                raise ConfigError(f"data.{name} must be >= {least}, got {value}")
        self.validation, self.val_per_class = validation, val_per_class
        self.val_copies, self.val_seed = val_copies, val_seed
        self.validation_source = ""
        """What the val split is, for the log; set by :meth:`prepare_validation`."""
        self.fine_tune_split: Optional[TaskSplit] = None
        """The support set less any held-out examples."""
        self.support_augmentation = support_augmentation
        self._augmented: Optional[tuple[TaskSplit, TaskSplit]] = None
        self.root = root
        self.image_size = size
        self.image_size_given = image_size is not None
        """False: the model's image size, once one is known (:meth:`follow`)."""
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.task: Optional[str] = None
        self.labels: list[str] = []
        self.ways: Optional[int] = None
        self.splits: dict[str, TaskSplit] = {}
        self.look: Look = "ink"
        self.normalization = Normalization.identity()
        """How images are decoded: the model's (:meth:`follow`); Omniglot's ink until a model is known."""
        self._tally = DecodeTally(self.look, self.image_size)

    # ------------------------------------------------------------------ reading
    def follow(self, metadata: Any) -> None:
        """Decode images as the model (its artifact metadata) was meta-trained: its look,
        normalisation and (unless ``image_size`` was given) image size. A folder read otherwise is
        read again."""
        init_args = (getattr(metadata, "architecture", None) or {}).get("init_args", {})
        try:
            look, normalization = model_look(
                getattr(metadata, "look", None),
                getattr(metadata, "normalization", None),
                init_args.get("in_channels"),
            )
        except ValueError as error:
            raise ConfigError(f"the model's metadata: {error}") from None
        size = self.image_size if self.image_size_given else init_args.get("image_size") or self.image_size
        if (look, normalization, size) == (self.look, self.normalization, self.image_size):
            return
        self.look, self.normalization, self.image_size = look, normalization, size
        self._tally = DecodeTally(look, self.image_size)
        if self.task == "classification":
            self.task, self.splits, self.validation_source, self.fine_tune_split = None, {}, "", None
            self.setup()

    def setup(self, stage: Optional[str] = None) -> None:
        """Reads the folder once (every file: a bad one fails here, not mid-training), in the look
        of the model being fitted, tested or predicted with when there is one."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(model, "metadata", None) is not None:
            self.follow(model.metadata)
        if self.task is not None:
            return
        root = Path(self.root).expanduser()
        try:
            files = scan_task(root)
            splits = self._read_images(files) if files.task == "classification" else self._read_csvs(files)
        except PermissionError as error:
            raise DataError(
                f"cannot read {error.filename or root} ({error.strerror}): fix its permissions"
            ) from None
        self.splits = splits
        self.task = files.task
        self.ways = len(self.labels) if files.task == "classification" else None

    def _read_images(self, files: TaskFiles) -> dict[str, TaskSplit]:
        splits = {name: self._image_split(split, files.labels) for name, split in files.splits.items()}
        self.labels = files.labels
        self._say_conversions(files.root)
        return splits

    def _read(self, paths: list[Path]) -> Tensor:
        """The images as the net's input, tallying what converting them did."""
        decoded = [decode_file(path, self.image_size, self.look) for path in paths]
        for path, image in zip(paths, decoded):
            self._tally.add(str(path), image)
        return self.normalization.apply(torch.from_numpy(np.stack([d.pixels for d in decoded])))

    def _say_conversions(self, root: Path) -> None:
        for note in self._tally.notes(f"task folder {root}"):
            rank_zero_info(note)
        self._tally = DecodeTally(self.look, self.image_size)

    def _image_split(self, split: SplitFiles, labels: list[str]) -> TaskSplit:
        x = self._read([path for _, path in split.images])
        y = torch.tensor(
            [UNLABELLED if label is None else labels.index(label) for label, _ in split.images],
            dtype=torch.int64,
        )
        return TaskSplit(x, y, split.names, labelled=split.labelled)

    def _read_csvs(self, files: TaskFiles) -> dict[str, TaskSplit]:
        splits: dict[str, TaskSplit] = {}
        for name, split in files.splits.items():
            x, y = read_csv(split.table, require_y=name != "query")
            labelled = y is not None
            if y is None:
                y = torch.full_like(x, math.nan)
            splits[name] = TaskSplit(x, y, [f"row_{i}" for i in range(1, len(x) + 1)], labelled)
        return splits

    # ------------------------------------------------------------------ what the fine-tuner asks
    @property
    def has_val(self) -> bool:
        return "val" in self.splits

    @property
    def has_query(self) -> bool:
        return "query" in self.splits

    @property
    def query_labelled(self) -> bool:
        return self.has_query and self.splits["query"].labelled

    @property
    def query_files(self) -> list[str]:
        return self.splits["query"].files if self.has_query else []

    def summary(self) -> str:
        """One line for logs: the task's shape."""
        self.setup()
        kind = f"{self.ways}-way classification ({', '.join(self.labels)})" if self.ways else "regression"
        sizes = ", ".join(f"{len(split)} {name}" for name, split in self.splits.items())
        query = "" if not self.has_query else " (labelled)" if self.query_labelled else " (unlabelled)"
        return f"{self.root}: {kind}; {sizes}{query}"

    def prepare_validation(self) -> str:
        """Find the val split a fine-tune stops on (``validation``; the support set it trains on
        loses what ``holdout`` takes), once; what it is. Not called, the folder's splits stand
        as read (``test``, ``predict``, and amortized learners that only adapt)."""
        self.setup()
        if not self.validation_source:
            options = (self.validation, self.val_per_class, self.val_copies, self.val_seed)
            train, val, self.validation_source = derive_validation(
                self.splits["support"], self.splits.get("val"), self.task, *options
            )
            self.fine_tune_split = train
            if val is None:
                self.splits.pop("val", None)
            else:
                self.splits["val"] = val
        return self.validation_source

    def support_split(self) -> TaskSplit:
        """What adaptation trains on (``train_dataloader``) or computes prototypes from: the
        support set less any holdout, with ``support_augmentation`` distorted copies of each image."""
        self.setup()
        split = self.fine_tune_split or self.splits["support"]
        if not self.support_augmentation or self.task != "classification":
            return split
        if self._augmented is None or self._augmented[0] is not split:
            # numpy's warp, not torch's: lthmaml-device makes the same copies without torch.
            x = support_copies(split.x.numpy(), self.support_augmentation, self.val_seed)
            times = self.support_augmentation + 1
            augmented = TaskSplit(torch.from_numpy(x), split.y.repeat(times), split.files * times)
            self._augmented = (split, augmented)
        return self._augmented[1]

    # ------------------------------------------------------------------ loaders
    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        split = self.support_split() if name == "support" else self.splits[name]
        return DataLoader(
            TensorDataset(split.x, split.y),
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=collate_pair,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _need_query(self, labelled: bool) -> None:
        self.setup()
        if not self.has_query:
            raise DataError(f"task folder {self.root} has no query: add query/*.png or query.csv to predict")
        if labelled and not self.query_labelled:
            raise DataError(
                f"the query of {self.root} is unlabelled, so there is nothing to test against: put its "
                "images in query/<label>/ (or add a y column to query.csv), or only predict"
            )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader("support", shuffle=True)

    def val_dataloader(self) -> Any:
        self.setup()
        return self._loader("val", shuffle=False) if self.has_val else []

    def test_dataloader(self) -> DataLoader:
        self._need_query(labelled=True)
        return self._loader("query", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        self._need_query(labelled=False)
        return self._loader("query", shuffle=False)


def check_compatible(
    datamodule: TaskFolderDataModule, metadata: Any, artifact: Union[str, Path, None] = None
) -> None:
    """ConfigError unless a model (its :class:`~lthmaml.edge.export.ArtifactMetadata`) fits the folder
    (:func:`~lthmaml.data.taskfiles.check_model_fits`). The folder is read in the model's look and
    normalisation (:meth:`TaskFolderDataModule.follow`)."""
    datamodule.follow(metadata)
    datamodule.setup()
    check_model_fits(
        metadata, datamodule.root, datamodule.task, datamodule.labels, datamodule.image_size, artifact
    )
