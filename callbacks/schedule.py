"""The level schedule every strategy with pruning events shares, written once.

A *level* is the net trained between two pruning events. It trains at most ``epochs_per_level``
epochs or ``steps_per_level`` training batches (meta-updates for MAML), and with ``patience`` it ends
sooner, on a validation plateau (``EarlyStopping``'s rule, counted by the one tracker of
:class:`~callbacks.base.PruningCallback`): a level of steps at the validation itself, a level of
epochs at the end of that validation's epoch. A level of steps whose record keeps its best
validation ends after the validation of its last step, when Lightning runs one there. At its end
the level is recorded (every ``write_every``-th, and always the final one), then the strategy's
:meth:`~LevelSchedule.prune_level` makes the next level. The final level (after ``levels``
pruning events, or once :meth:`~LevelSchedule.pruned_enough` says the target is reached) either
ends the fit at its own end (``last_level_ends_fit``: the lottery's last round) or trains on until
the fit ends or plateaus.

Scores that need the training batches (``scored``: taken ``before`` or ``after`` the batch's
update) are summed over the last ``accumulate_batches`` batches of each level (``None``: all of
them), over all ranks. With ``patience`` a plateau may come before that window opens, so scoring
then runs on every batch of the level; when the window opens the earlier sums are dropped, so a
level that runs its full length sums the window's batches as without ``patience``.

The fit's length is the Trainer's own (``max_epochs: -1`` lets the schedule end it): a shorter one
than the schedule needs is refused at setup, a longer one ends at the schedule's end through
``trainer.should_stop``. A resumed fit continues the level where it stopped; one resumed from a
level's record (written before its pruning event) prunes first.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError


class LevelSchedule(PruningCallback):
    """Base of the strategies that prune at the end of each level.

    Args:
        levels: pruning events (the fit trains ``levels + 1`` levels); None: until
            :meth:`pruned_enough`.
        epochs_per_level, steps_per_level: the (maximum) length of a level: exactly one.
        accumulate_batches: score only the last this many batches of a level (``None``, or more
            than ``steps_per_level``: all of them).
        write_every: record every this many levels (the final level is always recorded).
        **kwargs: the options of :class:`~callbacks.base.PruningCallback`.
    """

    plateaus = True
    scored: ClassVar[Optional[Literal["before", "after"]]] = None
    """When :meth:`score_batch` runs: at a batch's parameters (``before`` its update), ``after`` it,
    or never (None: the strategy scores at the level's end)."""
    last_level_ends_fit: ClassVar[bool] = False
    length_options: ClassVar[str] = "steps_between"
    """The strategy's names for ``epochs_per_level`` / ``steps_per_level``, for messages."""
    state_attributes = (
        *PruningCallback.state_attributes,
        "level_batches",
        "level_start_epoch",
        "score_sums",
        "tasks_scored",
        "last_step",
        "reset_pending",
        "end_pending",
    )

    def __init__(
        self,
        levels: Optional[int] = None,
        epochs_per_level: Optional[int] = None,
        steps_per_level: Optional[int] = None,
        accumulate_batches: Optional[int] = None,
        write_every: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if (epochs_per_level is None) == (steps_per_level is None):
            raise ConfigError(f"{name}: set exactly one of {self.length_options}")
        if (epochs_per_level or steps_per_level) < 1:
            raise ConfigError(f"{name}: {self.length_options} must be >= 1")
        if write_every < 1:
            raise ConfigError(f"{name}.write_every must be >= 1, got {write_every}")
        if accumulate_batches is not None and accumulate_batches < 1:
            raise ConfigError(
                f"{name}.accumulate_batches must be >= 1 or null (every batch), got {accumulate_batches}"
            )
        self.levels = levels
        self.epochs_per_level, self.steps_per_level = epochs_per_level, steps_per_level
        self.accumulate_batches, self.write_every = accumulate_batches, write_every
        self.level_batches = 0
        """Training batches of the current level so far."""
        self.level_start_epoch: Optional[int] = 0
        self.score_sums: dict[str, Tensor] = {}
        self.tasks_scored = 0
        self.last_step: dict[str, Any] = {}
        """What the last pruning event did, for the next level's record."""
        self.reset_pending = False
        self.end_pending = False
        """A level of steps is at its length and ends at the next hook: after its last step's
        validation, if one runs, so that validation can be the best it records."""

    # ------------------------------------------------------------------ the strategy's method
    def pruned_enough(self, pl_module: pl.LightningModule) -> bool:
        """Whether the target is reached: the current level is the final one."""
        return self.levels is not None and self.pruning_steps >= self.levels

    def score_batch(self, pl_module: pl.LightningModule, batch: Any) -> tuple[dict[str, Tensor], int]:
        """The criterion on one batch: scores by name, and the tasks (or batches) they cover."""
        raise NotImplementedError

    def prune_level(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: dict[str, Tensor]
    ) -> dict[str, Any]:
        """Make the next level from the recorded one (``scores``: the window's sums over all
        ranks); what it did, for the next record's ``details``."""
        raise NotImplementedError

    def may_end_level(self) -> bool:
        """Whether a plateau may end the current level now (a strategy may need it to train on)."""
        return True

    def restart_optimizers(self) -> None:
        """Fresh optimizer and scheduler state when the next level starts (as a new training run)."""
        self.reset_pending = True

    # ------------------------------------------------------------------ where the level is
    def done(self, pl_module: pl.LightningModule) -> bool:
        """Whether the final level is recorded."""
        return self.level_recorded and self.pruned_enough(pl_module)

    def at_max_length(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if self.pruned_enough(pl_module) and not self.last_level_ends_fit:
            return False  # the final level trains on to the end of the fit
        if self.epochs_per_level is not None:  # asked at an epoch's end
            return trainer.current_epoch + 1 >= self.level_start_epoch + self.epochs_per_level
        return self.level_batches >= self.steps_per_level

    def level_over(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if self.level_batches == 0 or self.done(pl_module):
            return False
        return (self.plateaued and self.may_end_level()) or self.at_max_length(trainer, pl_module)

    def end_level(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the level, then make the next one, or end the fit after the final level."""
        final = self.pruned_enough(pl_module)
        stopped_early = not self.at_max_length(trainer, pl_module)
        if final or self.pruning_steps % self.write_every == 0:
            best = self.best.epoch if self.keeps == "best" and self.best.state is not None else None
            in_level = None
            if best is not None and self.epochs_per_level is not None:
                in_level = best - self.level_start_epoch + 1  # 1 = the level's first epoch
            record = self.record(trainer, pl_module, stopped_early, val_epoch_in_round=in_level)
            found = "no validation" if record["val"] is None else f"{self.monitor} {record['val']:.4g}"
            rank_zero_info(
                f"{type(self).__name__}: level {self.pruning_steps} (record {record['round']}) trained "
                f"at sparsity {record['sparsity']:.2%}: {found} (step {record['val_step']})"
                + (f", ended after {self.patience} validations without improvement" if stopped_early else "")
            )
        if final:
            trainer.should_stop = True
        else:
            self.next_level(trainer, pl_module)

    def next_level(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scores = self.reduce_scores(trainer, self.score_sums)
        tasks = self.reduce_count(trainer, self.tasks_scored)
        before = sparsity.sparsity_report(pl_module).sparsity
        done = self.prune_level(trainer, pl_module, scores)
        self.pruning_steps += 1
        self.last_step = {"tasks_scored": tasks if self.scored else None, "details": done}
        self.score_sums, self.tasks_scored, self.level_batches = {}, 0, 0
        self.best.reset()
        self.level_start_step = self.level_start_epoch = None  # known at the level's first batch
        scored = f" scored on {tasks} tasks" if self.scored else ""
        rank_zero_info(
            f"{type(self).__name__}: pruning step {self.pruning_steps}{scored}: sparsity {before:.2%} -> "
            f"{sparsity.sparsity_report(pl_module).sparsity:.2%} {done or ''}"
        )

    # ------------------------------------------------------------------ the score window
    @property
    def window_start(self) -> int:
        """The level's batch (0-based) that opens the window of the last ``accumulate_batches``."""
        length = self.steps_per_level or 0
        return length - min(self.accumulate_batches or length, length)

    def scoring(self, pl_module: pl.LightningModule) -> bool:
        # With patience a plateau may come before the window opens: score every batch of the level.
        in_window = self.patience is not None or self.level_batches >= self.window_start
        return in_window and not self.pruned_enough(pl_module)

    def accumulate(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self.patience is not None and self.level_batches == self.window_start > 0:
            self.score_sums, self.tasks_scored = {}, 0  # no plateau before the window: sum the window
        scores, count = self.score_batch(pl_module, batch)
        for name, score in scores.items():
            total = self.score_sums.get(name)
            self.score_sums[name] = score.detach() if total is None else total.to(score) + score.detach()
        self.tasks_scored += count

    # ------------------------------------------------------------------ the fit's length
    def check_fit_length(self, trainer: pl.Trainer) -> None:
        """Refuse a Trainer limit shorter than the schedule (a longer one ends by ``should_stop``)."""
        if not self.last_level_ends_fit or self.levels is None:
            return
        levels = self.levels + 1
        if self.epochs_per_level is not None:
            name, limit, count = "max_epochs", trainer.max_epochs, levels * self.epochs_per_level
        else:
            name, limit, count = "max_steps", trainer.max_steps, levels * self.steps_per_level
            batches = trainer.num_training_batches
            if limit in (None, -1) and trainer.max_epochs not in (None, -1) and math.isfinite(batches):
                name, limit, count = "max_epochs", trainer.max_epochs, math.ceil(count / batches)
        if limit is not None and 0 <= limit < count:
            raise ConfigError(
                f"{type(self).__name__} needs trainer.{name} >= {count} for its {levels} levels, got "
                f"{limit} (-1: the schedule ends the fit)"
            )

    # ------------------------------------------------------------------ Lightning hooks
    def tracking(self, pl_module: pl.LightningModule) -> bool:
        return super().tracking(pl_module) and not self.done(pl_module)

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **fields: Any) -> dict:
        """:meth:`PruningCallback.record` with what the pruning event that made the level did."""
        details = {**self.last_step.get("details", {}), **fields.pop("details", {})}
        tasks = self.last_step.get("tasks_scored")
        return super().record(trainer, pl_module, *args, tasks_scored=tasks, details=details, **fields)

    def records_at_fit_end(self, pl_module: pl.LightningModule) -> bool:
        return not self.last_level_ends_fit and self.pruning_steps > 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_fit_length(trainer)
        if self.done(pl_module) and self.last_level_ends_fit:  # resumed after the final record
            rank_zero_info(f"{type(self).__name__}: all {len(self.history)} levels are recorded")
            trainer.should_stop = True
        elif self.level_recorded and not self.pruned_enough(pl_module):
            self.next_level(trainer, pl_module)  # resumed from a level's record, written before pruning

    def _reset_if_pending(self, trainer: pl.Trainer) -> None:
        if self.reset_pending:
            trainer.strategy.setup_optimizers(trainer)
            self.reset_pending = False

    def _end_if_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end_pending:
            self.end_pending = False
            self.end_level(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_if_pending(trainer, pl_module)  # resumed from the checkpoint of a level's last validation
        self._reset_if_pending(trainer)  # before the epoch, so no epoch-end scheduler step sees it

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._end_if_pending(trainer, pl_module)  # no validation ran after the level's last step
        self._reset_if_pending(trainer)
        if self.level_batches == 0:
            self.level_start_step, self.level_start_epoch = trainer.global_step, trainer.current_epoch
        if self.scored == "before" and self.scoring(pl_module):
            self.accumulate(pl_module, batch)

    def after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A strategy's hook after each optimizer step (masks re-applied), before a level may end."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after_step(trainer, pl_module)
        if self.scored == "after" and self.scoring(pl_module):
            self.accumulate(pl_module, batch)
        self.level_batches += 1
        if self.steps_per_level is not None and self.level_over(trainer, pl_module):
            if not self.tracking(pl_module):
                self.end_level(trainer, pl_module)
                return
            # The record keeps the level's best validation, and Lightning validates this step (if
            # at all) after this hook: end the level once that validation and the checkpoint it
            # may save are done. A final level stops the fit now, which also makes Lightning
            # validate this step.
            self.end_pending = True
            if self.pruned_enough(pl_module) and self.last_level_ends_fit:
                trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or self.patience is None or self.end_pending:
            return  # a level at its length ends at the next hook, plateau or not
        if self.steps_per_level is not None and self.plateaued and self.level_over(trainer, pl_module):
            self.end_level(trainer, pl_module)  # a level of steps ends at the validation

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_if_pending(trainer, pl_module)  # the epoch's validation ran before this hook
        super().on_train_epoch_end(trainer, pl_module)  # logs the sparsity trained at
        pl_module.log("round", float(self.pruning_steps), sync_dist=True)
        if self.epochs_per_level is not None and self.level_over(trainer, pl_module):
            self.end_level(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_if_pending(trainer, pl_module)  # the fit ended at the level's last step
        super().on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.last_level_ends_fit and not self.done(pl_module):
            total = "" if self.levels is None else f" of {self.levels + 1}"
            rank_zero_warn(f"{type(self).__name__}: the fit ended after {len(self.history)}{total} levels")
