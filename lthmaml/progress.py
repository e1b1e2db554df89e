"""A line per epoch for runs without a progress bar (``make run``, logs of the experiments)."""

from __future__ import annotations

import time
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class EpochProgress(Callback):
    """Prints ``epoch 3/10: val/loss_post 0.1234 (12 s)`` as each training epoch ends.

    The metric is ``monitor`` (the checkpoint's) once it is logged, else every ``val/`` metric;
    the time counts from the start of training. A long fit is never silent for minutes.
    """

    def __init__(self, monitor: Optional[str] = None) -> None:
        self.monitor = monitor
        self.start = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        names = (
            [self.monitor] if self.monitor in metrics else sorted(k for k in metrics if k.startswith("val/"))
        )
        values = (
            ", ".join(f"{name} {float(metrics[name]):.4f}" for name in names) or "no validation metric yet"
        )
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        epoch = f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")
        rank_zero_info(f"{epoch}: {values} ({time.monotonic() - self.start:.0f} s)")
