"""Matching Networks (Vinyals et al. 2016) as a LightningModule on the TaskBatch data layer."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lthmaml.errors import ConfigError
from lthmaml.meta.metric import MetricLearner


def attention(support: Tensor, query: Tensor, scale: Union[Tensor, float]) -> Tensor:
    """``[queries, shots]`` log-attention: log-softmax over the support examples of ``scale`` times
    the cosine similarity of each query embedding to each support embedding."""
    cosine = F.cosine_similarity(query[:, None, :], support[None, :, :], dim=-1)
    return (scale * cosine).log_softmax(-1)


def attended_log_probabilities(log_attention: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """``[queries, ways]``: ``log sum_i a_i [y_i = k]``, the attention-weighted sum of the support
    one-hot labels, in log space (a class far from a query gets a finite log-probability)."""
    log_onehot = F.one_hot(support_y, ways).to(log_attention.dtype).log()  # 0 or -inf
    return torch.logsumexp(log_attention[:, :, None] + log_onehot[None], dim=1)


def matching_log_probabilities(
    support: Tensor, support_y: Tensor, query: Tensor, ways: int, scale: Union[Tensor, float]
) -> Tensor:
    """``[queries, ways]``: MatchingNet's rule, the log of the attention-weighted support labels;
    module-level so the edge device scores a task with the very function training used."""
    return attended_log_probabilities(attention(support, query, scale), support_y, ways)


class MatchingNet(MetricLearner):
    """Matching Networks without full-context embeddings: support and query examples go through
    the same embedding net one at a time (no bidirectional LSTM over the support set, no attention
    LSTM over the query); Vinyals et al. add them for miniImageNet, not for Omniglot.

    A query's class probabilities are the attention-weighted sum of the support one-hot labels,
    the attention a softmax over the support examples of ``scale`` times the cosine similarities;
    the loss is their negative log-likelihood on the query set. Adapting to a task is embedding
    its support set, so there is no pre-adaptation model and no ``*_pre`` metric;
    ``task_losses(batch, adapted)`` is the query loss given the support set for either value.

    Args:
        net: the embedding net (a headless Conv4), see :class:`~lthmaml.meta.metric.MetricLearner`.
        scale: inverse temperature of the softmax. Cosines lie in [-1, 1] (in [0, 1] after a
            ReLU net), so at the paper's 1 the attention is nearly uniform and learning is slow;
            a scale of 10 (TADAM's metric scaling) sharpens it.
        learn_scale: learn the scale (as a log, so it stays positive) with the embedding; false
            keeps it fixed. It is a parameter outside ``net``: no pruning callback prunes it.
        optimizer, lr_scheduler: configurable the LightningCLI way.
    """

    def __init__(
        self,
        net: nn.Module,
        scale: float = 10.0,
        learn_scale: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        super().__init__(net, optimizer, lr_scheduler)
        self.save_portable_hyperparameters()
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"model.init_args.scale must be a finite number > 0, got {scale}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learn_scale)

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp()

    def adaptation_summary(self) -> str:
        return "attention over the support embeddings"

    def probabilities(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """``[queries, ways]`` class probabilities, each row summing to 1."""
        return self.log_probabilities(support, support_y, query, ways).exp()

    def log_probabilities(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        return matching_log_probabilities(support, support_y, query, ways, self.scale)
