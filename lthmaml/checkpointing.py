"""``last.ckpt`` at every epoch end, whatever the monitored metric did.

Lightning's ``save_last`` writes ``last.ckpt`` only when a top-k checkpoint is written too, so in a
pruning run (accuracy drops after each prune) it stops updating and a killed run loses epochs.
This callback writes it every training-epoch end, after the pruning callbacks' epoch-end work
(Lightning runs checkpoint callbacks, this one too, after the module's own epoch-end hook), so a
resumed fit continues exactly where it stopped.

It is also written atomically: Lightning's local save goes through fsspec's transaction, which
writes a temp file in the *system* temp folder and ``shutil.move``s it over; where that folder is
another file system the move is a plain copy onto ``last.ckpt``, and a kill mid-copy leaves it
truncated. Here the bytes go to ``.last.ckpt.partial`` beside it and ``os.replace`` swaps them in,
so ``last.ckpt`` is always either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint

LAST = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Keeps ``<run>/checkpoints/last.ckpt`` current; ranks nothing. Public Trainer API only.

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs its epoch-end hook with
    the other checkpoint callbacks, after the LightningModule's (a scheduler stepped there is saved
    stepped).

    Args:
        dirpath: where ``last.ckpt`` goes; default the ModelCheckpoint's folder, else
            ``<log_dir>/checkpoints``.
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = None if dirpath is None else Path(dirpath)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            checkpoint = trainer.checkpoint_callback
            log_dir = trainer.log_dir  # a collective under DDP: every rank asks
            if checkpoint is not None and checkpoint.dirpath is not None:
                self.dirpath = Path(checkpoint.dirpath)
            else:
                self.dirpath = Path(log_dir or trainer.default_root_dir) / "checkpoints"

    @property
    def path(self) -> Path:
        assert self.dirpath is not None, "set in setup"
        return self.dirpath / LAST

    def save(self, trainer: pl.Trainer) -> None:
        """Write the checkpoint beside ``last.ckpt`` and rename it over (every rank calls this)."""
        partial = self.path.with_name(f".{LAST}.partial")  # not *.ckpt: never taken for a checkpoint
        try:
            trainer.save_checkpoint(partial, weights_only=False)  # resumable: optimizer and callbacks
        except BaseException:
            if trainer.is_global_zero:
                partial.unlink(missing_ok=True)
            raise
        if trainer.is_global_zero:
            os.replace(partial, self.path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            self.save(trainer)
