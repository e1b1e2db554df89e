"""Round-based pruning: train a round, keep its best weights, record them, prune, start afresh.

The schedule every such strategy shares, written once: ``rounds`` counts pruning events, so a fit
trains ``rounds + 1`` rounds; a round lasts at most ``epochs_per_round`` epochs or
``steps_per_round`` optimizer steps (the fit's length is set from them), and with ``patience`` it
ends earlier, on a validation plateau: ``patience`` validations in a row that did not improve on
the round's best by more than ``min_delta`` (``EarlyStopping``'s rule), so each level trains to
convergence and its record's ``val_step`` is its early-stopping iteration. An epoch-long round
ends at the end of the epoch of that validation, a step-long one at the validation itself. Each
round's start (global step and epoch) is kept in the callback's state, since rounds no longer
start at multiples of their length; a resumed fit continues the round where it stopped.

During a round the weights of the best validation by ``monitor`` are kept
(:class:`~lthmaml.tracking.BestWeights`); at its end they are restored and recorded under
``rounds/round_XX``, then, unless it was the last round, the strategy's ``next_round`` prunes them
to the next level and the optimizer and scheduler start afresh. The last round ends the fit, so
``rounds/round_XX`` always describes the net trained at level ``XX``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.tracking import BestWeights


class RoundBasedPruning(PruningCallback):
    """Base of the strategies that prune between training rounds.

    Args:
        rounds: pruning events; the fit trains ``rounds + 1`` rounds.
        epochs_per_round, steps_per_round: (maximum) length of a round; set exactly one. A
            longer ``trainer.max_epochs`` / ``max_steps`` (or none) is cut to the schedule; a
            shorter one is an error naming the needed value.
        **kwargs: the options of :class:`~callbacks.base.PruningCallback` (``monitor``: the metric
            whose best value in a round picks the weights recorded and pruned; a round without
            validation uses its last weights; ``patience``, ``min_delta``: the plateau that ends
            a round before its maximum length).
    """

    plateau_rounds = True
    state_attributes = (
        *PruningCallback.state_attributes,
        "round",
        "best",
        "reset_pending",
        "round_start_step",
        "round_start_epoch",
    )

    def __init__(
        self,
        rounds: int = 5,
        epochs_per_round: Optional[int] = None,
        steps_per_round: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if rounds < 1:
            raise ConfigError(f"{name}.rounds must be >= 1 (pruning events), got {rounds}")
        if (epochs_per_round is None) == (steps_per_round is None):
            raise ConfigError(f"{name}: set exactly one of epochs_per_round and steps_per_round")
        if (epochs_per_round or steps_per_round) < 1:
            raise ConfigError(f"{name}.epochs_per_round / steps_per_round must be >= 1")
        self.rounds = rounds
        self.epochs_per_round = epochs_per_round
        self.steps_per_round = steps_per_round
        self.round = 0
        self.best = BestWeights(self.monitor or "", self.mode or "max", self.min_delta)
        self.reset_pending = False
        self.round_start_step: Optional[int] = 0
        self.round_start_epoch: Optional[int] = 0
        """Global step and epoch the current round started at; None until its first batch."""

    # ------------------------------------------------------------------ the strategy's method
    def next_round(self, pl_module: pl.LightningModule) -> None:
        """Prune the recorded net to level ``self.round`` and set the weights the round starts from."""
        raise NotImplementedError

    def round_details(self) -> dict[str, Any]:
        """What the strategy adds to each round's record (its ``details``)."""
        return {}

    # ------------------------------------------------------------------ the schedule
    @property
    def finished(self) -> bool:
        return len(self.history) > self.rounds

    @property
    def round_started(self) -> bool:
        """Whether the current round has trained a batch (its start is known)."""
        start = self.round_start_epoch if self.epochs_per_round is not None else self.round_start_step
        return start is not None

    @property
    def plateaued(self) -> bool:
        """Whether ``patience`` validations in a row did not improve on the round's best."""
        return self.patience is not None and self.best.validations_since_best >= self.patience

    def at_max_length(self, trainer: pl.Trainer) -> bool:
        """Whether the round has trained its full length (epoch rounds: asked at an epoch's end)."""
        if self.epochs_per_round is not None:
            return trainer.current_epoch + 1 >= self.round_start_epoch + self.epochs_per_round
        return trainer.global_step >= self.round_start_step + self.steps_per_round

    def may_stop_early(self) -> bool:
        """Whether a plateau may end the current round now (a strategy may need it to train on)."""
        return True

    def round_over(self, trainer: pl.Trainer) -> bool:
        if self.finished or not self.round_started:
            return False
        return (self.plateaued and self.may_stop_early()) or self.at_max_length(trainer)

    def end_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the round's best net, then prune it and start the next round (or end the fit)."""
        best = self.best
        if best.state is not None:
            sparsity.rewind(pl_module, best.state)  # the round's best-validation weights
        in_round = None
        if best.epoch is not None and self.epochs_per_round is not None:
            in_round = best.epoch - self.round_start_epoch + 1  # 1 = the round's first
        stopped_early = not self.at_max_length(trainer)
        self.write_round(
            trainer,
            pl_module,
            recorded="best" if best.state is not None else "last",
            val_metrics=best.metrics if best.state is not None else None,
            round_start_step=self.round_start_step,
            stopped_early=stopped_early,
            details=self.round_details(),
            val_step=best.step,
            val_epoch=best.epoch,
            val_epoch_in_round=in_round,
        )
        record = self.history[-1]
        found = "no validation" if best.value is None else f"best {self.monitor} {best.value:.4g}"
        rank_zero_info(
            f"{type(self).__name__}: round {record['round']} trained at sparsity {record['sparsity']:.2%}: "
            f"{found}"
            + ("" if best.epoch is None else f" (epoch {best.epoch}, step {best.step})")
            + (f", stopped after {self.patience} validations without improvement" if stopped_early else "")
        )
        if self.finished:
            trainer.should_stop = True
        else:
            self.start_next_round(pl_module)

    def start_next_round(self, pl_module: pl.LightningModule) -> None:
        self.round += 1
        self.pruning_steps = self.round
        self.next_round(pl_module)
        self.best.reset()
        # The fresh optimizer comes when the next round starts, so no epoch-end scheduler step hits it.
        self.reset_pending = True
        self.round_start_step = self.round_start_epoch = None  # known at the round's first batch

    def round_steps(self, trainer: pl.Trainer) -> Optional[int]:
        """Optimizer steps in one round (None while the epoch length is unknown)."""
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        if self.steps_per_round is not None and trainer.max_epochs not in (None, -1):
            needed = (self.rounds + 1) * self.steps_per_round
            if trainer.max_epochs * steps_per_epoch < needed:
                epochs = math.ceil(needed / steps_per_epoch)
                raise ConfigError(
                    f"{type(self).__name__} needs trainer.max_epochs >= {epochs} "
                    f"for {needed} steps ((rounds + 1) * steps_per_round), got {trainer.max_epochs}"
                )
        return self.steps_per_round or self.epochs_per_round * steps_per_epoch

    def fit_schedule(self, trainer: pl.Trainer) -> None:
        """Make the fit as long as the schedule: cut a longer limit, refuse a shorter one."""
        if self.epochs_per_round is not None:
            needed, limit, name = (self.rounds + 1) * self.epochs_per_round, trainer.max_epochs, "max_epochs"
        else:
            needed, limit, name = (self.rounds + 1) * self.steps_per_round, trainer.max_steps, "max_steps"
        if limit is not None and 0 <= limit < needed:
            unit = "epochs_per_round" if self.epochs_per_round is not None else "steps_per_round"
            raise ConfigError(
                f"{type(self).__name__} needs trainer.{name} >= {needed} ((rounds + 1) * {unit} = "
                f"({self.rounds} + 1) * {self.epochs_per_round or self.steps_per_round}), got {limit}"
            )
        if limit != needed:
            rank_zero_info(
                f"{type(self).__name__}: trainer.{name} set to {needed}, the length of the schedule"
            )
            if name == "max_epochs":
                trainer.fit_loop.max_epochs = needed
            else:
                trainer.fit_loop.epoch_loop.max_steps = needed

    def _reset_if_pending(self, trainer: pl.Trainer) -> None:
        if self.reset_pending:
            self.reset_optimizers(trainer)
            self.reset_pending = False

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.best.monitor, self.best.mode = self.monitor or "", self.mode or "max"
        if stage == "fit":
            self.fit_schedule(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished:  # resumed after the last round was recorded (killed while testing them)
            rank_zero_info(
                f"{type(self).__name__}: all {len(self.history)} rounds are recorded; nothing to train"
            )
            trainer.should_stop = True
        elif len(self.history) > self.round:
            self.start_next_round(pl_module)  # resumed from a round's model.ckpt, written before pruning

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_if_pending(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._reset_if_pending(trainer)
        if not self.round_started:
            self.round_start_step, self.round_start_epoch = trainer.global_step, trainer.current_epoch

    def after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A strategy's hook after each optimizer step (masks re-applied), before a round may end."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        self.after_step(trainer, pl_module)
        if self.steps_per_round is not None and self.round_over(trainer):
            self.end_round(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or self.finished or self.monitor is None:
            return
        self.best.update(
            self.monitored(trainer),
            lambda: sparsity.snapshot(pl_module),
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            metrics=self.validation_metrics(trainer),
        )
        if self.steps_per_round is not None and self.round_over(trainer):
            self.end_round(trainer, pl_module)  # a plateau: a round of steps ends at the validation

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # logs the sparsity trained at
        pl_module.log("round", float(self.round), sync_dist=True)
        if self.epochs_per_round is not None and self.round_over(trainer):
            self.end_round(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if not self.finished:
            rank_zero_warn(
                f"{type(self).__name__}: the fit ended after {len(self.history)} of {self.rounds + 1} rounds"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "best_value" in state_dict:  # a LotteryTicket checkpoint from before the shared tracker
            state_dict = dict(state_dict)
            state_dict["best"] = {
                "value": state_dict.get("best_value"),
                "step": state_dict.get("best_step"),
                "epoch": state_dict.get("best_epoch"),
                "state": state_dict.get("best_state"),
            }
            state_dict["pruning_steps"] = state_dict.get("round", 0)
        if "round_start_step" not in state_dict:  # before plateaus: round r started at r lengths
            r, steps, epochs = state_dict.get("round", 0), self.steps_per_round, self.epochs_per_round
            state_dict = {
                **state_dict,
                "round_start_step": None if steps is None else r * steps,
                "round_start_epoch": None if epochs is None else r * epochs,
            }
        super().load_state_dict(state_dict)
