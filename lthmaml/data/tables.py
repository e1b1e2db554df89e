"""A regression task's tables (``support.csv``, ``val.csv``, ``query.csv`` of a task folder)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from lthmaml.errors import DataError


def read_csv(path: Union[str, Path], require_y: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``x`` and ``y`` columns (header row; other columns are ignored) as float ``[rows, 1]``.

    ``y`` is None when the file has no y column and ``require_y`` is False (an unlabelled query).
    """
    path = Path(path)
    columns = "x,y" if require_y else "x (and optionally y)"
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet BOMs
            reader = csv.reader(handle)
            header = next((row for row in reader if any(cell.strip() for cell in row)), None)
            if header is None:
                raise DataError(f"{path} is empty: write a header {columns} and one row per example")
            names = [cell.strip().lower() for cell in header]
            missing = [c for c in ("x", "y") if c not in names and (require_y or c == "x")]
            if missing:
                raise DataError(
                    f"{path} has no column {' or '.join(missing)} (header: {','.join(header)}): "
                    f"its first row must name the columns {columns}"
                )
            wanted = [c for c in ("x", "y") if c in names]
            index = {c: names.index(c) for c in wanted}
            values: dict[str, list[float]] = {c: [] for c in wanted}
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank lines
                number = len(values["x"]) + 1
                for column in wanted:
                    cell = row[index[column]].strip() if index[column] < len(row) else ""
                    try:
                        value = float(cell)
                    except ValueError:
                        value = math.nan
                    if not math.isfinite(value):
                        raise DataError(
                            f"{path} row {number} (line {reader.line_num}): {column} = {cell!r} is not a "
                            "finite number: fix or delete the row"
                        )
                    values[column].append(value)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(
            f"cannot read {path} ({error}): write it as UTF-8 text with a header {columns}"
        ) from None
    if not values["x"]:
        raise DataError(f"{path} has a header but no rows: add one row per example")
    x = torch.tensor(values["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(values["y"], dtype=torch.float32).unsqueeze(1) if "y" in values else None
    return x, y
