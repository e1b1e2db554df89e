"""Episodic data: tasks, samplers, sources (sinusoid, Omniglot) and DataModules."""

from lthmaml.data.datamodule import EpisodicDataModule, OmniglotDataModule, SinusoidDataModule
from lthmaml.data.fewshot import FewShotTasks
from lthmaml.data.omniglot import OmniglotImages, load_omniglot, split_classes
from lthmaml.data.sinusoid import SinusoidTasks
from lthmaml.data.tasks import EpisodeDataset, EpochSampler, TaskBatch

__all__ = [
    "EpisodeDataset",
    "EpisodicDataModule",
    "EpochSampler",
    "FewShotTasks",
    "OmniglotDataModule",
    "OmniglotImages",
    "SinusoidDataModule",
    "SinusoidTasks",
    "TaskBatch",
    "load_omniglot",
    "split_classes",
]
