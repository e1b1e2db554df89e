"""Always-sparse training: the net is sparse from its first update, written once for every method.

The server never trains the dense net: before the first meta-update the strategy chooses the
initial masks (``initial_masks``: random, by sensitivity, by magnitude) at each layer's density
(:func:`lthmaml.rewiring.layer_densities`, ``uniform`` or ``erk``); every ``update_every`` steps
until ``stop_updates_at`` of the fit a dynamic strategy rewires them (``update_masks``: drop and
grow, the density unchanged; a grown weight starts at zero with a fresh optimizer state), and the
last ``1 - stop_updates_at`` of the fit trains the final mask. An update comes before a step, so no
validation scores (or records) a net whose grown weights have not trained yet. The mask holds inside
MAML's inner loop (its steps are masked), so adapted weights are as sparse.

Training FLOPs are counted as the sparse-training papers do (Evci et al. 2020, appendix H): a
training step costs ``3 f`` (forward, and a backward pass of twice its cost) where ``f`` is the
forward multiply-adds of one example through the kept weights (:func:`lthmaml.nets.flops.weight_uses`),
and a strategy adds what its method costs beyond that (``step_cost``, ``update_cost``). The fit's
one record (``rounds/round_00``, written when the fit ends) holds the weights and masks of the
best validation by ``monitor`` (as a lottery round records its best; the last ones without a
monitor) and, besides the shared schema, ``train_flops`` (per example) and
``train_flops_vs_dense``: the fit's FLOPs over those of the same steps dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.base import PruningCallback
from lthmaml import rewiring, sparsity
from lthmaml.errors import ConfigError
from lthmaml.nets.flops import weight_uses
from lthmaml.rewiring import Distribution
from lthmaml.sparsity import Masks

Decay = Literal["constant", "cosine"]


class SparseTraining(PruningCallback):
    """Base of the always-sparse strategies (static masks, SNIP, SET, RigL, TopKAST).

    Args:
        sparsity: the fraction of the prunable weights that are zero from the first update on.
        distribution: how the density is shared among layers: ``erk`` (the default of the
            sparse-training papers) or ``uniform``.
        update_every: meta-updates between mask updates (None: the mask is fixed).
        stop_updates_at: the fraction of the fit's steps (``trainer.estimated_stepping_batches``)
            after which the mask is fixed.
        drop_fraction: the fraction of each layer's kept weights rewired by an update;
            ``drop_decay: cosine`` anneals it to zero at ``stop_updates_at`` (RigL), ``constant``
            keeps it (SET).
        seed: the random draws (initial masks, random growth), keyed by the update's number too,
            so a resumed fit draws what an uninterrupted one would.
        **kwargs: ``exclude``, ``layer_rates`` (unused here), ``monitor``, ``mode``,
            ``test_each_round`` of :class:`~callbacks.base.PruningCallback`.
    """

    keeps = "best"
    default_distribution: ClassVar[Optional[Distribution]] = "erk"
    updates_after_step: ClassVar[bool] = False
    """Where a mask update runs: before a step (drop-and-grow zeroes what it grows, which no
    validation may score untrained), or right after one (TopKAST's re-selection by magnitude
    zeroes nothing, and a validation then scores the top-K of the current weights)."""
    state_attributes = (
        *PruningCallback.state_attributes,
        "started",
        "mask_updates",
        "flops",
        "dense_flops",
    )

    def __init__(
        self,
        sparsity: float = 0.9,
        distribution: Optional[Distribution] = "erk",
        update_every: Optional[int] = None,
        stop_updates_at: float = 0.75,
        drop_fraction: float = 0.3,
        drop_decay: Decay = "cosine",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"{name}.sparsity must be in [0, 1), got {sparsity}")
        if distribution not in ("erk", "uniform") and not (
            distribution is None and self.default_distribution is None
        ):
            raise ConfigError(f"{name}.distribution must be 'erk' or 'uniform', got {distribution!r}")
        if update_every is not None and update_every < 1:
            raise ConfigError(f"{name}.update_every must be >= 1 or null (a fixed mask), got {update_every}")
        if not 0.0 < stop_updates_at <= 1.0 or not 0.0 <= drop_fraction < 1.0:
            raise ConfigError(
                f"{name}: stop_updates_at must be in (0, 1] and drop_fraction in [0, 1); "
                f"got {stop_updates_at}, {drop_fraction}"
            )
        if drop_decay not in ("constant", "cosine"):
            raise ConfigError(f"{name}.drop_decay must be 'constant' or 'cosine', got {drop_decay!r}")
        self.sparsity, self.distribution = sparsity, distribution
        self.update_every, self.stop_updates_at = update_every, stop_updates_at
        self.drop_fraction, self.drop_decay, self.seed = drop_fraction, drop_decay, seed
        self.started = False
        self.mask_updates = 0
        self.flops = 0.0
        """Training multiply-adds so far, per example (see the module docstring)."""
        self.dense_flops = 0.0
        """What the same steps would have cost dense."""
        self._step_flops: Optional[tuple[float, float]] = None
        """(sparse, dense) multiply-adds of a training step at the current masks."""

    # ------------------------------------------------------------------ the strategy's method
    def initial_masks(self, pl_module: pl.LightningModule, batch: Any) -> Masks:
        """The masks the first meta-update trains (default: random at :meth:`densities`)."""
        generator = self.generator(0)
        masks = sparsity.masks_of(pl_module, self.prunable(pl_module))
        scores = {name: torch.rand(mask.shape, generator=generator) for name, mask in masks.items()}
        return rewiring.keep_highest(scores, self.densities(pl_module))

    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, fraction: float
    ) -> None:
        """Rewire ``fraction`` of each layer's kept weights (dynamic strategies)."""

    def rewire(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        fraction: float,
        growth: Mapping[str, Tensor],
    ) -> None:
        """Each layer drops ``fraction`` of its kept weights by smallest magnitude and grows as many
        of highest ``growth`` (SET: random, RigL: the dense gradient), starting them at zero."""
        masks = sparsity.masks_of(pl_module, self.prunable(pl_module))
        for name, mask in masks.items():
            count = round(fraction * float(mask.sum()))
            masks[name], grown = rewiring.drop_and_grow(
                mask, sparsity.weight(pl_module, name).detach().abs(), growth[name], count
            )
            rewiring.start_at_zero(pl_module, name, grown, trainer.optimizers)
        sparsity.load_masks(pl_module, masks)

    def step_cost(self, pl_module: pl.LightningModule, forward: float, dense: float) -> float:
        """Multiply-adds of one training step, given one sparse and one dense forward pass."""
        return 3 * forward

    def update_cost(self, forward: float, dense: float) -> float:
        """What a mask update adds (RigL: a dense gradient)."""
        return 0.0

    # ------------------------------------------------------------------ shared helpers
    def densities(self, pl_module: pl.LightningModule, sparsity_: Optional[float] = None) -> dict[str, float]:
        """Each prunable layer's kept fraction for the net at ``sparsity_`` (default: the target)."""
        target = self.sparsity if sparsity_ is None else sparsity_
        shapes = {name: sparsity.stored(pl_module, name).shape for name in self.prunable(pl_module)}
        return rewiring.layer_densities(shapes, 1.0 - target, self.distribution or "uniform")

    def generator(self, draw: int) -> torch.Generator:
        """The random source of draw ``draw`` (0: the initial masks, ``k``: the k-th update)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + draw)

    def current_fraction(self, trainer: pl.Trainer) -> float:
        """The drop fraction at this step: constant, or RigL's ``alpha / 2 (1 + cos(pi t / T_end))``."""
        if self.drop_decay == "constant":
            return self.drop_fraction
        return (
            self.drop_fraction / 2 * (1 + math.cos(math.pi * trainer.global_step / self.update_end(trainer)))
        )

    def update_end(self, trainer: pl.Trainer) -> int:
        """The step after which the mask is fixed: ``stop_updates_at`` of the fit's steps."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                f"{type(self).__name__}: mask updates stop at a fraction of the fit: set trainer.max_steps "
                "or trainer.max_epochs"
            )
        return max(1, int(self.stop_updates_at * total))

    def forward_cost(
        self, pl_module: pl.LightningModule, masks: Optional[Masks] = None
    ) -> tuple[float, float]:
        """One example's forward multiply-adds through the kept weights, and dense."""
        costs = rewiring.forward_multiply_adds(pl_module, masks, self.uses)
        assert costs is not None, "uses are measured at the first batch"
        return costs

    def measure_uses(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """How often a forward pass applies each weight (a conv's output positions), measured
        once on the learner's own loss of the batch's first task, for any net."""
        with torch.no_grad():
            self.uses = weight_uses(pl_module, run=lambda: next(iter(pl_module.task_losses(batch))))

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The initial masks before the first step; a drop-and-grow update before a step, never
        after one: a validation between the two would score (and might record) a net whose grown
        weights are still zero. So, as in SET's code, evaluate, then evolve."""
        if self.uses is None:
            self.measure_uses(pl_module, batch)
        if not self.started:
            sparsity.load_masks(pl_module, self.initial_masks(pl_module, batch))  # no optimizer state yet
            self.started = True
            report = sparsity.sparsity_report(pl_module)
            rank_zero_info(
                f"{type(self).__name__}: sparsity {report.sparsity:.2%} from the first step\n{report.table()}"
            )
            return
        if not self.updates_after_step:
            self.update_if_due(trainer, pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_flops is None:  # the masks' cost, counted again only when they change
            forward, dense = self.forward_cost(pl_module)
            self._step_flops = (self.step_cost(pl_module, forward, dense), 3 * dense)
        self.flops += self._step_flops[0]
        self.dense_flops += self._step_flops[1]
        if self.updates_after_step:
            self.update_if_due(trainer, pl_module, batch)

    def update_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Every ``update_every`` steps until :meth:`update_end`: :meth:`update_masks`, counted."""
        step = trainer.global_step
        if self.update_every is None or step % self.update_every or step > self.update_end(trainer):
            return
        self.update_masks(trainer, pl_module, batch, self.current_fraction(trainer))
        self.mask_updates += 1
        self._step_flops = None
        self.flops += self.update_cost(*self.forward_cost(pl_module))

    def tracking(self, pl_module: pl.LightningModule) -> bool:
        return self.started and super().tracking(pl_module)

    def records_at_fit_end(self, pl_module: pl.LightningModule) -> bool:
        return self.started

    def details(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {
            "train_flops": self.flops,
            "train_flops_vs_dense": self.flops / self.dense_flops if self.dense_flops else None,
            "distribution": self.distribution,
            "mask_updates": self.mask_updates,
        }
