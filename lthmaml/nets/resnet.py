"""The residual backbones few-shot and lottery-ticket work use, of stock layers only.

``ResNet12`` is the few-shot one (TADAM, MetaOptNet): four residual stages of three 3x3
conv-BatchNorm-leaky-ReLU layers with a 1x1 projection on the skip path, each ending in a 2x2
max-pool, then a global average; 64-160-320-640 channels, or narrower for a CPU. ``ResNet18`` is
He et al.'s 18-layer net with the CIFAR stem (a 3x3 conv, no max-pool), the lottery-ticket
papers' residual network for small images. Both are plain ``nn.Module`` trees, so every learner,
strategy and the structured shrink (through the dependency graph) treat them like a user's net.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from lthmaml.errors import ConfigError


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018): drop ``block x block`` squares of a feature map while
    training, so a conv net cannot lean on neighbouring activations; rescaled to keep the mean."""

    def __init__(self, drop: float, block: int = 5) -> None:
        super().__init__()
        self.drop, self.block = drop, block

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop == 0:
            return x
        side = x.shape[-1]
        block = min(self.block, side)
        gamma = self.drop / block**2 * side**2 / max(1, (side - block + 1) ** 2)
        seeds = (torch.rand_like(x[:, :1]) < gamma).to(x.dtype)
        mask = 1 - nn.functional.max_pool2d(seeds, block, stride=1, padding=block // 2)[..., :side, :side]
        return x * mask * mask.numel() / mask.sum().clamp_min(1)


def _check(name: str, out_features: Optional[int], widths: Sequence[int]) -> None:
    if out_features is not None and (isinstance(out_features, bool) or out_features < 1):
        raise ConfigError(
            f"model.init_args.net.init_args.out_features must be >= 1 class, or null for an embedding; "
            f"got {out_features!r}"
        )
    if not widths or any(isinstance(w, bool) or w < 1 for w in widths):
        raise ConfigError(f"model.init_args.net.init_args.{name} must be positive widths, got {list(widths)}")


class ResidualStage(nn.Module):
    """ResNet-12's stage: three 3x3 convs on the main path, a 1x1 projection on the skip, added,
    then leaky ReLU, max-pool and (optionally) DropBlock."""

    def __init__(self, in_channels: int, out_channels: int, running_stats: bool, drop_block: float) -> None:
        super().__init__()

        def norm() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=running_stats)

        self.conv1, self.bn1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), norm()
        self.conv2, self.bn2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm()
        self.conv3, self.bn3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm()
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), norm())
        self.relu = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop = DropBlock(drop_block) if drop_block else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.drop(self.pool(self.relu(out + self.shortcut(x))))


class ResNet12(nn.Module):
    """ResNet-12 for N-way few-shot classification, or an embedding for metric learners.

    Args:
        out_features: classes per task; None: no head, the net is an embedding of
            ``embedding_features`` (the last stage's channels after the global average).
        in_channels: image channels.
        widths: channels of the four stages (64, 160, 320, 640 in MetaOptNet; (16, 32, 64, 128)
            meta-trains on a CPU).
        image_size: side of the square input (each stage halves it; it must stay >= 1).
        drop_block: DropBlock's drop probability after each stage (0: none).
        running_stats: BatchNorm keeps running statistics for evaluation; False (the default, as
            MAML's Conv4) normalises every batch by its own statistics, which adaptation needs.
    """

    def __init__(
        self,
        out_features: Optional[int] = 5,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        drop_block: float = 0.0,
        running_stats: bool = False,
    ) -> None:
        super().__init__()
        _check("widths", out_features, widths)
        if image_size < 2 ** len(widths):
            raise ConfigError(
                f"model.init_args.net.init_args.image_size={image_size} is too small for {len(widths)} "
                f"pooling stages: it must be >= {2 ** len(widths)}"
            )
        self.out_features, self.in_channels, self.image_size = out_features, in_channels, image_size
        self.architecture = {
            "out_features": out_features,
            "in_channels": in_channels,
            "widths": list(widths),
            "image_size": image_size,
            "drop_block": drop_block,
            "running_stats": running_stats,
        }
        channels = [in_channels, *widths]
        self.stages = nn.Sequential(
            *(ResidualStage(a, b, running_stats, drop_block) for a, b in zip(channels, channels[1:]))
        )
        self.embedding_features = widths[-1]
        self.head = None if out_features is None else nn.Linear(widths[-1], out_features)

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(x).mean((-2, -1))
        return features if self.head is None else self.head(features)


class BasicBlock(nn.Module):
    """ResNet-18's block: two 3x3 conv-BatchNorm layers, the skip projected when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, running_stats: bool) -> None:
        super().__init__()

        def norm() -> nn.BatchNorm2d:
            return nn.BatchNorm2d(out_channels, track_running_stats=running_stats)

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm()
        self.conv2, self.bn2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), norm()
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm())
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool) for small images.

    Args:
        out_features: classes; None: an embedding of the last stage's channels.
        in_channels: image channels.
        width: channels of the first stage (64 in He et al.); the stages have 1, 2, 4, 8 times it.
        image_size: side of the square input (three stride-2 stages: >= 8).
        running_stats: BatchNorm keeps running statistics (True: the supervised setting; False:
            every batch normalised by its own statistics, as MAML's inner loop needs).
    """

    def __init__(
        self,
        out_features: Optional[int] = 10,
        in_channels: int = 3,
        width: int = 64,
        image_size: int = 32,
        running_stats: bool = True,
    ) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        _check("width", out_features, widths)
        if image_size < 8:
            raise ConfigError(f"model.init_args.net.init_args.image_size={image_size} must be >= 8")
        self.out_features, self.in_channels, self.image_size = out_features, in_channels, image_size
        self.architecture = {
            "out_features": out_features,
            "in_channels": in_channels,
            "width": width,
            "image_size": image_size,
            "running_stats": running_stats,
        }
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, track_running_stats=running_stats),
            nn.ReLU(),
        )
        blocks, channels = [], width
        for index, out in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks += [
                BasicBlock(channels, out, stride, running_stats),
                BasicBlock(out, out, 1, running_stats),
            ]
            channels = out
        self.layers = nn.Sequential(*blocks)
        self.embedding_features = widths[-1]
        self.head = None if out_features is None else nn.Linear(widths[-1], out_features)

    def forward(self, x: Tensor) -> Tensor:
        features = self.layers(self.stem(x)).mean((-2, -1))
        return features if self.head is None else self.head(features)
