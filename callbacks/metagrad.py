"""Meta-gradient pruning: prune the weights whose magnitude times meta-gradient energy is smallest.

Method. While meta-training, every task's support loss is differentiated at the meta-parameters
(first order) and the squared gradient of each effective weight ``w`` is summed over the tasks seen
since the last pruning step (eq. 6)::

    Imp(w) = |w| * sum_tasks (dL_support / dw) ** 2

and normalised within its layer (eq. 7), so layers of different size and gradient scale compete
on equal terms in a global ranking::

    Imp_norm(w) = Imp(w) / sum_{w' in layer} |Imp(w')|

Every ``steps_between`` training steps a pruning step removes the ``weights_per_step`` weights of
lowest score (or ``prune_rate`` of the remaining ones, the lottery-ticket schedule's sparsities),
``steps`` times; training (fine-tuning) continues in between. Two ablations order the two factors
instead of multiplying them: ``gradient_first`` takes the ``candidate_factor * weights_per_step``
weights of smallest accumulated squared gradient and prunes the smallest ``|w|`` among them;
``weight_first`` takes the candidates by smallest ``|w|`` and prunes the smallest squared gradient
among them.

Levels. ``rounds/round_XX`` records the net trained at the sparsity of pruning step ``XX``: written
at the end of its fine-tuning interval, just before the next step (round 0: the dense net before
the first), and the last one when the fit ends (:class:`~callbacks.schedule.LevelSchedule`);
``details.weights_pruned`` is what the step that made the level removed.

Cost: one extra forward and backward pass on each task's support set per scored training step;
``accumulate_batches=k`` pays it only for the last ``k`` steps before each pruning step, and after
the last pruning step nothing is paid (figures: docs/strategies.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.schedule import LevelSchedule
from lthmaml import sparsity
from lthmaml.errors import ConfigError

Criterion = Literal["product", "gradient_first", "weight_first"]


class MetaGradientPruning(LevelSchedule):
    """Weight x meta-gradient importance pruning, a fixed number of weights per step.

    Args:
        weights_per_step: weights removed per pruning step (exactly, with global scope and no
            ``layer_rates``; ``layerwise`` removes that fraction of the remaining weights from
            each layer, the same total up to one weight per layer of rounding).
        prune_rate: instead of ``weights_per_step``: remove this fraction of the remaining weights
            per step, so step ``k`` ends at sparsity ``1 - (1 - prune_rate) ** k`` exactly (the
            sparsities of a lottery-ticket run with the same rate).
        steps: pruning steps in all; afterwards the sparse net just trains on.
        criterion: ``product`` (eq. 7, the default), ``gradient_first`` or ``weight_first``.
        candidate_factor: the two-stage criteria draw ``candidate_factor * weights_per_step``
            candidates by their first key, then prune ``weights_per_step`` of them by the second.
        steps_between, accumulate_batches, write_every: the schedule of
            :class:`~callbacks.schedule.LevelSchedule` (``steps_between`` training steps of
            fine-tuning before each pruning step, or fewer on a validation plateau with
            ``patience``; the importance sums over the window's tasks).
        scope, exclude, layer_rates, monitor, mode, test_each_round: as for
            :class:`~callbacks.base.PruningCallback`.
    """

    scored = "before"  # the gradient is taken at the meta-parameters of the batch

    def __init__(
        self,
        weights_per_step: Optional[int] = None,
        steps: int = 40,
        criterion: Criterion = "product",
        candidate_factor: float = 2.0,
        prune_rate: Optional[float] = None,
        steps_between: int = 10,
        accumulate_batches: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(steps, None, steps_between, accumulate_batches, **kwargs)
        if (weights_per_step is None) == (prune_rate is None):
            raise ConfigError(
                "MetaGradientPruning: set exactly one of weights_per_step (a count per step) and "
                f"prune_rate (a fraction of the remaining weights); got {weights_per_step}, {prune_rate}"
            )
        if prune_rate is not None and not 0.0 < prune_rate < 1.0:
            raise ConfigError(f"MetaGradientPruning.prune_rate must be in (0, 1), got {prune_rate}")
        if (weights_per_step is not None and weights_per_step < 1) or steps < 0:
            raise ConfigError(
                "MetaGradientPruning needs weights_per_step >= 1 and steps >= 0; "
                f"got {weights_per_step}, {steps}"
            )
        if criterion not in ("product", "gradient_first", "weight_first"):
            raise ConfigError(
                f"criterion must be 'product', 'gradient_first' or 'weight_first', got {criterion!r}"
            )
        if candidate_factor < 1:
            raise ConfigError(f"candidate_factor must be >= 1, got {candidate_factor}")
        self.weights_per_step = weights_per_step
        self.prune_rate = prune_rate
        self.criterion = criterion
        self.candidate_factor = candidate_factor

    # ------------------------------------------------------------------ eq. 6: accumulation
    def score_batch(self, pl_module: pl.LightningModule, batch: Any) -> tuple[dict[str, Tensor], int]:
        """Each task's squared support-loss gradient w.r.t. the effective weights, summed (0 at
        pruned entries)."""
        squares, tasks = sparsity.summed_task_gradients(
            pl_module, self.prunable(pl_module), batch, squared=True
        )
        masks = sparsity.masks_of(pl_module, list(squares))
        return {name: square * masks[name] for name, square in squares.items()}, tasks

    def importance(self, pl_module: pl.LightningModule, grad_sq: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Eq. 7: ``|w| * sum_tasks g**2``, divided by its sum of absolute values over the layer."""
        scores = {}
        for name, weight in self._magnitudes(pl_module).items():
            imp = weight * _or_zeros(grad_sq, name, weight)
            scores[name] = imp / imp.abs().sum().clamp_min(torch.finfo(imp.dtype).tiny)
        return scores

    # ------------------------------------------------------------------ the criteria as scores
    def scores(
        self, pl_module: pl.LightningModule, grad_sq: Mapping[str, Tensor], fraction: float
    ) -> dict[str, Tensor]:
        """The score :func:`~lthmaml.sparsity.prune_lowest` ranks; non-candidates score +inf."""
        if self.criterion == "product":
            return self.importance(pl_module, grad_sq)
        magnitudes = self._magnitudes(pl_module)
        gradients = {name: _or_zeros(grad_sq, name, weight) for name, weight in magnitudes.items()}
        first, second = (
            (gradients, magnitudes) if self.criterion == "gradient_first" else (magnitudes, gradients)
        )
        masks = sparsity.masks_of(pl_module, list(second))
        pool = min(1.0, self.candidate_factor * fraction)
        # The candidate pool is itself a prune_lowest selection: the weights it would remove.
        after = sparsity.prune_lowest(masks, first, pool, self.scope, self.rates(pl_module))
        inf = torch.tensor(float("inf"))
        return {
            name: torch.where(masks[name].bool() & ~after[name].bool(), second[name], inf.to(second[name]))
            for name in second
        }

    def prune_level(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: Mapping[str, Tensor]
    ) -> dict[str, Any]:
        """Remove the step's weights (a count, or ``prune_rate`` of the remaining) by the criterion."""
        remaining = self._alive(pl_module)
        if self.prune_rate is not None:
            rate = self.prune_rate
            self.prune(pl_module, self.scores(pl_module, scores, rate), rate, level=self.pruning_steps + 1)
        elif remaining > 0:
            # prune_lowest removes round(fraction * remaining) = weights_per_step exactly.
            fraction = min(1.0, self.weights_per_step / remaining)
            self.prune(pl_module, self.scores(pl_module, scores, fraction), fraction)
        return {"weights_pruned": remaining - self._alive(pl_module)}

    # ------------------------------------------------------------------ helpers
    def _alive(self, pl_module: pl.LightningModule) -> int:
        return sum(
            int(mask.sum()) for mask in sparsity.masks_of(pl_module, self.prunable(pl_module)).values()
        )

    def _magnitudes(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return sparsity.magnitude_scores(pl_module, self.exclude)


def _or_zeros(values: Mapping[str, Tensor], name: str, like: Tensor) -> Tensor:
    total = values.get(name)
    return torch.zeros_like(like) if total is None else total.to(like)
