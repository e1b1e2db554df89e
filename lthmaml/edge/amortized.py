"""Adapting an amortized learner's artifact on the device: one forward pass, no gradients.

An artifact of a metric learner (``learner`` ``protonet`` or ``matching``: a headless embedding)
or of a CNP adapts without a backward pass or optimizer state: the support set goes through the
net once, giving the class prototypes (ProtoNet), the support embeddings and labels (MatchingNet)
or the mean encoding of the support pairs (CNP), and a query is scored against that context with
the learner's own rule: the functions :mod:`lthmaml.meta.protonet` and :mod:`lthmaml.meta.matching`
train with, the CNPNet's decoder. Nothing is re-implemented here, so the device's scores are the
learner's.

The classes are the task folder's labels in its order (label ``i`` is class ``i``), and the
query is embedded batch by batch with batch-statistics BatchNorm as in meta-training: with
``data.batch_size`` at least the query's size the scores are exactly the learner's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lthmaml.edge.artifact import AMORTIZED_LEARNERS, METRIC_LEARNERS, ArtifactMetadata
from lthmaml.errors import TrainingError
from lthmaml.meta.matching import matching_log_probabilities
from lthmaml.meta.metric import check_labels
from lthmaml.meta.protonet import distance_logits, prototypes

KEPT = {"protonet": "the class prototypes", "matching": "the support embeddings", "cnp": "the mean encoding"}
"""What each amortized learner keeps of the support set, for log lines and reports."""


@dataclass
class SupportAdapter:
    """One amortized learner's adaptation: :meth:`adapt` keeps the context of a support set,
    :meth:`scores` scores queries against it.

    Attributes:
        learner: ``protonet``, ``matching`` or ``cnp`` (see :data:`AMORTIZED_LEARNERS`).
        ways: the task's class count (metric learners), None for the CNP.
        metric_scale: MatchingNet's attention scale, from the artifact.
        distance: ProtoNet's distance (``squared`` or ``euclidean``), from the artifact.
        context: what :meth:`adapt` kept (None before it ran).
    """

    learner: str
    ways: Optional[int] = None
    metric_scale: Optional[float] = None
    distance: Optional[str] = None
    context: Any = None

    @classmethod
    def for_task(cls, metadata: ArtifactMetadata, support_y: Tensor, source: str) -> Optional[SupportAdapter]:
        """The adapter of an artifact's learner for a support set's labels; None for MAML or a
        Classifier (they adapt by gradient steps). Labels not ``0..N-1`` are a one-line DataError."""
        if metadata.learner not in AMORTIZED_LEARNERS:
            return None
        ways = None
        if metadata.learner in METRIC_LEARNERS:
            ways = check_labels(support_y, support_y[:0], f"{source} ({metadata.learner})")
        return cls(metadata.learner, ways, metadata.metric_scale, metadata.distance)

    def _metric_context(self, embeddings: Tensor, labels: Tensor) -> Any:
        if self.learner == "protonet":
            return prototypes(embeddings, labels, self.ways)
        return embeddings, labels

    def _metric_scores(self, context: Any, query: Tensor) -> Tensor:
        """``[queries, ways]``: ProtoNet's logits or MatchingNet's log-probabilities."""
        if self.learner == "protonet":
            return distance_logits(query, context, self.distance)
        support, labels = context
        return matching_log_probabilities(support, labels, query, self.ways, self.metric_scale)

    @torch.no_grad()
    def adapt(self, net: nn.Module, x: Tensor, y: Tensor) -> None:
        """Keep the context of the support set ``(x, y)``: one forward pass, no graph, in evaluation
        mode as the learner evaluates (BatchNorm with running statistics uses them and keeps them)."""
        training = net.training
        try:
            net.eval()
            if self.learner == "cnp":
                self.context = net.encode(x, y)
            else:
                self.context = self._metric_context(net(x).flatten(1), y)
        finally:
            net.train(training)

    def scores(self, net: nn.Module, x: Tensor) -> Tensor:
        """Class scores (log-probabilities up to a constant) of query images, or the CNP's
        predictive mean of query points, against the kept context."""
        if self.context is None:
            raise TrainingError("the support set must be adapted to before queries are scored")
        if self.learner == "cnp":
            return net.decode(self.context, x)[0]
        return self._metric_scores(self.context, net(x).flatten(1))

    def support_scores(self, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The support loss's scores, differentiable: the support set scored against itself by
        the learner's rule (no leave-one-out), one embedding pass."""
        embeddings = net(x).flatten(1)
        return self._metric_scores(self._metric_context(embeddings, y), embeddings)

    def summary(self, support: int) -> str:
        """E.g. ``the class prototypes of the 6 support examples (protonet)``."""
        return f"{KEPT[self.learner]} of the {support} support examples ({self.learner})"
