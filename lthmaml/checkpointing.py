"""``last.ckpt`` at every epoch end, whatever the monitored metric did.

Lightning's ``save_last`` writes ``last.ckpt`` only when a top-k checkpoint is written too, so in a
pruning run (accuracy drops after each prune) it stops updating and a killed run loses epochs.
This callback writes it every training-epoch end, after the pruning callbacks' epoch-end work
(Lightning runs checkpoint callbacks last), so a resumed fit continues exactly where it stopped.

It is also written atomically: Lightning's local save goes through fsspec's transaction, which
writes a temp file in the *system* temp folder and ``shutil.move``s it over; where that folder is
another file system the move is a plain copy onto ``last.ckpt``, and a kill mid-copy leaves it
truncated. Here the bytes go to ``.last.ckpt.partial`` beside it and ``os.replace`` swaps them in,
so ``last.ckpt`` is always either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import os
from typing import Optional

import lightning.pytorch as pl
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
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

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Write beside ``filepath`` and rename over it (local paths; remote stores keep Lightning's way)."""
        if not isinstance(get_filesystem(filepath), LocalFileSystem):
            super()._save_checkpoint(trainer, filepath)
            return
        folder, name = os.path.split(filepath)
        partial = os.path.join(folder, f".{name}.partial")  # not *.ckpt: never taken for a checkpoint
        super()._save_checkpoint(trainer, partial)
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_checkpoint_saved = filepath
