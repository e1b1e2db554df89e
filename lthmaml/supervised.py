"""A plain supervised classifier: the pruning callbacks work on it as on MAML (the lottery-ticket
experiments also prune ordinary supervised nets)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lthmaml.data.omniglot import load_omniglot
from lthmaml.errors import TrainingError, non_finite_message
from lthmaml.module import NetModule


class Classifier(NetModule):
    """Cross-entropy training of ``net`` on (image, label) batches."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=self.unsaved_hparams())

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if not bool(loss.isfinite()):  # stop before backward and the optimizer step see it
            raise TrainingError(
                non_finite_message(
                    "loss", self.trainer.global_step, self.trainer.current_epoch, "the optimizer lr"
                )
            )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def task_losses(self, batch, adapted: bool = False) -> Iterator[Tensor]:
        """The loss pruning criteria differentiate: here one per batch (there is no inner loop)."""
        x, y = batch
        yield F.cross_entropy(self.net(x), y)


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
