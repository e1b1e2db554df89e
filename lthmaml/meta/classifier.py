"""A plain supervised classifier: the pruning callbacks work on it as on MAML (the lottery-ticket
experiments also prune ordinary supervised nets)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import CatMetric

from lthmaml.errors import ConfigError, TrainingError, non_finite_message
from lthmaml.meta.distill import Distillable, Distillation, check_options, load_teacher
from lthmaml.meta.metrics import mean_and_ci95
from lthmaml.meta.module import NetModule


class Classifier(Distillable, NetModule):
    """Cross-entropy training of ``net`` on (image, label) batches.

    Args:
        net, optimizer, lr_scheduler: the net and its optimizer, configurable the LightningCLI way.
        distill_from: a Classifier checkpoint of the same net (e.g. a dense run's) to distil from:
            each training batch's loss adds ``distill_weight`` times the temperature-scaled KL
            towards its logits (:mod:`lthmaml.meta.distill`). A ``LotteryTicket`` distils from
            its own round 0 instead (its ``distill_weight``).
        distill_weight, distill_temperature: the term's weight (0: none) and temperature.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        distill_from: Optional[str] = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 4.0,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.save_portable_hyperparameters()
        check_options("model.init_args", distill_weight, distill_temperature)
        if distill_weight > 0 and distill_from is None:
            raise ConfigError("model.init_args.distill_weight needs distill_from, the teacher's checkpoint")
        self.distill_from = distill_from
        self.distill_weight, self.distill_temperature = float(distill_weight), float(distill_temperature)
        self.test_correct = CatMetric()
        """Each test example's 0/1 correctness, for the accuracy's 95% interval (``test/acc_ci95``)."""

    def setup(self, stage: str) -> None:
        self.check_data_fits(self.trainer.datamodule)

    def on_fit_start(self) -> None:
        """Load the teacher (once the net is on its device, so the teacher's copy is there too)."""
        if self.distill_from is not None and self.distill_weight > 0:
            teacher = load_teacher(self, Path(self.distill_from))
            self.distillation = Distillation(teacher, self.distill_weight, self.distill_temperature)

    def monitorable_metrics(self, datamodule: object) -> list[str]:
        """What fit logs, for checkpoint monitors."""
        return ["val/loss", "val/acc", "train/loss", "train/acc"]

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        correct = (logits.argmax(-1) == y).float()
        self.log(f"{stage}/acc", correct.mean(), prog_bar=True)
        if stage == "test":
            self.test_correct.update(correct)
        teacher = self.teacher_logits(batch) if stage == "train" else None
        return loss if teacher is None else loss + self.distillation.loss(logits, teacher[0])

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

    def on_test_epoch_start(self) -> None:
        self.test_correct.reset()

    def on_test_epoch_end(self) -> None:
        """The interval over test examples, as the episodic learners give one over test tasks, so a
        pruning run's levels carry error bars against the dense net."""
        if self.test_correct.update_count:
            _, ci95 = mean_and_ci95(self.test_correct.compute())
            self.log("test/acc_ci95", ci95, sync_dist=True)

    def query_logits(self, batch) -> list[Tensor]:
        """The batch's logits (one entry: the batch is the one "task"), without a graph."""
        with torch.no_grad():
            return [self.net(batch[0])]

    def task_losses(self, batch, adapted: bool = False) -> Iterator[Tensor]:
        """The loss pruning criteria differentiate: here one per batch (there is no inner loop)."""
        x, y = batch
        yield F.cross_entropy(self.net(x), y)
