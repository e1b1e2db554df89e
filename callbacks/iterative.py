"""Pruning while training: the window schedule every such strategy shares, written once.

Every ``steps_between`` training batches a pruning step happens; the scores it ranks are summed
over the last ``accumulate_batches`` batches before it (``None``: all of them), over all ranks.
Before each step the net trained at the current level is recorded (round 0: the dense net), and
the final level is recorded when the fit ends, before ModelCheckpoint writes ``last.ckpt``.

A strategy says only its method: ``score_batch`` (its criterion on one batch), ``prune_step``
(how the summed scores remove weights or filters), ``finished`` (its target), and optionally
``details`` (what its records add). ``score_before_update`` says whether the criterion is taken at
the batch's meta-parameters (before its update) or after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError


class IterativePruning(PruningCallback):
    """Base of the prune-while-training strategies.

    Args:
        steps_between: training batches (meta-updates for MAML) from one pruning step to the next.
        accumulate_batches: score only the last this many batches before each pruning step
            (``None``, or more than ``steps_between``: every batch since the last step).
        write_every: record the level of every this many pruning steps (``rounds/round_XX``); the
            final level is always recorded.
        **kwargs: the options of :class:`~callbacks.base.PruningCallback`.
    """

    score_before_update: ClassVar[bool] = False
    state_attributes = (
        *PruningCallback.state_attributes,
        "batches_since_prune",
        "score_sums",
        "tasks_scored",
        "last_step",
    )

    def __init__(
        self,
        steps_between: int = 10,
        accumulate_batches: Optional[int] = None,
        write_every: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if steps_between < 1 or write_every < 1:
            raise ConfigError(
                f"{name}: steps_between and write_every must be >= 1, got {steps_between}, {write_every}"
            )
        if accumulate_batches is not None and accumulate_batches < 1:
            raise ConfigError(
                f"{name}.accumulate_batches must be >= 1 or null (every batch), got {accumulate_batches}"
            )
        self.steps_between = steps_between
        self.accumulate_batches = accumulate_batches
        self.write_every = write_every
        self.batches_since_prune = 0
        self.score_sums: dict[str, Tensor] = {}
        self.tasks_scored = 0
        self.last_step: dict[str, Any] = {}  # what the last pruning step did, for the next record

    # ------------------------------------------------------------------ the strategy's method
    def finished(self, pl_module: pl.LightningModule) -> bool:
        """Whether the strategy's target is reached (then the sparse net just trains on)."""
        raise NotImplementedError

    def score_batch(self, pl_module: pl.LightningModule, batch: Any) -> tuple[dict[str, Tensor], int]:
        """The criterion on one batch: scores by layer name, and the tasks (or batches) they cover."""
        raise NotImplementedError

    def prune_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: Mapping[str, Tensor]
    ) -> dict[str, Any]:
        """Prune by ``scores`` (summed over the window and all ranks); what it did, for the record."""
        raise NotImplementedError

    def details(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What this strategy's records add to the shared schema."""
        return {}

    # ------------------------------------------------------------------ the schedule
    def in_window(self) -> bool:
        window = min(self.accumulate_batches or self.steps_between, self.steps_between)
        return self.batches_since_prune >= self.steps_between - window

    def accumulate(self, pl_module: pl.LightningModule, batch: Any) -> None:
        scores, count = self.score_batch(pl_module, batch)
        for name, score in scores.items():
            total = self.score_sums.get(name)
            self.score_sums[name] = score.detach() if total is None else total.to(score) + score.detach()
        self.tasks_scored += count

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the net as trained at the current level."""
        self.write_round(
            trainer,
            pl_module,
            tasks_scored=self.last_step.get("tasks_scored"),
            details={**self.details(pl_module), **self.last_step.get("details", {})},
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.score_before_update and not self.finished(pl_module) and self.in_window():
            self.accumulate(pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module)
        if self.finished(pl_module):
            return
        if not self.score_before_update and self.in_window():
            self.accumulate(pl_module, batch)
        self.batches_since_prune += 1
        if self.batches_since_prune < self.steps_between:
            return
        if self.pruning_steps % self.write_every == 0:
            self.record(trainer, pl_module)  # the net trained at this level, before the step
        scores = self.reduce_scores(trainer, self.score_sums)
        tasks = self.reduce_count(trainer, self.tasks_scored)
        before = sparsity.sparsity_report(pl_module).sparsity
        details = self.prune_step(trainer, pl_module, scores)
        self.pruning_steps += 1
        self.last_step = {"tasks_scored": tasks, "details": details}
        self.batches_since_prune, self.score_sums, self.tasks_scored = 0, {}, 0
        after = sparsity.sparsity_report(pl_module).sparsity
        rank_zero_info(
            f"{type(self).__name__}: pruning step {self.pruning_steps} scored on {tasks} tasks: "
            f"sparsity {before:.2%} -> {after:.2%} {details}"
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint's hook, so the fit's last.ckpt holds the final record too.
        if self.pruning_steps > 0 and not self.level_recorded and self.last_epoch(trainer):
            self.record(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)
