"""Omniglot as ordinary (non-episodic) classification, for the supervised baseline that the
lottery-ticket papers prune."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lthmaml.data.omniglot import load_omniglot


class OmniglotClassificationDataModule(pl.LightningDataModule):
    """Omniglot as ordinary classification: every character a class, drawers split train/val/test.

    Args:
        root: as for :class:`lthmaml.data.OmniglotDataModule`.
        classes: use the first ``classes`` characters (None: all).
        val_drawers, test_drawers: drawers per character held out for validation and test.
    """

    def __init__(
        self,
        root: str,
        classes: Optional[int] = None,
        val_drawers: int = 3,
        test_drawers: int = 3,
        image_size: int = 28,
        batch_size: int = 64,
        seed: int = 0,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.root, self.classes, self.image_size = root, classes, image_size
        self.val_drawers, self.test_drawers = val_drawers, test_drawers
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        images = load_omniglot(self.root, self.image_size, self.cache_dir).images[: self.classes]
        classes, drawers = images.shape[:2]
        order = torch.randperm(drawers, generator=torch.Generator().manual_seed(self.seed))
        held_out = self.val_drawers + self.test_drawers
        parts = {
            "train": order[held_out:],
            "val": order[: self.val_drawers],
            "test": order[self.val_drawers : held_out],
        }
        for split, drawer_index in parts.items():
            x = images[:, drawer_index].flatten(0, 1)
            y = torch.arange(classes).repeat_interleave(len(drawer_index))
            self.splits[split] = TensorDataset(x, y)

    def _loader(self, split: str) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits[split], self.batch_size, shuffle=split == "train", generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
