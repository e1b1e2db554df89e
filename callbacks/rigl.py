"""RigL: rigging the lottery, drop by magnitude, grow by gradient.

Evci et al. (2020), "Rigging the Lottery: Making All Tickets Winners". The net starts from a
random mask at Erdos-Renyi-Kernel densities. Every ``update_every`` steps ``t`` until ``T_end``
(``stop_updates_at`` of the fit), each layer drops the fraction::

    f(t) = alpha / 2 * (1 + cos(pi t / T_end))

of its kept weights with the smallest magnitude and grows as many of the connections it does not
hold with the largest gradient magnitude ``|dL/dw|``, computed densely on the update step's batch
(the only dense computation, every ``update_every`` steps). A grown weight starts at zero with a
fresh optimizer state, so growing leaves the function unchanged. The paper's defaults: ``alpha =
0.3``, ``update_every = 100``, ``T_end = 0.75``. Cost: the dense gradient adds ``2 f_S + f_D`` to its
step (appendix H), counted in the record's ``train_flops_vs_dense``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from callbacks.sparse_training import SparseTraining
from lthmaml import sparsity


class RigL(SparseTraining):
    """Drop the smallest ``|w|``, grow the largest dense ``|dL/dw|``, with a cosine-decayed fraction.

    Args:
        drop_fraction: ``alpha``, the fraction rewired at the first update (cosine-decayed to 0).
        update_every, stop_updates_at, sparsity, distribution, seed, **kwargs: as for
            :class:`~callbacks.sparse_training.SparseTraining`.
    """

    def __init__(self, drop_fraction: float = 0.3, update_every: int = 100, **kwargs: Any) -> None:
        super().__init__(
            drop_fraction=drop_fraction, update_every=update_every, drop_decay="cosine", **kwargs
        )

    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, fraction: float
    ) -> None:
        gradients, _ = sparsity.summed_task_gradients(pl_module, self.prunable(pl_module), batch)
        self.rewire(trainer, pl_module, fraction, {name: grad.abs() for name, grad in gradients.items()})

    def update_cost(self, forward: float, dense: float) -> float:
        return 2 * forward + dense
