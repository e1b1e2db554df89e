"""Per-task losses and metrics of the meta-learners, and the interval MAML papers report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TaskResult:
    """Query-set metrics of one task before and after adaptation (accuracy is None for regression;
    ``nll``, the Gaussian negative log-likelihood, only for learners that predict a variance)."""

    loss_pre: Optional[Tensor]
    loss_post: Tensor
    acc_pre: Optional[Tensor] = None
    acc_post: Optional[Tensor] = None
    nll: Optional[Tensor] = None


def task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer labels (classification), MSE for real targets (regression)."""
    if targets.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets)


def task_accuracy(outputs: Tensor, targets: Tensor) -> Optional[Tensor]:
    if targets.dtype not in (torch.int64, torch.int32):
        return None
    return (outputs.argmax(-1) == targets).float().mean()


def mean_and_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval, as MAML papers report."""
    values = values.double().flatten()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(unbiased=True) / math.sqrt(values.numel()))
