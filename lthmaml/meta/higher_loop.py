"""MAML's inner loop through ``higher``: one task at a time, on a functional copy of the net."""

from __future__ import annotations

from typing import Optional

import higher
import torch
from torch import Tensor, nn

from lthmaml.meta.metrics import task_loss


class Adapted:
    """Enters ``higher``'s context, takes the inner steps, and yields the adapted functional net.

    The inner optimizer is plain SGD with one parameter group per tensor, so learned rates
    (``rates``, one per parameter) map one to one.
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
    ) -> None:
        optimizer = torch.optim.SGD([{"params": [p]} for p in net.parameters()], lr=lr)
        self.ctx = higher.innerloop_ctx(
            net,
            optimizer,
            copy_initial_weights=False,
            track_higher_grads=track_higher_grads,
            override=None if rates is None else {"lr": rates},
        )
        self.support_x, self.support_y, self.steps = support_x, support_y, steps

    def __enter__(self) -> nn.Module:
        fnet, diffopt = self.ctx.__enter__()
        for _ in range(self.steps):
            diffopt.step(task_loss(fnet(self.support_x), self.support_y))
        return fnet

    def __exit__(self, *exc) -> None:
        self.ctx.__exit__(*exc)
