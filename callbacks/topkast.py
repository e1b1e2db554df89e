"""Top-KAST: top-K always-sparse training, a forward set inside a wider backward set.

Jayakumar et al. (2020), "Top-KAST: Top-K Always Sparse Training". The dense parameters ``theta``
are kept, but only the largest-magnitude fraction ``D`` of each layer computes (the forward set
``A``); the gradient reaches a larger set ``B`` of the top ``D + M`` (``backward_sparsity`` below
``sparsity``), so weights just outside ``A`` keep learning and may enter it. ``A`` and ``B`` are
chosen again by magnitude every ``update_every`` steps (the paper: every step). The exploration
regulariser penalises the weights of ``B`` by their magnitude, those outside the forward set
``1 / D`` times more::

    R(theta) = lambda * ( sum_{A} theta^2 + sum_{B \\ A} theta^2 / D )

so a weight only stays in ``A`` if the loss needs it. Parameters outside ``B`` get no gradient and
keep their value (the paper's). While it trains, the dense ``theta`` is kept and each pruned layer
computes with ``theta * A`` through a :class:`~lthmaml.sparsity.ForwardMask` parametrisation (the
one strategy whose weights behind the mask are not stored as zero); when the fit ends the
parametrisation is removed and ``theta`` outside ``A`` zeroed, so only ``A`` is recorded and
exported. With Powerpropagation installed the magnitude
is that of the effective weight ``theta |theta|^(alpha - 1)`` and the two stack as in the paper's
best result. Cost per step: forward and input-gradient over ``A``, weight-gradient over ``B``:
``2 f_A + f_B`` (against ``3 f`` dense).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks.sparse_training import SparseTraining
from lthmaml import rewiring, sparsity
from lthmaml.errors import ConfigError
from lthmaml.sparsity import Masks


class TopKAST(SparseTraining):
    """Forward by the top-``(1 - sparsity)`` weights, backward by the top-``(1 - backward_sparsity)``.

    Args:
        sparsity: of the forward set ``A`` (what computes, and what is exported).
        backward_sparsity: of the backward set ``B`` (smaller: ``B`` is a superset of ``A``);
            default: twice ``A``'s density (90% -> 80%, 95% -> 90%, the paper's pairs).
        regularization: ``lambda`` of the exploration regulariser (0: none).
        update_every: steps between re-selections of ``A`` and ``B`` by magnitude.
        stop_updates_at, distribution, **kwargs: as for :class:`~callbacks.sparse_training.SparseTraining`.
    """

    state_attributes = (*SparseTraining.state_attributes, "backward_masks", "theta")
    updates_after_step = True  # A is the top-K of the weights the last step left

    def __init__(
        self,
        sparsity: float = 0.9,
        backward_sparsity: Optional[float] = None,
        regularization: float = 1e-4,
        update_every: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(sparsity=sparsity, update_every=update_every, **kwargs)
        if backward_sparsity is None:
            backward_sparsity = max(0.0, 2 * sparsity - 1)
        if not 0.0 <= backward_sparsity <= sparsity:
            raise ConfigError(
                f"TopKAST.backward_sparsity must be in [0, sparsity={sparsity}], got {backward_sparsity}"
            )
        if regularization < 0:
            raise ConfigError(f"TopKAST.regularization must be >= 0, got {regularization}")
        self.backward_sparsity, self.regularization = backward_sparsity, regularization
        self.backward_masks: Optional[Masks] = None
        self.theta: Optional[dict[str, Tensor]] = None
        """The dense stored weights as of the last checkpoint, which holds them here: its
        ``state_dict`` holds ``theta * A``, exactly sparse like every other checkpoint."""

    # ------------------------------------------------------------------ the two sets
    def magnitudes(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``|theta|`` (reparametrised) of every prunable weight, in or out of the sets."""
        return {name: self.dense_weight(pl_module, name).detach().abs() for name in self.prunable(pl_module)}

    @staticmethod
    def dense_weight(pl_module: pl.LightningModule, name: str) -> Tensor:
        """``theta`` as the layer would compute with it unmasked (through Powerprop, if stacked)."""
        module, attribute = sparsity.owner(pl_module, name)
        if sparsity.forward_masked(pl_module, name) is None:
            return getattr(module, attribute)
        value = module.parametrizations[attribute].original
        for step in module.parametrizations[attribute]:
            if not isinstance(step, sparsity.ForwardMask):
                value = step(value)
        return value

    def select(self, pl_module: pl.LightningModule) -> Masks:
        """Install ``A`` (the layers' masks) and ``B`` (their backward masks) by magnitude."""
        scores = self.magnitudes(pl_module)
        forward = self.densities(pl_module)
        backward = self.densities(pl_module, self.backward_sparsity)
        backward = {name: max(backward[name], forward[name]) for name in forward}  # B contains A
        masks = rewiring.keep_highest(scores, forward)
        self.backward_masks = rewiring.keep_highest(scores, backward)
        rewiring.set_forward_masks(pl_module, masks, self.backward_masks)  # before: theta is kept
        sparsity.load_masks(pl_module, masks)
        return masks

    def initial_masks(self, pl_module: pl.LightningModule, batch: Any) -> Masks:
        return self.select(pl_module)

    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, fraction: float
    ) -> None:
        self.select(pl_module)

    # ------------------------------------------------------------------ the regulariser and cost
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.regularization == 0 or self.backward_masks is None:
            return
        density = 1.0 - self.sparsity
        masks = sparsity.masks_of(pl_module, list(self.backward_masks))
        with torch.no_grad():
            for name, forward in masks.items():
                theta = sparsity.stored(pl_module, name)
                if theta.grad is None:
                    continue
                backward = self.backward_masks[name].to(forward)
                weights = forward + (backward - forward) / density
                theta.grad.add_(2 * self.regularization * theta * weights)

    def step_cost(self, pl_module: pl.LightningModule, forward: float, dense: float) -> float:
        backward, _ = self.forward_cost(pl_module, self.backward_masks)
        return 2 * forward + backward

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first = next(iter(self.backward_masks or {}), None)
        if first is not None and sparsity.forward_masked(pl_module, first) is None:
            self.resume(pl_module)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @torch.no_grad()
    def resume(self, pl_module: pl.LightningModule) -> None:
        """After a resume: the sets again, and the dense ``theta`` the checkpoint kept here."""
        # A checkpoint keeps callback state on the CPU: bring B to the weights' device once.
        self.backward_masks = {name: mask.to(pl_module.device) for name, mask in self.backward_masks.items()}
        masks = sparsity.masks_of(pl_module, list(self.backward_masks))
        rewiring.set_forward_masks(pl_module, masks, self.backward_masks)
        for name, value in (self.theta or {}).items():
            sparsity.stored(pl_module, name).copy_(value)
        self.theta = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The checkpoint's weights are ``theta * A`` under their plain names (what any loader
        expects); the dense ``theta`` goes into this callback's state, for a resume."""
        state = checkpoint["state_dict"]
        theta = {}
        for name in list(self.backward_masks or {}):
            if sparsity.forward_masked(pl_module, name) is None:
                continue
            module, attribute = sparsity.owner(pl_module, name)
            original = f"{name.rpartition('.')[0]}.parametrizations.{attribute}.original"
            theta[name] = state[original].detach().cpu().clone()
            mask = sparsity.masks_of(pl_module, [name])[name].to(state[original])
            if len(module.parametrizations[attribute]) == 1:  # theta itself is the weight
                del state[original]
                state[name] = theta[name].to(mask) * mask
            else:  # stacked on Powerprop, whose phi stays under the parametrisation's key
                state[original] = state[original] * mask
        own = checkpoint.get("callbacks", {}).get(self.state_key)
        if own is not None:
            own["theta"] = theta

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The trained net is ``A`` only: the rest of ``theta`` is dropped and the sets removed."""
        rewiring.set_forward_masks(pl_module, None)
        sparsity.apply_masks(pl_module, trainer.optimizers)
        super().on_fit_end(trainer, pl_module)

    def details(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        extra = {"backward_sparsity": self.backward_sparsity, "regularization": self.regularization}
        return {**super().details(pl_module), **extra}
