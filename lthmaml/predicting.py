"""``lthmaml predict``'s ``predictions.csv``: the rows of the config's predict tasks, or of a task
folder's query, after the learner adapted to the task's support set; the columns and the atomic
write are ``lthmaml-edge predict``'s (:mod:`lthmaml.edge.predictions`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from lthmaml.data.tasks import TaskBatch
from lthmaml.edge.predictions import HEADER, prediction_rows, write_csv
from lthmaml.errors import ConfigError, DataError


def folder_task(folder: Path, ckpt: Optional[str]) -> tuple[Any, DataLoader]:
    """A task folder as one episode: its support set to adapt to, its query to predict. The folder
    is read as the edge path reads it for this checkpoint (look, normalisation, image size), and
    must fit the net (task kind, ways)."""
    from lthmaml.data.taskfolder import TaskFolderDataModule, check_compatible
    from lthmaml.edge.export import artifact_from_checkpoint

    if ckpt is None or not Path(ckpt).is_file():
        raise ConfigError("--task_folder needs --ckpt_path <run>/checkpoints/<file>.ckpt")
    source = TaskFolderDataModule(str(folder))
    check_compatible(source, artifact_from_checkpoint(ckpt).metadata, ckpt)
    if not source.has_query:
        raise DataError(f"task folder {folder} has no query: add query/*.png or query.csv to predict")
    support, query = source.splits["support"], source.splits["query"]
    # Predicting reads no query target; an unlabelled query's placeholders (-1, NaN) would fail
    # the learners' label checks, so they become 0.
    target = query.y if query.labelled else torch.zeros_like(query.y)
    episode = TaskBatch(support.x[None], support.y[None], query.x[None], target[None])
    return source, DataLoader([episode], batch_size=None)


class PredictionsCSV(Callback):
    """Writes ``path`` (``predictions.csv``) when predict ends: a row per query of every predict
    task, in order, with :func:`lthmaml.edge.predictions.prediction_rows`' columns (classification:
    the most probable label and its probability; regression: the input and the prediction).

    Rows are keyed by ``files`` when given (a task folder's query, as ``lthmaml-edge predict``
    writes them), else by task and query index, with the query's true label or value as
    ``target``. The learners' predict outputs are class probabilities (their log is what
    ``prediction_rows`` takes for logits) or ``[queries, y...]`` whose first column is the
    prediction (a CNP's mean).
    """

    def __init__(
        self, path: Path, labels: Optional[list[str]] = None, files: Optional[list[str]] = None
    ) -> None:
        self.path, self.labels, self.files = Path(path), labels, files
        self.rows: list[list[str]] = []
        self.tasks = 0
        self.kind = "regression"

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            raise ConfigError("predict on one device: predictions.csv keeps the tasks' order")
        self.rows, self.tasks = [], 0

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        classification = batch.query_y.dtype == torch.int64
        self.kind = "classification" if classification else "regression"
        labels = (self.labels or [str(i) for i in range(outputs.shape[-1])]) if classification else None
        for t in range(batch.num_tasks):
            scores: Tensor = outputs[t].detach().float().cpu()
            rows, _ = prediction_rows(
                batch.query_x[t].cpu(), scores.log() if classification else scores, labels
            )
            if self.files is not None:
                self.rows += [[name, *row] for name, row in zip(self.files, rows)]
            else:
                targets = batch.query_y[t].reshape(len(rows), -1)[:, 0].tolist()
                self.rows += [
                    [str(self.tasks), str(q), *row, labels[y] if labels else f"{y:.6g}"]
                    for q, (row, y) in enumerate(zip(rows, targets))
                ]
            self.tasks += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: LightningModule) -> None:
        columns = HEADER[self.kind]
        header = columns if self.files is not None else ["task", "query", *columns[1:], "target"]
        write_csv(self.path, header, self.rows)
        tasks = f"{self.tasks} task" + ("s" if self.tasks != 1 else "")
        rank_zero_info(f"Wrote {len(self.rows)} predictions ({tasks}) to {self.path}")
