"""Sinusoid regression tasks (Finn et al. 2017, section 5.1): y = A sin(x - phase)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lthmaml.data.tasks import TaskBatch


@dataclass(frozen=True)
class SinusoidTasks:
    """Amplitude ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5], as in the MAML paper."""

    shots: int = 5
    query_shots: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def sample(self, rng: np.random.Generator) -> TaskBatch:
        amplitude = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = rng.uniform(*self.x_range, size=(self.shots + self.query_shots, 1))
        y = amplitude * np.sin(x - phase)
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        k = self.shots
        return TaskBatch(x[:k], y[:k], x[k:], y[k:])
