"""Episodic data: tasks, samplers, sources (sinusoid, Omniglot) and DataModules.

The names below load their module on first use (PEP 562), so a device that only reads a task
folder (``lthmaml.data.taskfolder``) never imports the meta-training data code.
"""

from lthmaml._lazy import lazy_exports

_HOMES = {
    "OmniglotClassificationDataModule": "classification",
    "EpisodicDataModule": "datamodule",
    "OmniglotDataModule": "datamodule",
    "SinusoidDataModule": "datamodule",
    "FewShotTasks": "fewshot",
    "OmniglotImages": "omniglot",
    "load_omniglot": "omniglot",
    "split_classes": "omniglot",
    "SinusoidTasks": "sinusoid",
    "TaskFolderDataModule": "taskfolder",
    "check_compatible": "taskfolder",
    "read_image": "taskfolder",
    "make_image_task": "taskfolder_build",
    "make_sinusoid_task": "taskfolder_build",
    "EpisodeDataset": "tasks",
    "EpochSampler": "tasks",
    "TaskBatch": "tasks",
}
__getattr__, __all__ = lazy_exports(__name__, _HOMES)
