"""Weight reparametrisations the mask-aware layers compute through (``weight_transform``).

Powerpropagation (Schwarz et al. 2021) stores ``phi`` and computes with ``phi * |phi| ** (alpha - 1)``.
The transform is not part of a ``state_dict``: a checkpoint says which one it was trained with in
its top-level ``weight_transform`` entry (written by the Powerprop callback), so anything that
rebuilds the net from a checkpoint (export, the edge) installs it again without knowing the callback.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lthmaml.errors import ConfigError
from lthmaml.nets.layers import masked_layers

CHECKPOINT_KEY = "weight_transform"
"""Top-level checkpoint entry: ``{"kind": "power", "alpha": 2.0}``."""


class PowerTransform:
    """``w = phi * |phi| ** (alpha - 1)``: a small class, not a lambda, so nets holding it pickle
    and deep-copy.

    ``|phi| ** (alpha - 1)`` is taken at 1 where ``phi == 0`` and then zeroed, so no derivative of
    any order is ``0 * inf``: pruned (zero) parameters get zero, not NaN, gradients, also through
    second-order MAML.
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    def __call__(self, phi: Tensor) -> Tensor:
        if self.alpha == 1.0:
            return phi
        zero = phi == 0
        magnitude = torch.where(zero, torch.ones_like(phi), phi.abs())
        return phi * torch.where(zero, torch.zeros_like(phi), magnitude.pow(self.alpha - 1))

    def inverse(self, weight: Tensor) -> Tensor:
        """The ``phi`` whose transform is ``weight``."""
        if self.alpha == 1.0:
            return weight.clone()
        return weight.sign() * weight.abs().pow(1 / self.alpha)

    def gradient_factor(self, phi: Tensor) -> Tensor:
        """``dw/dphi = alpha * |phi| ** (alpha - 1)`` (0 at ``phi == 0`` for ``alpha > 1``)."""
        return self.alpha * phi.abs().pow(self.alpha - 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerTransform) and other.alpha == self.alpha

    def __hash__(self) -> int:
        return hash(("PowerTransform", self.alpha))

    def __repr__(self) -> str:
        return f"PowerTransform(alpha={self.alpha})"


def install_power(model: nn.Module, alpha: float) -> None:
    """Make ``model``'s mask-aware layers compute with ``phi * |phi| ** (alpha - 1)``.

    The parameters are taken to be ``phi`` already (a model loaded from a Powerprop checkpoint).
    """
    transform = PowerTransform(alpha)
    for layer in masked_layers(model).values():
        layer.weight_transform = transform


def installed_alpha(model: nn.Module) -> Optional[float]:
    """The alpha of the transform on ``model``'s layers, None if they have none."""
    alphas = {
        layer.weight_transform.alpha
        for layer in masked_layers(model).values()
        if isinstance(layer.weight_transform, PowerTransform)
    }
    if len(alphas) > 1:
        raise ConfigError(f"the model's layers carry Powerprop transforms of several alphas {alphas}")
    return alphas.pop() if alphas else None


def checkpoint_alpha(checkpoint: Union[str, Path, Mapping[str, Any]]) -> Optional[float]:
    """The Powerprop alpha a checkpoint (path or loaded dict) was trained with, None if none.

    Checkpoints written before the ``weight_transform`` entry existed carry it only in the
    Powerprop callback's state (key ``Powerprop``), which is read as a fallback.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    entry = checkpoint.get(CHECKPOINT_KEY)
    if isinstance(entry, Mapping) and entry.get("kind") == "power":
        return float(entry["alpha"])
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).split("{")[0] == "Powerprop" and "alpha" in state:
            return float(state["alpha"])
    return None
