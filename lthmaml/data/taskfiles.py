"""The layout of a few-shot task folder, read without torch: which files make which split.

Both readers of a task folder parse it here, so they agree on every rule and every message:
:class:`lthmaml.data.taskfolder.TaskFolderDataModule` (``lthmaml-edge``, which turns the files into
tensors) and ``lthmaml-device`` (numpy arrays, no torch). The layout is in
:mod:`lthmaml.data.taskfolder`'s docstring (:data:`LAYOUT` in one line). Labels are the sorted names
of the ``support/`` folders; label ``i`` is class ``i`` of the net.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lthmaml.data.decode import IMAGE_SUFFIXES, visible
from lthmaml.errors import ConfigError, DataError

SPLITS = ("support", "val", "query")
UNLABELLED = -1
"""The class target of an unlabelled query image (regression: NaN)."""
LAYOUT = (
    "support/<label>/*.png [val/<label>/*.png] [query/*.png or query/<label>/*.png], "
    "or support.csv [val.csv] [query.csv] with a header x,y"
)


@dataclass
class SplitFiles:
    """One split's examples: image files with their label (None: an unlabelled query image), in
    the order the loaders serve them, and their names as ``predictions.csv`` writes them; or, for
    regression, the CSV file."""

    images: list[tuple[Optional[str], Path]] = field(default_factory=list)
    table: Optional[Path] = None

    @property
    def names(self) -> list[str]:
        """``label/file`` (labelled) or ``file`` (unlabelled query), as the rows name them."""
        return [path.name if label is None else f"{label}/{path.name}" for label, path in self.images]

    @property
    def labelled(self) -> bool:
        return all(label is not None for label, _ in self.images)


@dataclass
class TaskFiles:
    """A task folder's layout: ``task`` ("classification" or "regression"), ``labels`` (sorted
    support folder names; ``[]`` for regression) and the :class:`SplitFiles` of each present split."""

    root: Path
    task: str
    labels: list[str]
    splits: dict[str, SplitFiles]


def images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; other files (notes, thumbs) are ignored."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and visible(p.name) and p.suffix.lower() in IMAGE_SUFFIXES
    )


def label_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and visible(p.name)), key=lambda p: p.name)


def scan_labelled(folder: Path, known: Optional[list[str]]) -> dict[str, list[Path]]:
    """``folder/<label>/*`` images per label; ``known`` (the support labels) bounds val and query."""
    loose = images_in(folder)
    if loose:
        raise DataError(
            f"{loose[0]} is not inside a label folder: move the images of {folder} into "
            f"{folder}/<label>/ folders, one per class"
        )
    found: dict[str, list[Path]] = {}
    for label_folder in label_folders(folder):
        images = images_in(label_folder)
        if not images:
            raise DataError(
                f"label folder {label_folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                "add images or remove the folder"
            )
        if known is not None and label_folder.name not in known:
            raise DataError(
                f"label folder {label_folder} names no class of {folder.parent / 'support'} "
                f"({', '.join(known)}): rename it to one of those or add support/{label_folder.name}/"
            )
        found[label_folder.name] = images
    if not found:
        raise DataError(f"{folder} holds no label folders: add {folder}/<label>/*.png or remove {folder}")
    return found


def _labelled(found: dict[str, list[Path]]) -> SplitFiles:
    return SplitFiles([(label, path) for label, paths in found.items() for path in paths])


def scan_task(root: Union[str, Path]) -> TaskFiles:
    """The layout of the task folder ``root``; a folder laid out otherwise is a one-line DataError
    saying how to lay it out (a file that cannot be listed: PermissionError, for the caller to name)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"task folder {root} does not exist or is not a folder: lay it out as {LAYOUT}")
    has_folder, has_csv = (root / "support").is_dir(), (root / "support.csv").is_file()
    if has_folder and has_csv:
        raise DataError(
            f"task folder {root} holds both support/ (images) and support.csv (regression): keep one"
        )
    if not (has_folder or has_csv):
        raise DataError(f"task folder {root} has no support/ folder or support.csv: lay it out as {LAYOUT}")
    if not has_folder:
        folders = [root / name for name in SPLITS[1:] if (root / name).is_dir()]
        if folders:
            raise DataError(
                f"task folder {root} mixes support.csv (regression) with the image folder {folders[0]}: "
                "keep one kind"
            )
        tables = {name: root / f"{name}.csv" for name in SPLITS}
        splits = {name: SplitFiles(table=path) for name, path in tables.items() if path.is_file()}
        return TaskFiles(root, "regression", [], splits)
    tables = [root / f"{name}.csv" for name in SPLITS[1:] if (root / f"{name}.csv").is_file()]
    if tables:
        raise DataError(
            f"task folder {root} mixes support/ (images) with the regression table {tables[0]}: keep one kind"
        )
    support = scan_labelled(root / "support", None)
    labels = list(support)
    splits = {"support": _labelled(support)}
    if (root / "val").is_dir():
        splits["val"] = _labelled(scan_labelled(root / "val", labels))
    query = root / "query"
    if query.is_dir():
        loose, folders = images_in(query), label_folders(query)
        if loose and folders:
            raise DataError(
                f"{query} mixes images ({loose[0].name}) and label folders ({folders[0].name}/): "
                "put every query image in query/ (unlabelled) or every one in query/<label>/ (labelled)"
            )
        splits["query"] = (
            SplitFiles([(None, path) for path in loose]) if loose else _labelled(scan_labelled(query, labels))
        )
    return TaskFiles(root, "classification", labels, splits)


def read_columns(path: Union[str, Path], require_y: bool = True) -> tuple[list[float], Optional[list[float]]]:
    """The ``x`` and ``y`` columns of a regression table (header row; other columns are ignored);
    ``y`` is None when the file has no y column and ``require_y`` is False (an unlabelled query)."""
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
    return values["x"], values.get("y")


def check_model_fits(
    metadata: Any,
    root: Union[str, Path],
    task: Optional[str],
    labels: list[str],
    image_size: int,
    artifact: Union[str, Path, None] = None,
) -> None:
    """ConfigError unless a model (its artifact metadata, read by attribute) fits a task folder read
    as ``task`` with ``labels`` at ``image_size``: the same task kind, as many ways as label folders,
    the image size it was trained at."""
    source = f"the model {artifact}" if artifact is not None else "the model"
    kind = getattr(metadata, "task", None)
    if kind is not None and kind != task:
        raise ConfigError(f"{source} does {kind} but task folder {root} is {task}")
    ways = getattr(metadata, "ways", None)
    if task == "classification" and ways is not None and ways != len(labels):
        raise ConfigError(
            f"{source} is {ways}-way but task folder {root} has {len(labels)} labels "
            f"({', '.join(labels)}) in support/: give it {ways} label folders or use a "
            f"{len(labels)}-way model"
        )
    init_args = (getattr(metadata, "architecture", None) or {}).get("init_args", {})
    inputs = init_args.get("in_features", init_args.get("x_features"))  # an MLP's, a CNPNet's
    if task == "regression" and inputs is not None and inputs != 1:
        raise ConfigError(f"{source} takes {inputs} inputs but {root} has one x column")
    size = init_args.get("image_size")
    if task == "classification" and size is not None and size != image_size:
        raise ConfigError(
            f"{source} takes {size}x{size} images but the task folder is read at data.image_size="
            f"{image_size}: set image_size to {size}"
        )
