"""Write task folders (the layout :class:`~lthmaml.data.taskfolder.TaskFolderDataModule` reads) for
demos and benchmarks: a held-out Omniglot task, or one sinusoid, as a device would receive it.

Images are written black ink on white paper like Omniglot's PNGs, so reading them back gives the
same ink-1.0 tensors up to 8-bit quantisation (at most 0.5/255 per pixel). An unlabelled query
comes with ``answers.csv`` (``file,label`` or ``file,y``) so its predictions can be scored.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lthmaml.data.sinusoid import SinusoidTasks
from lthmaml.errors import ConfigError

ANSWERS = "answers.csv"


def _fresh_folder(root_out: Union[str, Path]) -> Path:
    """Never mix a new task into an old one: the folder must be new or empty."""
    root = Path(root_out).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root} already exists and is not an empty folder: choose a new output folder")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _check_counts(shots: int, val_shots: int, query_shots: int, available: int, what: str) -> None:
    if shots < 1 or val_shots < 0 or query_shots < 0:
        raise ConfigError(
            f"shots must be >= 1 and val_shots, query_shots >= 0 (got {shots}, {val_shots}, {query_shots})"
        )
    if shots + val_shots + query_shots > available:
        raise ConfigError(
            f"shots + val_shots + query_shots = {shots + val_shots + query_shots} but there are only "
            f"{available} {what}: ask for fewer"
        )


def _png(ink: Tensor, path: Path) -> None:
    """``[1, H, W]`` ink in [0, 1] as an 8-bit black-on-white PNG."""
    paper = 255 - np.rint(ink[0].detach().cpu().clamp(0, 1).numpy() * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(paper, mode="L").save(path)


def _write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_image_task(
    root_out: Union[str, Path],
    images: Tensor,
    labels: list[str],
    shots: int,
    val_shots: int = 0,
    query_shots: int = 0,
    seed: int = 0,
    labelled_query: bool = True,
) -> Path:
    """A classification task folder from ``images`` ``[classes, examples, 1, H, W]`` (ink 1.0).

    Each class's examples are permuted (keyed by ``seed``) and dealt out: ``shots`` to
    ``support/<label>/``, ``val_shots`` to ``val/<label>/``, ``query_shots`` to ``query/<label>/``
    or, unlabelled, to ``query/`` under shuffled names with the truth in ``answers.csv``. Files are
    named by their example index (``07.png``). Returns the folder.
    """
    if images.dim() != 5 or images.shape[2] != 1:
        raise ConfigError(f"images must be [classes, examples, 1, H, W], got {tuple(images.shape)}")
    classes, examples = images.shape[:2]
    if len(labels) != classes:
        raise ConfigError(f"{len(labels)} labels for {classes} classes of images: give one label per class")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels must be distinct, got {labels}")
    for label in labels:
        if not label or label.startswith(".") or any(c in label for c in "/\\\0"):
            raise ConfigError(f"label {label!r} cannot be a folder name: use letters, digits, - and _")
    _check_counts(shots, val_shots, query_shots, examples, "examples per class")
    root = _fresh_folder(root_out)
    rng = np.random.default_rng(seed)
    width = len(str(examples - 1))
    unlabelled: list[tuple[int, int]] = []  # (class, example)
    for c, label in enumerate(labels):
        order = rng.permutation(examples)
        deals = {"support": order[:shots], "val": order[shots : shots + val_shots]}
        query = order[shots + val_shots : shots + val_shots + query_shots]
        if labelled_query:
            deals["query"] = query
        else:
            unlabelled.extend((c, int(e)) for e in query)
        for split, chosen in deals.items():
            for e in sorted(int(e) for e in chosen):
                _png(images[c, e], root / split / label / f"{e:0{width}d}.png")
    if unlabelled:
        order = rng.permutation(len(unlabelled))
        digits = len(str(len(unlabelled) - 1))
        answers = []
        for k, i in enumerate(order):
            c, e = unlabelled[int(i)]
            name = f"q{k:0{digits}d}.png"
            _png(images[c, e], root / "query" / name)
            answers.append([name, labels[c]])
        _write_rows(root / ANSWERS, ["file", "label"], answers)
    return root


def make_sinusoid_task(
    root_out: Union[str, Path],
    shots: int,
    val_shots: int = 0,
    query_shots: int = 0,
    seed: int = 0,
    labelled_query: bool = True,
) -> Path:
    """A regression task folder: one sinusoid of the MAML distribution (amplitude, phase, x drawn
    with ``seed``) as ``support.csv``, ``val.csv`` and ``query.csv`` (without y when unlabelled,
    the truth then in ``answers.csv`` as ``file,y``). Values round-trip exactly as float32."""
    total = shots + val_shots + query_shots
    _check_counts(shots, val_shots, query_shots, total, "points")
    task = SinusoidTasks(shots=total, query_shots=0).sample(np.random.default_rng(seed))
    x, y = task.support_x[:, 0].tolist(), task.support_y[:, 0].tolist()
    root = _fresh_folder(root_out)
    bounds = {"support": (0, shots), "val": (shots, shots + val_shots), "query": (shots + val_shots, total)}
    for split, (start, stop) in bounds.items():
        if start == stop:
            continue
        rows = list(zip(x[start:stop], y[start:stop]))
        if split == "query" and not labelled_query:
            _write_rows(root / "query.csv", ["x"], [[repr(a)] for a, _ in rows])
            answers = [[f"row_{i}", repr(b)] for i, (_, b) in enumerate(rows, start=1)]
            _write_rows(root / ANSWERS, ["file", "y"], answers)
        else:
            _write_rows(root / f"{split}.csv", ["x", "y"], [[repr(a), repr(b)] for a, b in rows])
    return root


def omniglot_task(
    root_out: Union[str, Path], images: Tensor, classes: list[str], ways: int, seed: int = 0, **counts: int
) -> Path:
    """``ways`` random classes of ``images`` (e.g. Omniglot's meta-test split) as a task folder,
    labelled by their ``alphabet/character`` names made folder-safe (``alphabet-character``)."""
    if ways > len(classes):
        raise ConfigError(f"ways={ways} but only {len(classes)} classes are given")
    chosen = sorted(int(i) for i in np.random.default_rng(seed).choice(len(classes), ways, replace=False))
    labels = [classes[i].replace("/", "-") for i in chosen]
    return make_image_task(root_out, images[torch.tensor(chosen)], labels, seed=seed, **counts)
