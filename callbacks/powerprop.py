"""Powerpropagation (Schwarz et al. 2021): a reparametrisation that leaves pruning little to remove.

Method. Each prunable weight is stored as a parameter ``phi``, and the layer computes with

    w = phi * |phi| ** (alpha - 1)        (times the layer's mask)

so that ``dL/dphi = dL/dw * alpha * |phi| ** (alpha - 1)``: for ``alpha > 1`` a parameter's
gradient scales with its magnitude. Large weights adapt fast, small ones hardly move ("rich get
richer"), and training ends with much of the mass near zero, where magnitude pruning removes it at
little cost. At the start the weights are converted, ``phi = sign(theta) * |theta| ** (1 / alpha)``,
so the network computes the very function it was initialised to; ``alpha = 1`` is the baseline.

Pruning. Powerprop itself only shapes the weights. ``final_sparsity`` prunes the effective weights
of lowest magnitude once, at the end of training (the paper's one-shot setting); or it stacks with
an iterative strategy (``callbacks.lottery.LotteryTicket``), whose magnitude scores are the
effective weights as well.

Adaptive optimizers. Adam divides each gradient by its running RMS, which cancels the
``alpha * |phi| ** (alpha - 1)`` factor. With ``adam_correction`` the optimizer is handed ``dL/dw``
and its update, computed as if for ``w``, is multiplied by ``alpha * |phi| ** (alpha - 1)`` before
it moves ``phi``; for plain SGD this is the uncorrected update again.

The reparametrisation lives in the mask-aware layers' ``weight_transform`` hook, a plain attribute
that ``higher``'s functional copies keep: MAML's inner loop adapts ``phi`` and computes with
``transform(phi') * mask``. The hook is not part of a ``state_dict``, so a model rebuilt from a
checkpoint needs it again: a Trainer with this callback installs it for validate, test and predict;
after ``load_from_checkpoint`` call :func:`lthmaml.nets.reparam.install_power` (``checkpoint_alpha``
reads ``alpha`` from the file, where this callback writes it).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.nets.layers import masked_layers
from lthmaml.nets.reparam import CHECKPOINT_KEY, PowerTransform, install_power, installed_alpha


class Powerprop(PruningCallback):
    """Powerpropagation of every mask-aware layer, optionally with one-shot magnitude pruning.

    Args:
        alpha: the power (>= 1; the paper uses 2 to 5). 1 is exactly training without the callback.
        final_sparsity: prune the effective weights of lowest magnitude to this fraction of all
            prunable weights at the end of the last training epoch, and write the round
            (``rounds/round_00``). None: no pruning here (e.g. stacked with ``LotteryTicket``).
        adam_correction: hand the optimizer ``dL/dw`` and scale its update by
            ``alpha * |phi| ** (alpha - 1)``, so adaptive optimizers keep the effect.
        scope, exclude, layer_rates, monitor, mode, test_each_round: of the one-shot pruning, as for
            :class:`~callbacks.base.PruningCallback`. ``exclude`` does not exempt a layer from the
            reparametrisation: every mask-aware layer is powerpropagated.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        final_sparsity: Optional[float] = None,
        adam_correction: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if alpha < 1:
            raise ConfigError(f"Powerprop alpha must be >= 1 (1: no reparametrisation), got {alpha}")
        if final_sparsity is not None and not 0.0 <= final_sparsity < 1.0:
            raise ConfigError(f"Powerprop final_sparsity must be in [0, 1), got {final_sparsity}")
        self.alpha = float(alpha)
        self.final_sparsity = final_sparsity
        self.adam_correction = adam_correction
        self.transform = PowerTransform(alpha)
        self.converted = False
        """Whether this callback has made its model hold ``phi`` (saved in the checkpoint)."""
        self._restored_phi = False
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._post_step_hook: Optional[Any] = None

    # ------------------------------------------------------------------ the reparametrisation
    @torch.no_grad()
    def convert(self, model: nn.Module, already_phi: bool = False) -> None:
        """``theta -> phi = sign(theta) |theta| ** (1/alpha)`` and install the transform, exactly once:
        a model that carries the transform, or whose parameters are ``already_phi``, is not converted."""
        alpha = installed_alpha(model)
        if alpha is not None and alpha != self.alpha:
            raise ConfigError(
                f"the model is powerpropagated with alpha={alpha}, the callback has {self.alpha}"
            )
        if alpha is None and not already_phi:
            for layer in masked_layers(model).values():
                layer.weight.copy_(self.transform.inverse(layer.weight))
        install_power(model, self.alpha)
        self.converted = True

    # ------------------------------------------------------------------ one-shot pruning
    def prune_to_final_sparsity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune the lowest-|w| effective weights up to ``final_sparsity`` of all, and record it.

        The record's validation metrics are the last validation's, the dense net's, before pruning.
        """
        # rounds=1: final_sparsity of *all* weights, also when another strategy pruned some already.
        scores = sparsity.magnitude_scores(pl_module, self.exclude)
        self.prune(pl_module, scores, self.final_sparsity, rounds=1)
        self.pruning_steps = 1
        self.write_round(trainer, pl_module, details={"alpha": self.alpha, "validated_dense": True})

    # ------------------------------------------------------------------ Adam correction
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Swap ``dL/dphi`` for ``dL/dw`` and have the step's update for ``w`` rescaled after it.

        Lightning calls this inside ``optimizer.step`` (automatic and manual optimization alike),
        so a post-step hook registered here fires at the end of this very step.
        """
        if not self.adam_correction or self.alpha == 1.0:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._pending.clear()
        for layer in masked_layers(pl_module).values():
            phi = layer.weight
            if phi.grad is None or id(phi) not in in_optimizer:
                continue
            factor = self.transform.gradient_factor(phi.detach())
            safe = torch.where(factor > 0, factor, torch.ones_like(factor))
            phi.grad = torch.where(factor > 0, phi.grad / safe, torch.zeros_like(phi.grad))
            self._pending.append((phi, phi.detach().clone(), factor))
        if self._post_step_hook is not None:
            self._post_step_hook.remove()
        self._post_step_hook = optimizer.register_step_post_hook(self._rescale_update)

    @torch.no_grad()
    def _rescale_update(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        for phi, before, factor in self._pending:
            phi.copy_(before + (phi - before) * factor)
        self._pending.clear()
        if self._post_step_hook is not None:
            self._post_step_hook.remove()
            self._post_step_hook = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            # validate / test / predict: the parameters are a Powerprop run's phi already.
            install_power(pl_module, self.alpha)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the checkpoint's model and callback states are restored (Trainer._run): the
        # phi of a resumed fit are not converted twice. A checkpoint of a run without Powerprop
        # (no state of this callback) holds theta, which is converted.
        self.convert(pl_module, already_phi=self._restored_phi)
        self._restored_phi = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before ModelCheckpoint's hook, so last.ckpt of the final epoch holds the pruned masks.
        if self.final_sparsity is not None and not self.history and self.last_epoch(trainer):
            self.prune_to_final_sparsity(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final_sparsity is not None and not self.history:  # stopped before an epoch ended
            self.prune_to_final_sparsity(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final_sparsity is not None:  # stacked, the pruning strategy reports the sparsity
            super().on_fit_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Read by whatever rebuilds the net from the file (export, the edge): see lthmaml.nets.reparam.
        checkpoint[CHECKPOINT_KEY] = {"kind": "power", "alpha": self.alpha}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha, "converted": self.converted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("alpha", self.alpha)
        if saved != self.alpha:
            raise ConfigError(
                f"the checkpoint was trained with Powerprop alpha={saved}; resume with the same alpha "
                f"(the callback has {self.alpha})"
            )
        self._restored_phi = bool(state_dict.get("converted", False))
