"""SNIP: single-shot network pruning at initialisation by connection sensitivity.

Lee, Ajanthan & Torr (2019), "SNIP". Before any training, the sensitivity of the loss to each
connection ``c_j`` (the mask entry, at ``c = 1``) is measured on one batch::

    s_j = | dL/dc_j | = | g_j * w_j |,      g = dL/dw at the initial weights

and the ``1 - sparsity`` fraction of connections with the largest ``s_j`` is kept, ranked over all
layers together (the paper's; ``distribution: erk|uniform`` ranks within each layer at its density
instead). The mask is then fixed and the sparse net trains from its initial weights. The loss is
each task's support loss at the initial meta-parameters (``task_losses``), summed over the batch's
tasks; the gradient is summed before the absolute value, as the paper differentiates one loss.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch

from callbacks.sparse_training import SparseTraining
from lthmaml import rewiring, sparsity
from lthmaml.rewiring import Distribution
from lthmaml.sparsity import Masks


class SNIP(SparseTraining):
    """Prune at initialisation by ``|g * w|`` on the first training batch; the mask is then fixed.

    Args:
        sparsity: the fraction of connections removed.
        distribution: None (rank all layers together, ``scope``/``layer_rates`` as for the other
            strategies), or ``erk``/``uniform`` per-layer densities.
        **kwargs: as for :class:`~callbacks.sparse_training.SparseTraining`.
    """

    default_distribution = None

    def __init__(
        self, sparsity: float = 0.9, distribution: Optional[Distribution] = None, **kwargs: Any
    ) -> None:
        super().__init__(sparsity=sparsity, distribution=distribution, update_every=None, **kwargs)

    def sensitivities(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        """``|dL/dc| = |sum_tasks dL/dw| * |w|`` for every prunable weight."""
        names = self.prunable(pl_module)
        total, _ = sparsity.summed_task_gradients(pl_module, names, batch)
        return {name: (total[name] * sparsity.weight(pl_module, name)).abs().detach() for name in names}

    def initial_masks(self, pl_module: pl.LightningModule, batch: Any) -> Masks:
        scores = self.sensitivities(pl_module, batch)
        if self.distribution is not None:
            return rewiring.keep_highest(scores, self.densities(pl_module))
        return sparsity.prune_lowest(
            sparsity.masks_of(pl_module, list(scores)),
            scores,
            self.sparsity,
            self.scope,
            self.rates(pl_module),
        )
