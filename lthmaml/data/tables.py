"""A regression task's tables (``support.csv``, ``val.csv``, ``query.csv`` of a task folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from lthmaml.data.taskfiles import read_columns


def read_csv(path: Union[str, Path], require_y: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``x`` and ``y`` columns (header row; other columns are ignored) as float ``[rows, 1]``;
    parsed by :func:`lthmaml.data.taskfiles.read_columns`, which the device reads tables with too.

    ``y`` is None when the file has no y column and ``require_y`` is False (an unlabelled query).
    """
    xs, ys = read_columns(path, require_y)
    x = torch.tensor(xs, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(ys, dtype=torch.float32).unsqueeze(1) if ys is not None else None
    return x, y
