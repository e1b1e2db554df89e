"""Episodic data: tasks, samplers, sources (sinusoid, Omniglot, image folders) and DataModules;
classification data (Omniglot, a graph's nodes) for the supervised classifier.

The names below load their module on first use (PEP 562), so a device that only reads a task
folder (``lthmaml.data.taskfolder``) never imports the meta-training data code.
"""

from lthmaml._lazy import lazy_exports

_HOMES = {
    "OmniglotClassificationDataModule": "classification",
    "EpisodicDataModule": "datamodule",
    "ImageTasksDataModule": "datamodule",
    "OmniglotDataModule": "datamodule",
    "SinusoidDataModule": "datamodule",
    "FewShotTasks": "fewshot",
    "ImageFolderDataModule": "folders",
    "Graph": "graph",
    "KarateClubDataModule": "graph",
    "load_graph": "graph",
    "Normalization": "images",
    "decode_image": "images",
    "read_image": "images",
    "OmniglotImages": "omniglot",
    "load_omniglot": "omniglot",
    "split_classes": "imageset",
    "SinusoidTasks": "sinusoid",
    "TaskFolderDataModule": "taskfolder",
    "check_compatible": "taskfolder",
    "make_image_task": "taskfolder_build",
    "make_sinusoid_task": "taskfolder_build",
    "EpisodeDataset": "tasks",
    "EpochSampler": "tasks",
    "TaskBatch": "tasks",
}
__getattr__, __all__ = lazy_exports(__name__, _HOMES)
