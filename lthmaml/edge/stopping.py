"""Early stopping on the metric that decides the task, for the edge fine-tune.

A fine-tune on a device is judged by its accuracy on the task (classification) or its error
(regression). Validation *loss* on a classification task keeps falling long after accuracy has
peaked (the net grows confident on what it already gets right), so stopping on it saves almost
no epochs (docs/benchmarks.md). :class:`TaskEarlyStopping` is Lightning's
``EarlyStopping`` whose ``monitor`` defaults to the deciding metric of the task it meets:
``val/acc`` (max) for classification, ``val/loss`` (min) for regression. The same config thus
serves an Omniglot artifact and a sinusoid one.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping


def deciding_metric(pl_module: pl.LightningModule) -> tuple[str, str]:
    """``(monitor, mode)`` that decides the module's task."""
    return ("val/loss", "min") if getattr(pl_module, "regression", False) else ("val/acc", "max")


class TaskEarlyStopping(EarlyStopping):
    """``EarlyStopping`` with ``monitor`` (and ``mode``) chosen by the task when not given.

    Args:
        monitor: a logged metric, or None: :func:`deciding_metric` of the module fitted.
        mode: ``min`` or ``max`` for a given ``monitor`` (default ``min``); ignored for None.
        **kwargs: ``EarlyStopping``'s (``patience``, ``min_delta``, ...).
    """

    def __init__(self, monitor: Optional[str] = None, mode: str = "min", **kwargs: Any) -> None:
        super().__init__(monitor=monitor or "val/loss", mode=mode, **kwargs)
        self.by_task = monitor is None
        self._min_delta = abs(self.min_delta)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.by_task:
            self.monitor, self.mode = deciding_metric(pl_module)
            self.min_delta = self._min_delta if self.monitor_op == torch.gt else -self._min_delta
            self.best_score = torch.tensor(-torch.inf if self.mode == "max" else torch.inf)
