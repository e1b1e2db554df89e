"""The meta-learned networks, built only from mask-aware layers so every weight is prunable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from torch import Tensor, nn

from lthmaml.errors import ConfigError
from lthmaml.nets.layers import MaskedBatchNorm2d, MaskedConv2d, MaskedLinear


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, BatchNorm on the batch's own statistics (as MAML does), ReLU, 2x2 max-pool."""
    return nn.Sequential(
        MaskedConv2d(in_channels, out_channels, 3, padding=1),
        MaskedBatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """The four-block convolutional net of Finn et al. (2017) for N-way image classification.

    Args:
        out_features: number of classes per task (the N in N-way).
        in_channels: image channels (1 for Omniglot).
        hidden_channels: filters per conv block (64 in the MAML paper), or one width per block
            (what ``lthmaml.nets.shrink.shrink`` builds after filter pruning).
        image_size: side of the square input; fixes the head's input width.
        blocks: number of conv blocks.
    """

    def __init__(
        self,
        out_features: int = 5,
        in_channels: int = 1,
        hidden_channels: Union[int, Sequence[int]] = 64,
        image_size: int = 28,
        blocks: int = 4,
    ) -> None:
        super().__init__()
        widths = [hidden_channels] * blocks if isinstance(hidden_channels, int) else list(hidden_channels)
        if len(widths) != blocks:
            raise ConfigError(
                f"model.init_args.net.init_args.hidden_channels has {len(widths)} widths for {blocks} "
                "blocks: give one width, or one per block"
            )
        self.out_features = out_features
        self.in_channels = in_channels
        self.image_size = image_size
        self.architecture = {
            "out_features": out_features,
            "in_channels": in_channels,
            "hidden_channels": widths,
            "image_size": image_size,
            "blocks": blocks,
        }
        channels = [in_channels, *widths]
        self.features = nn.Sequential(*(conv_block(a, b) for a, b in zip(channels, channels[1:])))
        side = image_size
        for _ in range(blocks):
            side //= 2
        if side < 1:
            raise ConfigError(
                f"model.init_args.net.init_args.image_size={image_size} is too small for {blocks} pooling "
                f"blocks: it must be >= {2**blocks} (and equal to data.init_args.image_size)"
            )
        self.head = MaskedLinear(widths[-1] * side * side, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """A ReLU multilayer perceptron; the default 1-40-40-1 is the MAML sinusoid regressor."""

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        self.out_features = out_features
        self.architecture = {"in_features": in_features, "hidden": list(hidden), "out_features": out_features}
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [MaskedLinear(a, b), nn.ReLU()]
        layers.append(MaskedLinear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
