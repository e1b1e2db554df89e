"""Reading run folders: config, round records, TensorBoard scalars, and the numbers plots and
tables show. Only PyYAML and TensorBoard's event reader are imported (no torch)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lthmaml.errors import DataError
from lthmaml.rounds import RoundRecord

SOURCES = {"test": "test", "best_val": "best val", "val": "last val"}
SCALARS_FILE = "scalars.json"
"""An archived run's TensorBoard scalars as text (lthmaml/reporting/archive.py), read like its events."""


FIT, TEST, EDGE = "fit", "test", "edge"
"""What made a run folder: a fit (``lthmaml fit``), an evaluation of a checkpoint made elsewhere
(``lthmaml test`` or ``validate`` of a checkpoint outside its run folder, or by an lthmaml that
gave each one a folder of its own), or an ``lthmaml-edge`` fine-tuning."""


@dataclass
class Run:
    """What the report reads from one run folder."""

    path: Path
    strategy: str
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    # TensorBoard scalars: tag -> [(wall_time, step, value)], in logged order.
    scalars: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)
    start_time: Optional[float] = None  # wall time of the event file's first event: the fit's start
    metric: str = "acc_post"  # the metric name without its val/ or test/ prefix
    regression: bool = False
    kind: str = FIT

    @property
    def label(self) -> str:
        return f"{self.strategy} ({self.path.parent.name}/{self.path.name})"

    @property
    def dense(self) -> bool:
        """A fit without pruning rounds: not a test of a (maybe pruned) checkpoint, nor an edge run."""
        return not self.rounds and self.kind == FIT

    @property
    def setting(self) -> tuple[str, ...]:
        """The learner and the data (class, ways, shots): a dense run is the reference of pruned
        runs of the same setting only."""
        model, data = self.config.get("model") or {}, self.config.get("data") or {}
        args = data.get("init_args") or {}
        return (
            str(model.get("class_path", "")).rsplit(".", 1)[-1],
            str(data.get("class_path", "")).rsplit(".", 1)[-1],
            str(args.get("ways", "")),
            str(args.get("shots", "")),
        )

    @property
    def quantity(self) -> str:
        """What the metric measures, as logged (accuracy as a fraction)."""
        if "acc" in self.metric:
            return "query accuracy after adaptation"
        if self.regression:
            return "query MSE after adaptation (regression)"
        return f"query cross-entropy ({self.metric})"

    @property
    def y_label(self) -> str:
        """The metric with its unit as the plots draw it (accuracy in %); runs with the same label
        share a panel."""
        return self.quantity + (" (%)" if "acc" in self.metric else "")


# ---------------------------------------------------------------------- reading


def is_run_dir(path: Path) -> bool:
    return (
        (path / "config.yaml").is_file()
        or (path / "rounds").is_dir()
        or any(path.glob("events.out.tfevents.*"))
        or (path / SCALARS_FILE).is_file()
    )


def expand(paths: Sequence[Path]) -> list[Path]:
    """Run folders named, or the ``version_*`` folders under an experiment folder or ``runs/``."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise DataError(f"{path}: no such run folder")
        if is_run_dir(path):
            found.append(path)
            continue
        versions = sorted(p for p in path.glob("version_*") if p.is_dir() and is_run_dir(p))
        versions = versions or sorted(p for p in path.glob("*/version_*") if p.is_dir() and is_run_dir(p))
        if not versions:
            raise DataError(
                f"{path} is not a run folder: it holds no config.yaml, rounds/ or TensorBoard events"
            )
        found.extend(versions)
    return found


def strategy_name(config: dict[str, Any]) -> str:
    """The pruning callbacks' class names joined by '+', or 'dense' when the fit had none."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    names = []
    for callback in callbacks:
        class_path = callback.get("class_path", "") if isinstance(callback, dict) else str(callback)
        if class_path.startswith("callbacks."):  # the repo's pruning strategies live there
            names.append(class_path.rsplit(".", 1)[-1])
    return "+".join(names) or "dense"


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.yaml"
    if not file.is_file():
        return {}
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise DataError(f"{file}: not valid YAML ({str(error).splitlines()[0]})") from None
    return config if isinstance(config, dict) else {}


def read_rounds(path: Path) -> list[dict[str, Any]]:
    rounds = []
    for file in sorted((path / "rounds").glob("round_*/metrics.json")):
        try:
            record = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{file}: not valid JSON ({error})") from None
        if not isinstance(record, dict) or "sparsity" not in record:
            raise DataError(f"{file}: not a round's metrics.json (no 'sparsity' key)")
        record.setdefault("round", int(file.parent.name.split("_")[-1]))
        try:
            schema = RoundRecord.from_dict(record).as_dict()
        except (TypeError, ValueError) as error:
            raise DataError(f"{file}: not a round record ({error})") from None
        rounds.append({**schema, "layers": record.get("layers") or {}})
    return sorted(rounds, key=lambda r: r["round"])


def read_scalars(path: Path) -> tuple[dict[str, list[tuple[float, int, float]]], Optional[float]]:
    """Every scalar of the run's event files (none dropped), and the first event's wall time."""
    if not any(path.glob("events.out.tfevents.*")):
        return read_archived_scalars(path)
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    try:
        accumulator.Reload()
        start: Optional[float] = accumulator.FirstEventTimestamp()
    except ValueError:  # an empty or truncated event file
        return {}, None
    except Exception as error:  # the reader's own errors on a corrupt file
        raise DataError(f"{path}: cannot read its TensorBoard events ({error})") from None
    scalars = {
        tag: [(e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags().get("scalars", [])
    }
    return scalars, start


def read_archived_scalars(path: Path) -> tuple[dict[str, list[tuple[float, int, float]]], Optional[float]]:
    """:func:`read_scalars` of an archived run: its ``scalars.json``, or nothing."""
    file = path / SCALARS_FILE
    if not file.is_file():
        return {}, None
    try:
        payload = json.loads(file.read_text())
        scalars = {
            tag: [(float(w), int(s), float(v)) for w, s, v in events]
            for tag, events in payload["scalars"].items()
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{file}: not an archived run's scalars ({error})") from None
    return scalars, payload.get("start_time")


def primary_metric(config: dict[str, Any], rounds: list[dict], scalars: dict) -> str:
    """The metric the run was judged on, without its split prefix (``acc_post``, ``loss_post``)."""
    for record in rounds:
        for key in ("test_metric", "monitor"):
            name = record.get(key)
            if isinstance(name, str) and "/" in name:
                return name.split("/", 1)[1]
    monitor = (config.get("checkpoint") or {}).get("monitor")
    if isinstance(monitor, str) and "/" in monitor:
        return monitor.split("/", 1)[1]
    for name in ("acc_post", "loss_post"):
        if f"val/{name}" in scalars or f"test/{name}" in scalars:
            return name
    return "acc_post"


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such run folder")
    if not is_run_dir(path):
        raise DataError(f"{path} is not a run folder: it holds no config.yaml, rounds/ or TensorBoard events")
    config = read_config(path)
    rounds = read_rounds(path)
    scalars, start = read_scalars(path)
    data_class = str((config.get("data") or {}).get("class_path", ""))
    metric = primary_metric(config, rounds, scalars)
    kind = run_kind(path, config, rounds, scalars)
    return Run(
        path=path,
        strategy="checkpoint test" if kind == TEST else strategy_name(config),
        config=config,
        rounds=rounds,
        scalars=scalars,
        start_time=start,
        metric=metric,
        regression="sinusoid" in data_class.lower() or ("loss" in metric and not data_class),
        kind=kind,
    )


def run_kind(path: Path, config: dict[str, Any], rounds: list, scalars: dict) -> str:
    """:data:`EDGE` for an ``lthmaml-edge`` folder (its model is an artifact or a checkpoint to
    fine-tune, no LightningModule class), :data:`TEST` for a folder that evaluated a checkpoint
    and trained nothing (no rounds, no checkpoints, no ``train/`` metric), else :data:`FIT`."""
    model = config.get("model")
    if (
        isinstance(model, dict)
        and "class_path" not in model
        and ("artifact" in model or "checkpoint" in model)
    ):
        return EDGE
    trained = rounds or (path / "checkpoints").is_dir() or any(tag.startswith("train/") for tag in scalars)
    return TEST if config.get("ckpt_path") and not trained else FIT


# ---------------------------------------------------------------------- data for the plots


def run_name(run: Run) -> str:
    """The experiment's name: its logger folder (``runs/experiments/<name>/version_0``)."""
    return run.path.parent.name if run.path.name.startswith("version_") else run.path.name


ALWAYS_SPARSE = "sparse_"
"""The experiments' name for an always-sparse run: ``sparse_<method>_<level>`` (the Makefile's)."""


def _sparse_parts(run: Run) -> Optional[tuple[str, str]]:
    name = run_name(run)
    method, _, level = name[len(ALWAYS_SPARSE) :].rpartition("_")
    return (method, level) if name.startswith(ALWAYS_SPARSE) and method else None


def sparse_method(run: Run) -> Optional[str]:
    """The method of an always-sparse run (``sparse_rigl_90`` -> ``rigl``), None for any other run."""
    parts = _sparse_parts(run)
    return parts[0] if parts else None


def sparse_level(run: Run) -> Optional[str]:
    """The sparsity level an always-sparse run is named for (``sparse_rigl_90`` -> ``90``)."""
    parts = _sparse_parts(run)
    return parts[1] if parts else None


def round_value(run: Run, record: dict[str, Any]) -> tuple[Optional[float], Optional[float], str]:
    """A round's (metric, 95% CI, source): its test when tested, else the validation value of the
    recorded weights (``best_val``: the round's best, ``val``: its last)."""
    test_metric = record["test_metric"] or f"test/{run.metric}"
    if isinstance(record["test"], (int, float)):
        ci = record["test_metrics"].get(f"{test_metric}_ci95")
        return float(record["test"]), (None if ci is None else float(ci)), "test"
    value = record["val_metrics"].get(f"val/{run.metric}")
    if isinstance(value, (int, float)):
        return float(value), None, "best_val" if record["recorded"] == "best" else "val"
    return None, None, "none"


def accuracy_points(run: Run) -> list[dict[str, Any]]:
    """Plot 1's points: x = fraction of weights remaining (1 - sparsity), y and CI per round."""
    points = []
    for record in run.rounds:
        y, ci, source = round_value(run, record)
        if y is None:
            continue
        points.append(
            {
                "round": record["round"],
                "x": 1.0 - float(record["sparsity"]),
                "y": y,
                "ci": ci,
                "source": source,
            }
        )
    return points


def last_scalar(run: Run, tag: str) -> Optional[float]:
    events = run.scalars.get(tag)
    return events[-1][2] if events else None


def dense_reference(run: Run) -> Optional[tuple[float, Optional[float]]]:
    """A run without rounds: its test metric +- CI, else its best validation value."""
    test = last_scalar(run, f"test/{run.metric}")
    if test is not None:
        return test, last_scalar(run, f"test/{run.metric}_ci95")
    values = [v for _, _, v in run.scalars.get(f"val/{run.metric}", [])]
    if not values:
        return None
    return (max(values) if "acc" in run.metric else min(values)), None


def round_seconds(run: Run) -> dict[int, float]:
    """Wall time of each round: between the first ``prune/round`` event of consecutive rounds
    (from the fit's start). A round's record is logged again, later, when ``test_each_round``
    tests it at the end of the fit; the first event is the one that ends its training."""
    if run.start_time is None:
        return {}
    ends: dict[int, float] = {}
    for wall, _, value in sorted(run.scalars.get("prune/round", [])):
        ends.setdefault(int(round(value)), wall)
    seconds, previous = {}, run.start_time
    for round_index, wall in sorted(ends.items(), key=lambda item: item[1]):
        seconds[round_index] = wall - previous
        previous = wall
    return seconds


def metric_over_time(run: Run) -> list[tuple[float, float]]:
    """Plot 3's points: (minutes since the fit's start, ``val/<metric>``). A validation logged at
    no later step than the one before is left out: ``lthmaml validate`` of a checkpoint logs into
    its run folder, after the fit, and is no point of the training curve."""
    if run.start_time is None:
        return []
    points, last = [], None
    for wall, step, value in run.scalars.get(f"val/{run.metric}", []):
        if last is None or step > last:
            points.append(((wall - run.start_time) / 60.0, value))
            last = step
    return points


def remaining_ticks(smallest: float) -> list[float]:
    """Ticks at 0.8^k (the 20%-per-round schedule), every third one once they get crowded."""
    k_max = max(1, math.ceil(math.log(max(smallest, 1e-6)) / math.log(0.8) - 1e-9))  # 0.8^k itself: k
    stride = 1 if k_max <= 9 else 3 if k_max <= 24 else 6
    return [0.8**k for k in range(0, k_max + 1, stride)]
