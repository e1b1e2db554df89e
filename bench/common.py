"""Shared helpers of the benchmark scripts: threads, synthetic tasks, Trainer construction,
timing, tables and the JSON written to ``bench/out/``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lthmaml.data import EpisodeDataset, FewShotTasks, TaskBatch
from lthmaml.data.tasks import TaskSource
from lthmaml.environment import machine_info

OUT_DIR = Path(__file__).resolve().parent / "out"


def quiet_lightning() -> None:
    """Lightning's per-fit banners, tips and hints are noise in a benchmark's output."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in ("does not have many workers", "validation_step", "LeafSpec", "max_epochs"):
        warnings.filterwarnings("ignore", f".*{message}.*")


# ---------------------------------------------------------------------------- command line
def base_parser(description: str, default_threads: Optional[int] = None) -> argparse.ArgumentParser:
    """A parser with the options every script shares (``--threads``, ``--seed``, ``--json``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads or os.cpu_count(),
        help="torch.set_num_threads (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tasks")
    parser.add_argument(
        "--json", type=Path, default=None, help="where to write the results (default: bench/out/<name>.json)"
    )
    return parser


def setup(threads: int) -> None:
    """Threads as asked, Lightning quiet."""
    torch.set_num_threads(threads)
    quiet_lightning()


# ---------------------------------------------------------------------------- tasks
def random_images(classes: int = 50, examples: int = 20, image_size: int = 28, seed: int = 0) -> torch.Tensor:
    """A synthetic image pool ``[classes, examples, 1, H, W]`` (random tensors, Omniglot-shaped)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(classes, examples, 1, image_size, image_size, generator=gen)


def image_task_source(ways: int, shots: int, query_shots: int, seed: int = 0, **pool) -> FewShotTasks:
    return FewShotTasks(random_images(seed=seed, **pool), ways=ways, shots=shots, query_shots=query_shots)


def pregenerate(source: TaskSource, num_tasks: int, seed: int = 0) -> list[TaskBatch]:
    """``num_tasks`` tasks drawn once (as the real DataModule draws them), to feed several paths."""
    dataset = EpisodeDataset(source, num_tasks, seed, "train")
    return [dataset[i] for i in range(num_tasks)]


def stack_tasks(tasks: Sequence[TaskBatch]) -> TaskBatch:
    """A meta-batch ``[tasks, ...]``, exactly what the DataLoader's default collation produces."""
    return TaskBatch(*(torch.stack(field) for field in zip(*tasks)))


def meta_batches(tasks: Sequence[TaskBatch], meta_batch_size: int) -> list[TaskBatch]:
    return [
        stack_tasks(tasks[i : i + meta_batch_size])
        for i in range(0, len(tasks) - meta_batch_size + 1, meta_batch_size)
    ]


class _ListDataset(Dataset):
    def __init__(self, items: Sequence) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def task_loader(tasks: Sequence[TaskBatch] | Dataset, meta_batch_size: int) -> DataLoader:
    """A training loader over pre-generated tasks (or a lazy :class:`EpisodeDataset`), collated
    into meta-batches the way :class:`lthmaml.data.EpisodicDataModule` does."""
    dataset = tasks if isinstance(tasks, Dataset) else _ListDataset(tasks)
    return DataLoader(dataset, batch_size=meta_batch_size, shuffle=False, drop_last=True)


# ---------------------------------------------------------------------------- Lightning
def make_trainer(max_steps: int = -1, callbacks: Optional[list] = None, **overrides) -> pl.Trainer:
    """A bare CPU Trainer for benchmarking: no logger, checkpoints, progress bar or validation."""
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        inference_mode=False,  # MAML adapts with gradients at test time
        callbacks=callbacks or [],
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class StepTimer(pl.Callback):
    """Wall time of the training loop proper: first batch start to last batch end."""

    def __init__(self) -> None:
        self.start: Optional[float] = None
        self.end: Optional[float] = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps += 1

    @property
    def seconds(self) -> float:
        return self.end - self.start


# ---------------------------------------------------------------------------- timing and output
def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def write_json(name: str, payload: dict, path: Optional[Path] = None) -> Path:
    path = path or OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path
