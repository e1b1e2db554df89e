"""Turn run folders into pictures: ``lthmaml-report RUN_DIR [RUN_DIR ...] -o report/``.

A pruning paper is read from four plots, so this writes those four PNGs and a ``report.md`` that
links them beside one table per run (its numbers are the logged ones, rounded for display):

1. ``accuracy_vs_remaining.png``: the metric of each round against the fraction of weights left
   (log x, as in the lottery-ticket papers), one line per run; a run without rounds (dense) is a
   horizontal reference line with its 95% CI band.
2. ``rounds.png``: per pruning round, the epoch of best validation (``best_epoch``) and the wall
   time of the round: the time between consecutive ``prune/round`` TensorBoard events (the first
   round counts from the event file's first event), validation and per-round tests included.
3. ``accuracy_vs_time.png``: the ``val/`` metric against wall time since the event file's first
   event (the fit's start), in minutes, one line per run.
4. ``layer_sparsity.png``: per-layer sparsity of each run's final round (``metrics.json`` layers).

A round's metric is its ``test`` when the round was tested, else its ``best_val``; the error bars
are ``test_metrics[<test_metric>_ci95]``. Only matplotlib, PyYAML and TensorBoard's reader are
imported (no torch): a report of many runs takes a second.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lthmaml.errors import DataError, one_line_errors

PROG = "lthmaml-report"
PLOTS = {
    "remaining": "accuracy_vs_remaining.png",
    "rounds": "rounds.png",
    "time": "accuracy_vs_time.png",
    "layers": "layer_sparsity.png",
}
SOURCES = {"test": "test", "best_val": "best val", "val": "last val"}


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

    @property
    def label(self) -> str:
        return f"{self.strategy} ({self.path.parent.name}/{self.path.name})"

    @property
    def dense(self) -> bool:
        return not self.rounds

    @property
    def y_label(self) -> str:
        """The metric with its unit; runs with the same label share a panel."""
        if "acc" in self.metric:
            return "query accuracy after adaptation (%)"
        if self.regression:
            return "query MSE after adaptation (regression)"
        return f"query cross-entropy ({self.metric})"


# ---------------------------------------------------------------------- reading


def is_run_dir(path: Path) -> bool:
    return (
        (path / "config.yaml").is_file()
        or (path / "rounds").is_dir()
        or any(path.glob("events.out.tfevents.*"))
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
        rounds.append(record)
    return sorted(rounds, key=lambda r: r["round"])


def read_scalars(path: Path) -> tuple[dict[str, list[tuple[float, int, float]]], Optional[float]]:
    """Every scalar of the run's event files (none dropped), and the first event's wall time."""
    if not any(path.glob("events.out.tfevents.*")):
        return {}, None
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
    return Run(
        path=path,
        strategy=strategy_name(config),
        config=config,
        rounds=rounds,
        scalars=scalars,
        start_time=start,
        metric=metric,
        regression="sinusoid" in data_class.lower() or ("loss" in metric and not data_class),
    )


# ---------------------------------------------------------------------- data for the plots


def round_value(run: Run, record: dict[str, Any]) -> tuple[Optional[float], Optional[float], str]:
    """A round's (metric, 95% CI, source): its test when tested, else its best validation value."""
    test_metric = record.get("test_metric") or f"test/{run.metric}"
    if isinstance(record.get("test"), (int, float)):
        ci = (record.get("test_metrics") or {}).get(f"{test_metric}_ci95")
        return float(record["test"]), (None if ci is None else float(ci)), "test"
    if isinstance(record.get("best_val"), (int, float)):
        return float(record["best_val"]), None, "best_val"
    value = record.get(f"val/{run.metric}")  # strategies that record the last validation instead
    if isinstance(value, (int, float)):
        return float(value), None, "val"
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
    """Wall time of each round: between consecutive ``prune/round`` events (from the fit's start)."""
    events = sorted(run.scalars.get("prune/round", []), key=lambda e: (e[1], e[0]))
    if not events or run.start_time is None:
        return {}
    seconds, previous = {}, run.start_time
    for wall, _, value in events:
        seconds[int(round(value))] = wall - previous
        previous = wall
    return seconds


def metric_over_time(run: Run) -> list[tuple[float, float]]:
    """Plot 3's points: (minutes since the fit's start, ``val/<metric>``)."""
    if run.start_time is None:
        return []
    return [((w - run.start_time) / 60.0, v) for w, _, v in run.scalars.get(f"val/{run.metric}", [])]


def remaining_ticks(smallest: float) -> list[float]:
    """Ticks at 0.8^k (the 20%-per-round schedule), every third one once they get crowded."""
    k_max = max(1, math.ceil(math.log(max(smallest, 1e-6)) / math.log(0.8) - 1e-9))  # 0.8^k itself: k
    stride = 1 if k_max <= 9 else 3 if k_max <= 24 else 6
    return [0.8**k for k in range(0, k_max + 1, stride)]


# ---------------------------------------------------------------------- plots


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.y_label, []).append(run)
    return groups


def percent_scale(run: Run) -> float:
    return 100.0 if "acc" in run.metric else 1.0  # accuracy in %, losses as logged


def _panels(n: int, width: float = 7.5, height: float = 5.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def plot_remaining(runs: Sequence[Run], file: Path) -> Optional[str]:
    """Plot 1, or the reason it was skipped."""
    from matplotlib.ticker import FixedLocator, NullLocator

    groups = {
        label: group
        for label, group in _groups(runs).items()
        if any(accuracy_points(r) or (r.dense and dense_reference(r)) for r in group)
    }
    if not groups:
        return "no run logged a round's metric or a dense test/validation value"
    fig, axes = _panels(len(groups))
    for ax, (label, group) in zip(axes, groups.items()):
        xs = [p["x"] for r in group for p in accuracy_points(r) if p["x"] > 0] or [1.0]
        smallest = min(xs)
        for run in group:
            scale = percent_scale(run)
            points = [p for p in accuracy_points(run) if p["x"] > 0]
            if points:
                ax.errorbar(
                    [p["x"] for p in points],
                    [p["y"] * scale for p in points],
                    yerr=[(p["ci"] or 0.0) * scale for p in points],
                    marker="o",
                    capsize=3,
                    label=f"{run.label}, {'/'.join(sorted({SOURCES[p['source']] for p in points}))}",
                )
            elif run.dense and (ref := dense_reference(run)) is not None:
                y, ci = ref
                line = ax.axhline(
                    y * scale, linestyle="--", color="black", label=f"dense reference: {run.label}"
                )
                if ci:
                    ax.axhspan((y - ci) * scale, (y + ci) * scale, color=line.get_color(), alpha=0.12)
        ax.set_xscale("log")
        ticks = remaining_ticks(smallest)
        ax.set_xlim(1.08, min(smallest, ticks[-1]) / 1.08)  # inverted: 100% on the left
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{100 * t:.3g}%" for t in ticks])
        ax.set_xlabel("weights remaining (% of the dense net, log scale)")
        ax.set_ylabel(label + ", mean ± 95% CI")
        ax.set_title("Metric vs. weights remaining (test when tested, else best validation)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, file)
    return None


def plot_rounds(runs: Sequence[Run], file: Path) -> Optional[str]:
    """Plot 2: best-validation epoch and wall time per round, or the reason it was skipped."""
    pruned = [r for r in runs if r.rounds]
    if not pruned:
        return "no run has pruning rounds (rounds/round_XX/metrics.json)"
    fig, (left, right) = _panels(2, width=6.5)
    any_epoch = any_time = in_round = False
    for run in pruned:
        key = "best_epoch_in_round" if any(r.get("best_epoch_in_round") for r in run.rounds) else "best_epoch"
        in_round = in_round or key == "best_epoch_in_round"
        epochs = [(r["round"], r[key]) for r in run.rounds if r.get(key) is not None]
        if epochs:
            any_epoch = True
            left.plot(*zip(*epochs), marker="o", label=run.label)
        seconds = round_seconds(run)
        if seconds:
            any_time = True
            rounds = sorted(seconds)
            right.plot(rounds, [seconds[r] for r in rounds], marker="s", label=run.label)
    for ax, ok, what in (
        (left, any_epoch, "no best_epoch in metrics.json"),
        (right, any_time, "no prune/round TensorBoard events"),
    ):
        ax.set_xlabel("pruning round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        if ok:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
    left.set_ylabel(
        "epoch of best validation within the round (1 = first)"
        if in_round
        else "epoch of best validation (global epoch index)"
    )
    left.set_title("When each round's best validation came")
    right.set_ylabel("wall time of the round (s)")
    right.set_title("Wall time per round (between prune/round events)")
    _save(fig, file)
    return None


def plot_time(runs: Sequence[Run], file: Path) -> Optional[str]:
    """Plot 3: validation metric vs. meta-training time, or the reason it was skipped."""
    groups = {
        label: group for label, group in _groups(runs).items() if any(metric_over_time(r) for r in group)
    }
    if not groups:
        return "no run has TensorBoard events with a val/ metric"
    fig, axes = _panels(len(groups))
    for ax, (label, group) in zip(axes, groups.items()):
        for run in group:
            points = metric_over_time(run)
            if points:
                minutes, values = zip(*points)
                ax.plot(minutes, [v * percent_scale(run) for v in values], marker=".", label=run.label)
        ax.set_xlabel("meta-training wall time since the fit started (min)")
        ax.set_ylabel(label.replace("query", "validation query"))
        ax.set_title("Validation metric vs. meta-training time")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, file)
    return None


def plot_layers(runs: Sequence[Run], file: Path) -> Optional[str]:
    """Plot 4: per-layer sparsity of each run's final round, or the reason it was skipped."""
    finals = [(run, run.rounds[-1]["layers"]) for run in runs if run.rounds and run.rounds[-1].get("layers")]
    if not finals:
        return "no run's last round lists its layers"
    names: list[str] = []
    for _, layers in finals:
        names += [name for name in layers if name not in names]
    fig, (ax,) = _panels(1, width=max(7.0, 1.1 * len(names) * max(1, len(finals)) ** 0.5 + 3))
    width = 0.8 / len(finals)
    for i, (run, layers) in enumerate(finals):
        xs = [j + (i - (len(finals) - 1) / 2) * width for j in range(len(names))]
        values = [100.0 * layers[n]["sparsity"] if n in layers else 0.0 for n in names]
        last = run.rounds[-1]
        bars = ax.bar(
            xs, values, width, label=f"{run.label}: round {last['round']}, {last['sparsity']:.1%} overall"
        )
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("weights pruned (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Per-layer sparsity of the final model")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, file)
    return None


def _save(fig, file: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- report.md


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def run_table(run: Run) -> str:
    """One row per round: the logged numbers with fixed decimals ('—' where not logged)."""
    seconds = round_seconds(run)
    header = (
        "| round | sparsity | weights remaining | best val | best epoch | test +- 95% CI | round time (s) |\n"
        "|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for record in run.rounds:
        sparsity = float(record["sparsity"])
        test = "—"
        if isinstance(record.get("test"), (int, float)):
            test_metric = record.get("test_metric") or f"test/{run.metric}"
            ci = (record.get("test_metrics") or {}).get(f"{test_metric}_ci95")
            test = _num(record["test"]) + ("" if ci is None else f" ± {_num(ci)}")
        epoch = record.get("best_epoch")
        rows.append(
            f"| {record['round']} | {100 * sparsity:.2f}% | {100 * (1 - sparsity):.2f}% "
            f"| {_num(record.get('best_val'))} | {'—' if epoch is None else epoch} | {test} "
            f"| {_num(seconds.get(record['round']), 1)} |"
        )
    return "\n".join([header, *rows])


def run_section(run: Run) -> str:
    lines = [f"## {run.label}", "", f"- folder: `{run.path}`", f"- strategy: {run.strategy}"]
    lines.append(f"- metric: `{run.metric}` ({run.y_label})")
    if run.start_time is None:
        lines.append("- no TensorBoard events: no time plots for this run")
    else:
        ends = [e[0] for events in run.scalars.values() for e in events]
        if ends:
            lines.append(f"- wall time logged: {(max(ends) - run.start_time) / 60:.2f} min")
    if run.dense:
        ref = dense_reference(run)
        if ref is None:
            lines.append("- no pruning rounds and no test or validation metric logged")
        else:
            y, ci = ref
            lines.append(
                f"- no pruning rounds (dense): {run.metric} {_num(y)}"
                + ("" if ci is None else f" ± {_num(ci)}")
            )
        return "\n".join(lines)
    return "\n".join([*lines, "", run_table(run)])


def write_report(runs: Sequence[Run], out: Path) -> Path:
    """Write the four PNGs (those that apply) and ``report.md`` under ``out``; return report.md."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    titles = {
        "remaining": "Metric vs. weights remaining",
        "rounds": "Best-validation epoch and wall time per round",
        "time": "Validation metric vs. meta-training time",
        "layers": "Per-layer sparsity of the final model",
    }
    plotters = {"remaining": plot_remaining, "rounds": plot_rounds, "time": plot_time, "layers": plot_layers}
    lines = ["# lthmaml report", "", f"Runs: {len(runs)}", ""]
    lines += [f"- {run.label}: `{run.path}`" for run in runs]
    lines.append("")
    for key, plot in plotters.items():
        file = out / PLOTS[key]
        file.unlink(missing_ok=True)  # never leave a stale picture from an earlier report
        skipped = plot(runs, file)
        lines.append(f"## {titles[key]}")
        lines.append("")
        lines.append(f"_Skipped: {skipped}._" if skipped else f"![{titles[key]}]({PLOTS[key]})")
        lines.append("")
    lines += [
        "Round metric: the round's test when tested (error bar: its 95% CI), else its best validation. "
        "Round wall time: between consecutive `prune/round` TensorBoard events, the first from the "
        "event file's first event (validation and per-round tests included).",
        "",
    ]
    for run in runs:
        lines += [run_section(run), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders (runs/<name>/version_N) or runs/<name>"
    )
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("report"), help="output folder (default: report)"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also write the cross-run summary (commands, machine, plots, table, findings) between "
        "the '<!-- results:begin -->' and '<!-- results:end -->' markers of this file",
    )
    parser.add_argument(
        "--sinusoid", type=Path, default=None, help="bench/sinusoid.py's JSON, for the sinusoid table"
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        runs = [load_run(path) for path in expand(args.runs)]
        report = write_report(runs, args.out)
        if args.readme is not None:
            from lthmaml.results import results_section, write_readme

            write_readme(args.readme, results_section(runs, args.out, args.readme, args.sinusoid))
            print(f"{PROG}: wrote the results section of {args.readme}")
    print(f"{PROG}: wrote {report} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
