"""Where a run ran: cores, threads, versions and accelerator, kept beside its results.

Wall times mean little without the machine behind them, so every fit run by the ``lthmaml`` command
writes ``machine.json`` into its log folder, and the benchmarks put the same record in their JSON.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

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
        if stage != "fit" or not trainer.is_global_zero or trainer.log_dir is None:
            return
        folder = Path(trainer.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            **machine_info(),
            "processes": trainer.world_size,
            "accelerator": type(trainer.accelerator).__name__,
        }
        (folder / MACHINE_FILE).write_text(json.dumps(record, indent=2) + "\n")
