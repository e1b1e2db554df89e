"""ProtoNet's distances, named once for the learner (torch) and the device runtime (numpy).

Torch-free, so the device scores a query as the learner does without importing torch.
"""

from __future__ import annotations

from typing import Literal, get_args

Distance = Literal["squared", "euclidean"]
DISTANCES = get_args(Distance)
EUCLIDEAN_EPS = 1e-12
"""Added under the square root, so the gradient stays finite for a query on its prototype."""
