"""``predictions.csv``: its rows (one per query file, in the query's order) and its atomic write.

Torch-free (torch is only named for type checking): ``lthmaml-device`` writes its CSV with the same
functions, so the two device paths write the same columns in the same format."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from lthmaml.files import replacing

if TYPE_CHECKING:
    from torch import Tensor

HEADER = {"classification": ["file", "label", "probability"], "regression": ["file", "x", "prediction"]}


def prediction_rows(
    x: Tensor, outputs: Tensor, labels: Optional[list[str]]
) -> tuple[list[list[str]], Tensor]:
    """One batch's rows without the file column, and what predict returns: for classification
    (``labels`` given) the most probable label and its softmax probability, the probabilities;
    for regression the inputs and the prediction, the outputs."""
    if labels is None:
        rows = regression_rows(x.reshape(len(x), -1).tolist(), outputs.reshape(len(x), -1)[:, 0].tolist())
        return rows, outputs
    probabilities = outputs.softmax(-1)
    best, index = probabilities.max(-1)
    return classification_rows(index.tolist(), best.tolist(), labels), probabilities


def classification_rows(index: list[int], best: list[float], labels: list[str]) -> list[list[str]]:
    """Rows ``label, probability`` of the most probable class of each example and its probability."""
    return [[labels[i], f"{p:.6f}"] for i, p in zip(index, best)]


def regression_rows(inputs: list[list[float]], values: list[float]) -> list[list[str]]:
    """Rows ``x, prediction``: an example's inputs (space-separated) and its predicted value."""
    return [[" ".join(f"{v:.6g}" for v in row), f"{value:.6g}"] for row, value in zip(inputs, values)]


def printable(name: str) -> str:
    r"""A file or label name as UTF-8 text. A name whose bytes are not valid UTF-8 (Python holds
    such bytes as lone surrogates, which no UTF-8 file can take) gets each of those bytes written
    as ``\xNN``: the file named by the bytes ``b``, ``0xff``, ``x.jpg`` is the row ``b\xffx.jpg``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Write the UTF-8 CSV beside ``path`` and rename it over: a reader never sees half a file, and
    it gets the mode any new file does (:func:`lthmaml.files.replacing`). File names that are not
    valid UTF-8 are escaped by :func:`printable`; a place that cannot be written is a DataError."""
    with replacing(path, "the predictions") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows([[printable(str(cell)) for cell in row] for row in rows])
