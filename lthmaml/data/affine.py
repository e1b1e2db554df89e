"""Koch et al. (2015)'s random affine distortions in numpy: the ranges, the matrices drawn from them,
and the warp, so the torch-free device runtime makes the support copies ``lthmaml-edge`` makes.

The matrices are ``torch.nn.functional.affine_grid``'s (normalised coordinates, ``align_corners``
False) and :func:`warp` samples as its ``grid_sample`` does (bilinear, edge pixels repeated), so
:class:`lthmaml.data.augment.Affine`, the batched torch path meta-training draws from, warps to the
same images within float32 rounding. Imports numpy only: ``lthmaml-device`` runs without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lthmaml.errors import ConfigError


@dataclass(frozen=True)
class AffineRanges:
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

    def matrices(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` random float32 ``[2, 3]`` matrices in ``affine_grid``'s normalised coordinates
        (each output pixel samples the input at the matrix times its own position)."""
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
        return np.concatenate([linear, shift[:, :, None]], -1).astype(np.float32)


def describe(affine: AffineRanges) -> str:
    low, high = affine.scale
    return (
        f"rotation +-{affine.rotation:g} deg, shear +-{affine.shear:g}, scale {low:g}-{high:g}, "
        f"translation +-{affine.translate * 100:.3g}% of the side"
    )


def _pixel_centres(size: int) -> np.ndarray:
    """The pixel centres along a side in normalised coordinates, float32 ``[size]``, computed as
    ``affine_grid`` computes them (``linspace(-1, 1) * (size - 1) / size``)."""
    side = np.linspace(-1, 1, size).astype(np.float32)
    return side * np.float32(size - 1) / np.float32(size)


def _pixel_positions(grid: np.ndarray, size: int) -> np.ndarray:
    """Normalised coordinates to pixel positions (``align_corners`` False: -1 and 1 are the outer
    edges of the first and last pixel), clipped to the image so the edge pixels repeat."""
    return np.clip((grid + 1) * np.float32(size / 2) - np.float32(0.5), 0, size - 1)


def warp(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """``images`` ``[n, C, H, W]`` (float, or uint8 returned as uint8), image ``i`` warped by
    ``matrices[i]`` (``[n, 2, 3]``) as ``affine_grid`` + ``grid_sample`` (bilinear, border padding,
    ``align_corners`` False) warp it, in float32 and in torch's order of operations, so the two
    differ by float32 rounding only."""
    if len(images) == 0:
        return images
    n, channels, height, width = images.shape
    pixels = images.astype(np.float32, copy=False).reshape(n, channels, height * width)
    theta = matrices.astype(np.float32, copy=False)[:, :, :, None, None]  # [n, 2, 3, 1, 1]
    across, down = _pixel_centres(width)[None, :], _pixel_centres(height)[:, None]
    grid = theta[:, :, 0] * across + theta[:, :, 1] * down + theta[:, :, 2]  # [n, 2, H, W]: (x, y)
    x, y = _pixel_positions(grid[:, 0], width), _pixel_positions(grid[:, 1], height)
    left, top = np.floor(x), np.floor(y)
    dx, dy = (x - left)[:, None], (y - top)[:, None]  # towards the right and the lower neighbours
    left, top = left.astype(np.intp), top.astype(np.intp)
    right, bottom = np.minimum(left + 1, width - 1), np.minimum(top + 1, height - 1)

    def at(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        index = np.broadcast_to((rows * width + cols).reshape(n, 1, height * width), pixels.shape)
        return np.take_along_axis(pixels, index, 2).reshape(n, channels, height, width)

    out = (
        at(top, left) * ((1 - dy) * (1 - dx))
        + at(top, right) * ((1 - dy) * dx)
        + at(bottom, left) * (dy * (1 - dx))
        + at(bottom, right) * (dy * dx)
    )
    if images.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def support_copies(x: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """The support images ``x`` (``[n, C, H, W]``) followed by ``copies`` distorted copies of each,
    copy by copy, drawn with Koch et al.'s ranges from ``np.random.default_rng(seed)``: what
    ``lthmaml-edge`` (``data.support_augmentation``, ``data.val_seed``) and ``lthmaml-device``
    (``--support_augmentation``, ``--seed``) adapt on, the same images in both."""
    rng = np.random.default_rng(seed)
    ranges = AffineRanges()
    return np.concatenate([x, *(warp(x, ranges.matrices(len(x), rng)) for _ in range(copies))])
