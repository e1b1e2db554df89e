"""Structured shrinking of any net: a physically smaller dense copy without its removed channels."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from typing import Optional

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lthmaml.channels import ChannelGroup, channel_groups, dependency_graph, example_input
from lthmaml.errors import ConfigError
from lthmaml.masks import folded, stored
from lthmaml.nets.models import Conv4


def removed_channels(batchnorm: nn.BatchNorm2d) -> Tensor:
    """Boolean ``[channels]``: those whose BatchNorm scale and shift are both exactly zero, so the
    layer emits exactly 0 there whatever comes in (how filter pruning removes a channel)."""
    return (batchnorm.weight.detach() == 0) & (batchnorm.bias.detach() == 0)


def shrink(
    model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None
) -> tuple[nn.Module, dict[str, Tensor]]:
    """A physically smaller dense copy of the net ``model`` without its removed channels, and its
    ``masks`` (by parameter name) cut to match.

    Channels go by channel group (:func:`lthmaml.channels.channel_groups`: a conv's output
    channels with those of every conv a residual sum joins to them). A group's channel is removed
    when it emits exactly 0 whatever comes in: every BatchNorm of the group has scale and shift 0
    there (:func:`removed_channels`; a conv no BatchNorm follows needs its filter and bias zero
    too). 0 stays 0 through ReLU, leaky ReLU, pooling, sums and averages, so cutting the channel
    from every layer the dependency graph couples to it (the convs' filters, the BatchNorms, the
    input columns of every conv and linear layer reading it, flattened positions included) leaves
    every output unchanged; a headless net (an embedding) loses only output coordinates that are
    always 0, which change no distance or cosine similarity between embeddings. (A channel whose
    filters are all pruned but whose BatchNorm shift is not still emits its activation of beta
    and is kept.)

    torch-pruning cuts the layers in place on a copy, which keeps the layer classes; unstructured
    sparsity inside kept channels survives in the weights and the masks, so the copy can be
    adapted or pruned further, and an elementwise parametrisation (Powerprop's) is registered on
    the copy's layers too, with the kept part of the stored tensors. A Conv4's ``architecture``
    records its per-block ``hidden_channels``, which rebuild its shape; another net's narrower
    layers are no constructor arguments, so its copy carries no ``architecture``.
    ``embedding_features`` follows the cut.
    """
    if isinstance(model, LightningModule):
        raise ConfigError(f"shrink takes a net, got the learner {type(model).__name__}: pass its .net")
    masks = dict(masks or {})
    groups = channel_groups(model)
    if not groups:
        raise ConfigError(f"shrink removes conv channels, and {type(model).__name__} has no conv layer")
    removed = {name: _removed(model, group) for name, group in groups.items()}
    empty = [name for name, channels in removed.items() if bool(channels.all())]
    if empty:
        raise ConfigError(
            f"shrink: channel group {empty[0]} has no channel left; the net computes a constant"
        )
    shrunk = folded(model)  # stock layers computing what the model does, no mask set
    graph = dependency_graph(shrunk)
    values = {name: tensor.detach() for _, _, name, tensor in _tensors(shrunk)}
    # Each entry holds its own position while torch-pruning cuts, so whatever remains says which
    # positions of every tensor of that shape (weights, stored tensors, masks) the copy keeps.
    for registry, attribute, _, tensor in _tensors(shrunk):
        registry[attribute] = _like(
            tensor, torch.arange(tensor.numel(), dtype=torch.float64).view(tensor.shape)
        )
    for name, dead in removed.items():
        channels = dead.nonzero().flatten().tolist()
        if channels:
            conv = shrunk.get_submodule(name)
            graph.get_pruning_group(
                conv, graph.get_pruner_of_module(conv).prune_out_channels, channels
            ).prune()
    kept: dict[str, tuple[Tensor, torch.Size]] = {}
    for registry, attribute, name, tensor in _tensors(shrunk):
        kept[name] = (tensor.detach().to(torch.long).flatten(), tensor.shape)
        registry[attribute] = _like(tensor, values[name].flatten()[kept[name][0]].view(tensor.shape))

    def cut(name: str, full: Tensor) -> Tensor:
        positions, shape = kept[name]
        return full.flatten()[positions.to(full.device)].view(shape)

    unknown = sorted(set(masks) - set(kept))
    if unknown:
        raise ConfigError(f"shrink: masks {unknown[:3]} name no parameter of {type(model).__name__}")
    _copy_parametrizations(model, shrunk, cut)
    shrunk.train(model.training)
    _describe(shrunk)
    cut_masks = {name: cut(name, mask) for name, mask in masks.items()}
    return shrunk, {name: mask for name, mask in cut_masks.items() if not bool(mask.all())}


def _removed(model: nn.Module, group: ChannelGroup) -> Tensor:
    """Boolean ``[width]``: the group's channels that emit exactly 0 whatever comes in."""
    dead = torch.ones(group.width, dtype=torch.bool, device=next(model.parameters()).device)
    for name in group.batchnorms:
        dead &= removed_channels(model.get_submodule(name))
    for name in group.bare:
        layer = model.get_submodule(name)
        dead &= (layer.weight.detach().flatten(1) == 0).all(dim=1)
        if layer.bias is not None:
            dead &= layer.bias.detach() == 0
    return dead


def _tensors(net: nn.Module) -> Iterator[tuple[dict, str, str, Tensor]]:
    """(registry, attribute, qualified name, tensor) of every parameter and floating buffer."""
    for prefix, module in net.named_modules():
        for registry in (module._parameters, module._buffers):
            for attribute, tensor in list(registry.items()):
                if tensor is not None and tensor.is_floating_point():
                    yield registry, attribute, f"{prefix}.{attribute}" if prefix else attribute, tensor


def _like(old: Tensor, value: Tensor) -> Tensor:
    """``value`` on ``old``'s device, a parameter if ``old`` is one (keeping ``requires_grad``)."""
    value = value.to(old.device)
    return nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value


def _describe(net: nn.Module) -> None:
    """Bring the shape records lthmaml's nets carry in line with the cut layers."""
    if isinstance(net, Conv4):
        net.architecture = {**net.architecture, "hidden_channels": [b[0].out_channels for b in net.features]}
    elif hasattr(net, "architecture"):
        del net.architecture
    if hasattr(net, "embedding_features") and hasattr(net, "head"):
        if net.head is not None:
            net.embedding_features = net.head.in_features
        else:
            training = net.training
            with torch.no_grad():
                net.embedding_features = net.eval()(example_input(net)).flatten(1).shape[1]
            net.train(training)


def _copy_parametrizations(model: nn.Module, shrunk: nn.Module, cut: Callable[[str, Tensor], Tensor]) -> None:
    """Register ``model``'s parametrisations (Powerprop's transform) on the same layers of
    ``shrunk``, holding the ``cut`` of the stored tensors, so the copy computes, adapts and trains
    as the original does. One holding tensors of the original's shape (a Top-KAST forward mask)
    cannot be cut: a ConfigError."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attribute, chain in module.parametrizations.items():
            for transform in chain:
                if any(True for _ in transform.parameters()) or any(True for _ in transform.buffers()):
                    raise ConfigError(
                        f"shrink: {name}.{attribute} carries {type(transform).__name__}, whose tensors "
                        "cannot be cut to the kept channels; remove it first (lthmaml.masks.folded)"
                    )
                parametrize.register_parametrization(
                    shrunk.get_submodule(name), attribute, deepcopy(transform), unsafe=True
                )
            qualified = f"{name}.{attribute}" if name else attribute
            with torch.no_grad():
                stored(shrunk, qualified).copy_(cut(qualified, stored(model, qualified).detach()))
