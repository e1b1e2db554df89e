"""Channel groups: the conv output channels that can only be removed together, found by
torch-pruning's dependency graph (DepGraph, Fang et al., CVPR 2023).

Removing output channel ``c`` of a conv removes its feature map ``c``. Where the maps of several
layers meet (a residual sum, the projection on a skip path, an identity shortcut carrying an
earlier map on), channel ``c`` of all of them is one channel of the net, read by every layer after
the meeting point: it can only go from all of them at once. In a ResNet-12 stage the third conv and
the skip path's 1x1 conv, their BatchNorms and the next stage's first conv and projection inputs
are one group; in a chain (Conv4) each conv is its own group. torch-pruning traces one forward pass
of a net of stock layers and finds these couplings for any graph; this module turns them into
names (by parameter, as the masks beside the model are kept), so that pruning a channel masks
every producer's filter and every BatchNorm channel of it (:mod:`lthmaml.sparsity`) and shrinking
cuts it from every coupled layer (:func:`lthmaml.nets.shrink.shrink`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch_pruning as tp
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from lthmaml.errors import ConfigError
from lthmaml.masks import folded, is_named

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layers whose output channels (filters) are pruned."""

SIDES = (8, 16, 28, 32, 64, 84, 96, 224)
"""The usual image sides, tried in turn on a net that does not say its own (``image_size``)."""


@dataclass(frozen=True)
class ChannelGroup:
    """One group of coupled output channels, named after its first conv (in module order).

    ``convs``: the layers whose output channels the group's channels are (their filter ``c`` is
    channel ``c``); ``batchnorms``: those normalising their maps; ``bare``: the convs whose map
    reaches the group's meeting point without a BatchNorm; ``parameters``: what removing a channel
    zeroes at its index along the first dimension (every conv's filters and bias, every
    BatchNorm's scale and shift), in module order.
    """

    name: str
    width: int
    convs: tuple[str, ...]
    batchnorms: tuple[str, ...]
    bare: tuple[str, ...]
    parameters: tuple[str, ...]

    def prefixed(self, prefix: str) -> ChannelGroup:
        def names(values: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(prefix + value for value in values)

        return replace(
            self,
            name=prefix + self.name,
            convs=names(self.convs),
            batchnorms=names(self.batchnorms),
            bare=names(self.bare),
            parameters=names(self.parameters),
        )


def traced_net(model: nn.Module) -> tuple[str, nn.Module]:
    """The net whose forward pass is traced, and its prefix in ``model``'s names: a learner's
    ``net`` (``"net."``), else ``model`` itself."""
    net = getattr(model, "net", None)
    if isinstance(model, LightningModule) and isinstance(net, nn.Module):
        return "net.", net
    return "", model


def example_input(net: nn.Module) -> Tensor:
    """Two zero inputs of a shape ``net`` takes, for a trace: ``in_channels`` x ``image_size`` a
    side where the net says (lthmaml's nets do), else its first conv's input channels at the
    smallest of the usual image sides (:data:`SIDES`) its forward pass takes (tried in evaluation
    mode, which may initialise lazy layers: try on a copy)."""
    first = next(module for module in net.modules() if isinstance(module, CONVS))
    channels = getattr(net, "in_channels", first.in_channels)

    def zeros(side: int) -> Tensor:
        shape = (2, channels, *[side] * len(first.kernel_size))
        return torch.zeros(shape, dtype=first.weight.dtype, device=first.weight.device)

    if getattr(net, "image_size", None) is not None:
        return zeros(net.image_size)
    training = net.training
    try:
        with torch.no_grad():
            for side in SIDES:
                try:
                    net.eval()(zeros(side))
                except (RuntimeError, ValueError):
                    continue
                return zeros(side)
    finally:
        net.train(training)
    raise ConfigError(
        f"channel groups trace one forward pass of {type(net).__name__}, which takes no "
        f"[2, {channels}, side, side] input for side in {SIDES}: give the net `in_channels` and "
        "`image_size` attributes saying what it takes"
    )


def dependency_graph(net: nn.Module) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``net`` (traced in evaluation mode, in which it leaves
    the net: trace a copy)."""
    x = example_input(net)
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(net, example_inputs=x, verbose=False)
    except (RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"channel groups trace one forward pass of {type(net).__name__} on a {list(x.shape)} input, "
            f"which failed ({reason}): give the net `in_channels` and `image_size` attributes saying "
            "what it takes"
        ) from None


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list[ChannelGroup]]] = weakref.WeakKeyDictionary()


def channel_groups(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, ChannelGroup]:
    """The channel groups of ``model`` (a net, or a learner holding one as ``net``) by name, in
    module order, named as in ``model``; without the groups of a conv ``exclude`` names (by layer
    or weight name). Traced once per net and shape."""
    prefix, net = traced_net(model)
    shapes = tuple((name, None if is_lazy(p) else tuple(p.shape)) for name, p in net.named_parameters())
    cached = _CACHE.get(net)
    if cached is None or cached[0] != shapes:
        cached = (shapes, _groups(net))
        _CACHE[net] = cached
    groups = [group.prefixed(prefix) for group in cached[1]]
    return {
        group.name: group
        for group in groups
        if not any(is_named(key, f"{conv}.weight") for key in exclude for conv in group.convs)
    }


def group_of(model: nn.Module, conv_name: str) -> ChannelGroup:
    """The channel group whose channels are ``conv_name``'s output channels."""
    groups = channel_groups(model)
    found = next((group for group in groups.values() if conv_name in group.convs), None)
    if found is None:
        convs = sorted(conv for group in groups.values() for conv in group.convs)
        raise ConfigError(f"'{conv_name}' is not a conv layer; choose from {convs}")
    return found


def _groups(net: nn.Module) -> list[ChannelGroup]:
    if not any(isinstance(module, CONVS) for module in net.modules()):
        return []
    plain = folded(net)  # stock layers, no mask set; the trace leaves it in evaluation mode
    graph = dependency_graph(plain)
    names = {module: name for name, module in plain.named_modules()}
    order = {name: index for index, name in enumerate(names.values())}
    groups = []
    for group in graph.get_all_groups(root_module_types=CONVS):
        convs, batchnorms, bare = [], [], []
        for item in group:
            module = item.dep.target.module
            name = names.get(module)
            if name is None or not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue  # an operation without parameters, or a layer reading the channels
            if list(item.idxs) != list(item.root_idxs):
                raise ConfigError(
                    f"{name} carries the channels of {names[group[0].dep.target.module]} at other positions "
                    "(a concatenation): channel groups need them one to one; exclude those convs"
                )
            if isinstance(module, _BatchNorm):
                if not module.affine:
                    raise ConfigError(
                        f"{name} has no scale and shift (affine=False) to zero a channel with; "
                        "exclude the convs it normalises"
                    )
                batchnorms.append(name)
            elif isinstance(module, (*CONVS, nn.Linear)):
                convs.append(name)
                outputs = graph.module2node[module].outputs
                if not outputs or not all(isinstance(o.module, _BatchNorm) for o in outputs):
                    bare.append(name)
        convs.sort(key=order.get)
        batchnorms.sort(key=order.get)
        parameters = [
            f"{layer}.{attribute}"
            for layer in sorted(convs + batchnorms, key=order.get)
            for attribute in ("weight", "bias")
            if getattr(plain.get_submodule(layer), attribute) is not None
        ]
        groups.append(
            ChannelGroup(
                name=convs[0],
                width=len(group[0].idxs),
                convs=tuple(convs),
                batchnorms=tuple(batchnorms),
                bare=tuple(sorted(bare, key=order.get)),
                parameters=tuple(parameters),
            )
        )
    return sorted(groups, key=lambda group: order[group.name])
