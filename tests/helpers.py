"""What many test files need: a quiet CPU Trainer and tiny few-shot image tasks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lthmaml.data import EpisodicDataModule, FewShotTasks

QUIET = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    inference_mode=False,  # MAML adapts with gradients in validation and test
    num_sanity_val_steps=0,
    limit_val_batches=0,
    accelerator="cpu",
)


TINY_FIT = [
    *("--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"),
    *("--data.init_args.tasks_per_epoch", "50", "--data.init_args.meta_batch_size", "10"),
    *("--data.init_args.val_tasks", "20", "--data.init_args.test_tasks", "20"),
]
"""CLI overrides that shrink an episodic config's fit to 5 meta-steps and 20-task evaluations."""


def sgd_lr1(params):
    """With SGD at lr 1, one meta-step moves each parameter by exactly minus its meta-gradient."""
    return torch.optim.SGD(params, lr=1.0)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A Trainer that writes nothing and skips validation unless ``kwargs`` say otherwise."""
    return pl.Trainer(**{**QUIET, **kwargs})


class TinyImageTasks(EpisodicDataModule):
    """3-way 1-shot tasks (2 query images a class) on 8x8 random images: exact checks stay cheap."""

    ways = 3

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.images = torch.rand(8, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def task_source(self, split):
        return FewShotTasks(self.images, ways=3, shots=1, query_shots=2, name=split)
