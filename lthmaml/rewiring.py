"""The always-sparse half of the sparsity engine: densities per layer, drop and grow, backward sets.

What the strategies that train sparse from the first update share (``callbacks.sparse_training``):
how a density is allocated among layers (uniform, Erdos-Renyi-Kernel), masks that keep the
highest scores, SET's and RigL's drop-and-grow with a grown weight starting at zero and a fresh
optimizer state, TopKAST's forward and backward sets, and the forward multiply-adds of a masked net
(which every round record holds). Masks are keyed by parameter name, as in :mod:`lthmaml.sparsity`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.sparsity import ForwardMask, Masks, Scores

Distribution = Literal["uniform", "erk"]


def layer_densities(
    shapes: Mapping[str, torch.Size], density: float, distribution: Distribution = "erk"
) -> dict[str, float]:
    """Each layer's fraction of weights kept, so that the net as a whole keeps ``density``.

    ``uniform``: every layer at ``density``. ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020, after
    Mocanu et al. 2018): layer ``l`` keeps a fraction proportional to ``sum(shape) / prod(shape)``
    of its weight tensor (``(C_out + C_in + k_h + k_w) / (C_out C_in k_h k_w)`` for a conv), so
    small layers stay denser; a layer that would exceed 1 is kept dense and the others share the
    rest.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if distribution == "uniform":
        return {name: density for name in shapes}
    if distribution != "erk":
        raise ConfigError(f"distribution must be 'uniform' or 'erk', got {distribution!r}")
    sizes = {name: shape.numel() for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [name for name in shapes if name not in dense]
        if not rest:  # density 1: every layer dense
            return dict.fromkeys(shapes, 1.0)
        scale = (budget - sum(sizes[name] for name in dense)) / sum(raw[n] * sizes[n] for n in rest)
        full = {name for name in rest if scale * raw[name] >= 1.0}
        if not full:
            return {name: 1.0 if name in dense else scale * raw[name] for name in shapes}
        dense |= full


def keep_highest(scores: Scores, densities: Mapping[str, float]) -> Masks:
    """Per layer, a mask keeping the ``round(density * size)`` entries of highest score (ties to
    the lower flat index): the forward set of a magnitude, sensitivity or random allocation."""
    masks = {}
    for name, density in densities.items():
        score = scores[name].detach().flatten().float()
        keep = round(density * score.numel())
        order = torch.sort(-score, stable=True).indices[:keep]
        mask = torch.zeros(score.numel(), dtype=scores[name].dtype, device=score.device)
        mask[order] = 1
        masks[name] = mask.view_as(scores[name])
    return masks


def drop_and_grow(
    mask: Tensor, drop_scores: Tensor, grow_scores: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """Drop the ``count`` active entries of lowest ``drop_scores`` and activate the ``count``
    inactive ones (inactive before the drop) of highest ``grow_scores``: SET's and RigL's update,
    the layer's density unchanged. Returns the new mask and the boolean map of grown entries."""
    active = mask.flatten().bool()
    count = min(count, int(active.sum()), int((~active).sum()))
    new = active.clone()
    if count > 0:
        drop = torch.where(active, drop_scores.flatten().float(), torch.inf)
        new[torch.sort(drop, stable=True).indices[:count]] = False
        grow = torch.where(active, -torch.inf, grow_scores.flatten().float())
        new[torch.sort(-grow, stable=True).indices[:count]] = True
    grown = new & ~active
    return new.to(mask.dtype).view_as(mask), grown.view_as(mask)


@torch.no_grad()
def start_at_zero(
    model: nn.Module, name: str, grown: Tensor, optimizers: Sequence[torch.optim.Optimizer]
) -> None:
    """A grown connection starts from zero (Evci et al.: the function is unchanged by growing) with
    a fresh optimizer state: its entries of every per-weight state tensor (Adam's moments, SGD's
    momentum) are zeroed, so it does not inherit the history of the weight it replaces."""
    weight = sparsity.stored(model, name)
    weight[grown] = 0.0
    for optimizer in optimizers:
        for value in optimizer.state.get(weight, {}).values():
            if isinstance(value, Tensor) and value.shape == weight.shape:
                value[grown] = 0.0


def forward_multiply_adds(
    model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None, uses: Optional[Mapping[str, int]] = None
) -> Optional[tuple[float, float]]:
    """One example's forward multiply-adds in ``model``'s prunable weights through the kept entries
    of ``masks`` (default: the model's own; a weight they leave out counts its own mask), and dense.
    ``uses``: :func:`lthmaml.nets.flops.weight_uses` measured on the model (default: counted on a
    Conv4 or linear layers; None for a net it cannot count)."""
    from lthmaml.nets.flops import weight_uses

    try:
        uses = dict(uses or weight_uses(model))
        own = sparsity.masks_of(model, list(uses))
    except ConfigError:
        return None
    chosen = masks or {}
    # One device-to-host copy for all layers, not one per layer (each waits for a GPU).
    counts = [chosen.get(name, own[name]).sum().double() * uses[name] for name in uses]
    kept = float(torch.stack(counts).sum()) if counts else 0.0
    return kept, sum(float(own[name].numel()) * uses[name] for name in uses)


def set_forward_masks(
    model: nn.Module, masks: Optional[Mapping[str, Tensor]], backward: Optional[Mapping[str, Tensor]] = None
) -> None:
    """Make each named weight compute with ``w * mask`` through a :class:`~lthmaml.sparsity.ForwardMask`,
    its gradient reaching the entries of ``backward`` too (TopKAST's two sets), keeping the dense
    weights behind the mask; ``None``: remove every forward mask (the weights stay as stored)."""
    for name in sparsity.prunable(model):
        module, attribute = sparsity.owner(model, name)
        current = sparsity.forward_masked(model, name)
        if masks is None or name not in masks:
            if current is not None:
                chain = module.parametrizations[attribute]
                if len(chain) == 1:
                    parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
                else:
                    del chain[[i for i, p in enumerate(chain) if p is current][0]]
            continue
        mask = masks[name].to(sparsity.stored(model, name))
        back = None if backward is None else backward[name].to(mask)
        if current is None:
            parametrize.register_parametrization(module, attribute, ForwardMask(mask, back))
        else:
            current.mask, current.backward = mask, back
