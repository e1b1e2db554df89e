"""Static sparse training: a random mask fixed before the first update.

The baseline of the sparse-training papers (Evci et al. 2020, "Rigging the Lottery", "Static"):
each layer keeps a random ``density`` of its weights, the densities allocated ``uniform`` or by
Erdos-Renyi-Kernel (``erk``: small layers denser), and the mask never changes. Everything else
(the random draw, the record, the FLOPs count) is :class:`~callbacks.sparse_training.SparseTraining`'s.
"""

from __future__ import annotations

from typing import Any

from callbacks.sparse_training import SparseTraining


class StaticSparse(SparseTraining):
    """A random mask at ``sparsity`` (``distribution``: ``erk`` or ``uniform``), fixed from the start.

    Args:
        sparsity, distribution, seed, **kwargs: as for :class:`~callbacks.sparse_training.SparseTraining`.
    """

    def __init__(
        self, sparsity: float = 0.9, distribution: str = "erk", seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(sparsity=sparsity, distribution=distribution, update_every=None, seed=seed, **kwargs)
