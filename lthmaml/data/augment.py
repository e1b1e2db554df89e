"""Random affine distortions of drawn images: Koch et al. (2015)'s augmentation for one-shot
character recognition, drawn from the task's own random stream so a task stays fixed by its seed.

Each image gets its own rotation, shear, scale and translation, applied in one batched
``affine_grid``/``grid_sample`` (bilinear, edge pixels repeated) to all images of a task, so the
cost is one small kernel per task, not a loop over images. The ranges and the matrices are
:mod:`lthmaml.data.affine`'s, whose numpy :func:`~lthmaml.data.affine.warp` gives the same images
where torch is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lthmaml.data.affine import AffineRanges, describe

__all__ = ["Affine", "describe"]


@dataclass(frozen=True)
class Affine(AffineRanges):
    """The ranges (:class:`~lthmaml.data.affine.AffineRanges`), applied to torch batches."""

    def __call__(self, images: Tensor, rng: np.random.Generator) -> Tensor:
        """``images`` ``[n, C, H, W]`` (float, or uint8 returned as uint8), each distorted at random."""
        if len(images) == 0:
            return images
        pixels = images.float()
        matrices = torch.from_numpy(self.matrices(len(images), rng)).to(pixels.device)
        grid = F.affine_grid(matrices, list(pixels.shape), align_corners=False)
        out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if images.dtype == torch.uint8:
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return out
