"""A plain supervised classifier: the pruning callbacks work on it as on MAML (the lottery-ticket
experiments also prune ordinary supervised nets)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.errors import TrainingError, non_finite_message
from lthmaml.meta.module import NetModule


class Classifier(NetModule):
    """Cross-entropy training of ``net`` on (image, label) batches."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.save_portable_hyperparameters()

    def setup(self, stage: str) -> None:
        self.check_data_fits(self.trainer.datamodule)

    def monitorable_metrics(self, datamodule: object) -> list[str]:
        """What fit logs, for checkpoint monitors."""
        return ["val/loss", "val/acc", "train/loss", "train/acc"]

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
