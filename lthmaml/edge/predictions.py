"""``predictions.csv``: its rows (one per query file, in the query's order) and its atomic write."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Optional

from torch import Tensor

HEADER = {"classification": ["file", "label", "probability"], "regression": ["file", "x", "prediction"]}


def prediction_rows(
    x: Tensor, outputs: Tensor, labels: Optional[list[str]]
) -> tuple[list[list[str]], Tensor]:
    """One batch's rows without the file column, and what predict returns: for classification
    (``labels`` given) the most probable label and its softmax probability, the probabilities;
    for regression the inputs and the prediction, the outputs."""
    if labels is None:
        inputs = x.reshape(len(x), -1)
        values = outputs.reshape(len(x), -1)[:, 0]
        rows = [
            [" ".join(f"{v:.6g}" for v in row), f"{value:.6g}"]
            for row, value in zip(inputs.tolist(), values.tolist())
        ]
        return rows, outputs
    probabilities = outputs.softmax(-1)
    best, index = probabilities.max(-1)
    return [[labels[i], f"{p:.6f}"] for i, p in zip(index.tolist(), best.tolist())], probabilities


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write the CSV beside ``path`` and rename it over: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
