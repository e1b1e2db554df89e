"""Multiply-adds of a Conv4's forward pass on its alive channels: what filter pruning saves.

Counted, for one example: each conv's ``k_h k_w C_in C_out H_out W_out`` and the head's
``in_features x out_features`` multiply-adds. Left out: biases, BatchNorm, ReLU and pooling (a few
operations a channel and position, against ``k_h k_w C_in`` for a conv's output). Channels are the
alive ones (a filter with any non-zero weight: pruned weights are stored as zero), so a
filter-pruned net and its :func:`~lthmaml.nets.shrink.shrink` copy count the same; unstructured
zeros inside a kept filter count, since dense kernels compute them.

Per filter, two costs of a pruning criterion's regularisation (Molchanov et al. 2017, section 2.4,
which names both FLOPs and memory): :func:`filter_flops`, the multiply-adds one alive filter adds,
and :func:`filter_activations`, the activations its feature map adds; :func:`filter_cost` picks one
by name (:data:`COSTS`). The multiply-adds are counted on a Conv4; the activations are measured on
any net, per channel group (the channels a residual sum couples go together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from lthmaml.channels import channel_groups, example_input, traced_net
from lthmaml.errors import ConfigError
from lthmaml.masks import folded
from lthmaml.nets.models import Conv4


@dataclass(frozen=True)
class ConvShape:
    """A conv of the chain: its qualified name, kernel area, output positions and alive widths."""

    name: str
    kernel: int
    positions: int
    alive_in: int
    alive_out: int

    @property
    def flops(self) -> int:
        return self.kernel * self.alive_in * self.alive_out * self.positions


def find_conv4(model: nn.Module) -> tuple[str, Conv4]:
    """The qualified name (``""``: the model itself) and the Conv4 inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Conv4):
            return name, module
    raise ConfigError(
        f"FLOPs are counted on a lthmaml.nets.models.Conv4, and {type(model).__name__} holds none: "
        "a cost-regularised criterion (flops_weight > 0) takes a Conv4; other nets, flops_weight 0"
    )


def _side(side: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (side + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_shapes(model: nn.Module) -> list[ConvShape]:
    """The convs of the Conv4 in ``model`` in forward order, named as in ``model``."""
    prefix, net = find_conv4(model)
    dot = f"{prefix}." if prefix else ""
    shapes, height, width = [], net.image_size, net.image_size
    alive_in = net.in_channels
    for index, block in enumerate(net.features):
        conv: nn.Conv2d = block[0]
        height, width = (
            _side(side, k, s, p, d)
            for side, k, s, p, d in zip(
                (height, width), conv.kernel_size, conv.stride, conv.padding, conv.dilation
            )
        )
        alive_out = int(conv.weight.detach().flatten(1).any(dim=1).sum())
        kernel = conv.kernel_size[0] * conv.kernel_size[1]
        shapes.append(ConvShape(f"{dot}features.{index}.0", kernel, height * width, alive_in, alive_out))
        for pool in (m for m in block if isinstance(m, nn.MaxPool2d)):
            height, width = (
                _side(side, pool.kernel_size, pool.stride, pool.padding) for side in (height, width)
            )
        alive_in = alive_out
    return shapes


def head_positions(net: Conv4) -> int:
    """Inputs of the head per channel of the last block (its flattened map's positions)."""
    return net.embedding_features // net.features[-1][0].out_channels


def layer_flops(model: nn.Module) -> dict[str, int]:
    """Multiply-adds of one example's forward pass by layer (the convs, then the head if any)."""
    prefix, net = find_conv4(model)
    shapes = conv_shapes(model)
    flops = {shape.name: shape.flops for shape in shapes}
    if net.head is not None:
        flops[f"{prefix}.head" if prefix else "head"] = (
            shapes[-1].alive_out * head_positions(net) * net.head.out_features
        )
    return flops


def forward_flops(model: nn.Module) -> int:
    """Multiply-adds of one example's forward pass through the Conv4 in ``model``."""
    return sum(layer_flops(model).values())


def filter_flops(model: nn.Module) -> dict[str, int]:
    """Per conv: the multiply-adds one more alive filter costs (what removing one saves).

    Its own output map, ``k_h k_w C_in^alive H_out W_out``, plus the input channel it is to the
    next layer: ``k_h k_w C_out^alive H_out W_out`` of the next conv, or the head's
    ``positions x out_features`` after the last block (nothing for a headless Conv4).
    """
    _, net = find_conv4(model)
    shapes = conv_shapes(model)
    feeds = [nxt.kernel * nxt.alive_out * nxt.positions for nxt in shapes[1:]]
    feeds.append(0 if net.head is None else head_positions(net) * net.head.out_features)
    return {
        shape.name: shape.kernel * shape.alive_in * shape.positions + feed
        for shape, feed in zip(shapes, feeds)
    }


def filter_activations(model: nn.Module) -> dict[str, int]:
    """Per channel group (:func:`lthmaml.channels.channel_groups`, named by its first conv): the
    activations one more alive filter adds to one example's forward pass.

    Its maps' output positions, ``H_out W_out`` of each conv of the group (the conv alone in a
    chain; each conv whose map a residual sum joins), whatever the widths: kept three times for the
    backward pass (conv, BatchNorm and activation outputs), each of them read and written by
    BatchNorm, the activation and pooling and their backward, the per-position work that is a CPU
    step's bulk at full resolution (the pooled map, a quarter of it, is left out). Measured in a
    forward pass of the net, so any graph is counted.
    """
    groups = channel_groups(model)
    prefix, net = traced_net(model)
    plain = folded(net).eval()  # a copy: a forward pass may initialise lazy layers
    convs = {name: plain.get_submodule(name[len(prefix) :]) for g in groups.values() for name in g.convs}
    positions = _measured_positions(convs, lambda: plain(example_input(plain)))
    return {name: sum(positions[conv] for conv in group.convs) for name, group in groups.items()}


Cost = Literal["flops", "activations"]
COSTS: dict[str, Callable[[nn.Module], dict[str, int]]] = {
    "flops": filter_flops,
    "activations": filter_activations,
}


def filter_cost(model: nn.Module, cost: Cost) -> dict[str, int]:
    """Per conv: what one more alive filter costs, in ``cost`` (a key of :data:`COSTS`)."""
    return COSTS[cost](model)


def weight_uses(model: nn.Module, run: Optional[Callable[[], object]] = None) -> dict[str, int]:
    """How often one example's forward pass applies each entry of each conv and linear weight (by
    parameter name): a conv's output positions, 1 for a linear layer. A kept entry costs that many
    multiply-adds, so ``sum(mask.sum() * uses)`` is a sparse net's forward cost as sparse-training
    papers count it (Evci et al. 2020, appendix H: zeros inside a filter are skipped, unlike
    :func:`layer_flops`).

    A conv's positions are read from the Conv4 they belong to, or, for any other net, measured:
    ``run`` makes a forward pass (the learner's loss on a batch) while hooks record each conv's
    output size.
    """
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    }
    convs = {name: layer for name, layer in layers.items() if not isinstance(layer, nn.Linear)}
    if not convs:
        positions: dict[str, int] = {}
    elif run is not None:
        positions = _measured_positions(convs, run)
    else:
        positions = {shape.name: shape.positions for shape in conv_shapes(model)}
    uses = {}
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear):
            uses[f"{name}.weight"] = 1
        elif name in positions:
            uses[f"{name}.weight"] = positions[name]
        else:
            raise ConfigError(f"{name}: a conv that no forward pass reached; its FLOPs cannot be counted")
    return uses


@torch.no_grad()
def _measured_positions(convs: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, int]:
    positions: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            positions[name] = output.shape[2:].numel()

        return hook

    handles = [conv.register_forward_hook(record(name)) for name, conv in convs.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return positions
