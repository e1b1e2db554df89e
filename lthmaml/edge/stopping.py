"""Early stopping on the metric that decides the task, for the edge fine-tune.

A fine-tune on a device is judged by its accuracy on the task (classification) or its error
(regression). Validation *loss* on a classification task keeps falling long after accuracy has
peaked (the net grows confident on what it already gets right), so stopping on it saves almost
no epochs (docs/benchmarks.md). :class:`TaskEarlyStopping` stops as Lightning's ``EarlyStopping``
does, on the deciding metric of the task it meets unless given one: ``val/acc`` (max) for
classification, ``val/loss`` (min) for regression. The same config thus serves an Omniglot
artifact and a sinusoid one.

The task is known only when the fit sets up, after the callback was configured, so it holds a
stock ``EarlyStopping`` built for that metric then, and hands it Lightning's hooks and its state.
It decides after each validation, never at a training epoch's end: a fit without a validation
split (the artifact's inner loop) gives it nothing to decide, and it stays out of the way.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EarlyStopping


def deciding_metric(pl_module: pl.LightningModule) -> tuple[str, str]:
    """``(monitor, mode)`` that decides the module's task."""
    return ("val/loss", "min") if getattr(pl_module, "regression", False) else ("val/acc", "max")


class TaskEarlyStopping(Callback):
    """Lightning's ``EarlyStopping``, with ``monitor`` (and ``mode``) chosen by the task when not given.

    Args:
        monitor: a logged metric, or None: :func:`deciding_metric` of the module fitted.
        mode: ``min`` or ``max`` for a given ``monitor`` (default ``min``); ignored for None.
        **kwargs: ``EarlyStopping``'s (``patience``, ``min_delta``, ...).

    ``stopper`` is the ``EarlyStopping`` that decides (its ``wait_count``, ``stopped_epoch``, ...).
    """

    def __init__(self, monitor: Optional[str] = None, mode: str = "min", **kwargs: Any) -> None:
        self.by_task = monitor is None
        self._kwargs = kwargs
        self.stopper = self._stock(monitor or "val/loss", mode)  # a bad argument fails here, not mid-fit

    def _stock(self, monitor: str, mode: str) -> EarlyStopping:
        return EarlyStopping(monitor=monitor, mode=mode, check_on_train_epoch_end=False, **self._kwargs)

    @property
    def monitor(self) -> str:
        return self.stopper.monitor

    @property
    def mode(self) -> str:
        return self.stopper.mode

    @property
    def state_key(self) -> str:
        return self.stopper.state_key

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.by_task and deciding_metric(pl_module) != (self.monitor, self.mode):
            self.stopper = self._stock(*deciding_metric(pl_module))
        self.stopper.setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopper.on_validation_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return self.stopper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopper.load_state_dict(state_dict)


def stopper_of(trainer: pl.Trainer) -> Optional[Union[EarlyStopping, TaskEarlyStopping]]:
    """The trainer's first early stopper, stock or :class:`TaskEarlyStopping`, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, (EarlyStopping, TaskEarlyStopping))), None)
