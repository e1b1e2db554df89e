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
keep their value (the paper's; after the fit only ``A`` is used: the layers compute with
``theta * mask`` and export the effective weights). With Powerpropagation installed the magnitude
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

    state_attributes = (*SparseTraining.state_attributes, "backward_masks")
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

    # ------------------------------------------------------------------ the two sets
    def magnitudes(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """``|theta|`` (reparametrised) of every prunable weight, in or out of the sets."""
        return {
            name: sparsity.transformed_weight(layer).detach().abs()
            for name, layer in self.prunable(pl_module).items()
        }

    def select(self, pl_module: pl.LightningModule) -> Masks:
        """Install ``A`` (the layers' masks) and ``B`` (their backward masks) by magnitude."""
        scores = self.magnitudes(pl_module)
        forward = self.densities(pl_module)
        backward = self.densities(pl_module, self.backward_sparsity)
        backward = {name: max(backward[name], forward[name]) for name in forward}  # B contains A
        masks = rewiring.keep_highest(scores, forward)
        self.backward_masks = rewiring.keep_highest(scores, backward)
        for name, layer in self.prunable(pl_module).items():
            layer.mask.copy_(masks[name])
        rewiring.set_backward_masks(pl_module, self.backward_masks)
        return masks

    def initial_masks(self, pl_module: pl.LightningModule, batch: Any) -> Masks:
        return self.select(pl_module)

    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, fraction: float
    ) -> None:
        self.select(pl_module)

    def keep_raw_weights(self, pl_module: pl.LightningModule) -> None:
        """Nothing is zeroed: ``theta`` outside ``A`` is what may re-enter it."""

    # ------------------------------------------------------------------ the regulariser and cost
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.regularization == 0 or self.backward_masks is None:
            return
        density = 1.0 - self.sparsity
        with torch.no_grad():
            for name, layer in self.prunable(pl_module).items():
                if layer.weight.grad is None:
                    continue
                forward, backward = layer.mask, self.backward_masks[name].to(layer.mask)
                weights = forward + (backward - forward) / density
                layer.weight.grad.add_(2 * self.regularization * layer.weight * weights)

    def step_cost(self, pl_module: pl.LightningModule, forward: float, dense: float) -> float:
        backward, _ = self.forward_cost(pl_module, self.backward_masks)
        return 2 * forward + backward

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.backward_masks is not None:  # again after a resume: a layer attribute is not in a checkpoint
            rewiring.set_backward_masks(pl_module, self.backward_masks)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The trained net is ``A`` only: the rest of ``theta`` is dropped and the sets removed."""
        rewiring.set_backward_masks(pl_module, None)
        sparsity.apply_masks(pl_module)
        super().on_fit_end(trainer, pl_module)

    def details(self) -> dict[str, Any]:
        return {"backward_sparsity": self.backward_sparsity, "regularization": self.regularization}
