"""Pruning while training: the window schedule every such strategy shares, written once.

Every ``steps_between`` training batches a pruning step happens; the scores it ranks are summed
over the last ``accumulate_batches`` batches before it (``None``: all of them), over all ranks.
Before each step the net trained at the current level is recorded (round 0: the dense net), and
the final level is recorded when the fit ends, before ModelCheckpoint writes ``last.ckpt``.

With ``patience`` a level may end sooner, on a validation plateau: the pruning step then happens
at the validation after which ``patience`` validations in a row did not improve the monitored
metric (by more than ``min_delta``) since the last pruning step, and at the latest after
``steps_between`` batches as before; the level's record says ``stopped_early``. The final level
(the strategy's target reached) ends the fit on its plateau the same way, as ``EarlyStopping``
would. Since the plateau
may come before the window of the last ``accumulate_batches`` opens, scoring then runs on every
batch of the level: a step on a plateau before the window sums the scores of every batch since
the last step, and when the window opens the earlier sums are dropped, so a later step sums the
window's batches as without ``patience`` (the cost of scoring thus grows to every batch when
``accumulate_batches < steps_between``).

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
from lthmaml.tracking import BestWeights


class IterativePruning(PruningCallback):
    """Base of the prune-while-training strategies.

    Args:
        steps_between: training batches (meta-updates for MAML) from one pruning step to the next.
        accumulate_batches: score only the last this many batches before each pruning step
            (``None``, or more than ``steps_between``: every batch since the last step).
        write_every: record the level of every this many pruning steps (``rounds/round_XX``); the
            final level is always recorded.
        **kwargs: the options of :class:`~callbacks.base.PruningCallback` (``patience`` and
            ``min_delta``: a pruning step on a validation plateau, before ``steps_between``
            batches; see the module docstring for the scores it sums).
    """

    score_before_update: ClassVar[bool] = False
    plateau_rounds = True
    state_attributes = (
        *PruningCallback.state_attributes,
        "batches_since_prune",
        "score_sums",
        "tasks_scored",
        "last_step",
        "level_best",
        "level_start_step",
        "ended_on_plateau",
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
        self.level_best = BestWeights(self.monitor or "", self.mode or "max", self.min_delta)
        """The level's best validation (no weights kept): what ``patience`` counts from."""
        self.level_start_step: Optional[int] = 0
        """The global step of the last pruning step (0: the dense level), for the record."""
        self.ended_on_plateau = False
        """Whether the final level (the target reached) ended the fit on its plateau."""

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
    @property
    def window_start(self) -> int:
        """The level's batch (0-based) that opens the window of the last ``accumulate_batches``."""
        return self.steps_between - min(self.accumulate_batches or self.steps_between, self.steps_between)

    def in_window(self) -> bool:
        # With patience a plateau may come before the window opens: score every batch of the level.
        return self.patience is not None or self.batches_since_prune >= self.window_start

    def accumulate(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self.patience is not None and self.batches_since_prune == self.window_start > 0:
            self.score_sums, self.tasks_scored = {}, 0  # no plateau before the window: sum the window
        scores, count = self.score_batch(pl_module, batch)
        for name, score in scores.items():
            total = self.score_sums.get(name)
            self.score_sums[name] = score.detach() if total is None else total.to(score) + score.detach()
        self.tasks_scored += count

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stopped_early: bool = False) -> None:
        """Record the net as trained at the current level."""
        self.write_round(
            trainer,
            pl_module,
            tasks_scored=self.last_step.get("tasks_scored"),
            details={**self.details(pl_module), **self.last_step.get("details", {})},
            round_start_step=self.level_start_step,
            stopped_early=stopped_early,
        )

    def pruning_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stopped_early: bool) -> None:
        """Record the level (every ``write_every`` steps), prune by the summed scores, start a level."""
        if self.pruning_steps % self.write_every == 0:
            self.record(trainer, pl_module, stopped_early)  # the net trained at this level, before the step
        scores = self.reduce_scores(trainer, self.score_sums)
        tasks = self.reduce_count(trainer, self.tasks_scored)
        before = sparsity.sparsity_report(pl_module).sparsity
        details = self.prune_step(trainer, pl_module, scores)
        self.pruning_steps += 1
        self.last_step = {"tasks_scored": tasks, "details": details}
        self.batches_since_prune, self.score_sums, self.tasks_scored = 0, {}, 0
        self.level_best.reset()
        self.level_start_step = trainer.global_step
        after = sparsity.sparsity_report(pl_module).sparsity
        plateau = f" (a plateau after {self.patience} validations)" if stopped_early else ""
        rank_zero_info(
            f"{type(self).__name__}: pruning step {self.pruning_steps} scored on {tasks} tasks{plateau}: "
            f"sparsity {before:.2%} -> {after:.2%} {details}"
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.level_best.monitor, self.level_best.mode = self.monitor or "", self.mode or "max"

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.score_before_update and not self.finished(pl_module) and self.in_window():
            self.accumulate(pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.finished(pl_module):
            self.batches_since_prune += 1  # the final level's length, for its plateau
            return
        if not self.score_before_update and self.in_window():
            self.accumulate(pl_module, batch)
        self.batches_since_prune += 1
        if self.batches_since_prune >= self.steps_between:
            self.pruning_step(trainer, pl_module, stopped_early=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or self.patience is None:
            return
        self.level_best.update(self.monitored(trainer), dict, step=trainer.global_step)
        if self.level_best.validations_since_best < self.patience or self.batches_since_prune == 0:
            return
        if self.finished(pl_module):  # the final level has converged too: the fit is done
            self.ended_on_plateau, trainer.should_stop = True, True
            rank_zero_info(f"{type(self).__name__}: the final level plateaued; the fit stops")
        else:
            self.pruning_step(trainer, pl_module, stopped_early=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint's hook, so the fit's last.ckpt holds the final record too.
        if self.pruning_steps > 0 and not self.level_recorded and self.last_epoch(trainer):
            self.record(trainer, pl_module, stopped_early=self.ended_on_plateau)
        super().on_train_epoch_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "level_start_step" not in state_dict and self.pruning_steps > 0:
            self.level_start_step = None  # a checkpoint from before it was kept: not known
