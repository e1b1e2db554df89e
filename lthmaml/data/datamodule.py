"""Lightning DataModules that serve meta-batches of tasks."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lthmaml.data.augment import Affine
from lthmaml.data.fewshot import ROTATIONS, FewShotTasks, check_pool
from lthmaml.data.images import IMAGE_LOOK, Look, Normalization, channels
from lthmaml.data.imageset import SplitSpec, check_class_split, split_classes
from lthmaml.data.omniglot import OmniglotImages, load_omniglot
from lthmaml.data.sinusoid import SinusoidTasks
from lthmaml.data.tasks import SPLITS, EpisodeDataset, EpochSampler, TaskSource
from lthmaml.errors import ConfigError

STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": SPLITS,  # test too: --test_after_fit and a pruning run's rounds test after the fit
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
"""The splits whose episodes a Trainer stage draws (predict draws the test tasks)."""


def check_episode(ways: Optional[int], shots: int, query_shots: int) -> None:
    """An episode that can be learned and scored: at least 2 classes (``ways`` None: regression),
    1 support and 1 query example each. Fewer gives a negative dimension in torch, or a task with
    nothing to adapt on or a 1-way task scored 100%."""
    if ways is not None and ways < 2:
        raise ConfigError(f"data.init_args.ways must be >= 2 (classification needs two classes), got {ways}")
    for name, value in (("shots", shots), ("query_shots", query_shots)):
        if value < 1:
            raise ConfigError(f"data.init_args.{name} must be >= 1 example, got {value}")


class EpisodicDataModule(pl.LightningDataModule, ABC):
    """Training tasks are fresh every epoch; validation and test tasks are fixed by ``seed``.

    Under a distributed strategy (``trainer.world_size`` ranks) every count here stays a total
    over all ranks: rank ``r`` loads the tasks ``r, r + world_size, ...`` of the single-process
    order, ``meta_batch_size // world_size`` at a time. So each meta-update sees the same tasks
    as in one process, and validation and test cover their sets exactly once (docs/distributed.md).

    Args:
        meta_batch_size: tasks per meta-update (and per evaluation batch), summed over all ranks;
            a multiple of the number of ranks.
        tasks_per_epoch: training tasks per epoch (``tasks_per_epoch // meta_batch_size`` steps).
        val_tasks, test_tasks: sizes of the fixed evaluation sets (600 test tasks as in MAML).
        seed: keys every task; two evaluations of one model give identical numbers.
        num_workers: DataLoader worker processes (sampling and augmentation leave the training
            process: worth it on a GPU, where the meta-update no longer dominates).
        pin_memory: page-locked batches for faster host-to-GPU copies (None: when CUDA is present).
        eval_query_shots: query examples per class (per task for regression) in validation, test
            and predict tasks; None: the training ``query_shots``. Meta-training learns fastest on
            small query sets (MAML's Omniglot code trains on K per class), while the test metric
            wants many for its precision: the two are set apart.
    """

    query_shots: int

    def __init__(
        self,
        meta_batch_size: int = 32,
        tasks_per_epoch: int = 3200,
        val_tasks: int = 200,
        test_tasks: int = 600,
        seed: int = 0,
        num_workers: int = 0,
        eval_query_shots: Optional[int] = None,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if eval_query_shots is not None and eval_query_shots < 1:
            raise ConfigError(f"data.init_args.eval_query_shots must be >= 1 example, got {eval_query_shots}")
        self.eval_query_shots = eval_query_shots
        if meta_batch_size < 1:
            raise ConfigError(f"data.init_args.meta_batch_size must be >= 1 task, got {meta_batch_size}")
        self.meta_batch_size = meta_batch_size
        self.tasks_per_epoch = tasks_per_epoch
        self.val_tasks = val_tasks
        self.test_tasks = test_tasks
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def split_query_shots(self, split: str) -> int:
        """Query examples of a ``split``'s tasks: ``query_shots`` in training, else ``eval_query_shots``."""
        if split == "train" or self.eval_query_shots is None:
            return self.query_shots
        return self.eval_query_shots

    @abstractmethod
    def task_source(self, split: str) -> TaskSource:
        """The task distribution of ``split`` (train, val or test)."""

    def _loader(self, split: str, num_tasks: int, train: bool) -> DataLoader:
        dataset = EpisodeDataset(self.task_source(split), num_tasks, self.seed, split)
        ranks, rank = self._ranks()
        if self.meta_batch_size % ranks:
            raise ConfigError(
                f"data.meta_batch_size={self.meta_batch_size} is the meta-batch over all {ranks} ranks "
                "(devices x nodes): make it a multiple of that"
            )
        if train and num_tasks < self.meta_batch_size:
            raise ConfigError(
                f"data.init_args.tasks_per_epoch={num_tasks} is less than one meta-batch "
                f"(data.init_args.meta_batch_size={self.meta_batch_size}): no training step; raise it"
            )
        if not train and num_tasks < ranks:
            raise ConfigError(f"data.{split}_tasks={num_tasks} leaves some of the {ranks} ranks no task")
        sampler: Optional[Sampler] = EpochSampler(num_tasks) if train else None
        # Our own shards, so that Lightning injects none of its samplers: its training wrapper
        # shuffles the epoch, and its evaluation sampler repeats tasks to even the ranks out.
        shard = dict(num_replicas=ranks, rank=rank, shuffle=False)
        if ranks > 1 and train:  # strided, so step k's shards are step k's tasks of one process
            sampler = DistributedSamplerWrapper(sampler, drop_last=True, **shard)
        elif ranks > 1:
            sampler = UnrepeatedDistributedSampler(dataset, **shard)
        return DataLoader(
            dataset,
            batch_size=self.meta_batch_size // ranks,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _ranks(self) -> tuple[int, int]:
        """(number of ranks, this rank) of the attached trainer; (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.tasks_per_epoch, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_tasks, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.test_tasks, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class SinusoidDataModule(EpisodicDataModule):
    """Sinusoid regression; every split draws from the same continuous task distribution.

    Args:
        shots: K support points per task.
        query_shots: query points per task (the meta-loss during training, the metric at test).
    """

    def __init__(self, shots: int = 5, query_shots: int = 10, meta_batch_size: int = 25, **kwargs) -> None:
        super().__init__(meta_batch_size=meta_batch_size, **kwargs)
        check_episode(None, shots, query_shots)
        self.shots = shots
        self.query_shots = query_shots

    def task_source(self, split: str) -> SinusoidTasks:
        return SinusoidTasks(shots=self.shots, query_shots=self.split_query_shots(split))


class ImageTasksDataModule(EpisodicDataModule):
    """N-way K-shot classification on classes of images split into meta-train, val and test: what
    the Omniglot and image-folder modules share. Subclasses read in :meth:`setup` (building the
    module stays instant for ``--print_config``) and draw a split's tasks in :meth:`split_tasks`.

    The look (``ink``, ``gray``, ``rgb``: :mod:`lthmaml.data.images`) and the normalisation of
    the meta-train images go into the checkpoint (:meth:`state_dict`, under :data:`IMAGE_LOOK`),
    so the exported artifact tells the device how to decode its photos.
    """

    look: Look = "ink"

    def __init__(
        self,
        ways: int,
        shots: int,
        query_shots: int,
        image_size: int,
        train_ways: Optional[int] = None,
        augment_affine: Union[bool, Affine] = False,
        support_augmentation: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if support_augmentation < 0:
            raise ConfigError(
                f"data.init_args.support_augmentation must be >= 0 copies, got {support_augmentation}"
            )
        self.augment_affine: Optional[Affine] = (
            Affine() if augment_affine is True else augment_affine or None  # type: ignore[assignment]
        )
        """Random affine distortions of every meta-training image (True: Koch et al.'s ranges)."""
        self.support_augmentation = support_augmentation
        """Distorted copies of each support image added to validation and test tasks' support."""
        check_episode(ways, shots, query_shots)
        if train_ways is not None and train_ways < 2:
            raise ConfigError(
                f"data.init_args.train_ways must be >= 2 classes or null (ways), got {train_ways}"
            )
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.train_ways = train_ways
        """Classes of a meta-training episode when not ``ways``: Snell et al. train Prototypical
        Networks on 60-way episodes for 5- and 20-way tests (a learner without a ``ways``-wide head)."""
        self.image_size = image_size
        self.normalization = Normalization.identity(self.look)
        self.class_indices: dict[str, list[int]] = {}
        self._sources: dict[str, FewShotTasks] = {}

    def split_ways(self, split: str) -> int:
        """Classes of a ``split``'s episodes: ``train_ways`` (if set) in training, else ``ways``."""
        return self.train_ways if split == "train" and self.train_ways is not None else self.ways

    def split_rotations(self, split: str) -> bool:
        """Whether ``split``'s classes also count at 90/180/270 degrees (rotation augmentation)."""
        return False

    def split_augmentation(self, split: str) -> dict[str, Any]:
        """:class:`~lthmaml.data.fewshot.FewShotTasks` options of ``split``: distortions on
        meta-train, distorted support copies on validation and test."""
        if split == "train":
            return {"affine": self.augment_affine}
        return {"support_copies": self.support_augmentation}

    def check_splits(self, stage: Optional[str], class_sizes: Sequence[int]) -> None:
        """Each split the Trainer ``stage`` draws from has classes enough for its episodes, and
        images enough in each (``class_sizes``: images per class, by index): checked in setup, as
        the data is read. Drawn only when a split's loader is first made, a test split too small
        would fail after the whole fit. Without a stage (tasks drawn outside a Trainer) each split
        is checked as it is drawn (:class:`~lthmaml.data.fewshot.FewShotTasks`)."""
        for split in STAGE_SPLITS.get(stage or "", ()):
            indices = self.class_indices[split]
            check_pool(
                split,
                self.split_ways(split),
                self.shots,
                self.split_query_shots(split),
                len(indices),
                min((class_sizes[i] for i in indices), default=0),
                self.split_rotations(split),
                "train_ways" if split == "train" and self.train_ways is not None else "ways",
                self.more_classes(split),
            )

    def more_classes(self, split: str) -> str:
        """How to give ``split`` more classes, for :meth:`check_splits`' message."""
        return f"add classes to the {split} split"

    def class_split_fix(self, split: str, classes: int) -> str:
        """:meth:`more_classes` where ``data.init_args.class_split`` divides ``classes`` classes: a
        split by counts that gives val and test ``ways`` classes each and the rest to training."""
        sizes = {name: len(self.class_indices[name]) for name in SPLITS}
        sizes.update({name: max(sizes[name], self.ways) for name in ("val", "test")})
        sizes["train"] = classes - sizes["val"] - sizes["test"]
        pool = sizes["train"] * (ROTATIONS if self.split_rotations("train") else 1)
        if sizes["train"] < 1 or pool < self.split_ways("train"):
            return f"add classes: {classes} cannot give each split the classes of an episode"
        counts = ", ".join(str(sizes[name]) for name in SPLITS)
        return f"give the {split} split more classes: data.init_args.class_split [{counts}] (class counts)"

    @abstractmethod
    def split_tasks(self, split: str) -> FewShotTasks:
        """The tasks of ``split``, after :meth:`setup`."""

    def task_source(self, split: str) -> FewShotTasks:
        if split not in self._sources:
            self.setup()
            self._sources[split] = self.split_tasks(split)
        return self._sources[split]

    def check_net_channels(self) -> None:
        """The attached model's net takes this look's channels: a ConfigError naming both
        options, not a shape error inside torch."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        taken = getattr(getattr(model, "net", None), "in_channels", None)
        if taken is not None and taken != channels(self.look):
            raise ConfigError(
                f"model.init_args.net.init_args.in_channels={taken} but data.init_args.look={self.look!r} "
                f"gives {channels(self.look)}: set in_channels {channels(self.look)} or another look"
            )

    def state_dict(self) -> dict[str, Any]:
        return {IMAGE_LOOK: {"look": self.look, "normalization": self.normalization.to_dict()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed or tested run keeps the checkpoint's normalisation (the net learned on it)."""
        saved = state_dict.get(IMAGE_LOOK)
        if saved is None:
            return
        if saved.get("look", "ink") != self.look:
            raise ConfigError(
                f"the checkpoint was meta-trained with look {saved.get('look')!r} but data.init_args.look "
                f"is {self.look!r}: give the look of its config.yaml"
            )
        stored = Normalization.parse(saved.get("normalization"), self.look)
        if stored != self.normalization:
            warnings.warn(
                f"the data's normalisation {self.normalization} differs from the checkpoint's {stored} "
                "(the images changed?): the checkpoint's is used",
                stacklevel=2,
            )
        self.normalization = stored

    def to_input(self, pixels: Tensor) -> Tensor:
        """Drawn uint8 pixels as the net's input, by the arithmetic the device uses."""
        return self.normalization.apply(pixels)


class OmniglotDataModule(ImageTasksDataModule):
    """N-way K-shot Omniglot classification (MAML section 5.2) on a seeded split of classes.

    Images are read in :meth:`setup`, not here, so that building the module (``--print_config``)
    stays instant.

    Args:
        root: folder with the official zips, their unpacked folders, or ``<alphabet>/<character>/*.png``.
        ways, shots, query_shots: the episode shape (N classes, K support and Q query images each);
            ``query_shots`` is meta-training's, ``eval_query_shots`` (default 15, as MAML tests)
            evaluation's.
        image_size: images are resized to ``image_size`` squared (28 in MAML).
        class_split: meta-train/val/test shares of the classes: fractions (floats) or counts (ints,
            e.g. ``[1200, 100, 323]`` for the full set).
        split_by_alphabet: split whole alphabets instead of characters.
        split_seed: keys the class permutation, apart from ``seed`` so that task seeds can vary on
            one split.
        augment_rotations: on meta-train, each class at 90/180/270 degrees is a new class.
        cache_dir: where decoded images are cached (default ``$LTHMAML_CACHE`` or ``~/.cache/lthmaml``).
        task_sampling: how validation and test tasks draw their classes: ``across`` alphabets
            (MAML's protocol) or ``within_alphabet`` (Lake et al.'s: all N from one alphabet, the
            harder one-shot problem; with ``split_by_alphabet`` the alphabets are unseen).
        train_task_sampling: how meta-training tasks draw theirs (``across`` by default;
            ``within_alphabet`` trains on the hard negatives that protocol tests on: one script's
            characters and their rotations).
        augment_affine: random affine distortions of each meta-training image (True: Koch et
            al.'s ranges; or the ranges, :class:`~lthmaml.data.augment.Affine`), composed with
            the rotations.
        support_augmentation: distorted copies of each support image added to every validation
            and test task's support set (0: none).
        **kwargs: :class:`EpisodicDataModule` arguments (meta_batch_size, tasks_per_epoch, ...).
    """

    def __init__(
        self,
        root: str,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        image_size: int = 28,
        class_split: SplitSpec = (0.6, 0.2, 0.2),
        split_by_alphabet: bool = False,
        split_seed: int = 0,
        augment_rotations: bool = True,
        cache_dir: Optional[str] = None,
        eval_query_shots: Optional[int] = 15,
        task_sampling: Literal["across", "within_alphabet"] = "across",
        train_task_sampling: Literal["across", "within_alphabet"] = "across",
        **kwargs,
    ) -> None:
        super().__init__(ways, shots, query_shots, image_size, eval_query_shots=eval_query_shots, **kwargs)
        check_class_split(class_split)
        for option, value in (("task_sampling", task_sampling), ("train_task_sampling", train_task_sampling)):
            if value not in ("across", "within_alphabet"):
                raise ConfigError(
                    f"data.init_args.{option} must be 'across' or 'within_alphabet', got {value!r}"
                )
        self.task_sampling, self.train_task_sampling = task_sampling, train_task_sampling
        self.root = root
        self.class_split = list(class_split)
        self.split_by_alphabet = split_by_alphabet
        self.split_seed = split_seed
        self.augment_rotations = augment_rotations
        self.cache_dir = cache_dir
        self.data: Optional[OmniglotImages] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            self.data = load_omniglot(self.root, self.image_size, self.cache_dir)
            self.class_indices = split_classes(
                self.data.classes, self.class_split, self.split_seed, self.split_by_alphabet
            )
        classes, drawers = self.data.images.shape[:2]
        self.check_splits(stage, [drawers] * classes)
        self.check_net_channels()

    def split_rotations(self, split: str) -> bool:
        return self.augment_rotations and split == "train"

    def more_classes(self, split: str) -> str:
        if self.split_by_alphabet:
            return f"give the {split} split a larger share of the alphabets in data.init_args.class_split"
        return self.class_split_fix(split, len(self.data.classes))

    def split_tasks(self, split: str) -> FewShotTasks:
        indices = self.class_indices[split]
        groups = None
        if (self.train_task_sampling if split == "train" else self.task_sampling) == "within_alphabet":
            alphabets = [self.data.classes[i].split("/", 1)[0] for i in indices]
            groups = [sorted(set(alphabets)).index(a) for a in alphabets]
        return FewShotTasks(
            self.data.images[indices],
            self.split_ways(split),
            self.shots,
            self.split_query_shots(split),
            rotations=self.split_rotations(split),
            name=split,
            groups=groups,
            **self.split_augmentation(split),
        )
