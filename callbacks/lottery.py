"""Lottery tickets: iterative magnitude pruning with rewinding.

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis": train the net, remove ``p`` of the remaining
weights with the smallest magnitude, reset the survivors to their initial values, and repeat; the
sparse subnetwork that still trains to full accuracy from its initial weights is a winning ticket.
Frankle et al. (2019), "Stabilizing the Lottery Ticket Hypothesis": for deeper nets, rewind to the
weights of an early training step ``k`` instead of step 0 (late rewinding).

The schedule. ``rounds`` counts pruning events, so a fit trains ``rounds + 1`` rounds. Round 0 trains
the dense net; round ``r`` trains at sparsity ``1 - (1 - p) ** r``. At the end of a round the weights
with the best validation metric of the round are restored and recorded under ``rounds/round_XX``
(mask, metrics, checkpoint of that trained sparse net); then, unless it was the last round, they are
pruned to the next round's sparsity, rewound (or re-initialised, or kept) and the optimizer and
scheduler start afresh. The last round trains the final ticket (the standard LTH evaluation) and ends
the fit, so ``rounds/round_XX`` always describes the net trained at ``1 - (1 - p) ** XX``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.sparsity import Scope

RewindTo = Union[Literal["init", "none"], int]


class LotteryTicket(PruningCallback):
    """Iterative magnitude pruning with rewinding (the lottery-ticket procedure).

    Args:
        prune_rate: fraction ``p`` of the remaining weights removed per round (0.2 in the papers).
        rounds: number of pruning events; the fit trains ``rounds + 1`` rounds and ends at sparsity
            ``1 - (1 - p) ** rounds``.
        epochs_per_round, steps_per_round: length of a round; set exactly one. The fit's length is
            set from them (``trainer.max_epochs`` / ``max_steps`` larger or unlimited is cut to the
            schedule; smaller is an error naming the needed value).
        rewind_to: ``"init"`` (Frankle & Carbin), a step ``k`` (late rewinding: the weights after
            ``k`` optimizer steps of round 0), or ``"none"`` (keep training the pruned trained
            weights: fine-tuning).
        reinit_random: the random-reinitialisation control: after pruning, fresh random weights
            (seeded by ``seed + round``) under the same masks instead of rewinding.
        masks_from: the run folder (``runs/<name>/version_N``) of an earlier LotteryTicket fit
            with at least as many rounds: round ``r`` takes that run's
            ``rounds/round_XX/mask.safetensors`` instead of pruning by magnitude. With
            ``reinit_random`` this is the control exactly as the paper runs it: the winning
            tickets' masks with fresh weights.
        seed: seed of ``reinit_random``.
        monitor, mode: validation metric whose best value in a round picks the weights that are
            pruned (``val/acc_post`` with ``max`` for MAML classification, ``val/loss_post`` with
            ``min`` for regression, ``val/acc`` for the supervised Classifier). Default: the
            ModelCheckpoint's monitor and mode. A round without validation uses its last weights.
        test_each_round: run the trainer's test loop at each round end (on the round's best weights)
            and record the test metrics in the round.
        scope, exclude, layer_rates: see :class:`callbacks.base.PruningCallback`.
    """

    def __init__(
        self,
        prune_rate: float = 0.2,
        rounds: int = 5,
        epochs_per_round: Optional[int] = None,
        steps_per_round: Optional[int] = None,
        rewind_to: RewindTo = "init",
        reinit_random: bool = False,
        masks_from: Optional[str] = None,
        seed: int = 0,
        monitor: Optional[str] = None,
        mode: Optional[Literal["min", "max"]] = None,
        test_each_round: bool = False,
        scope: Scope = "global",
        exclude: Sequence[str] = (),
        layer_rates: Optional[Mapping[str, float]] = None,
    ) -> None:
        super().__init__(
            scope=scope, exclude=exclude, layer_rates=layer_rates, test_each_round=test_each_round
        )
        if not 0.0 < prune_rate < 1.0:
            raise ConfigError(f"LotteryTicket.prune_rate must be in (0, 1), got {prune_rate}")
        if rounds < 1:
            raise ConfigError(f"LotteryTicket.rounds must be >= 1 (pruning events), got {rounds}")
        if (epochs_per_round is None) == (steps_per_round is None):
            raise ConfigError("LotteryTicket: set exactly one of epochs_per_round and steps_per_round")
        if (epochs_per_round or steps_per_round) < 1:
            raise ConfigError("LotteryTicket.epochs_per_round / steps_per_round must be >= 1")
        if isinstance(rewind_to, bool) or not (
            rewind_to in ("init", "none") or (isinstance(rewind_to, int) and rewind_to >= 0)
        ):
            raise ConfigError(
                f"LotteryTicket.rewind_to must be 'init', 'none' or a step >= 0, got {rewind_to!r}"
            )
        if reinit_random and rewind_to != "init":
            raise ConfigError("LotteryTicket.reinit_random replaces rewinding: leave rewind_to at 'init'")
        if monitor is not None and mode not in ("min", "max"):
            raise ConfigError(f"LotteryTicket: set mode (max or min) for monitor '{monitor}'")
        self.prune_rate = prune_rate
        self.rounds = rounds
        self.epochs_per_round = epochs_per_round
        self.steps_per_round = steps_per_round
        self.rewind_to = rewind_to
        self.reinit_random = reinit_random
        self.masks_from = None if masks_from is None else Path(masks_from)
        self.seed = seed
        self.monitor, self.mode = monitor, mode
        # The procedure's state, all of it in state_dict() so a resumed fit continues exactly.
        self.round = 0
        self.rewind_state: Optional[dict[str, Tensor]] = None
        self.best_state: Optional[dict[str, Tensor]] = None
        self.best_value: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_step: Optional[int] = None
        self.reset_pending = False

    # ------------------------------------------------------------------ the method
    def score(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Magnitude of the effective weights: the lottery-ticket criterion."""
        return sparsity.magnitude_scores(pl_module, self.exclude)

    def end_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the round's best net, then prune it, rewind it and start the next round."""
        if self.best_state is not None:
            sparsity.rewind(pl_module, self.best_state)  # the round's best-validation weights
        in_round = None
        if self.best_epoch is not None and self.epochs_per_round is not None:
            in_round = self.best_epoch - self.round * self.epochs_per_round + 1  # 1 = the round's first
        metrics: dict[str, Any] = {
            "best_val": self.best_value,
            "best_epoch": self.best_epoch,
            "best_epoch_in_round": in_round,
            "best_step": self.best_step,
            "monitor": self.monitor,
        }
        self.write_round(trainer, pl_module, metrics)
        record = self.history[-1]
        best = "no validation" if self.best_value is None else f"best {self.monitor} {self.best_value:.4g}"
        rank_zero_info(
            f"LotteryTicket: round {record['round']} trained at sparsity {record['sparsity']:.2%}: {best}"
            + ("" if self.best_epoch is None else f" (epoch {self.best_epoch})")
        )
        if self.finished:
            trainer.should_stop = True
        else:
            self.next_round(pl_module)

    def next_round(self, pl_module: pl.LightningModule) -> None:
        """Prune the recorded net to the next round's sparsity and rewind (or re-init, or keep) it."""
        self.round += 1
        if self.masks_from is None:
            self.prune(pl_module, self.score(pl_module), self.prune_rate, rounds=self.round)
        else:
            sparsity.load_masks(pl_module, sparsity.read_masks(self.borrowed_mask_file(self.round)))
        if self.reinit_random:
            self.reinitialize(pl_module)
        elif self.rewind_step is not None:
            assert self.rewind_state is not None, "the rewind point precedes every round end"
            sparsity.rewind(pl_module, self.rewind_state)
        self.best_state = self.best_value = self.best_epoch = self.best_step = None
        # The fresh optimizer comes when the next round starts, so no epoch-end scheduler step hits it.
        self.reset_pending = True

    def reinitialize(self, pl_module: pl.LightningModule) -> None:
        """Fresh seeded weights under the masks, without moving the global random stream."""
        devices = [pl_module.device.index] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            sparsity.reinitialize(pl_module, generator_seed=self.seed + self.round)

    def borrowed_mask_file(self, round_index: int) -> Path:
        assert self.masks_from is not None
        return self.masks_from / "rounds" / f"round_{round_index:02d}" / "mask.safetensors"

    def check_borrowed_masks(self, pl_module: pl.LightningModule) -> None:
        """Fail before training if ``masks_from`` lacks a round's mask or its masks do not fit."""
        if self.masks_from is None:
            return
        shapes = {name: tuple(mask.shape) for name, mask in sparsity.masks_of(pl_module).items()}
        for r in range(1, self.rounds + 1):
            file = self.borrowed_mask_file(r)
            if not file.is_file():
                raise ConfigError(
                    f"LotteryTicket.masks_from: {file} does not exist; masks_from needs a finished "
                    f"LotteryTicket run with rounds 1..{self.rounds} (run that experiment first)"
                )
            borrowed = {name: tuple(mask.shape) for name, mask in sparsity.read_masks(file).items()}
            if borrowed != shapes:
                raise ConfigError(
                    f"LotteryTicket.masks_from: the masks in {file} ({borrowed}) do not fit this "
                    f"model's layers ({shapes}): use a run of the same net"
                )

    @property
    def rewind_step(self) -> Optional[int]:
        """The optimizer step whose weights the survivors return to (None: no rewinding)."""
        if self.reinit_random or self.rewind_to == "none":
            return None
        return 0 if self.rewind_to == "init" else int(self.rewind_to)

    @property
    def finished(self) -> bool:
        return len(self.history) > self.rounds

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.monitor is None and trainer.checkpoint_callback is not None:
            self.monitor = trainer.checkpoint_callback.monitor
            self.mode = trainer.checkpoint_callback.mode
        self.check_borrowed_masks(pl_module)
        self._fit_schedule(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind_step == 0 and self.rewind_state is None:
            if trainer.global_step > 0:
                rank_zero_warn(f"LotteryTicket: rewind point is step {trainer.global_step}, not init")
            self.rewind_state = sparsity.snapshot(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self.history) > self.round and not self.finished:
            self.next_round(pl_module)  # resumed from a round's model.ckpt, written before pruning
        steps_per_epoch = self._steps_per_epoch(trainer)
        if steps_per_epoch is None:
            return
        if self.steps_per_round is not None and trainer.max_epochs not in (None, -1):
            needed = (self.rounds + 1) * self.steps_per_round
            if trainer.max_epochs * steps_per_epoch < needed:
                raise ConfigError(
                    f"LotteryTicket needs trainer.max_epochs >= {math.ceil(needed / steps_per_epoch)} "
                    f"for {needed} steps ((rounds + 1) * steps_per_round), got {trainer.max_epochs}"
                )
        round_steps = self.steps_per_round or self.epochs_per_round * steps_per_epoch
        if self.rewind_step is not None and self.rewind_step >= round_steps:
            raise ConfigError(
                f"LotteryTicket.rewind_to={self.rewind_step} must be below the {round_steps} steps of round 0"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset_if_pending(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._reset_if_pending(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        step = trainer.global_step
        if self.rewind_step is not None and self.rewind_state is None and step >= self.rewind_step:
            self.rewind_state = sparsity.snapshot(pl_module)  # late rewinding: weights after step k
        if self.steps_per_round is not None and not self.finished:
            if step >= (self.round + 1) * self.steps_per_round:
                self.end_round(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.finished or self.monitor is None:
            return
        if self.monitor not in trainer.callback_metrics:
            raise ConfigError(
                f"LotteryTicket.monitor '{self.monitor}' is not logged; "
                f"logged: {sorted(trainer.callback_metrics)}"
            )
        value = float(trainer.callback_metrics[self.monitor])
        if self._improves(value):
            self.best_state = sparsity.snapshot(pl_module)
            self.best_value, self.best_epoch = value, trainer.current_epoch
            self.best_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # logs the sparsity trained at
        pl_module.log("round", float(self.round), sync_dist=True)
        if self.epochs_per_round is not None and not self.finished:
            if trainer.current_epoch + 1 >= (self.round + 1) * self.epochs_per_round:
                self.end_round(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if not self.finished:
            rank_zero_warn(
                f"LotteryTicket: the fit ended after {len(self.history)} of {self.rounds + 1} rounds"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "round": self.round,
            "rewind_state": self.rewind_state,
            "best_state": self.best_state,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "reset_pending": self.reset_pending,
            "monitor": self.monitor,
            "mode": self.mode,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.round = state_dict["round"]
        self.rewind_state = state_dict["rewind_state"]
        self.best_state = state_dict["best_state"]
        self.best_value = state_dict["best_value"]
        self.best_epoch = state_dict["best_epoch"]
        self.best_step = state_dict["best_step"]
        self.reset_pending = state_dict["reset_pending"]
        self.monitor, self.mode = state_dict["monitor"], state_dict["mode"]

    # ------------------------------------------------------------------ bookkeeping
    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def _reset_if_pending(self, trainer: pl.Trainer) -> None:
        if self.reset_pending:
            self.reset_optimizers(trainer)
            self.reset_pending = False

    def _fit_schedule(self, trainer: pl.Trainer) -> None:
        """Make the fit as long as the schedule: cut a longer limit, refuse a shorter one."""
        if self.epochs_per_round is not None:
            needed, limit, name = (self.rounds + 1) * self.epochs_per_round, trainer.max_epochs, "max_epochs"
        else:
            needed, limit, name = (self.rounds + 1) * self.steps_per_round, trainer.max_steps, "max_steps"
        if limit is not None and 0 <= limit < needed:
            unit = "epochs_per_round" if self.epochs_per_round is not None else "steps_per_round"
            raise ConfigError(
                f"LotteryTicket needs trainer.{name} >= {needed} ((rounds + 1) * {unit} = "
                f"({self.rounds} + 1) * {self.epochs_per_round or self.steps_per_round}), got {limit}"
            )
        if limit != needed:
            rank_zero_info(f"LotteryTicket: trainer.{name} set to {needed}, the length of the schedule")
            if name == "max_epochs":
                trainer.fit_loop.max_epochs = needed
            else:
                trainer.fit_loop.epoch_loop.max_steps = needed

    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> Optional[int]:
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        return math.ceil(batches / trainer.accumulate_grad_batches)
