"""Episodic data: tasks, samplers, sources (sinusoid, Omniglot) and DataModules."""

from lthmaml.data.classification import OmniglotClassificationDataModule
from lthmaml.data.datamodule import EpisodicDataModule, OmniglotDataModule, SinusoidDataModule
from lthmaml.data.fewshot import FewShotTasks
from lthmaml.data.omniglot import OmniglotImages, load_omniglot, split_classes
from lthmaml.data.sinusoid import SinusoidTasks
from lthmaml.data.taskfolder import TaskFolderDataModule, check_compatible, read_image
from lthmaml.data.taskfolder_build import make_image_task, make_sinusoid_task
from lthmaml.data.tasks import EpisodeDataset, EpochSampler, TaskBatch

__all__ = [
    "EpisodeDataset",
    "EpisodicDataModule",
    "EpochSampler",
    "FewShotTasks",
    "OmniglotClassificationDataModule",
    "OmniglotDataModule",
    "OmniglotImages",
    "SinusoidDataModule",
    "SinusoidTasks",
    "TaskBatch",
    "load_omniglot",
    "split_classes",
    "TaskFolderDataModule",
    "check_compatible",
    "make_image_task",
    "make_sinusoid_task",
    "read_image",
]
