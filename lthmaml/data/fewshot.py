"""N-way K-shot classification tasks drawn from a pool of classes (torchmeta's ClassSplitter idea)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lthmaml.data.tasks import TaskBatch, shuffled_labels
from lthmaml.errors import ConfigError

ROTATIONS = 4
"""Rotation class augmentation: each image class at 0/90/180/270 degrees is a class of its own."""


class FewShotTasks:
    """Draws ``ways`` classes, then ``shots`` support and ``query_shots`` query images of each.

    Args:
        images: ``[classes, examples, channels, height, width]`` float images (all classes of a split).
        ways, shots, query_shots: the episode shape.
        rotations: multiply the class pool by four rotations (Santoro et al.; used on meta-train).
        name: the split's name, for error messages.
    """

    def __init__(
        self,
        images: Tensor,
        ways: int,
        shots: int,
        query_shots: int,
        rotations: bool = False,
        name: str = "train",
    ) -> None:
        if images.dim() != 5:
            raise ValueError(f"images must be [classes, examples, C, H, W], got {tuple(images.shape)}")
        self.images = images
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.rotations = ROTATIONS if rotations else 1
        classes, examples = images.shape[:2]
        pool = classes * self.rotations
        if ways < 1 or shots < 1 or query_shots < 1:
            raise ConfigError(
                f"data.ways, data.shots, data.query_shots must be >= 1 (got {ways}, {shots}, {query_shots})"
            )
        if ways > pool:
            raise ConfigError(
                f"data.ways={ways} but the {name} split has only {pool} classes"
                f"{' (rotations included)' if rotations else ''}: lower data.ways or add classes"
            )
        if shots + query_shots > examples:
            query = "query_shots" if name == "train" else "eval_query_shots"
            raise ConfigError(
                f"data.shots + data.{query} = {shots + query_shots} but the {name} split has only "
                f"{examples} examples per class: lower data.shots or data.{query}"
            )

    @property
    def num_classes(self) -> int:
        return self.images.shape[0] * self.rotations

    def sample(self, rng: np.random.Generator) -> TaskBatch:
        per_class = self.shots + self.query_shots
        examples = self.images.shape[1]
        chosen = rng.choice(self.num_classes, size=self.ways, replace=False)
        labels = shuffled_labels(self.ways, rng)
        support, query = [], []
        for pooled_class in chosen:
            image_class, quarter_turns = divmod(int(pooled_class), self.rotations)
            picks = torch.from_numpy(rng.choice(examples, size=per_class, replace=False))
            images = self.images[image_class, picks]
            if quarter_turns:
                images = torch.rot90(images, quarter_turns, dims=(-2, -1))
            support.append(images[: self.shots])
            query.append(images[self.shots :])
        support_y = labels.repeat_interleave(self.shots)
        query_y = labels.repeat_interleave(self.query_shots)
        return TaskBatch(torch.cat(support), support_y, torch.cat(query), query_y)
