"""N-way K-shot classification tasks drawn from a pool of classes (torchmeta's ClassSplitter idea)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lthmaml.data.augment import Affine
from lthmaml.data.tasks import TaskBatch, shuffled_labels
from lthmaml.errors import ConfigError

ROTATIONS = 4
"""Rotation class augmentation: each image class at 0/90/180/270 degrees is a class of its own."""


def check_pool(
    split: str,
    ways: int,
    shots: int,
    query_shots: int,
    classes: int,
    examples: int,
    rotations: bool = False,
    ways_option: str = "ways",
    more_classes: str = "add classes",
) -> None:
    """A ``split`` of ``classes`` classes (times four with ``rotations``) of at least ``examples``
    images each can make ``ways``-way episodes of ``shots`` + ``query_shots`` images a class: else a
    ConfigError naming the split, the option and the fix (``more_classes`` says how to add some)."""
    query = "query_shots" if split == "train" else "eval_query_shots"
    if ways < 1 or shots < 1 or query_shots < 1:
        raise ConfigError(
            f"data.init_args.{ways_option}, shots and {query} must be >= 1 "
            f"(got {ways}, {shots}, {query_shots})"
        )
    pool = classes * (ROTATIONS if rotations else 1)
    if ways > pool:
        raise ConfigError(
            f"data.init_args.{ways_option}={ways} but the {split} split has only {pool} classes"
            f"{' (rotations included)' if rotations else ''}: lower data.init_args.{ways_option}, or "
            f"{more_classes}"
        )
    if shots + query_shots > examples:
        raise ConfigError(
            f"data.init_args.shots + data.init_args.{query} = {shots + query_shots} but the {split} split "
            f"has only {examples} examples per class: lower data.init_args.shots or data.init_args.{query}"
        )


class FewShotTasks:
    """Draws ``ways`` classes, then ``shots`` support and ``query_shots`` query images of each.

    Args:
        images: ``[classes, examples, channels, height, width]`` images (all classes of a split);
            or, with ``counts``, ``[images, channels, height, width]`` with class ``i`` the
            ``counts[i]`` rows after the classes before it (classes of different sizes).
        ways, shots, query_shots: the episode shape.
        rotations: multiply the class pool by four rotations (Santoro et al.; used on meta-train).
        flips: mirror each drawn image left to right with probability 1/2 (label-preserving, for
            photos; the extra draws leave tasks without flips as they were).
        prepare: turns the drawn images into the net's input (uint8 pixels to normalised floats),
            so a split stays in memory as uint8; None: the images are the input.
        name: the split's name, for error messages.
        groups: a group per class (Omniglot's alphabet); with it every task draws its ``ways``
            classes from one group (Lake et al.'s within-alphabet tasks), the group at random among
            those with classes enough.
        affine: distort every drawn image at random (:class:`~lthmaml.data.augment.Affine`).
        support_copies: add this many randomly distorted copies of each support image to the
            support set (``jitter`` the distortion): adaptation sees more views of each example.
        jitter: the distortion of the support copies (default: Koch et al.'s ranges).
    """

    def __init__(
        self,
        images: Tensor,
        ways: int,
        shots: int,
        query_shots: int,
        rotations: bool = False,
        name: str = "train",
        counts: Optional[Sequence[int]] = None,
        flips: bool = False,
        prepare: Optional[Callable[[Tensor], Tensor]] = None,
        groups: Optional[Sequence[int]] = None,
        affine: Optional[Affine] = None,
        support_copies: int = 0,
        jitter: Optional[Affine] = None,
    ) -> None:
        if images.dim() != (4 if counts is not None else 5):
            shape = "[images, C, H, W] with counts" if counts is not None else "[classes, examples, C, H, W]"
            raise ValueError(f"images must be {shape}, got {tuple(images.shape)}")
        self.images = images
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.rotations = ROTATIONS if rotations else 1
        self.flips, self.prepare = flips, prepare
        self.counts = list(counts) if counts is not None else None
        self.offsets = (
            None if counts is None else np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        )
        classes = len(self.counts) if counts is not None else images.shape[0]
        examples = min(self.counts, default=0) if counts is not None else images.shape[1]
        check_pool(name, ways, shots, query_shots, classes, examples, rotations)
        if support_copies < 0:
            raise ConfigError(
                f"data.init_args.support_augmentation must be >= 0 copies, got {support_copies}"
            )
        self.affine, self.support_copies = affine, support_copies
        self.jitter = jitter or Affine()
        self.members: Optional[list[np.ndarray]] = None
        """Per group with classes enough for a task, its pooled classes (rotations included)."""
        if groups is not None:
            pooled = np.repeat(np.asarray(groups), self.rotations)  # pooled class c is class c // rotations
            members = [np.flatnonzero(pooled == g) for g in sorted(set(groups))]
            self.members = [m for m in members if len(m) >= ways]
            if not self.members:
                largest = max(len(m) for m in members)
                raise ConfigError(
                    f"data.init_args.task_sampling within_alphabet: no alphabet of the {name} split has "
                    f"{ways} characters (the largest has {largest}): lower data.init_args.ways"
                )

    @property
    def num_classes(self) -> int:
        classes = len(self.counts) if self.counts is not None else self.images.shape[0]
        return classes * self.rotations

    def sample(self, rng: np.random.Generator) -> TaskBatch:
        per_class = self.shots + self.query_shots
        if self.members is None:
            chosen = rng.choice(self.num_classes, size=self.ways, replace=False)
        else:
            group = self.members[rng.integers(len(self.members))]
            chosen = rng.choice(group, size=self.ways, replace=False)
        labels = shuffled_labels(self.ways, rng)
        support, query = [], []
        for pooled_class in chosen:
            image_class, quarter_turns = divmod(int(pooled_class), self.rotations)
            if self.counts is None:
                picks = torch.from_numpy(rng.choice(self.images.shape[1], size=per_class, replace=False))
                images = self.images[image_class, picks]
            else:
                picks = rng.choice(self.counts[image_class], size=per_class, replace=False)
                images = self.images[torch.from_numpy(self.offsets[image_class] + picks)]
            if quarter_turns:
                images = torch.rot90(images, quarter_turns, dims=(-2, -1))
            if self.flips:
                mirrored = torch.from_numpy(rng.random(per_class) < 0.5)
                images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
            support.append(images[: self.shots])
            query.append(images[self.shots :])
        support_y = labels.repeat_interleave(self.shots)
        query_y = labels.repeat_interleave(self.query_shots)
        support_x, query_x = torch.cat(support), torch.cat(query)
        if self.affine is not None:
            support_x, query_x = self.affine(support_x, rng), self.affine(query_x, rng)
        if self.support_copies:
            copies = [self.jitter(support_x, rng) for _ in range(self.support_copies)]
            support_x = torch.cat([support_x, *copies])
            support_y = support_y.repeat(self.support_copies + 1)
        if self.prepare is not None:
            support_x, query_x = self.prepare(support_x), self.prepare(query_x)
        return TaskBatch(support_x, support_y, query_x, query_y)
