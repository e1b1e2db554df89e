"""Prototypical Networks (Snell et al. 2017) as a LightningModule on the TaskBatch data layer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.errors import ConfigError
from lthmaml.meta.distances import DISTANCES, EUCLIDEAN_EPS, Distance
from lthmaml.meta.metric import MetricLearner


def prototypes(support: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """``[ways, features]``: the mean support embedding of each class, in label order."""
    onehot = F.one_hot(support_y, ways).to(support.dtype)
    return (onehot.T @ support) / onehot.sum(0)[:, None]


def distance_logits(query: Tensor, centres: Tensor, distance: Distance = "squared") -> Tensor:
    """``[queries, ways]``: ``-||q - c_k||^2``, or ``-||q - c_k||`` for ``euclidean``, written out
    (``cdist``'s gradient at 0 is not finite)."""
    squared = (query[:, None, :] - centres[None, :, :]).pow(2).sum(-1)
    return -squared if distance == "squared" else -(squared + EUCLIDEAN_EPS).sqrt()


class ProtoNet(MetricLearner):
    """Prototypical Networks: a query's logits are its negative squared Euclidean distances to the
    class prototypes, the means of the support embeddings of each class; trained by cross-entropy
    on the query set. ``distance: euclidean`` takes the distance itself, not its square (easyfsl's
    choice): its logits grow more slowly with distance, a softer softmax early in training.

    Adapting to a task is computing the prototypes (one forward pass over the support set), so
    there is no pre-adaptation model and no ``*_pre`` metric; ``task_losses(batch, adapted)`` is
    the query loss given the prototypes for either value of ``adapted``.

    Args:
        net, optimizer, lr_scheduler: see :class:`~lthmaml.meta.metric.MetricLearner`.
        distance: ``squared`` (Snell et al.) or ``euclidean``; exported artifacts carry it.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        distance: Distance = "squared",
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        if distance not in DISTANCES:
            raise ConfigError(f"model.init_args.distance must be one of {list(DISTANCES)}, got {distance!r}")
        self.distance = distance
        self.save_portable_hyperparameters()

    def adaptation_summary(self) -> str:
        return "class prototypes of the support embeddings"

    def logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """``-||q - c_k||^2`` (or ``-||q - c_k||``) for every query embedding ``q`` and prototype ``c_k``."""
        return distance_logits(query, prototypes(support, support_y, ways), self.distance)

    def log_probabilities(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        return self.logits(support, support_y, query, ways).log_softmax(-1)
