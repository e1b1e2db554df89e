"""Weight reparametrisations, as ``torch.nn.utils.parametrize`` parametrisations of stock layers.

Powerpropagation (Schwarz et al. 2021) stores ``phi`` and computes with ``phi * |phi| ** (alpha - 1)``.
A parametrisation keeps the layer's class (a subclass of it) and is differentiated through by
``torch.func.functional_call`` and ``higher`` alike, so MAML's inner loop adapts ``phi``. A
checkpoint holds ``phi`` under ``<layer>.parametrizations.weight.original`` and says which
transform it was trained with in its top-level ``weight_transform`` entry (written by the Powerprop
callback), so anything that rebuilds the net from a checkpoint (export, the edge) installs it
again, on the layers the keys name, before loading.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lthmaml.errors import ConfigError

CHECKPOINT_KEY = "weight_transform"
"""Top-level checkpoint entry: ``{"kind": "power", "alpha": 2.0}``."""

ORIGINAL = ".parametrizations.weight.original"
"""The ``state_dict`` suffix under which a parametrised weight's stored tensor lies."""


class PowerTransform(nn.Module):
    """``w = phi * |phi| ** (alpha - 1)``.

    ``|phi| ** (alpha - 1)`` is taken at 1 where ``phi == 0`` and then zeroed, so no derivative of
    any order is ``0 * inf``: pruned (zero) parameters get zero, not NaN, gradients, also through
    second-order MAML. ``right_inverse`` makes registering it keep the function the layer computes
    (``phi = sign(w) |w| ** (1 / alpha)``).
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, phi: Tensor) -> Tensor:
        if self.alpha == 1.0:
            return phi
        zero = phi == 0
        magnitude = torch.where(zero, torch.ones_like(phi), phi.abs())
        return phi * torch.where(zero, torch.zeros_like(phi), magnitude.pow(self.alpha - 1))

    def right_inverse(self, weight: Tensor) -> Tensor:
        """The ``phi`` whose transform is ``weight``."""
        if self.alpha == 1.0:
            return weight.clone()
        return weight.sign() * weight.abs().pow(1 / self.alpha)

    def gradient_factor(self, phi: Tensor) -> Tensor:
        """``dw/dphi = alpha * |phi| ** (alpha - 1)`` (0 at ``phi == 0`` for ``alpha > 1``)."""
        return self.alpha * phi.abs().pow(self.alpha - 1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def install_power(model: nn.Module, alpha: float, layers: Iterable[str]) -> None:
    """Make the named layers of ``model`` compute with ``phi * |phi| ** (alpha - 1)``, converting
    their weights to ``phi`` so the net computes what it did. A layer that has the transform
    already is left as it is."""
    for name in layers:
        module = model.get_submodule(name)
        if power_of(module) is None:
            parametrize.register_parametrization(module, "weight", PowerTransform(alpha))


def power_of(module: nn.Module) -> Optional[PowerTransform]:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, PowerTransform)), None)


def installed_alpha(model: nn.Module) -> Optional[float]:
    """The alpha of the transform on ``model``'s layers, None if they have none."""
    alphas = {t.alpha for t in (power_of(m) for m in model.modules()) if t is not None}
    if len(alphas) > 1:
        raise ConfigError(f"the model's layers carry Powerprop transforms of several alphas {alphas}")
    return alphas.pop() if alphas else None


def reparametrized_layers(state_dict: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The layers (relative to ``prefix``) whose weight a ``state_dict`` stores as a
    parametrisation's ``original``."""
    return [
        key[len(prefix) : -len(ORIGINAL)]
        for key in state_dict
        if key.startswith(prefix) and key.endswith(ORIGINAL)
    ]


def checkpoint_alpha(checkpoint: Union[str, Path, Mapping[str, Any]]) -> Optional[float]:
    """The Powerprop alpha a checkpoint (path or loaded dict) was trained with, None if none."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    entry = checkpoint.get(CHECKPOINT_KEY)
    if isinstance(entry, Mapping) and entry.get("kind") == "power":
        return float(entry["alpha"])
    return None
