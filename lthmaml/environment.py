"""Where a run ran: cores, threads, versions and accelerator, kept beside its results.

Wall times mean little without the machine behind them, so every fit run by the ``lthmaml`` command
writes ``machine.json`` into its log folder, and the benchmarks put the same record in their JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

MACHINE_FILE = "machine.json"


def machine_info() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpu": gpu,
    }


class MachineRecord(Callback):
    """Writes :func:`machine_info` (plus the process count) to ``<log_dir>/machine.json`` as a fit starts."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it, not rank 0 alone
        if not trainer.is_global_zero or log_dir is None:
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            **machine_info(),
            "processes": trainer.world_size,
            "accelerator": type(trainer.accelerator).__name__,
        }
        (folder / MACHINE_FILE).write_text(json.dumps(record, indent=2) + "\n")


FAILED = "FAILED"
"""Written into the log folder of a run that stopped on an error, with the error."""
START_UP_FILES = ("events.out.tfevents.*", "config.yaml", "hparams.yaml", "machine.json")
"""What a fit writes before its first epoch: a folder of only these is removed when the fit fails."""


def mark_failed(trainer: Optional[pl.Trainer], error: BaseException) -> None:
    """A failed run's log folder: removed if it holds only what start-up writes (event file,
    config), else given a ``FAILED`` file with the error, so no folder passes for a finished run.
    Ctrl-C (``KeyboardInterrupt``) is noted as an interruption; a resumed fit removes the note.

    Rank zero only, and no collective (``trainer.log_dir`` is one): the other ranks may be gone.
    """
    logger = getattr(trainer, "logger", None)
    if logger is None or not trainer.is_global_zero or logger.log_dir is None:
        return
    folder = Path(logger.log_dir)
    if not folder.is_dir():
        return
    start_up = {path for pattern in START_UP_FILES for path in folder.glob(pattern) if path.is_file()}
    if all(path in start_up for path in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
    elif isinstance(error, KeyboardInterrupt):
        (folder / FAILED).write_text(
            "KeyboardInterrupt: interrupted (Ctrl-C); resume from checkpoints/last.ckpt\n"
        )
    else:
        message = " ".join(str(error).split()) or type(error).__name__
        (folder / FAILED).write_text(f"{type(error).__name__}: {message}\n")


class FailedRunMarker(Callback):
    """A fit that stops on an error leaves no folder passing for a finished one (:func:`mark_failed`);
    a fit resumed into that folder removes its ``FAILED`` note as it starts.

    Lightning calls ``on_exception`` for an error anywhere inside fit, validate, test or predict;
    only a fit's folder is marked: the others may log into the run folder of the checkpoint they
    read, which did not fail.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            (Path(log_dir) / FAILED).unlink(missing_ok=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            mark_failed(trainer, exception)


def release_process_group() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    Lightning destroys only NCCL groups at exit; a gloo group left to the interpreter's teardown
    can abort a rank after a finished fit ("terminate called without an active exception").
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
