"""What every learner on TaskBatch episodes shares: the per-stage query metrics, the test mean and
95% interval over the fixed test tasks with its one summary line, and (for learners that adapt in
a forward pass) the training, evaluation and ``task_losses`` loops.

The metrics exist once here, so MAML, the metric learners and the CNP log the same names
(``{train,val,test}/{loss,acc}_post``, ``test/*_ci95``) and the tables beside each other compare
the same quantities.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric

from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import TrainingError, non_finite_message
from lthmaml.meta.metrics import TaskResult, mean_and_ci95
from lthmaml.meta.module import NetModule

SUMMARY_LABELS = {"acc_post": "accuracy", "loss_post": "loss", "nll": "Gaussian NLL"}
"""How the test summary line names each metric, in its order (``loss_post``: :data:`LOSS_NAMES`)."""
LOSS_NAMES = {"classification": "cross-entropy", "regression": "MSE"}
"""What the query loss is: a cross-entropy where the task is scored by accuracy too, else the MSE."""


class EpisodicLearner(NetModule):
    """A learner scored on the query sets of tasks, after adapting to their support sets.

    Subclasses say which :class:`~lthmaml.meta.metrics.TaskResult` fields they log
    (``logged_metrics``), which get a test mean and 95% CI (``test_metrics``), and how they adapt
    (:meth:`adaptation_summary`, for the summary line).
    """

    logged_metrics: ClassVar[tuple[str, ...]] = ("loss_pre", "loss_post", "acc_pre", "acc_post")
    """TaskResult fields logged as ``{stage}/{name}`` (a field that is None is skipped)."""
    test_metrics: ClassVar[tuple[str, ...]] = ("loss_post", "acc_post")
    """TaskResult fields whose per-task values give ``test_results[name]`` and ``[name_ci95]``."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MeanMetric()
                for stage in ("train", "val", "test")
                for name in self.logged_metrics
            }
        )
        self.test_per_task = nn.ModuleDict({name: CatMetric() for name in self.test_metrics})
        self.test_results: dict[str, float] = {}

    def adaptation_summary(self) -> str:
        """How test tasks were adapted to, for the summary line (e.g. ``3 inner steps``)."""
        raise NotImplementedError

    def monitorable_metrics(self, datamodule: object) -> list[str]:
        """What fit logs, for checkpoint monitors: accuracy for classification (data with ``ways``);
        training logs no pre-adaptation metric."""
        classification = getattr(datamodule, "ways", None) is not None
        names = [n for n in self.logged_metrics if classification or not n.startswith("acc")]
        train = [
            f"train/{n}{end}" for n in names if not n.endswith("_pre") for end in ("", "_step", "_epoch")
        ]
        return [f"val/{n}" for n in names] + train

    def _log_results(self, stage: str, results: list[TaskResult]) -> None:
        on_step = stage == "train"
        for name in self.logged_metrics:
            values = [getattr(r, name) for r in results]
            if values[0] is None:
                continue
            metric = self.metrics[f"{stage}_{name}"]
            metric(torch.stack(values).detach())
            self.log(
                f"{stage}/{name}", metric, on_step=on_step, on_epoch=True, prog_bar=name.endswith("post")
            )

    def record_test(self, results: list[TaskResult]) -> None:
        """Keep each test task's metrics for the interval at the epoch's end."""
        for result in results:
            for name, metric in self.test_per_task.items():
                value = getattr(result, name)
                if value is not None:
                    metric.update(value.detach())

    def on_test_epoch_start(self) -> None:
        for metric in self.test_per_task.values():
            metric.reset()

    def on_test_epoch_end(self) -> None:
        self.test_results = {}
        for name, metric in self.test_per_task.items():
            if metric.update_count == 0:
                continue
            mean, ci95 = mean_and_ci95(metric.compute())
            self.test_results[name] = mean
            self.test_results[f"{name}_ci95"] = ci95
            # The same on every rank (the CatMetric gathers all tasks); sync_dist keeps DDP quiet.
            self.log(f"test/{name}_ci95", ci95, sync_dist=True)
        tasks = int(self.test_per_task["loss_post"].compute().numel())
        labels = {
            **SUMMARY_LABELS,
            "loss_post": LOSS_NAMES["classification" if "acc_post" in self.test_results else "regression"],
        }
        summary = "; ".join(
            f"{label} {self.test_results[key]:.4f} +- {self.test_results[key + '_ci95']:.4f}"
            for key, label in labels.items()
            if key in self.test_results
        )
        rank_zero_info(
            f"Post-adaptation on {tasks} test tasks ({self.adaptation_summary()}), mean +- 95% CI: {summary}"
        )

    def _evaluate(self, batch: TaskBatch, stage: str) -> list[TaskResult]:
        """Each task's query metrics after the learner's adaptation, logged under ``stage``."""
        raise NotImplementedError

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self.record_test(self._evaluate(batch, "test"))


class AmortizedLearner(EpisodicLearner):
    """A learner whose adaptation is a forward pass over the support set (metric learners, neural
    processes): no inner loop, so training is ordinary back-propagation of the mean query
    objective over the meta-batch (Lightning's automatic optimization, DDP included), and
    evaluation needs no gradients (it runs under ``inference_mode`` too).

    There are no pre-adaptation weights to score, so nothing ``*_pre`` is logged.
    Subclasses implement :meth:`task_result` (one task, differentiable) and may override
    :meth:`objective` (what training minimises, the query loss by default).
    """

    logged_metrics = ("loss_post", "acc_post")

    def task_result(self, task: TaskBatch) -> TaskResult:
        """One task's query metrics; ``loss_post`` (and ``objective``) keep their graph."""
        raise NotImplementedError

    def task_results(self, batch: TaskBatch) -> list[TaskResult]:
        """Every task of a meta-batch (subclasses may compute them together)."""
        return [self.task_result(batch.task(i)) for i in range(batch.num_tasks)]

    def objective(self, result: TaskResult) -> Tensor:
        """The per-task loss training minimises and pruning criteria differentiate."""
        return result.loss_post

    def training_objectives(self, batch: TaskBatch) -> tuple[list[TaskResult], Tensor]:
        """Each task's query metrics and the ``[tasks]`` objectives whose mean training minimises
        (a learner may add terms of its own, such as a distillation's)."""
        results = self.task_results(batch)
        return results, torch.stack([self.objective(r) for r in results])

    def task_losses(self, batch: TaskBatch, adapted: bool = False) -> Iterator[Tensor]:
        """One loss per task for pruning criteria, differentiable w.r.t. the parameters: the query
        objective given the support set, lazily (Taylor pruning's gates see each task's passes).

        ``adapted`` is ignored: adapting is the forward pass over the support set, with no
        pre-adaptation weights to score the support loss at, so both values give the loss
        training minimises (which for ``adapted=True`` is what MAML's callers ask for).
        """
        for i in range(batch.num_tasks):
            yield self.objective(self.task_result(batch.task(i)))

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        results, objectives = self.training_objectives(batch)
        loss = objectives.mean()
        if not bool(loss.isfinite()):  # stop before backward and the optimizer step see it
            raise TrainingError(
                non_finite_message(
                    "meta-loss", self.trainer.global_step, self.trainer.current_epoch, "the optimizer lr"
                )
            )
        self._log_results("train", results)
        return loss

    def _evaluate(self, batch: TaskBatch, stage: str) -> list[TaskResult]:
        with torch.no_grad():
            results = self.task_results(batch)
        self._log_results(stage, results)
        return results
