"""A validation split for a task folder that brings none, so early stopping can run on the device.

A fine-tune that stops early needs held-out labelled examples. A task with ``val/`` has them; one
without (the common few-shot case) gets them from its support set:

* ``holdout``: with more than one example per class, ``per_class`` examples of every class leave
  the support set for validation (chosen by a seeded permutation; each class keeps at least one);
* ``augment``: for 1-shot tasks, where nothing can be held out, ``copies`` transformed versions of
  every support image: the small label-preserving changes a phone camera makes between two shots
  of the same thing (a shift of up to ``max_shift`` of the width, a rotation of up to
  ``max_degrees``, a scale within ``1 +- max_scale``), seeded, so a validation reads "does the net
  still recognise its own examples when they move a little" rather than "does it memorise pixels".

Both return :class:`~lthmaml.data.taskfolder.TaskSplit` objects (file names tell where each
example came from, e.g. ``val:cat/1.png#aug2``) and a one-line description for the log.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Validation = Literal["auto", "folder", "holdout", "augment", "none"]
"""How a task's validation split is found: ``folder`` (``val/`` or ``val.csv``), ``holdout``,
``augment``, ``none``; ``auto`` takes the folder if there is one, else none. A derived split is
asked for by name, never chosen for the user: stopping on one can cost accuracy against the
meta-learned inner steps, because the net still improves on new images after it is perfect on its
own support images moved a little (docs/benchmarks.md, ``bench/early_stopping.py``)."""


def holdout_per_class(y: Tensor, per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, held_out)`` of a labelled set: ``per_class`` of each class held out,
    at least one kept per class (a class with fewer examples gives fewer)."""
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        take = min(per_class, len(members) - 1)
        held.append(members[:take])
        kept.append(members[take:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def camera_jitter(
    x: Tensor,
    copies: int,
    seed: int,
    max_shift: float = 0.1,
    max_degrees: float = 10.0,
    max_scale: float = 0.1,
) -> Tensor:
    """``[copies * n, C, H, W]``: every image of ``x`` (``[n, C, H, W]``, paper 0) moved
    ``copies`` times by a random affine map (shift, rotation, scale), copy-major order."""
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0] * copies

    def uniform(bound: float) -> Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    angle = uniform(math.radians(max_degrees))
    scale = 1 + uniform(max_scale)
    shift = torch.stack([uniform(2 * max_shift), uniform(2 * max_shift)], 1)  # grid units: 2 = width
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    images = x.repeat(copies, 1, 1, 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def derive_validation(
    support: Any, own: Any, task: str, how: Validation, per_class: int = 1, copies: int = 4, seed: int = 0
) -> tuple[Any, Any, str]:
    """The splits a fine-tune uses for ``how``, given a task folder's ``support`` and its ``own``
    val split (None if it has none): ``(train, val, description)``, where ``train`` is the support
    set minus what ``holdout`` moved to ``val`` (else ``support`` itself), ``val`` is None for no
    validation, and the description says what was used, for the log."""
    from dataclasses import replace

    from lthmaml.errors import ConfigError, DataError

    if how == "auto":
        how = "folder" if own else "none"
    if how == "folder":
        if own is None:
            raise DataError(
                "data.validation is folder but the task has no val/ (or val.csv): add one, or set "
                "data.validation to auto, holdout or augment"
            )
        return support, own, f"the task's own val split ({len(own)} examples)"
    unused = " (its own val split unused)" if own is not None else ""
    if how == "none":
        return support, None, f"none{unused}"
    if how == "holdout":
        labels = support.y if task == "classification" else torch.zeros(len(support), dtype=torch.int64)
        kept, held = holdout_per_class(labels, per_class, seed)
        if len(held) == 0:
            raise DataError(
                "data.validation holdout needs 2 or more support examples per class: this task has one; "
                "use data.validation augment (1-shot) or add a val/ folder"
            )

        def pick(indices: Tensor, tag: str = "") -> Any:
            files = [tag + support.files[i] for i in indices]
            return replace(support, x=support.x[indices], y=support.y[indices], files=files)

        description = (
            f"{len(held)} support examples held out ({per_class} per class, seed {seed}), "
            f"{len(kept)} left to fine-tune on{unused}"
        )
        return pick(kept), pick(held, "support:"), description
    if how == "augment":
        if task != "classification":
            raise ConfigError("data.validation augment transforms images: for regression use holdout or none")
        x = camera_jitter(support.x, copies, seed)
        files = [f"support:{name}#aug{copy}" for copy in range(copies) for name in support.files]
        description = (
            f"{len(x)} camera-jittered copies of the {len(support)} support images (shift <= 10%, "
            f"rotation <= 10 degrees, scale within 10%, seed {seed}){unused}"
        )
        return support, replace(support, x=x, y=support.y.repeat(copies), files=files), description
    raise ConfigError(f"data.validation must be auto, folder, holdout, augment or none, got {how!r}")
