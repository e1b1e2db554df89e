"""Keep the best weights by a monitored metric: the lottery rounds and the edge fine-tune share it.

The improvement rule is ``EarlyStopping``'s: with ``mode="max"`` a value improves on the best if it
exceeds it by more than ``min_delta`` (``"min"``: falls below it by more than ``min_delta``); NaN
never improves. ``validations_since_best`` is what a patience rule counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional

from torch import Tensor

Mode = Literal["min", "max"]


class BestWeights:
    """The best value of ``monitor`` seen, where it was seen, and a copy of the weights then.

    Args:
        monitor: the metric name (for messages and records).
        mode: ``max`` or ``min``.
        min_delta: the margin a new value must beat the best by to count as better.
    """

    def __init__(self, monitor: str, mode: Mode, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)
        self.reset()

    def reset(self) -> None:
        """Forget the best (a new round starts)."""
        self.value: Optional[float] = None
        self.step: Optional[int] = None
        self.epoch: Optional[int] = None
        self.state: Optional[dict[str, Tensor]] = None
        self.metrics: dict[str, float] = {}
        self.validations_since_best = 0

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > self.value
        return value + self.min_delta < self.value

    def update(
        self,
        value: float,
        snapshot: Callable[[], dict[str, Tensor]],
        step: Optional[int] = None,
        epoch: Optional[int] = None,
        metrics: Optional[Mapping[str, float]] = None,
    ) -> bool:
        """Take ``snapshot()`` (only then) if ``value`` improves on the best; True if it did."""
        if not self.improves(value):
            self.validations_since_best += 1
            return False
        self.value, self.step, self.epoch = float(value), step, epoch
        self.state = snapshot()
        self.metrics = dict(metrics or {})
        self.validations_since_best = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "step": self.step,
            "epoch": self.epoch,
            "state": self.state,
            "metrics": self.metrics,
            "validations_since_best": self.validations_since_best,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value, self.step, self.epoch = state.get("value"), state.get("step"), state.get("epoch")
        self.state = state.get("state")
        self.metrics = dict(state.get("metrics") or {})
        self.validations_since_best = int(state.get("validations_since_best", 0))
