"""SET: sparse evolutionary training, drop by magnitude, grow at random.

Mocanu et al. (2018), "Scalable training of artificial neural networks with adaptive sparse
connectivity". The net starts from a random mask at Erdos-Renyi(-Kernel) densities; every
``update_every`` steps each layer drops the ``zeta`` fraction of its kept weights closest to zero
and grows as many connections at random among those it does not hold, so its density stays
fixed. A grown weight starts at zero (the engine's :func:`~lthmaml.rewiring.start_at_zero`).
The paper rewires at the end of every epoch with a constant ``zeta = 0.3``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from callbacks.sparse_training import SparseTraining
from lthmaml import sparsity


class SET(SparseTraining):
    """Drop the smallest ``|w|``, grow at random, every ``update_every`` steps.

    Args:
        drop_fraction: ``zeta``, the fraction of each layer's kept weights rewired per update.
        update_every, stop_updates_at, sparsity, distribution, seed, **kwargs: as for
            :class:`~callbacks.sparse_training.SparseTraining` (the drop fraction stays constant).
    """

    def __init__(self, drop_fraction: float = 0.3, update_every: int = 100, **kwargs: Any) -> None:
        super().__init__(
            drop_fraction=drop_fraction, update_every=update_every, drop_decay="constant", **kwargs
        )

    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, fraction: float
    ) -> None:
        generator = self.generator(self.mask_updates + 1)
        growth = {
            name: torch.rand(mask.shape, generator=generator).to(mask.device)
            for name, mask in sparsity.masks_of(pl_module, self.prunable(pl_module)).items()
        }
        self.rewire(trainer, pl_module, fraction, growth)
