"""One schema for a pruning round's record, ``rounds/round_XX/metrics.json``, whatever the strategy.

The strategies write it (``callbacks/``), the report reads it (``lthmaml.reporting``): each key has
one meaning for every strategy, so nothing downstream guesses which one wrote a file. Plain Python,
no torch: reading a hundred records takes no time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

ROUNDS_FOLDER = "rounds"
METRICS_FILE = "metrics.json"
MASK_FILE = "mask.safetensors"
CHECKPOINT_FILE = "model.ckpt"

Recorded = Literal["best", "last"]


def round_folder_name(index: int) -> str:
    return f"round_{index:02d}"


@dataclass
class RoundRecord:
    """A network trained at one sparsity level, as recorded.

    Attributes:
        round: index of the record (``round_XX``), in the order written.
        sparsity: fraction of the prunable weights that are zero (effective weights).
        pruning_step: pruning events applied to reach this level (0: the dense net).
        global_step: optimizer steps taken when the record was written.
        epoch: the trainer's epoch (0-based) when the record was written.
        recorded: which weights the record holds: the level's ``best`` by ``monitor`` (round-based
            strategies restore them) or its ``last`` (prune-while-training strategies).
        monitor: the validation metric ``val`` is (None: nothing was monitored).
        val: the monitored validation value of the recorded weights.
        val_step, val_epoch: global step and epoch (0-based) of that validation; for ``best``
            weights ``val_step`` is the early-stopping iteration of the LTH papers.
        val_epoch_in_round: ``val_epoch`` counted within the round, 1 = its first epoch (round-based
            strategies with epoch-long rounds only).
        val_metrics: every ``val/*`` metric of that validation.
        round_start_step: the global step the level's training started at (its round's first step,
            or the pruning step that made it); ``global_step - round_start_step`` is how long it
            trained (None: not known).
        stopped_early: whether the level's training ended on a validation plateau (``patience``)
            before its maximum length (``epochs_per_round`` / ``steps_per_round`` /
            ``steps_between``); None where the strategy has no such length (Powerprop).
        tasks_scored: tasks (or batches) the scores of the pruning step that made this level summed
            over, all ranks together (None: the step did not score tasks, or the net is dense).
        test, test_metric, test_metrics: the test counterpart of ``monitor`` and every test metric,
            when the round was tested (``test_each_round``).
        forward_flops, dense_forward_flops: multiply-adds of one example's forward pass through
            the kept weights, and through all of them (:func:`lthmaml.rewiring.forward_multiply_adds`;
            None where the net's layers are not counted): training FLOPs are ``3 x forward_flops``
            a step, as the sparse-training papers count them.
        details: what only this strategy records (documented in its file, e.g. Taylor's filters).
    """

    round: int
    sparsity: float
    pruning_step: int
    global_step: int
    epoch: int
    recorded: Recorded = "last"
    monitor: Optional[str] = None
    val: Optional[float] = None
    val_step: Optional[int] = None
    val_epoch: Optional[int] = None
    val_epoch_in_round: Optional[int] = None
    val_metrics: dict[str, float] = field(default_factory=dict)
    round_start_step: Optional[int] = None
    stopped_early: Optional[bool] = None
    tasks_scored: Optional[int] = None
    test: Optional[float] = None
    test_metric: Optional[str] = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    forward_flops: Optional[float] = None
    dense_forward_flops: Optional[float] = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tested(self) -> bool:
        return self.test is not None or bool(self.test_metrics)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RoundRecord:
        """A record from ``metrics.json`` (extra keys such as ``layers`` are left out)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def round_dir(run_dir: Path, index: int) -> Path:
    """Where record ``index`` of the run in ``run_dir`` lives."""
    return Path(run_dir) / ROUNDS_FOLDER / round_folder_name(index)


def write_metrics(folder: Path, record: Mapping[str, Any], layers: Optional[Mapping] = None) -> None:
    """Write ``metrics.json`` (the record and its per-layer sparsity; without ``layers``, those
    already in the file), so that a reader never sees half a record."""
    file = folder / METRICS_FILE
    if layers is None and file.is_file():
        layers = json.loads(file.read_text()).get("layers")
    partial = folder / f".{METRICS_FILE}.partial"
    partial.write_text(json.dumps({**record, "layers": layers or {}}, indent=2))
    partial.replace(file)


TABLE_COLUMNS = (
    "round",
    "sparsity",
    "val",
    "val_epoch",
    "val_step",
    "round_start_step",
    "stopped_early",
    "test",
    "pruning_step",
    "tasks_scored",
)


def round_table(history: Sequence[Mapping[str, Any]]) -> str:
    """The per-round table printed at fit end: the shared columns any record has (numbers, and
    ``stopped_early``), then the numbers among the strategy's ``details``."""

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def shown(value: Any) -> bool:
        return isinstance(value, (int, float))  # a flag too

    rows = [
        {**record, **{k: v for k, v in (record.get("details") or {}).items() if number(v)}}
        for record in history
    ]
    keys = [key for key in TABLE_COLUMNS if any(shown(row.get(key)) for row in rows)]
    keys += sorted(
        {key for row in rows for key in row.get("details") or {} if number(row.get(key))} - set(keys)
    )

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return (
            f"{value:.4f}"
            if isinstance(value, float) and abs(value) < 1e6
            else f"{value:.4g}"
            if isinstance(value, float)
            else str(value)
        )

    cells = [[cell(row.get(key)) for key in keys] for row in rows]
    widths = [max(12, len(key) + 2, *(len(line[i]) + 2 for line in cells)) for i, key in enumerate(keys)]
    lines = ["".join(f"{key:>{width}}" for key, width in zip(keys, widths))]
    lines += ["".join(f"{text:>{width}}" for text, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)
