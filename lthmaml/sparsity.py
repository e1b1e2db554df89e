"""The sparsity engine: what every pruning strategy shares, written once.

A strategy only decides *what* to score and *when*; this module turns scores into masks (a
fraction of the remaining weights, globally or per layer, ties broken by position), removes conv
channels (a whole channel group at a time: :mod:`lthmaml.channels`), rewinds, re-initialises,
takes gradients at the weights, reports sparsity and saves masks. The masks themselves live beside
the model (:mod:`lthmaml.masks`, whose names this module re-exports, as the channel groups', so a
strategy reads one module).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lthmaml.channels import ChannelGroup, channel_groups, group_of  # noqa: F401  (for strategies)
from lthmaml.errors import ConfigError
from lthmaml.files import give_default_mode
from lthmaml.masks import (  # noqa: F401  (the engine's names, for strategies)
    ForwardMask,
    Masks,
    apply_masks,
    folded,
    forward_masked,
    gradient_masks,
    is_named,
    left_dense,
    load_masks,
    mask_gradients,
    mask_set,
    masks_of,
    masks_within,
    owner,
    prunable,
    stored,
    unparametrize,
    weight,
)

Scores = Mapping[str, Tensor]
Scope = Literal["global", "layerwise"]


# ---------------------------------------------------------------------- scores to masks
def magnitude_scores(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, Tensor]:
    """|weight| per prunable weight: the magnitude criterion, reparametrisations included."""
    return {name: weight(model, name).detach().abs() for name in prunable(model, exclude)}


def prune_lowest(
    masks: Mapping[str, Tensor],
    scores: Scores,
    fraction: float,
    scope: Scope = "global",
    layer_rates: Optional[Mapping[str, float]] = None,
    level: Optional[int] = None,
) -> Masks:
    """New masks with ``fraction`` of each group's *remaining* weights removed, lowest score first.

    ``scope="layerwise"`` prunes each weight on its own; ``"global"`` ranks all scores together.
    A weight in ``layer_rates`` is pruned on its own at ``fraction * rate`` (the LTH papers prune
    the output layer at half rate). Weights without a score keep their mask. Ties go to the lower
    flat index, so equal scores give the same mask on every run and rank.

    With ``level=r`` the group is instead pruned up to ``1 - (1 - fraction) ** r`` of *all* its
    weights (level r of a geometric schedule), so rounding never accumulates across levels.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"prune fraction must be in [0, 1], got {fraction}")
    layer_rates = dict(layer_rates or {})
    unknown = set(layer_rates) - set(scores)
    if unknown:
        raise ConfigError(f"layer_rates names {sorted(unknown)}, which are not scored weights")
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
        if level is None:
            count = round(group_fraction * (total - pruned))
        else:
            count = max(0, round(total * (1 - (1 - group_fraction) ** level)) - pruned)
        _prune_group(new_masks, scores, names, count)
    return new_masks


def prune_by_magnitude(
    model: nn.Module,
    fraction: float,
    layer_rates: Optional[Mapping[str, float]] = None,
    level: Optional[int] = None,
) -> None:
    """Install global magnitude pruning of ``fraction`` of ``model``'s remaining prunable weights
    (:func:`prune_lowest`'s ``layer_rates`` and ``level``): one-shot pruning outside a callback."""
    scores = magnitude_scores(model)
    rates = {
        name: rate for key, rate in (layer_rates or {}).items() for name in scores if is_named(key, name)
    }
    unknown = [key for key in layer_rates or {} if not any(is_named(key, name) for name in scores)]
    if unknown:
        raise ConfigError(
            f"layer_rates names {unknown}, which are not prunable weights; choose from {list(scores)}"
        )
    masks = prune_lowest(masks_of(model, list(scores)), scores, fraction, layer_rates=rates, level=level)
    load_masks(model, masks)


def _prune_group(masks: Masks, scores: Scores, names: list[str], count: int) -> None:
    alive = [masks[name].flatten().bool() for name in names]
    candidates = torch.cat([scores[name].flatten().float()[keep] for name, keep in zip(names, alive)])
    if count == 0:
        return
    order = torch.sort(candidates, stable=True).indices[:count]
    removed = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
    removed[order] = True
    start = 0
    for name, keep in zip(names, alive):
        positions = keep.nonzero().flatten()
        chosen = positions[removed[start : start + positions.numel()]]
        masks[name].view(-1)[chosen] = 0
        start += positions.numel()


# ---------------------------------------------------------------------- channels (structured)
def channel_parameters(model: nn.Module, conv_name: str) -> list[str]:
    """What removing one of the conv's output channels zeroes: the filters and bias of every conv
    of its channel group (:func:`~lthmaml.channels.channel_groups`: the conv alone in a chain, the
    convs whose maps a residual sum joins), and each of their BatchNorms' scale and shift of that
    channel (a zero scale and shift make the map exactly 0, whatever the inner loop does to the
    rest), so the channel is exactly 0 wherever it is read."""
    return list(group_of(model, conv_name).parameters)


@torch.no_grad()
def prune_channels(model: nn.Module, conv_name: str, channels: Sequence[int]) -> None:
    """Remove output ``channels`` of a conv, with the coupled ones of its channel group."""
    names = channel_parameters(model, conv_name)
    masks = masks_of(model, names)
    index = torch.as_tensor(list(channels), dtype=torch.long)
    for mask in masks.values():
        mask[index] = 0
    load_masks(model, masks)


def alive_channels(model: nn.Module, conv_name: str) -> Tensor:
    """Boolean ``[out_channels]``: the channels of the conv's group that a filter with an
    unpruned weight still computes."""
    group = group_of(model, conv_name)
    masks = masks_of(model, [f"{conv}.weight" for conv in group.convs])
    return torch.stack([mask.flatten(1).any(dim=1) for mask in masks.values()]).any(dim=0)


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
    """Fresh random weights under the current masks: the random-reinit control of the LTH paper.

    A parametrised layer (Powerprop) is re-initialised as its stock twin would be and its new
    weight stored through the parametrisation's inverse.
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    for module in model.modules():
        if not hasattr(module, "reset_parameters") or isinstance(module, parametrize.ParametrizationList):
            continue
        if not parametrize.is_parametrized(module):
            module.reset_parameters()
            continue
        twin = copy.deepcopy(module)
        unparametrize(twin)
        twin.reset_parameters()
        for attribute, value in twin.named_parameters(recurse=False):
            if parametrize.is_parametrized(module, attribute):
                setattr(module, attribute, value.detach())  # stored through right_inverse
            else:
                getattr(module, attribute).copy_(value)
    apply_masks(model)


# ---------------------------------------------------------------------- gradients at the weights
@contextmanager
def weights_as_leaves(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Let ``model`` compute with a detached leaf copy of each named weight (its value through
    any parametrisation), and yield the leaves.

    Their gradient is ``dL/dw`` at the weight the layer computes with, at every entry, pruned ones
    too (the signal by which RigL grows connections); reparametrisations are left out of it
    (what a gradient criterion such as meta-gradient pruning's eq. 6 differentiates), and autograd
    never writes the ``.grad`` an optimizer accumulates into.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    leaves = {name: weight(model, name).detach().clone().requires_grad_() for name in names}
    with _reparametrize_module(model, leaves):
        yield leaves


def task_gradients(model: nn.Module, names: Sequence[str], batch: object) -> Iterator[dict[str, Tensor]]:
    """``dL_i/dw`` of each task ``i`` of ``batch`` at the weights ``names`` compute with: the
    support loss at the meta-parameters (the learner's ``task_losses``, the first-order task
    gradient every learner gives), dense (pruned entries too), one task at a time. What SNIP,
    RigL and meta-gradient pruning score with, each reducing the tasks its own way."""
    with torch.enable_grad(), weights_as_leaves(model, names) as leaves:
        for loss in model.task_losses(batch, adapted=False):
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            yield {name: torch.zeros_like(leaves[name]) if g is None else g for name, g in zip(names, grads)}


def summed_task_gradients(
    model: nn.Module, names: Sequence[str], batch: object, squared: bool = False
) -> tuple[dict[str, Tensor], int]:
    """:func:`task_gradients` (or their squares) summed over the batch's tasks, and the task count."""
    total: dict[str, Tensor] = {}
    tasks = 0
    for grads in task_gradients(model, names, batch):
        for name, grad in grads.items():
            value = grad**2 if squared else grad
            total[name] = value if name not in total else total[name] + value
        tasks += 1
    return total, tasks


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
    """Sparsity counted on the weights the layers compute with, per layer and overall."""

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
        width = max(24, *(len(layer.name) + 2 for layer in self.layers))
        rows = [f"{'layer':<{width}}{'weights':>10}{'pruned':>10}{'sparsity':>10}"]
        for layer in (*self.layers, LayerSparsity("all", self.total, self.zeros)):
            rows.append(f"{layer.name:<{width}}{layer.total:>10}{layer.zeros:>10}{layer.sparsity:>10.2%}")
        return "\n".join(rows)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    layers = []
    for name in prunable(model):  # rows named by layer: every prunable weight is its layer's weight
        w = weight(model, name)
        layers.append(LayerSparsity(name.removesuffix(".weight"), w.numel(), int((w == 0).sum())))
    return SparsityReport(tuple(layers))


def save_masks(path: Path, masks: Mapping[str, Tensor], metadata: Optional[dict] = None) -> None:
    """Masks as a safetensors file (bool tensors; no pickle), metadata as JSON in its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: mask.detach().to(torch.bool).contiguous() for name, mask in masks.items()}
    save_file(tensors, str(path), metadata={"lthmaml": json.dumps(metadata or {})})
    give_default_mode(path)  # safetensors writes through a 0600 temporary file


def read_masks(path: Path, dtype: torch.dtype = torch.float32) -> Masks:
    return {name: mask.to(dtype) for name, mask in load_file(str(path)).items()}
