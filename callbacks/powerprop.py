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

The reparametrisation is a ``torch.nn.utils.parametrize`` parametrisation of each prunable layer's
weight (:mod:`lthmaml.nets.reparam`): the layer keeps its class, ``phi`` is the parameter the
optimizer and MAML's inner loops (``higher`` and ``torch.func`` alike) update, and the layer
computes with ``w``. A checkpoint names the transform (``weight_transform``), so every learner
loading it (validate, test, predict, export, a distillation teacher) installs it again first.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from callbacks.base import PruningCallback
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.nets.reparam import CHECKPOINT_KEY, ORIGINAL, PowerTransform, install_power, installed_alpha


class Powerprop(PruningCallback):
    """Powerpropagation of every conv and linear weight, optionally with one-shot magnitude pruning.

    Args:
        alpha: the power (>= 1; the paper uses 2 to 5). 1 is exactly training without the callback.
        final_sparsity: prune the effective weights of lowest magnitude to this fraction of all
            prunable weights at the end of the last training epoch, and write the round
            (``rounds/round_00``). None: no pruning here (e.g. stacked with ``LotteryTicket``).
        adam_correction: hand the optimizer ``dL/dw`` and scale its update by
            ``alpha * |phi| ** (alpha - 1)``, so adaptive optimizers keep the effect.
        scope, exclude, layer_rates, monitor, mode, test_each_round: of the one-shot pruning, as for
            :class:`~callbacks.base.PruningCallback`. ``exclude`` does not exempt a layer from the
            reparametrisation: every conv and linear weight is powerpropagated.
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
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._post_step_hook: Optional[Any] = None

    # ------------------------------------------------------------------ the reparametrisation
    def install(self, model: nn.Module) -> None:
        """``theta -> phi = sign(theta) |theta| ** (1/alpha)`` on every prunable layer, once: a
        model that carries the transform keeps its ``phi``."""
        alpha = installed_alpha(model)
        if alpha is not None and alpha != self.alpha:
            raise ConfigError(
                f"the model is powerpropagated with alpha={alpha}, the callback has {self.alpha}"
            )
        layers = [name.removesuffix(".weight") for name in sparsity.prunable(model)]
        install_power(model, self.alpha, layers)

    # ------------------------------------------------------------------ one-shot pruning
    def records_at_fit_end(self, pl_module: pl.LightningModule) -> bool:
        return self.final_sparsity is not None

    def final_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune the lowest-|w| effective weights up to ``final_sparsity`` of all, and record it.

        The record's validation metrics are the last validation's, the dense net's, before pruning.
        """
        # level=1: final_sparsity of *all* weights, also when another strategy pruned some already.
        scores = sparsity.magnitude_scores(pl_module, self.exclude)
        self.prune(pl_module, scores, self.final_sparsity, level=1)
        self.pruning_steps = 1
        self.record(trainer, pl_module, details={"alpha": self.alpha, "validated_dense": True})

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
        for name in sparsity.prunable(pl_module):
            phi = sparsity.stored(pl_module, name)
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
        # Before a checkpoint is restored: a resumed fit's phi then load over the converted theta.
        self.install(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final_sparsity is not None:  # stacked, the pruning strategy reports the sparsity
            super().on_fit_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Read by whatever rebuilds the net from the file (export, the edge): see lthmaml.nets.reparam.
        checkpoint[CHECKPOINT_KEY] = {"kind": "power", "alpha": self.alpha}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint of a run without Powerprop, resumed with it: its optimizer state follows
        the stock layers' parameter order, which the parametrisation changes (``phi`` lies under
        the layer's ``parametrizations``, after its bias). Reorder it by parameter name (Lightning
        restores it after this hook), so each weight keeps its own moments."""
        states = checkpoint.get("optimizer_states")
        if checkpoint.get(CHECKPOINT_KEY) is not None or not states:
            return
        current = [name.replace(ORIGINAL, ".weight") for name, _ in pl_module.named_parameters()]
        saved = [key for key in checkpoint.get("state_dict", {}) if key in set(current)]
        if saved == current or sorted(saved) != sorted(current):
            return
        position = {name: index for index, name in enumerate(saved)}
        order = [position[name] for name in current]  # new index -> the saved index of that weight
        for state in states:
            groups = state.get("param_groups", [])
            if len(groups) != 1 or groups[0].get("params") != list(range(len(current))):
                raise ConfigError(
                    "Powerprop: resuming a checkpoint of a run without it reorders the parameters, and "
                    "its optimizer state has parameter groups this callback cannot map by name; "
                    "start from the weights only (load them into the model, no ckpt_path)"
                )
            saved_state = state["state"]
            state["state"] = {new: saved_state[old] for new, old in enumerate(order) if old in saved_state}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("alpha", self.alpha)
        if saved != self.alpha:
            raise ConfigError(
                f"the checkpoint was trained with Powerprop alpha={saved}; resume with the same alpha "
                f"(the callback has {self.alpha})"
            )
