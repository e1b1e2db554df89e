"""Conditional Neural Processes (Garnelo et al. 2018) as a LightningModule for regression tasks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta.episodic import AmortizedLearner
from lthmaml.meta.metrics import TaskResult


def gaussian_nll(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Per task (all but the last two dimensions): the mean over its points and outputs of
    ``log(2 pi std^2) / 2 + (target - mean)^2 / (2 std^2)``."""
    nll = F.gaussian_nll_loss(mean, target, std.pow(2), full=True, reduction="none")
    return nll.mean((-2, -1))


class CNP(AmortizedLearner):
    """A Conditional Neural Process: the support pairs, encoded and averaged, condition a decoder
    that predicts a Gaussian for each query ``x``; trained by the query's Gaussian negative
    log-likelihood (``nll``). ``loss_post`` is the query MSE of the predictive mean, the quantity
    MAML's sinusoid table reports, so the two sit side by side.

    Adapting to a task is one encoder pass over the support set, so there is no pre-adaptation
    model and no ``*_pre`` metric; ``task_losses(batch, adapted)`` is the query NLL given the
    support set for either value. All tasks of a meta-batch are computed together. The targets
    are the query points only (the paper's also include the context points), so the loss is the
    one MAML's query MSE is measured on.

    Args:
        net: a :class:`~lthmaml.nets.models.CNPNet` (an encoder and a decoder under one module).
        optimizer, lr_scheduler: configurable the LightningCLI way.
    """

    logged_metrics = ("loss_post", "nll")
    test_metrics = ("loss_post", "nll")

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.save_portable_hyperparameters()
        if not (callable(getattr(net, "encode", None)) and callable(getattr(net, "decode", None))):
            raise ConfigError(
                f"CNP needs an encoder-decoder net (lthmaml.nets.models.CNPNet), got {type(net).__name__}"
            )

    def setup(self, stage: str) -> None:
        if getattr(self.trainer.datamodule, "ways", None) is not None:
            raise ConfigError("CNP regresses real targets: use it on regression tasks (SinusoidDataModule)")

    def adaptation_summary(self) -> str:
        return "the mean representation of the support pairs"

    def predict_gaussian(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Predictive mean and standard deviation of every query point, ``[tasks, queries, y]``
        (a single task without the task dimension works too)."""
        if batch.support_y.dtype in (torch.int64, torch.int32):
            raise ConfigError("CNP regresses real targets: it got integer (classification) labels")
        features = (batch.support_x.shape[-1], batch.support_y.shape[-1])
        if features != (self.net.x_features, self.net.y_features):
            raise ConfigError(
                f"model.init_args.net.init_args x_features, y_features = {self.net.x_features}, "
                f"{self.net.y_features} but the tasks have {features[0]}, {features[1]}: set them equal"
            )
        return self.net(batch.support_x, batch.support_y, batch.query_x)

    def results(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Per-task query NLL and MSE of the predictive mean."""
        mean, std = self.predict_gaussian(batch)
        return gaussian_nll(mean, std, batch.query_y), (mean - batch.query_y).pow(2).mean((-2, -1))

    def task_results(self, batch: TaskBatch) -> list[TaskResult]:
        nll, mse = self.results(batch)
        return [TaskResult(loss_pre=None, loss_post=m, nll=n) for n, m in zip(nll, mse)]

    def task_result(self, task: TaskBatch) -> TaskResult:
        nll, mse = self.results(task)
        return TaskResult(loss_pre=None, loss_post=mse, nll=nll)

    def objective(self, result: TaskResult) -> Tensor:
        return result.nll

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        """``[tasks, queries, 2 * y]``: the predictive mean and standard deviation, concatenated."""
        with torch.no_grad():
            return torch.cat(self.predict_gaussian(batch), -1)
