"""The networks that ship: stock layers only, so anything that takes a user's net takes these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lthmaml.errors import ConfigError


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv, BatchNorm on the batch's own statistics (as MAML does), ReLU, 2x2 max-pool."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """The four-block convolutional net of Finn et al. (2017) for N-way image classification.

    Args:
        out_features: number of classes per task (the N in N-way); None: no head, the net is an
            embedding of ``embedding_features`` (the flattened last block) for metric learners
            (ProtoNet, MatchingNet), which compare embeddings instead of predicting classes.
        in_channels: image channels (1 for Omniglot).
        hidden_channels: filters per conv block (64 in the MAML paper), or one width per block
            (what ``lthmaml.nets.shrink.shrink`` builds after filter pruning).
        image_size: side of the square input; fixes the head's input width.
        blocks: number of conv blocks.
    """

    def __init__(
        self,
        out_features: Optional[int] = 5,
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
        if out_features is not None and (isinstance(out_features, bool) or out_features < 1):
            raise ConfigError(
                f"model.init_args.net.init_args.out_features must be >= 1 class, or null for an embedding; "
                f"got {out_features!r}"
            )
        self.embedding_features = widths[-1] * side * side
        self.head = None if out_features is None else nn.Linear(self.embedding_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x).flatten(1)
        return features if self.head is None else self.head(features)


class MLP(nn.Module):
    """A ReLU multilayer perceptron; the default 1-40-40-1 is the MAML sinusoid regressor."""

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        self.out_features = out_features
        self.architecture = {"in_features": in_features, "hidden": list(hidden), "out_features": out_features}
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNPNet(nn.Module):
    """The encoder and decoder of a Conditional Neural Process (Garnelo et al. 2018), as MLPs under
    one module, so the pruning callbacks find both.

    The encoder maps each context pair ``(x, y)`` to a representation; their mean over the context
    is the task's representation ``r``. The decoder maps ``(r, x)`` to a predictive mean and a
    standard deviation ``min_std + (1 - min_std) * softplus(.)`` for each target ``x``: bounded
    below so the likelihood cannot grow without limit on a few points (the paper's code, 0.1).

    Args:
        x_features, y_features: input and output widths (1 and 1 for the sinusoid).
        representation: width of ``r`` (128 in the paper).
        encoder_hidden, decoder_hidden: hidden widths (the paper's 1-D regression: three encoder
            layers and five decoder layers of 128, counting the output layers).
        min_std: the lower bound of the predicted standard deviation.
    """

    def __init__(
        self,
        x_features: int = 1,
        y_features: int = 1,
        representation: int = 128,
        encoder_hidden: Sequence[int] = (128, 128),
        decoder_hidden: Sequence[int] = (128, 128, 128, 128),
        min_std: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= min_std < 1.0:
            raise ConfigError(f"model.init_args.net.init_args.min_std must be in [0, 1), got {min_std}")
        self.x_features, self.y_features, self.min_std = x_features, y_features, min_std
        self.architecture = {
            "x_features": x_features,
            "y_features": y_features,
            "representation": representation,
            "encoder_hidden": list(encoder_hidden),
            "decoder_hidden": list(decoder_hidden),
            "min_std": min_std,
        }
        self.encoder = MLP(x_features + y_features, encoder_hidden, representation)
        self.decoder = MLP(representation + x_features, decoder_hidden, 2 * y_features)

    def encode(self, context_x: Tensor, context_y: Tensor) -> Tensor:
        """``[..., representation]``: the mean over the context points (dimension -2) of the encoded pairs."""
        return self.encoder(torch.cat([context_x, context_y], -1)).mean(-2)

    def decode(self, representation: Tensor, target_x: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive mean and standard deviation ``[..., targets, y_features]`` of each target ``x``."""
        r = representation.unsqueeze(-2).expand(*target_x.shape[:-1], representation.shape[-1])
        mean, raw_std = self.decoder(torch.cat([r, target_x], -1)).chunk(2, dim=-1)
        return mean, self.min_std + (1 - self.min_std) * F.softplus(raw_std)

    def forward(self, context_x: Tensor, context_y: Tensor, target_x: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(self.encode(context_x, context_y), target_x)
