"""Random affine distortions of drawn images: Koch et al. (2015)'s augmentation for one-shot
character recognition, drawn from the task's own random stream so a task stays fixed by its seed.

Each image gets its own rotation, shear, scale and translation, applied in one batched
``affine_grid``/``grid_sample`` (bilinear, edge pixels repeated) to all images of a task, so the
cost is one small kernel per task, not a loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lthmaml.errors import ConfigError


@dataclass(frozen=True)
class Affine:
    """The ranges each distortion is drawn from, uniformly (Koch et al.'s, by default).

    Args:
        rotation: degrees, in ``[-rotation, rotation]``.
        shear: in ``[-shear, shear]``, along each axis.
        scale: ``(low, high)``, along each axis.
        translate: a fraction of the image side, in ``[-translate, translate]`` along each axis
            (Koch et al.: 2 pixels of 105).
    """

    rotation: float = 10.0
    shear: float = 0.3
    scale: tuple[float, float] = (0.8, 1.2)
    translate: float = 2 / 105

    def __post_init__(self) -> None:
        low, high = self.scale
        if self.rotation < 0 or self.shear < 0 or self.translate < 0 or not 0 < low <= high:
            raise ConfigError(
                "data.init_args.augment_affine: rotation, shear and translate must be >= 0 and scale "
                f"(low, high) with 0 < low <= high; got {self}"
            )

    def matrices(self, count: int, rng: np.random.Generator) -> Tensor:
        """``count`` random ``[2, 3]`` matrices in ``affine_grid``'s normalised coordinates."""
        angle = np.deg2rad(rng.uniform(-self.rotation, self.rotation, count))
        shear = rng.uniform(-self.shear, self.shear, (count, 2))
        scale = rng.uniform(*self.scale, (count, 2))
        shift = rng.uniform(-self.translate, self.translate, (count, 2)) * 2  # [-1, 1] spans the side
        cos, sin = np.cos(angle), np.sin(angle)
        rotate = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
        shearing = np.stack(
            [np.stack([np.ones(count), shear[:, 0]], -1), np.stack([shear[:, 1], np.ones(count)], -1)], -2
        )
        linear = rotate @ shearing * scale[:, None, :]
        return torch.from_numpy(np.concatenate([linear, shift[:, :, None]], -1)).float()

    def __call__(self, images: Tensor, rng: np.random.Generator) -> Tensor:
        """``images`` ``[n, C, H, W]`` (float, or uint8 returned as uint8), each distorted at random."""
        if len(images) == 0:
            return images
        pixels = images.float()
        grid = F.affine_grid(self.matrices(len(images), rng), list(pixels.shape), align_corners=False)
        out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if images.dtype == torch.uint8:
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return out


def describe(affine: Affine) -> str:
    low, high = affine.scale
    return (
        f"rotation +-{affine.rotation:g} deg, shear +-{affine.shear:g}, scale {low:g}-{high:g}, "
        f"translation +-{affine.translate * 100:.3g}% of the side"
    )
