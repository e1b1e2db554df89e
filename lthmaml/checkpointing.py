"""``last.ckpt`` at every epoch end, whatever the monitored metric did.

Lightning's ``save_last`` writes ``last.ckpt`` only when a top-k checkpoint is written too, so in a
pruning run (accuracy drops after each prune) it stops updating and a killed run loses epochs.
This callback writes it every training-epoch end, after the pruning callbacks' epoch-end work
(Lightning runs checkpoint callbacks last), so a resumed fit continues exactly where it stopped.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<run>/checkpoints/last.ckpt`` current; ranks nothing."""

    def __init__(self, dirpath: Optional[str] = None) -> None:
        super().__init__(
            dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, save_on_train_epoch_end=True
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: ``last.ckpt`` is written once per epoch, at its end."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: a fit that stops mid-epoch keeps the last completed epoch's checkpoint."""
