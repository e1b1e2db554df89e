"""Tasks and episodes: the vocabulary the rest of the package speaks.

A task is a :class:`TaskBatch` of one support and one query set; the DataLoader stacks tasks into
a meta-batch with a leading task dimension.  Every task is a pure function of ``(seed, split,
index)``, so evaluation sets are fixed and a resumed run sees the same training tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from lthmaml.errors import ConfigError

SPLITS = ("train", "val", "test")


class TaskBatch(NamedTuple):
    """Support and query sets; each field is ``[tasks, examples, ...]`` in a meta-batch."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def task(self, index: int) -> TaskBatch:
        return TaskBatch(*(field[index] for field in self))

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]


class TaskSource(Protocol):
    """Anything that draws one task from a random generator."""

    def sample(self, rng: np.random.Generator) -> TaskBatch: ...


class EpisodeDataset(Dataset):
    """``num_tasks`` tasks from ``source``; task ``i`` is drawn from a generator keyed by (seed, split, i).

    Indices past ``num_tasks`` are valid (the training sampler offsets them by epoch), so each
    epoch sees fresh tasks while every task stays reproducible.
    """

    def __init__(self, source: TaskSource, num_tasks: int, seed: int, split: str) -> None:
        if num_tasks < 1:
            raise ConfigError(f"the number of {split} tasks must be >= 1, got {num_tasks}")
        self.source = source
        self.num_tasks = num_tasks
        self.seed = seed
        self.split_key = SPLITS.index(split)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int) -> TaskBatch:
        rng = np.random.default_rng([self.seed, self.split_key, index])
        return self.source.sample(rng)


class EpochSampler(Sampler[int]):
    """Yields ``epoch * n .. epoch * n + n - 1``: new tasks every epoch, the same ones on resume.

    Lightning calls :meth:`set_epoch` on a loader's sampler at the start of every epoch.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_tasks

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.num_tasks
        return iter(range(start, start + self.num_tasks))


def shuffled_labels(ways: int, rng: np.random.Generator) -> Tensor:
    """A random assignment of labels 0..ways-1 to the task's classes (so no class owns a label)."""
    return torch.from_numpy(rng.permutation(ways))
