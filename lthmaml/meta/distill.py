"""Knowledge distillation (Hinton et al. 2015) from a dense teacher into the net being trained.

A lottery ticket's later rounds train a sparse net; with a distillation attached, each task's
training objective (its query loss) gains ``weight * T^2 * KL(softmax(teacher / T) ||
softmax(student / T))`` on the query set, the teacher being the dense net of round 0 adapted to
the same task. The teacher's logits are constants: nothing flows back into it, and it is not a
submodule of the student, so it is neither optimised nor saved in the student's checkpoints. With
weight 0 the term is skipped altogether, so training is bit-identical to training without it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lthmaml.errors import ConfigError


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the examples.

    ``[examples, classes]`` logits (log-probabilities are logits too). The ``T^2`` keeps the
    gradient's scale independent of ``T``, as in Hinton et al.
    """
    if student_logits.shape[-1] < 2:
        raise ConfigError(
            "distillation compares class distributions: the outputs have "
            f"{student_logits.shape[-1]} column(s), not classes (a regression task?)"
        )
    return temperature**2 * F.kl_div(
        (student_logits / temperature).log_softmax(-1),
        (teacher_logits / temperature).log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )


def check_options(owner: str, weight: float, temperature: float) -> None:
    """A one-line ConfigError for a weight that is not a number >= 0 or a temperature not > 0."""
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"{owner}.distill_weight must be a number >= 0, got {weight!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"{owner}.distill_temperature must be a number > 0, got {temperature!r}")


@dataclass(frozen=True)
class Distillation:
    """What a learner distils from: a frozen ``teacher`` learner, the term's weight and temperature."""

    teacher: Distillable
    weight: float
    temperature: float = 4.0

    def loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The term one task's (or batch's) objective adds."""
        return self.weight * distillation_loss(student_logits, teacher_logits, self.temperature)


class Distillable:
    """A learner whose training objective can take a distillation term (MAML, the metric learners,
    the Classifier): it says what its query logits are, the teacher's side of the term."""

    distillation: Optional[Distillation] = None
    """The teacher to distil from while training (set by ``LotteryTicket`` or the learner's own
    options); a plain attribute, not a submodule: not in the state_dict, not optimised."""

    def query_logits(self, batch: Any) -> list[Tensor]:
        """Each task's query logits as this learner evaluates them (the Classifier: the batch's
        logits, one entry), without a graph: the teacher's outputs."""
        raise NotImplementedError

    def teacher_logits(self, batch: Any) -> Optional[list[Tensor]]:
        """The attached teacher's query logits for ``batch``, constants; None when there is no
        term to add (no teacher, or weight 0), so the objective is computed exactly as without."""
        if self.distillation is None or self.distillation.weight == 0:
            return None
        return [logits.detach() for logits in self.distillation.teacher.query_logits(batch)]


def load_teacher(student: Distillable, checkpoint: Path) -> Distillable:
    """A frozen copy of ``student`` holding the weights and masks recorded in ``checkpoint``.

    A copy of the student's own learner, so the teacher computes its query logits as the student
    does (inner loop, metric, hyperparameters), on the student's device, and a net built outside
    the CLI loads too (``load_from_checkpoint`` needs the net's config in the hyperparameters).
    """
    if not checkpoint.is_file():
        raise ConfigError(f"the distillation teacher's checkpoint {checkpoint} does not exist")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    # Neither the student's own teacher nor its trainer (and with it the data) is copied.
    skip = [student.distillation, getattr(student, "_trainer", None)]
    teacher = copy.deepcopy(student, {id(item): None for item in skip if item is not None})
    try:
        teacher.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(
            f"the teacher checkpoint {checkpoint} does not hold this {type(student).__name__}'s net: "
            f"{str(error).splitlines()[0]}"
        ) from None
    return teacher.eval().requires_grad_(False)
