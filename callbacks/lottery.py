"""Lottery tickets: iterative magnitude pruning with rewinding.

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis": train the net, remove ``p`` of the remaining
weights with the smallest magnitude, reset the survivors to their initial values, and repeat; the
sparse subnetwork that still trains to full accuracy from its initial weights is a winning ticket.
Frankle et al. (2019), "Stabilizing the Lottery Ticket Hypothesis": for deeper nets, rewind to the
weights of an early training step ``k`` instead of step 0 (late rewinding).

The schedule (:class:`~callbacks.schedule.LevelSchedule`, a level being a round). Round 0 trains
the dense net; round ``r`` trains at sparsity ``1 - (1 - p) ** r``. At the end of a round its
best-validation weights are recorded under ``rounds/round_XX``; then they are pruned by magnitude
to the next round's sparsity and rewound (or re-initialised, or kept), and the optimizer starts
afresh. The last round trains the final ticket (the standard LTH evaluation) and ends the fit.

Distillation (``distill_weight > 0``). From round 1 on, each task's training objective adds a
temperature-scaled KL term towards the dense round-0 net's query outputs (Hinton et al. 2015; see
:mod:`lthmaml.meta.distill`). The teacher is loaded from round 0's record,
``rounds/round_00/model.ckpt``, whose path rides in the callback's state: a fit resumed from any
later checkpoint, into a new run folder too, distils from the same net. Every record's ``details``
then hold ``distill_weight`` and ``distill_temperature`` (round 0, the teacher, trains without the
term).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks.schedule import LevelSchedule
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.meta.distill import Distillable, Distillation, check_options, load_teacher
from lthmaml.rounds import CHECKPOINT_FILE, MASK_FILE, round_dir

RewindTo = Union[Literal["init", "none"], int]


class LotteryTicket(LevelSchedule):
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
        distill_weight: weight of the distillation term towards the dense round-0 net in rounds
            1 and later (0: none; the learner must output class logits).
        distill_temperature: its softmax temperature ``T`` (the term is scaled by ``T^2``).
        rounds: pruning events; the fit trains ``rounds + 1`` rounds.
        epochs_per_round, steps_per_round: (maximum) length of a round; set exactly one. A longer
            ``trainer.max_epochs`` / ``max_steps`` (or -1) ends with the last round; a shorter one
            is an error naming the needed value.
        **kwargs: ``patience``, ``min_delta`` (a round ends on a validation plateau), ``scope``,
            ``exclude``, ``layer_rates``, ``monitor`` (whose best value in a round picks the weights
            recorded and pruned; a round without validation uses its last weights), ``mode``,
            ``test_each_round``: as for :class:`~callbacks.base.PruningCallback`.
    """

    keeps = "best"
    last_level_ends_fit = True
    length_options = "epochs_per_round and steps_per_round"
    state_attributes = (*LevelSchedule.state_attributes, "rewind_state", "teacher_file")

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
        distill_weight: float = 0.0,
        distill_temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        if rounds < 1:
            raise ConfigError(f"LotteryTicket.rounds must be >= 1 (pruning events), got {rounds}")
        super().__init__(
            rounds, epochs_per_round, steps_per_round, accumulate_batches=None, write_every=1, **kwargs
        )
        check_options("LotteryTicket", distill_weight, distill_temperature)
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
        self.distill_weight, self.distill_temperature = float(distill_weight), float(distill_temperature)
        self.rewind_state: Optional[dict[str, Tensor]] = None
        self.teacher_file: Optional[str] = None
        """Round 0's ``model.ckpt`` (absolute), the distillation teacher; None: not distilling."""

    # ------------------------------------------------------------------ the method
    def prune_level(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: dict[str, Tensor]
    ) -> dict[str, Any]:
        """Prune the smallest-magnitude weights to the next round's sparsity, rewind the survivors."""
        level = self.pruning_steps + 1
        if self.masks_from is None:
            magnitudes = sparsity.magnitude_scores(pl_module, self.exclude)
            self.prune(pl_module, magnitudes, self.prune_rate, level=level)
        else:
            sparsity.load_masks(pl_module, sparsity.read_masks(self.borrowed_mask_file(level)))
        if self.reinit_random:
            devices = [pl_module.device.index] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # the global random stream stays put
                sparsity.reinitialize(pl_module, generator_seed=self.seed + level)
        elif self.rewind_step is not None:
            assert self.rewind_state is not None, "the rewind point precedes every round end"
            sparsity.rewind(pl_module, self.rewind_state)
        self.restart_optimizers()
        return {}

    @property
    def rewind_step(self) -> Optional[int]:
        """The optimizer step whose weights the survivors return to (None: no rewinding)."""
        if self.reinit_random or self.rewind_to == "none":
            return None
        return 0 if self.rewind_to == "init" else int(self.rewind_to)

    def borrowed_mask_file(self, round_index: int) -> Path:
        assert self.masks_from is not None
        return round_dir(self.masks_from, round_index) / MASK_FILE

    def check_borrowed_masks(self, pl_module: pl.LightningModule) -> None:
        """Fail before training if ``masks_from`` lacks a round's mask or its masks do not fit."""
        shapes = {name: tuple(mask.shape) for name, mask in sparsity.masks_of(pl_module).items()}
        for r in range(1, self.levels + 1):
            file = self.borrowed_mask_file(r)
            if not file.is_file():
                raise ConfigError(
                    f"LotteryTicket.masks_from: {file} does not exist; masks_from needs a finished "
                    f"LotteryTicket run with rounds 1..{self.levels} (run that experiment first)"
                )
            borrowed = {name: tuple(mask.shape) for name, mask in sparsity.read_masks(file).items()}
            if borrowed != shapes:
                raise ConfigError(
                    f"LotteryTicket.masks_from: the masks in {file} ({borrowed}) do not fit this "
                    f"model's layers ({shapes}): use a run of the same net"
                )

    # ------------------------------------------------------------------ distillation
    def details(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        if self.distill_weight == 0:
            return {}
        return {"distill_weight": self.distill_weight, "distill_temperature": self.distill_temperature}

    def teacher_checkpoint(self, trainer: pl.Trainer) -> Path:
        """Round 0's record (this run's own, for a checkpoint written before the path was kept)."""
        return Path(self.teacher_file or round_dir(self.run_dir(trainer), 0) / CHECKPOINT_FILE)

    def attach_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Distil from the round-0 net once round 0 is recorded (and from no net before)."""
        if self.distill_weight == 0:
            return
        pl_module.distillation = (
            Distillation(
                load_teacher(pl_module, self.teacher_checkpoint(trainer)),
                self.distill_weight,
                self.distill_temperature,
            )
            if self.history
            else None
        )

    def check_distillation(self, pl_module: pl.LightningModule) -> None:
        """Fail before training if the learner cannot distil, or distils from a teacher of its own."""
        if self.distill_weight == 0:
            return
        if not isinstance(pl_module, Distillable):
            raise ConfigError(
                f"LotteryTicket.distill_weight: {type(pl_module).__name__} has no class logits to distil"
            )
        if getattr(pl_module, "distill_weight", 0.0) > 0:
            raise ConfigError(
                "LotteryTicket.distill_weight: the model distils from its own distill_from; set one of them"
            )

    def end_level(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.distill_weight > 0 and not self.history:  # round 0's record, the teacher, comes now
            self.teacher_file = str((round_dir(self.run_dir(trainer), 0) / CHECKPOINT_FILE).resolve())
        super().end_level(trainer, pl_module)
        if len(self.history) == 1:
            self.attach_teacher(trainer, pl_module)

    # ------------------------------------------------------------------ the rewind point
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.masks_from is not None:
            self.check_borrowed_masks(pl_module)
        if stage == "fit":
            self.check_distillation(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind_step == 0 and self.rewind_state is None:
            if trainer.global_step > 0:
                rank_zero_warn(f"LotteryTicket: rewind point is step {trainer.global_step}, not init")
            self.rewind_state = sparsity.snapshot(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.attach_teacher(trainer, pl_module)  # a resumed fit past round 0 distils from it again
        batches = trainer.num_training_batches
        round_steps = self.steps_per_level or self.epochs_per_level * batches
        if math.isfinite(round_steps) and self.rewind_step is not None and self.rewind_step >= round_steps:
            raise ConfigError(
                f"LotteryTicket.rewind_to={self.rewind_step} must be below the {round_steps} steps of round 0"
            )

    def may_end_level(self) -> bool:
        # A plateau ends round 0 only once the rewind point is reached (late rewinding).
        return self.rewind_step is None or self.rewind_state is not None

    def after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self.rewind_step is not None and self.rewind_state is None and step >= self.rewind_step:
            self.rewind_state = sparsity.snapshot(pl_module)  # late rewinding: weights after step k
