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

Rounds. ``rounds/round_XX`` records the net trained at the sparsity of pruning step ``XX``: written
at the end of its fine-tuning interval, just before the next step (round 0: the dense net before
the first), and the last one when the fit ends. So a round's validation and test numbers belong to
the sparsity it states, as for :class:`~callbacks.lottery.LotteryTicket`.

Cost: one extra forward and backward pass on each task's support set per accumulated training
step (measured on one CPU thread: 5-8% of a second-order meta-step for 5-way 1-shot Omniglot on
the 64-filter Conv4, whose support set is 5 of a task's 80 images; for the supervised
:class:`~lthmaml.meta.classifier.Classifier` it about doubles a step). ``accumulate_batches=k`` pays it
only for the last ``k`` steps before each pruning step; after the last pruning step nothing is paid.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.nets.layers import MaskedMixin
from lthmaml.sparsity import Scope

Criterion = Literal["product", "gradient_first", "weight_first"]


class MetaGradientPruning(PruningCallback):
    """Weight x meta-gradient importance pruning, a fixed number of weights per step.

    Args:
        weights_per_step: weights removed per pruning step (exactly, with global scope and no
            ``layer_rates``; ``layerwise`` removes that fraction of the remaining weights from
            each layer, the same total up to one weight per layer of rounding).
        prune_rate: instead of ``weights_per_step``: remove this fraction of the remaining weights
            per step, so step ``k`` ends at sparsity ``1 - (1 - prune_rate) ** k`` exactly (the
            sparsities of a lottery-ticket run with the same rate).
        steps: pruning steps in all; afterwards the sparse net just trains on.
        steps_between: training steps (meta-updates, or supervised batches) before each
            pruning step: the fine-tuning between steps and the tasks the importance sums over.
        criterion: ``product`` (eq. 7, the default), ``gradient_first`` or ``weight_first``.
        candidate_factor: the two-stage criteria draw ``candidate_factor * weights_per_step``
            candidates by their first key, then prune ``weights_per_step`` of them by the second.
        accumulate_batches: sum the importance over only the last this many training steps
            before each pruning step (None: all ``steps_between`` of them).
        write_every: record the sparsity of every this many pruning steps (``rounds/round_XX``);
            the final sparsity is always recorded.
        scope, exclude, layer_rates, test_each_round: as for :class:`~callbacks.base.PruningCallback`.
    """

    def __init__(
        self,
        weights_per_step: Optional[int] = None,
        steps: int = 40,
        steps_between: int = 10,
        criterion: Criterion = "product",
        candidate_factor: float = 2.0,
        accumulate_batches: Optional[int] = None,
        write_every: int = 1,
        prune_rate: Optional[float] = None,
        scope: Scope = "global",
        exclude: Sequence[str] = (),
        layer_rates: Optional[Mapping[str, float]] = None,
        test_each_round: bool = False,
    ) -> None:
        super().__init__(
            scope=scope, exclude=exclude, layer_rates=layer_rates, test_each_round=test_each_round
        )
        if (weights_per_step is None) == (prune_rate is None):
            raise ConfigError(
                "MetaGradientPruning: set exactly one of weights_per_step (a count per step) and "
                f"prune_rate (a fraction of the remaining weights); got {weights_per_step}, {prune_rate}"
            )
        if prune_rate is not None and not 0.0 < prune_rate < 1.0:
            raise ConfigError(f"MetaGradientPruning.prune_rate must be in (0, 1), got {prune_rate}")
        if (
            (weights_per_step is not None and weights_per_step < 1)
            or steps < 0
            or steps_between < 1
            or write_every < 1
        ):
            raise ConfigError(
                "MetaGradientPruning needs weights_per_step >= 1, steps >= 0, steps_between >= 1 "
                f"and write_every >= 1; got {weights_per_step}, {steps}, {steps_between}, {write_every}"
            )
        if criterion not in ("product", "gradient_first", "weight_first"):
            raise ConfigError(
                f"criterion must be 'product', 'gradient_first' or 'weight_first', got {criterion!r}"
            )
        if candidate_factor < 1:
            raise ConfigError(f"candidate_factor must be >= 1, got {candidate_factor}")
        if accumulate_batches is not None and not 1 <= accumulate_batches <= steps_between:
            raise ConfigError(
                f"accumulate_batches must be in [1, steps_between={steps_between}], got {accumulate_batches}"
            )
        self.weights_per_step = weights_per_step
        self.prune_rate = prune_rate
        self.steps = steps
        self.steps_between = steps_between
        self.criterion = criterion
        self.candidate_factor = candidate_factor
        self.accumulate_batches = accumulate_batches
        self.write_every = write_every
        self.pruned_steps = 0
        self.batches_since_prune = 0
        self.tasks_seen = 0
        self.grad_sq: dict[str, Tensor] = {}
        self.last_step: dict[str, int] = {}  # what the last pruning step did, for the next record

    # ------------------------------------------------------------------ eq. 6: accumulation
    def accumulate(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Add each task's squared support-loss gradient w.r.t. the effective weights."""
        layers = self.prunable(pl_module)
        with torch.enable_grad(), _effective_weights_as_leaves(layers) as leaves:
            names = list(leaves)
            for loss in pl_module.task_losses(batch, adapted=False):
                grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is None:
                        continue
                    total = self.grad_sq.get(name)
                    square = grad.detach() ** 2
                    self.grad_sq[name] = square if total is None else total.to(square) + square
                self.tasks_seen += 1

    def importance(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Eq. 7: ``|w| * sum_tasks g**2``, divided by its sum of absolute values over the layer."""
        scores = {}
        for name, weight in self._magnitudes(pl_module).items():
            imp = weight * self._grad_sq(name, weight)
            scores[name] = imp / imp.abs().sum().clamp_min(torch.finfo(imp.dtype).tiny)
        return scores

    # ------------------------------------------------------------------ the criteria as scores
    def scores(self, pl_module: pl.LightningModule, fraction: float) -> dict[str, Tensor]:
        """The score :func:`~lthmaml.sparsity.prune_lowest` ranks; non-candidates score +inf."""
        if self.criterion == "product":
            return self.importance(pl_module)
        magnitudes = self._magnitudes(pl_module)
        gradients = {name: self._grad_sq(name, weight) for name, weight in magnitudes.items()}
        first, second = (
            (gradients, magnitudes) if self.criterion == "gradient_first" else (magnitudes, gradients)
        )
        masks = sparsity.masks_of(pl_module)
        pool = min(1.0, self.candidate_factor * fraction)
        # The candidate pool is itself a prune_lowest selection: the weights it would remove.
        after = sparsity.prune_lowest(masks, first, pool, self.scope, self.layer_rates)
        inf = torch.tensor(float("inf"))
        return {
            name: torch.where(masks[name].bool() & ~after[name].bool(), second[name], inf.to(second[name]))
            for name in second
        }

    def prune_step(self, pl_module: pl.LightningModule) -> int:
        """One pruning step: score, remove the step's weights, reset the accumulators."""
        remaining = self._alive(pl_module)
        if self.prune_rate is not None:
            rate = self.prune_rate
            self.prune(pl_module, self.scores(pl_module, rate), rate, rounds=self.pruned_steps + 1)
        elif remaining > 0:
            # prune_lowest removes round(fraction * remaining) = weights_per_step exactly.
            fraction = min(1.0, self.weights_per_step / remaining)
            self.prune(pl_module, self.scores(pl_module, fraction), fraction)
        self.pruned_steps += 1
        self.batches_since_prune = 0
        self.grad_sq = {}
        self.tasks_seen = 0
        return remaining - self._alive(pl_module)

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Before the meta-update: the gradient is taken at the meta-parameters of this batch.
        if self.pruned_steps >= self.steps:
            return
        window = self.accumulate_batches or self.steps_between
        if self.batches_since_prune >= self.steps_between - window:
            self.accumulate(pl_module, batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self.pruned_steps >= self.steps:
            return
        self.batches_since_prune += 1
        if self.batches_since_prune < self.steps_between:
            return
        if self.pruned_steps % self.write_every == 0:
            self.record(trainer, pl_module)  # the net trained at this sparsity, before the step
        tasks = self.reduce_count(trainer, self.tasks_seen)
        self.grad_sq = self.reduce_scores(trainer, self.grad_sq)
        pruned = self.prune_step(pl_module)
        self.last_step = {"pruned": pruned, "tasks": tasks}
        rank_zero_info(
            f"MetaGradientPruning: step {self.pruned_steps} removed {pruned} weights, scored on "
            f"{tasks} tasks; sparsity {sparsity.sparsity_report(pl_module).sparsity:.2%}"
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint's hook, so the fit's last.ckpt holds the final record too.
        recorded = bool(self.history) and self.history[-1]["step"] == self.pruned_steps
        if self.pruned_steps > 0 and not recorded and self.last_epoch(trainer):
            self.record(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the net as trained at the current sparsity: ``step`` pruning steps made it."""
        val = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val/") and v.numel() == 1
        }
        metrics = {"step": self.pruned_steps, **self.last_step, "global_step": trainer.global_step, **val}
        self.write_round(trainer, pl_module, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "pruned_steps": self.pruned_steps,
            "batches_since_prune": self.batches_since_prune,
            "tasks_seen": self.tasks_seen,
            "grad_sq": {name: value.detach().cpu() for name, value in self.grad_sq.items()},
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.pruned_steps = int(state_dict.get("pruned_steps", 0))
        self.batches_since_prune = int(state_dict.get("batches_since_prune", 0))
        self.tasks_seen = int(state_dict.get("tasks_seen", 0))
        self.grad_sq = dict(state_dict.get("grad_sq", {}))
        self.last_step = dict(state_dict.get("last_step", {}))

    # ------------------------------------------------------------------ helpers
    def _alive(self, pl_module: pl.LightningModule) -> int:
        return sum(int(layer.mask.sum()) for layer in self.prunable(pl_module).values())

    def _magnitudes(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return sparsity.magnitude_scores(pl_module, self.exclude)

    def _grad_sq(self, name: str, like: Tensor) -> Tensor:
        total = self.grad_sq.get(name)
        return torch.zeros_like(like) if total is None else total.to(like)


@contextmanager
def _effective_weights_as_leaves(layers: Mapping[str, MaskedMixin]) -> Iterator[dict[str, Tensor]]:
    """Let each layer compute with a detached leaf copy of its (transformed) weight.

    The layer still multiplies by its mask, so the leaf's gradient is dL/dw at the effective
    weight ``w`` on every unpruned entry (eq. 6 differentiates w, reparametrisations included),
    and autograd never writes the parameters' ``.grad`` the meta-update accumulates into.
    """
    saved = {name: layer.weight_transform for name, layer in layers.items()}
    leaves = {}
    with torch.no_grad():
        for name, layer in layers.items():
            transform = saved[name]
            weight = layer.weight if transform is None else transform(layer.weight)
            leaves[name] = weight.detach().clone().requires_grad_()
    try:
        for name, layer in layers.items():
            layer.weight_transform = lambda _, leaf=leaves[name]: leaf
        yield leaves
    finally:
        for name, layer in layers.items():
            layer.weight_transform = saved[name]
