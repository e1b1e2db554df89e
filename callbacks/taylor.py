"""Taylor-expansion filter pruning: Molchanov et al. (2017), "Pruning Convolutional Neural Networks
for Resource Efficient Inference", made to prune MAML's meta-parameters.

Criterion (their section 2.2). Removing feature map ``z`` (a conv filter's output after its
BatchNorm) changes the cost ``C`` by, to first order, ``Theta(z) = |1/M sum_m z_m dC/dz_m|``, the
mean running over the M = examples x positions of the map. For MAML, ``C`` is a task's query loss
after the inner loop (what meta-training minimises; ``task_losses(batch, adapted=True)``); for a
plain classifier it is the batch loss. Theta is taken per task (or batch) and summed over the
tasks seen since the last pruning step.

Any graph. Where a residual sum joins the maps of several convs (ResNet-12's third conv and its
skip path's projection, ResNet-18's identity shortcuts), channel ``k`` of all of them is one
channel, which can only go from all of them at once: a *channel group*, found by torch-pruning's
dependency graph (Fang et al. 2023; :mod:`lthmaml.channels`). Removing it removes each of those
maps, so the first-order change of ``C`` is the sum of their changes, and a group's channel
scores the sum of its maps' Theta (what DepGraph's group importance does with coupled channels).
In a chain (Conv4) each conv is its own group and this is the paper's criterion unchanged.

Normalisation (section 2.3). Scores are divided by their layer's (channel group's) L2 norm, so
that layers of different depth compare, then ranked over all layers together.

FLOPs regularisation (section 2.4). The ranked criterion is ``Theta_flops(z_l^k) = Theta(z_l^k) -
lambda Theta_l^flops``, where ``Theta_l^flops`` is the cost in FLOPs of a feature map of layer
``l``: maps of expensive layers rank lower, so they go sooner. Here ``lambda`` is
``flops_weight`` (0, the default: the plain criterion), ``Theta`` the layer-normalised score, and,
on a comparable scale, ``Theta_l^flops`` the multiply-adds one alive filter of layer ``l`` costs
(its own output map plus its input channel to the next layer, on the alive channels:
:func:`lthmaml.nets.flops.filter_flops`), divided by the largest over the ranked layers; it is
recounted at every pruning step, as the widths change. With ``cost="activations"`` the cost is
instead the activation memory the paper also names: a map's ``H_out W_out`` positions
(:func:`lthmaml.nets.flops.filter_activations`), so removals move to the full-resolution layers,
whose per-position work (BatchNorm, ReLU, pooling and their backward) dominates a fine-tuning step
on a CPU more than the multiply-adds do (step times and accuracies: docs/strategies.md). The
multiply-adds are counted on a Conv4 (:mod:`lthmaml.nets.flops`); the activations on any net, a
group's channel costing the positions of each of its coupled maps.

Schedule (section 3). Every ``steps_between`` training steps the ``filters_per_step`` lowest
filters go (the filters, biases and BatchNorm channels of every conv of their group, via the
engine's ``prune_channels``) while training goes on, until ``target_fraction`` of the filters is
removed, a group's channel counting as one filter. A group always keeps one.
The window, the rank reduction and the records are :class:`~callbacks.schedule.LevelSchedule`'s.

Cost. Scores come from a separate pass over the batch just trained on, in the last
``accumulate_batches`` batches before each pruning step (``None``: every batch). For MAML that pass
is, per task, the inner loop without second-order graph, a query forward pass and one backward pass
to the gates, cheaper than a second-order meta-training task; nothing is paid once the target is
reached, and no activation is kept: the gates' gradients are the criterion.

Rounds. ``rounds/round_XX`` (masks, ``metrics.json`` whose ``details`` hold ``filters_remaining``,
``filters_pruned`` and the ``channels`` left per group, ``model.ckpt``) records the net trained
with the filters of pruning step ``XX``: written at the end of its training interval, just before
the next step (round 0: the full net), the last one when the fit ends. Any intermediate network
can be tested (``test_each_round`` tests them all after the fit), for a
curve of accuracy against filters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from callbacks.schedule import LevelSchedule
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.nets.flops import COSTS, Cost, filter_cost


def taylor_scores(
    batchnorms: Mapping[str, _BatchNorm], losses: Iterable[Tensor]
) -> tuple[dict[str, Tensor], int]:
    """Per channel of each BatchNorm's output ``a``: the sum over ``losses`` of
    ``|mean over examples and positions of a * dL/da|``, and the number of losses.

    A forward hook multiplies each output by a gate of ones; ``dL/dgate_c = sum a_c * dL/da_c``, so
    one backward pass to the gates yields the criterion without keeping activations. ``losses``
    must be lazy (a generator) so that its forward passes run with the hooks in place. MAML's
    ``task_losses(adapted=True)`` adapts to fresh leaves, so only the query's forward pass (the
    last one, whose size ``M`` is recorded) reaches the gates.
    """
    gates: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    totals: dict[str, Tensor] = {}

    def gate(name: str):
        def apply(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            positions[name] = out.numel() // out.shape[1]
            return out * gates[name].view(1, -1, *([1] * (out.dim() - 2)))

        return apply

    for name, batchnorm in batchnorms.items():
        like = batchnorm.weight if batchnorm.weight is not None else batchnorm.running_mean
        kind = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        gates[name] = torch.ones(batchnorm.num_features, requires_grad=True, **kind)
        totals[name] = torch.zeros(batchnorm.num_features, **kind)
    count = 0
    handles = [bn.register_forward_hook(gate(name)) for name, bn in batchnorms.items()]
    try:
        with torch.enable_grad():
            for loss in losses:
                grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
                for name, grad in zip(gates, grads):
                    if grad is not None:
                        totals[name] += (grad / positions[name]).abs()
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    return totals, count


def layer_normalized(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's scores divided by their L2 norm (all-zero layers stay zero)."""
    return {name: s / s.norm() if s.norm() > 0 else s.clone() for name, s in scores.items()}


def flops_regularized(
    scores: Mapping[str, Tensor], costs: Mapping[str, float], flops_weight: float
) -> dict[str, Tensor]:
    """``scores - flops_weight * cost / max cost``, each layer's cost being one of its filters'
    (FLOPs or activations)."""
    top = max(costs[name] for name in scores)
    return {name: s - flops_weight * costs[name] / top for name, s in scores.items()}


class TaylorFilterPruning(LevelSchedule):
    """Structured pruning of conv filters by the first-order Taylor criterion (Molchanov et al. 2017).

    Args:
        filters_per_step: filters removed at each pruning step (8 on a 4 x 64 Conv4).
        target_fraction: stop once this share of the scored filters is removed.
        flops_weight: lambda of the FLOPs regularisation (>= 0; 0: none): each layer's normalised
            per-filter FLOPs (1 for the costliest layer) times this is taken off its scores.
            Layer-normalised scores of a layer of ``n`` filters are about ``1/sqrt(n)`` each
            (0.125 for 64), so weights of a few hundredths already move removals.
        cost: what a filter costs in that term. ``"flops"``: the multiply-adds of its map and of its
            input channel to the next layer (the second block of the Omniglot Conv4 costs most);
            ``"activations"``: its map's output positions, ``H_out W_out`` (the first block, at full
            resolution, costs most). ``"flops"`` needs a Conv4; ``"activations"`` takes any net.
        exclude: conv layers (qualified names, e.g. ``net.features.0.0``) never pruned, nor the
            convs of their channel groups.
        steps_between, accumulate_batches, write_every, patience, min_delta: the schedule of
            :class:`~callbacks.schedule.LevelSchedule`; ``monitor``, ``mode``,
            ``test_each_round``: as for :class:`~callbacks.base.PruningCallback`.
    """

    scored = "after"  # on the batch just trained on

    def __init__(
        self,
        filters_per_step: int = 8,
        target_fraction: float = 0.5,
        steps_between: int = 20,
        accumulate_batches: Optional[int] = 5,
        exclude: Sequence[str] = (),
        flops_weight: float = 0.0,
        cost: Cost = "flops",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("scope", "global") != "global" or kwargs.get("layer_rates"):
            raise ConfigError(
                "TaylorFilterPruning ranks layer-normalised scores globally: drop scope/layer_rates"
            )
        super().__init__(None, None, steps_between, accumulate_batches, exclude=exclude, **kwargs)
        if filters_per_step < 1:
            raise ConfigError(f"TaylorFilterPruning: filters_per_step must be >= 1, got {filters_per_step}")
        if not 0.0 < target_fraction < 1.0:
            raise ConfigError(
                f"TaylorFilterPruning: target_fraction must be in (0, 1), got {target_fraction}"
            )
        if not flops_weight >= 0:  # NaN too
            raise ConfigError(f"TaylorFilterPruning: flops_weight must be >= 0, got {flops_weight}")
        self.filters_per_step = filters_per_step
        self.target_fraction = target_fraction
        if cost not in COSTS:
            raise ConfigError(f"TaylorFilterPruning: cost must be one of {sorted(COSTS)}, got {cost!r}")
        self.flops_weight = flops_weight
        self.cost = cost

    # ------------------------------------------------------------------ the layers and the target
    def layers(self, pl_module: pl.LightningModule) -> dict[str, sparsity.ChannelGroup]:
        """The scored channel groups (a conv alone, or convs whose maps a residual sum joins), each
        with the BatchNorms whose outputs are its feature maps."""
        groups = sparsity.channel_groups(pl_module, self.exclude)
        if not groups:
            raise ConfigError(
                f"{type(self).__name__} prunes conv filters, but {type(pl_module).__name__} has no "
                "nn.Conv2d layer to prune (outside exclude): use it on a conv net such as "
                "lthmaml.nets.Conv4, or pick an unstructured pruning callback"
            )
        lonely = [conv for group in groups.values() for conv in group.bare]
        if lonely:
            raise ConfigError(
                f"{type(self).__name__} scores a filter's map after the BatchNorm that follows its conv "
                f"(nn.Conv2d then nn.BatchNorm2d), but conv {lonely} has none: add it to exclude"
            )
        return groups

    def target(self, pl_module: pl.LightningModule) -> tuple[int, int, int]:
        """(filters scored in all, filters left, filters to remove in all), a group's channel
        counting as one filter."""
        groups = self.layers(pl_module)
        total = sum(group.width for group in groups.values())
        alive = [sparsity.alive_channels(pl_module, name).sum() for name in groups]
        left = int(torch.stack(alive).sum())  # one wait for the device, not one per group
        return total, left, round(self.target_fraction * total)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        total, _, goal = self.target(pl_module)
        layers = len(self.layers(pl_module))
        if goal > total - layers:
            raise ConfigError(
                f"{type(self).__name__}: target_fraction={self.target_fraction} would remove {goal} of "
                f"{total} filters, but each of the {layers} channel groups keeps at least one"
            )
        if self.flops_weight:
            filter_cost(pl_module, self.cost)  # a net not counted fails now, not at the first step
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        pl_module.log("filters_remaining", float(self.target(pl_module)[1]), sync_dist=True)

    # ------------------------------------------------------------------ the method
    def pruned_enough(self, pl_module: pl.LightningModule) -> bool:
        total, left, goal = self.target(pl_module)
        return total - left >= goal

    def score_batch(self, pl_module: pl.LightningModule, batch: Any) -> tuple[dict[str, Tensor], int]:
        """The Taylor criterion of every task (or the batch) in ``batch``, per channel group: the
        sum of its coupled maps' criteria (removing the channel removes all of them)."""
        groups = self.layers(pl_module)
        batchnorms = {name: pl_module.get_submodule(name) for g in groups.values() for name in g.batchnorms}
        scores, count = taylor_scores(batchnorms, pl_module.task_losses(batch, adapted=True))
        return {
            name: torch.stack([scores[bn] for bn in group.batchnorms]).sum(dim=0)
            for name, group in groups.items()
        }, count

    def criterion(self, pl_module: pl.LightningModule, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What is ranked: layer-normalised scores, cost-regularised when ``flops_weight > 0``."""
        normalized = layer_normalized(scores)
        if not self.flops_weight:
            return normalized
        return flops_regularized(normalized, filter_cost(pl_module, self.cost), self.flops_weight)

    def prune_level(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scores: Mapping[str, Tensor]
    ) -> dict[str, Any]:
        """Remove the step's filters of lowest criterion (a group keeps one)."""
        groups = self.layers(pl_module)
        total, left, goal = self.target(pl_module)
        alive = {name: sparsity.alive_channels(pl_module, name) for name in groups}
        sums = {
            name: scores.get(name, torch.zeros(group.width)).to(pl_module.get_submodule(name).weight)
            for name, group in groups.items()
        }
        chosen = sparsity.lowest_channels(
            self.criterion(pl_module, sums), alive, min(self.filters_per_step, goal - (total - left))
        )
        if not chosen:
            rank_zero_warn(f"{type(self).__name__}: every group is down to one filter; nothing pruned")
        for name, channels in chosen.items():
            sparsity.prune_channels(pl_module, name, channels)
        return {"filters_removed": sum(len(c) for c in chosen.values())}

    def details(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        total, left, _ = self.target(pl_module)
        channels = {
            name: int(sparsity.alive_channels(pl_module, name).sum()) for name in self.layers(pl_module)
        }
        return {"filters_remaining": left, "filters_pruned": total - left, "channels": channels}
