"""Mask-aware layers.

``torch.nn.utils.prune`` and ``parametrize`` keep the real weight behind a property, which
``higher``'s functional copy loses.  Here the mask is a plain buffer and the forward pass reads
``self.weight`` directly, so ``higher`` swaps in fast weights and still multiplies by the mask:
a pruned entry is zero in every adapted model and receives a zero meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WeightTransform = Callable[[Tensor], Tensor]
"""Maps the stored parameter to the weight the layer computes with (e.g. Powerpropagation)."""


class MaskedMixin:
    """Adds a ``mask`` buffer (same shape as ``weight``) and an optional weight transform.

    The effective weight is ``transform(weight) * mask``; every forward uses it, so
    reparametrisations and pruning compose and survive ``higher.monkeypatch``.

    ``backward_mask`` (a superset of ``mask``, or None) is TopKAST's backward set: the forward value
    stays ``transform(weight) * mask``, but the gradient also reaches the weights of
    ``backward_mask``, as if they computed. A plain attribute, like ``weight_transform``, so the
    functional copies of the inner loop keep it; the strategy that sets it keeps it in its state.
    """

    weight: Tensor
    mask: Tensor
    weight_transform: Optional[WeightTransform]
    backward_mask: Optional[Tensor]

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=self.weight.dtype))
        self.weight_transform = None
        self.backward_mask = None

    def effective_weight(self) -> Tensor:
        weight = self.weight if self.weight_transform is None else self.weight_transform(self.weight)
        if self.backward_mask is None:
            return weight * self.mask
        explore = weight * (self.backward_mask - self.mask)  # value 0 below, gradient kept
        return weight * self.mask + (explore - explore.detach())


class MaskedLinear(MaskedMixin, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_mask()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self._init_mask()

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("MaskedConv2d supports padding_mode='zeros' only")
        return F.conv2d(
            x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose output channels can be switched off by a ``channel_mask`` buffer.

    Zeroing a conv filter is not enough to remove a channel: the BatchNorm after it would still
    emit its shift ``beta``, and the inner loop would adapt ``beta`` away from zero. Multiplying
    the output by the mask keeps a pruned channel at exactly zero and its parameters' gradients too.

    ``output_hook``, when set, sees the masked output and returns what the layer emits (Taylor
    pruning multiplies a gate of ones there to read activation x gradient). It is a plain
    attribute like ``weight_transform``, so ``higher``'s functional copy keeps it; forward hooks
    registered on the module are not copied and would not fire inside the inner loop.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.register_buffer("channel_mask", torch.ones(num_features))
        self.output_hook: Optional[Callable[[Tensor], Tensor]] = None

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        if self.track_running_stats or not torch.is_grad_enabled():
            out = super().forward(x)  # the fused kernel: running statistics, or no graph to build
        else:
            # Batch statistics written out: the fused kernel's double backward is wrong under
            # torch.func.vmap (second-order MAML over a chunk of tasks); these ops are not.
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, keepdim=True, unbiased=False)
            out = (x - mean) * torch.rsqrt(var + self.eps)
            if self.affine:
                out = out * self.weight.view(shape) + self.bias.view(shape)
        out = out * self.channel_mask.view(shape)
        return out if self.output_hook is None else self.output_hook(out)


def masked_layers(model: nn.Module) -> dict[str, MaskedMixin]:
    """The prunable layers of ``model`` by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedMixin)}
