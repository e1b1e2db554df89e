"""The sparsity engine: the mask bookkeeping every pruning strategy shares, written once.

A strategy only decides *what* to score and *when*; this module turns scores into masks (a
fraction of the remaining weights, globally or per layer, ties broken by position), keeps raw
weights under a mask at zero, rewinds, re-initialises, reports sparsity and saves masks.

Masks are the ``mask`` buffers of the mask-aware layers (``lthmaml.nets.layers``), keyed here by the
layer's qualified name in the model handed in (a LightningModule or a bare net alike).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lthmaml.errors import ConfigError
from lthmaml.nets.layers import MaskedBatchNorm2d, MaskedConv2d, MaskedMixin, masked_layers

Masks = dict[str, Tensor]
Scores = Mapping[str, Tensor]
Scope = Literal["global", "layerwise"]


def prunable_layers(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, MaskedMixin]:
    """Mask-aware layers of ``model`` by name, without those whose name is in ``exclude``."""
    layers = masked_layers(model)
    unknown = set(exclude) - set(layers)
    if unknown:
        raise ConfigError(
            f"exclude names {sorted(unknown)} that are not prunable layers; choose from {sorted(layers)}"
        )
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no mask-aware layers to prune: build the net from "
            "lthmaml.nets.layers.MaskedConv2d / MaskedLinear"
        )
    return {name: layer for name, layer in layers.items() if name not in exclude}


def masks_of(model: nn.Module) -> Masks:
    """A copy of every prunable layer's mask."""
    return {name: layer.mask.detach().clone() for name, layer in masked_layers(model).items()}


@torch.no_grad()
def load_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Install ``masks`` (by layer name) and zero the raw weights they prune."""
    layers = masked_layers(model)
    for name, mask in masks.items():
        if name not in layers or layers[name].mask.shape != mask.shape:
            raise ConfigError(f"mask '{name}' of shape {tuple(mask.shape)} does not fit this model")
        layers[name].mask.copy_(mask)
    apply_masks(model)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero raw weights under a mask, and BatchNorm parameters of switched-off channels.

    The forward pass already multiplies by the mask; zeroing the stored values too keeps
    optimizer steps (weight decay, stale momentum) from growing anything behind a mask and makes
    checkpoints and exports exactly sparse.
    """
    for module in model.modules():
        if isinstance(module, MaskedMixin):
            module.weight.mul_(module.mask)
        elif isinstance(module, MaskedBatchNorm2d) and module.affine:
            module.weight.mul_(module.channel_mask)
            module.bias.mul_(module.channel_mask)


def magnitude_scores(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, Tensor]:
    """|effective weight| per layer: the magnitude criterion, reparametrisations included."""
    return {
        name: layer.effective_weight().detach().abs()
        for name, layer in prunable_layers(model, exclude).items()
    }


def prune_lowest(
    masks: Mapping[str, Tensor],
    scores: Scores,
    fraction: float,
    scope: Scope = "global",
    layer_rates: Optional[Mapping[str, float]] = None,
    rounds: Optional[int] = None,
) -> Masks:
    """New masks with ``fraction`` of each group's *remaining* weights removed, lowest score first.

    ``scope="layerwise"`` prunes each layer on its own; ``"global"`` ranks all layers' scores
    together. A layer in ``layer_rates`` is pruned on its own at ``fraction * rate`` (the LTH
    papers prune the output layer at half rate). Layers without a score keep their mask. Ties go
    to the lower flat index, so equal scores give the same mask on every run and rank.

    With ``rounds=r`` the group is instead pruned up to ``1 - (1 - fraction) ** r`` of *all* its weights
    (round r of an iterative schedule), so rounding never accumulates across rounds.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"prune fraction must be in [0, 1], got {fraction}")
    layer_rates = dict(layer_rates or {})
    unknown = set(layer_rates) - set(scores)
    if unknown:
        raise ConfigError(f"layer_rates names {sorted(unknown)}, which are not scored layers")
    new_masks = {name: mask.clone() for name, mask in masks.items()}
    groups: list[tuple[list[str], float]] = [([name], fraction * rate) for name, rate in layer_rates.items()]
    shared = [name for name in scores if name not in layer_rates]
    if scope == "global":
        groups.append((shared, fraction))
    elif scope == "layerwise":
        groups += [([name], fraction) for name in shared]
    else:
        raise ConfigError(f"scope must be 'global' or 'layerwise', got {scope!r}")
    for names, group_fraction in groups:
        total = sum(new_masks[name].numel() for name in names)
        pruned = sum(int((new_masks[name] == 0).sum()) for name in names)
        if rounds is None:
            count = round(group_fraction * (total - pruned))
        else:
            count = max(0, round(total * (1 - (1 - group_fraction) ** rounds)) - pruned)
        _prune_group(new_masks, scores, names, count)
    return new_masks


def prune_by_magnitude(
    model: nn.Module,
    fraction: float,
    layer_rates: Optional[Mapping[str, float]] = None,
    rounds: Optional[int] = None,
) -> None:
    """Install global magnitude pruning of ``fraction`` of ``model``'s remaining prunable weights
    (:func:`prune_lowest`'s ``layer_rates`` and ``rounds``): one-shot pruning outside a callback."""
    scores = magnitude_scores(model)
    load_masks(model, prune_lowest(masks_of(model), scores, fraction, layer_rates=layer_rates, rounds=rounds))


def _prune_group(masks: Masks, scores: Scores, names: list[str], count: int) -> None:
    alive = [masks[name].flatten().bool() for name in names]
    candidates = torch.cat([scores[name].flatten().float()[keep] for name, keep in zip(names, alive)])
    if count == 0:
        return
    order = torch.sort(candidates, stable=True).indices[:count]
    removed = torch.zeros(candidates.numel(), dtype=torch.bool)
    removed[order] = True
    start = 0
    for name, keep in zip(names, alive):
        positions = keep.nonzero().flatten()
        chosen = positions[removed[start : start + positions.numel()]]
        masks[name].view(-1)[chosen] = 0
        start += positions.numel()


# ---------------------------------------------------------------------- channels (structured)
def conv_batchnorm_pairs(model: nn.Module) -> dict[str, tuple[MaskedConv2d, Optional[MaskedBatchNorm2d]]]:
    """Each masked conv with the channel-masked BatchNorm that follows it (None if there is none)."""
    pairs: dict[str, tuple[MaskedConv2d, Optional[MaskedBatchNorm2d]]] = {}
    pending: Optional[str] = None
    for name, module in model.named_modules():
        if isinstance(module, MaskedConv2d):
            pairs[name] = (module, None)
            pending = name
        elif isinstance(module, MaskedBatchNorm2d) and pending is not None:
            conv = pairs[pending][0]
            if module.num_features == conv.out_channels:
                pairs[pending] = (conv, module)
            pending = None
    return pairs


@torch.no_grad()
def prune_channels(model: nn.Module, conv_name: str, channels: Sequence[int]) -> None:
    """Remove output ``channels`` of a conv: its filters and its BatchNorm channels."""
    pairs = conv_batchnorm_pairs(model)
    if conv_name not in pairs:
        raise ConfigError(f"'{conv_name}' is not a masked conv layer; choose from {sorted(pairs)}")
    conv, batchnorm = pairs[conv_name]
    index = torch.as_tensor(list(channels), dtype=torch.long)
    conv.mask[index] = 0
    if batchnorm is not None:
        batchnorm.channel_mask[index] = 0
    apply_masks(model)


def alive_channels(conv: MaskedConv2d) -> Tensor:
    """Boolean ``[out_channels]``: the filters with any unpruned weight."""
    return conv.mask.flatten(1).any(dim=1)


def lowest_channels(
    scores: Mapping[str, Tensor], alive: Mapping[str, Tensor], count: int
) -> dict[str, list[int]]:
    """The ``count`` alive channels (filters) with the lowest scores over all layers, by layer name.

    A layer never loses its last filter. Ties go to the earlier layer, then the lower index.
    """
    values = {name: scores[name].detach().cpu().tolist() for name in alive}
    candidates = sorted(
        (values[name][channel], order, channel, name)
        for order, name in enumerate(alive)
        for channel in alive[name].nonzero().flatten().tolist()
    )
    left = {name: int(a.sum()) for name, a in alive.items()}
    chosen: dict[str, list[int]] = {}
    for _, _, channel, name in candidates:
        if sum(map(len, chosen.values())) == count:
            break
        if left[name] > 1:
            chosen.setdefault(name, []).append(channel)
            left[name] -= 1
    return chosen


# ---------------------------------------------------------------------- rewind and re-init
def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter: the state a later :func:`rewind` returns to."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def rewind(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Set every parameter back to ``state`` bit-exactly, keeping the current masks."""
    params = dict(model.named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise ConfigError(
            f"rewind state lacks parameters {sorted(missing)[:5]}: was it saved from this model?"
        )
    for name, param in params.items():
        param.copy_(state[name])
    apply_masks(model)


@torch.no_grad()
def reinitialize(model: nn.Module, generator_seed: Optional[int] = None) -> None:
    """Fresh random weights under the current masks: the random-reinit control of the LTH paper."""
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        transform = getattr(module, "weight_transform", None)
        if hasattr(transform, "inverse"):  # a reparametrised layer stores what maps to the weight
            module.weight.copy_(transform.inverse(module.weight))
    apply_masks(model)


# ---------------------------------------------------------------------- reporting and files
@dataclass(frozen=True)
class LayerSparsity:
    name: str
    total: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity counted on effective weights (what the layer computes with), per layer and overall."""

    layers: tuple[LayerSparsity, ...]

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "total": self.total,
            "zeros": self.zeros,
            "layers": {layer.name: {**asdict(layer), "sparsity": layer.sparsity} for layer in self.layers},
        }

    def table(self) -> str:
        rows = [f"{'layer':<24}{'weights':>10}{'pruned':>10}{'sparsity':>10}"]
        for layer in (*self.layers, LayerSparsity("all", self.total, self.zeros)):
            rows.append(f"{layer.name:<24}{layer.total:>10}{layer.zeros:>10}{layer.sparsity:>10.2%}")
        return "\n".join(rows)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    return SparsityReport(
        tuple(
            LayerSparsity(name, layer.weight.numel(), int((layer.effective_weight() == 0).sum()))
            for name, layer in masked_layers(model).items()
        )
    )


def save_masks(path: Path, masks: Mapping[str, Tensor], metadata: Optional[dict] = None) -> None:
    """Masks as a safetensors file (bool tensors; no pickle), metadata as JSON in its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: mask.detach().to(torch.bool).contiguous() for name, mask in masks.items()}
    save_file(tensors, str(path), metadata={"lthmaml": json.dumps(metadata or {})})


def read_masks(path: Path, dtype: torch.dtype = torch.float32) -> Masks:
    return {name: mask.to(dtype) for name, mask in load_file(str(path)).items()}


# ---------------------------------------------------------------------- gradients at the weights
@contextmanager
def effective_weights_as_leaves(
    layers: Mapping[str, MaskedMixin], dense: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Let each layer compute with a detached leaf copy of its (transformed) weight.

    The layer still multiplies by its mask, so the leaf's gradient is dL/dw at the effective
    weight ``w`` on every unpruned entry (reparametrisations included: what a gradient criterion
    such as meta-gradient pruning's eq. 6 differentiates), and autograd never writes the
    parameters' ``.grad`` an optimizer accumulates into.

    ``dense=True``: the leaf is the effective weight itself (pruned entries zero) and the layer
    multiplies by ones instead of its mask, so the forward pass is unchanged and the gradient is
    dense: dL/dw at pruned entries too, the signal by which RigL grows connections.
    """
    saved = {name: (layer.weight_transform, layer.mask) for name, layer in layers.items()}
    leaves = {}
    with torch.no_grad():
        for name, layer in layers.items():
            source = layer.effective_weight() if dense else transformed_weight(layer)
            leaves[name] = source.detach().clone().requires_grad_()
    try:
        for name, layer in layers.items():
            layer.weight_transform = lambda _, leaf=leaves[name]: leaf
            if dense:
                layer.mask = torch.ones_like(saved[name][1])
        yield leaves
    finally:
        for name, layer in layers.items():
            layer.weight_transform, layer.mask = saved[name]


def transformed_weight(layer: MaskedMixin) -> Tensor:
    """The weight a layer computes with before its mask: ``transform(weight)``, or ``weight``."""
    return layer.weight if layer.weight_transform is None else layer.weight_transform(layer.weight)
