"""Lottery tickets: iterative magnitude pruning with rewinding.

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis": train the net, remove ``p`` of the remaining
weights with the smallest magnitude, reset the survivors to their initial values, and repeat; the
sparse subnetwork that still trains to full accuracy from its initial weights is a winning ticket.
Frankle et al. (2019), "Stabilizing the Lottery Ticket Hypothesis": for deeper nets, rewind to the
weights of an early training step ``k`` instead of step 0 (late rewinding).

The schedule (:class:`~callbacks.round_based.RoundBasedPruning`). Round 0 trains the dense net;
round ``r`` trains at sparsity ``1 - (1 - p) ** r``. At the end of a round its best-validation
weights are recorded under ``rounds/round_XX``; then they are pruned by magnitude to the next
round's sparsity and rewound (or re-initialised, or kept). The last round trains the final ticket
(the standard LTH evaluation) and ends the fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.round_based import RoundBasedPruning
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.rounds import MASK_FILE, ROUNDS_FOLDER, round_folder_name

RewindTo = Union[Literal["init", "none"], int]


class LotteryTicket(RoundBasedPruning):
    """Iterative magnitude pruning with rewinding (the lottery-ticket procedure).

    Args:
        prune_rate: fraction ``p`` of the remaining weights removed per round (0.2 in the papers).
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
        rounds, epochs_per_round, steps_per_round: the schedule of
            :class:`~callbacks.round_based.RoundBasedPruning` (``patience``, ``min_delta``: a round
            ends on a validation plateau); ``scope``, ``exclude``, ``layer_rates``, ``monitor``,
            ``mode``, ``test_each_round``: as for :class:`~callbacks.base.PruningCallback`.
    """

    state_attributes = (*RoundBasedPruning.state_attributes, "rewind_state")

    def __init__(
        self,
        prune_rate: float = 0.2,
        rewind_to: RewindTo = "init",
        reinit_random: bool = False,
        masks_from: Optional[str] = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < prune_rate < 1.0:
            raise ConfigError(f"LotteryTicket.prune_rate must be in (0, 1), got {prune_rate}")
        if isinstance(rewind_to, bool) or not (
            rewind_to in ("init", "none") or (isinstance(rewind_to, int) and rewind_to >= 0)
        ):
            raise ConfigError(
                f"LotteryTicket.rewind_to must be 'init', 'none' or a step >= 0, got {rewind_to!r}"
            )
        if reinit_random and rewind_to != "init":
            raise ConfigError("LotteryTicket.reinit_random replaces rewinding: leave rewind_to at 'init'")
        self.prune_rate = prune_rate
        self.rewind_to = rewind_to
        self.reinit_random = reinit_random
        self.masks_from = None if masks_from is None else Path(masks_from)
        self.seed = seed
        self.rewind_state: Optional[dict[str, Tensor]] = None

    # ------------------------------------------------------------------ the method
    def next_round(self, pl_module: pl.LightningModule) -> None:
        """Prune the smallest-magnitude weights to the round's sparsity, then rewind the survivors."""
        if self.masks_from is None:
            scores = sparsity.magnitude_scores(pl_module, self.exclude)
            self.prune(pl_module, scores, self.prune_rate, rounds=self.round)
        else:
            sparsity.load_masks(pl_module, sparsity.read_masks(self.borrowed_mask_file(self.round)))
        if self.reinit_random:
            devices = [pl_module.device.index] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the global random stream stays put
                sparsity.reinitialize(pl_module, generator_seed=self.seed + self.round)
        elif self.rewind_step is not None:
            assert self.rewind_state is not None, "the rewind point precedes every round end"
            sparsity.rewind(pl_module, self.rewind_state)

    @property
    def rewind_step(self) -> Optional[int]:
        """The optimizer step whose weights the survivors return to (None: no rewinding)."""
        if self.reinit_random or self.rewind_to == "none":
            return None
        return 0 if self.rewind_to == "init" else int(self.rewind_to)

    def borrowed_mask_file(self, round_index: int) -> Path:
        assert self.masks_from is not None
        return self.masks_from / ROUNDS_FOLDER / round_folder_name(round_index) / MASK_FILE

    def check_borrowed_masks(self, pl_module: pl.LightningModule) -> None:
        """Fail before training if ``masks_from`` lacks a round's mask or its masks do not fit."""
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

    # ------------------------------------------------------------------ the rewind point
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.masks_from is not None:
            self.check_borrowed_masks(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind_step == 0 and self.rewind_state is None:
            if trainer.global_step > 0:
                rank_zero_warn(f"LotteryTicket: rewind point is step {trainer.global_step}, not init")
            self.rewind_state = sparsity.snapshot(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        round_steps = self.round_steps(trainer)
        if round_steps is not None and self.rewind_step is not None and self.rewind_step >= round_steps:
            raise ConfigError(
                f"LotteryTicket.rewind_to={self.rewind_step} must be below the {round_steps} steps of round 0"
            )

    def may_stop_early(self) -> bool:
        # A plateau ends round 0 only once the rewind point is reached (late rewinding).
        return self.rewind_step is None or self.rewind_state is not None

    def after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.rewind_step is not None and self.rewind_state is None and step >= self.rewind_step:
            self.rewind_state = sparsity.snapshot(pl_module)  # late rewinding: weights after step k
