"""Metric meta-learners: classify a query by comparing its embedding with the support set's.

Adapting to a task is one forward pass of the embedding net over the support set (no backward
pass, no optimizer state), the cheapest on-device learning there is. ProtoNet and MatchingNet
differ only in how query and support embeddings become class log-probabilities
(:meth:`MetricLearner.log_probabilities`); everything else is here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta.distill import Distillable
from lthmaml.meta.episodic import AmortizedLearner
from lthmaml.meta.metrics import TaskResult, task_accuracy


class MetricLearner(Distillable, AmortizedLearner):
    """A classifier of query examples by their embeddings' relation to the support embeddings.

    Support and query sets are embedded in separate forward passes, as MAML's adapted net sees
    them: with batch-statistics BatchNorm the support embeddings (and so what a device keeps per
    task) depend on the support set alone. The class count of a task is read from its support
    labels (``0 .. N-1``, each at least once), so one trained net serves any N.

    Taylor filter pruning sees both passes of a task (unlike MAML's, whose untracked inner loop
    leaves only the query pass): the gate gradient sums over support and query examples, which is
    the criterion over the whole task, divided by the query pass's size, a factor the same in
    every layer that leaves the ranking as it is.

    With a ``distillation`` attached (:mod:`lthmaml.meta.distill`), each task's training objective
    adds its term between the query log-probabilities and the teacher's for the same task.

    Args:
        net: the embedding net, any ``nn.Module`` mapping images to vectors; the shipped one is a
            Conv4 without its classification head (``out_features: null``).
        optimizer, lr_scheduler: configurable the LightningCLI way.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        if getattr(net, "head", None) is not None:
            raise ConfigError(
                f"{type(self).__name__} compares embeddings: build its net without a classification head "
                "(model.init_args.net.init_args.out_features: null)"
            )

    def setup(self, stage: str) -> None:
        self.check_data_fits(self.trainer.datamodule)

    def embed(self, x: Tensor) -> Tensor:
        """``[examples, features]`` embeddings of ``[examples, ...]`` inputs."""
        return self.net(x).flatten(1)

    def log_probabilities(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """``[queries, ways]`` class log-probabilities from ``[shots, features]`` support and
        ``[queries, features]`` query embeddings."""
        raise NotImplementedError

    def task_log_probabilities(self, task: TaskBatch) -> Tensor:
        """Embed one task's support and query sets and score every query against every class."""
        ways = check_labels(task.support_y, task.query_y, type(self).__name__)
        return self.log_probabilities(
            self.embed(task.support_x), task.support_y, self.embed(task.query_x), ways
        )

    def task_result(self, task: TaskBatch) -> TaskResult:
        return query_result(self.task_log_probabilities(task), task.query_y)

    def training_objectives(self, batch: TaskBatch) -> tuple[list[TaskResult], Tensor]:
        teacher = self.teacher_logits(batch)
        if teacher is None:
            return super().training_objectives(batch)
        tasks = [batch.task(i) for i in range(batch.num_tasks)]
        log_ps = [self.task_log_probabilities(task) for task in tasks]
        results = [query_result(log_p, task.query_y) for log_p, task in zip(log_ps, tasks)]
        objectives = [
            self.objective(result) + self.distillation.loss(log_p, target)
            for result, log_p, target in zip(results, log_ps, teacher)
        ]
        return results, torch.stack(objectives)

    def query_logits(self, batch: TaskBatch) -> list[Tensor]:
        """Each task's query log-probabilities (logits up to a constant), without a graph."""
        with torch.no_grad():
            return [self.task_log_probabilities(batch.task(i)) for i in range(batch.num_tasks)]

    def predict_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        """``[tasks, queries, ways]`` class probabilities of the query examples."""
        return torch.stack(self.query_logits(batch)).exp()


def query_result(log_p: Tensor, query_y: Tensor) -> TaskResult:
    """One task's query metrics from its ``[queries, ways]`` log-probabilities (the loss keeps its graph)."""
    return TaskResult(
        loss_pre=None, loss_post=F.nll_loss(log_p, query_y), acc_post=task_accuracy(log_p.detach(), query_y)
    )


def check_labels(support_y: Tensor, query_y: Tensor, learner: str) -> int:
    """The task's class count N, after checking the labels are ``0 .. N-1`` with every class in the
    support set and no query of a class outside it (a one-line error, not an index error in torch)."""
    if support_y.dtype not in (torch.int64, torch.int32):
        raise ConfigError(
            f"{learner} classifies: its tasks need integer labels, got {support_y.dtype} targets "
            "(for regression tasks use MAML or CNP)"
        )
    flat = support_y.flatten()
    query = query_y.flatten() if query_y.numel() else flat[:1]
    ordered = flat.sort().values
    distinct = (ordered[1:] != ordered[:-1]).sum() + 1
    # One device-to-host copy per task (on a GPU every int() or bool() waits for the device): the
    # support's label range and distinct labels, the query's range.
    facts = torch.stack([flat.min(), flat.max(), distinct, query.min(), query.max()]).tolist()
    low, high, present, query_low, query_high = facts
    ways = int(high) + 1
    if low < 0 or present < ways:
        raise DataError(
            f"{learner}: support labels must be 0..{ways - 1} with each class present, got "
            f"{sorted(set(flat.tolist()))}"
        )
    if query_y.numel() and not 0 <= query_low <= query_high < ways:
        raise DataError(f"{learner}: query labels must lie in the support's classes 0..{ways - 1}")
    return ways
