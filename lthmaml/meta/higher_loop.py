"""MAML's inner loop through ``higher``: one task at a time, on a functional copy of the net."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import higher
import torch
from torch import Tensor, nn

from lthmaml.meta.metrics import task_loss


class Adapted:
    """Enters ``higher``'s context, takes the inner steps, and yields the adapted functional net.

    The inner optimizer is plain SGD with one parameter group per tensor, so learned rates
    (``rates``, one per parameter) map one to one. ``masks`` (by parameter name) multiply each
    step's gradient: a pruned entry, stored as zero, stays zero in every adapted weight.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float,
        rates: Optional[list[Tensor]],
        support_x: Tensor,
        support_y: Tensor,
        steps: int,
        track_higher_grads: bool,
        masks: Optional[Mapping[str, Tensor]] = None,
    ) -> None:
        optimizer = torch.optim.SGD([{"params": [p]} for p in net.parameters()], lr=lr)
        self.ctx = higher.innerloop_ctx(
            net,
            optimizer,
            copy_initial_weights=False,
            track_higher_grads=track_higher_grads,
            override=None if rates is None else {"lr": rates},
        )
        masks = masks or {}
        self.masks = [masks.get(name) for name, _ in net.named_parameters()] if masks else None
        self.support_x, self.support_y, self.steps = support_x, support_y, steps

    def _masked(self, grads: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
        return [g if m is None or g is None else g * m for g, m in zip(grads, self.masks)]

    def __enter__(self) -> nn.Module:
        fnet, diffopt = self.ctx.__enter__()
        callback = None if self.masks is None else self._masked
        for _ in range(self.steps):
            diffopt.step(task_loss(fnet(self.support_x), self.support_y), grad_callback=callback)
        return fnet

    def __exit__(self, *exc) -> None:
        self.ctx.__exit__(*exc)
