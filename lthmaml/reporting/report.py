"""Turn run folders into pictures: ``lthmaml-report RUN_DIR [RUN_DIR ...] -o report/``.

A pruning paper is read from four plots, so this writes those four PNGs and a ``report.md`` that
links them beside one table per run (its numbers are the logged ones, rounded for display):

1. ``accuracy_vs_remaining.png``: the metric of each round against the fraction of weights left
   (log x, as in the lottery-ticket papers), one line per run (per method for always-sparse runs),
   a panel per metric, one above the other; a fit without rounds (dense) is a horizontal reference
   line with its 95% CI band for the pruned runs of its learner and data (model and data class,
   ways, shots) only.
2. ``rounds.png``: per pruning round, the epoch of the recorded weights' validation
   (``val_epoch``: the trainer's epoch, 0-based, as the table's "best epoch" and the checkpoint
   names) and the wall time of the round: the time between consecutive ``prune/round``
   TensorBoard events (the first round counts from the event file's first event), validation
   included.
3. ``accuracy_vs_time.png``: the ``val/`` metric against wall time since the event file's first
   event (the fit's start), in minutes, one line per run; always-sparse runs in a panel per level.
4. ``layer_sparsity.png``: a heat map of each run's per-layer sparsity in its final round
   (``metrics.json`` layers).

A round's metric is its ``test`` when the round was tested, else the validation value of its
recorded weights; the error bars are ``test_metrics[<test_metric>_ci95]``. Tables give the logged
values (an accuracy as a fraction), the plots accuracy in %. A folder that only tested a
checkpoint (no training) gets its numbers in report.md, never a dense reference; an
``lthmaml-edge`` folder is skipped with the reason. Only matplotlib, PyYAML
and TensorBoard's reader are imported (no torch): a report of many runs takes a second.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lthmaml.errors import DataError, one_line_errors
from lthmaml.reporting.plots import PLOTS, plot_layers, plot_remaining, plot_rounds, plot_time
from lthmaml.reporting.readme import results_section, write_readme
from lthmaml.reporting.runs import EDGE, TEST, Run, dense_reference, expand, load_run, round_seconds

PROG = "lthmaml-report"


# ---------------------------------------------------------------------- report.md


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def run_table(run: Run) -> str:
    """One row per round: the logged numbers with fixed decimals ('—' where not logged)."""
    seconds = round_seconds(run)
    header = (
        "| round | sparsity | weights remaining | best val | best epoch (0-based) | test +- 95% CI "
        "| round time (s) |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for record in run.rounds:
        sparsity = float(record["sparsity"])
        test = "—"
        if isinstance(record.get("test"), (int, float)):
            test_metric = record.get("test_metric") or f"test/{run.metric}"
            ci = (record.get("test_metrics") or {}).get(f"{test_metric}_ci95")
            test = _num(record["test"]) + ("" if ci is None else f" ± {_num(ci)}")
        epoch = record.get("val_epoch")
        rows.append(
            f"| {record['round']} | {100 * sparsity:.2f}% | {100 * (1 - sparsity):.2f}% "
            f"| {_num(record.get('val'))} | {'—' if epoch is None else epoch} | {test} "
            f"| {_num(seconds.get(record['round']), 1)} |"
        )
    return "\n".join([header, *rows])


def run_section(run: Run) -> str:
    lines = [f"## {run.label}", "", f"- folder: `{run.path}`", f"- strategy: {run.strategy}"]
    unit = ", a fraction: 1 = 100%" if "acc" in run.metric else ""
    lines.append(f"- metric: `{run.metric}` ({run.quantity}{unit})")
    if run.start_time is None:
        lines.append("- no TensorBoard events: no time plots for this run")
    else:
        ends = [e[0] for events in run.scalars.values() for e in events]
        if ends:
            lines.append(f"- wall time logged: {(max(ends) - run.start_time) / 60:.2f} min")
    if not run.rounds:
        ref = dense_reference(run)
        what = (
            f"a test of the checkpoint `{run.config.get('ckpt_path')}` (nothing trained in this folder)"
            if run.kind == TEST
            else "no pruning rounds (dense)"
        )
        if ref is None:
            lines.append(f"- {what}; no test or validation metric logged")
        else:
            y, ci = ref
            lines.append(f"- {what}: {run.metric} {_num(y)}" + ("" if ci is None else f" ± {_num(ci)}"))
        return "\n".join(lines)
    return "\n".join([*lines, "", run_table(run)])


def write_report(runs: Sequence[Run], out: Path) -> Path:
    """Write the four PNGs (those that apply) and ``report.md`` under ``out``; return report.md."""
    import matplotlib

    matplotlib.use("Agg")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".report.partial"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DataError(
            f"-o {out}: cannot write the report there ({reason}): choose another folder"
        ) from None
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
    parser.add_argument(
        "--pending",
        nargs="+",
        default=(),
        metavar="NAME",
        help="experiments not finished yet: the results section names them as still to run",
    )
    return parser


def not_reported(run: Run) -> Optional[str]:
    """Why ``run`` is left out of the report, or None: an ``lthmaml-edge`` fine-tuning (no
    meta-training to draw), or a fit that failed before its first epoch.

    A failed fit's folder has no rounds, no scalars and no checkpoint; reported, it would pass for
    a dense run. ``FAILED`` is the note the ``lthmaml`` command leaves in a failed run's folder.
    """
    if run.kind == EDGE:
        return (
            "an lthmaml-edge fine-tuning on a task folder, not a meta-training run; "
            "its metrics.csv has its numbers"
        )
    if run.rounds or run.scalars or any(run.path.glob("checkpoints/*.ckpt")):
        return None
    note = run.path / "FAILED"
    reason = " ".join(note.read_text(errors="replace").split()) if note.is_file() else ""
    return reason or "no pruning rounds, no logged metrics and no checkpoint: a run that failed at start-up"


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with one_line_errors(PROG):
        runs, edge = [], False
        for run in (load_run(path) for path in expand(args.runs)):
            reason = not_reported(run)
            if reason is None:
                runs.append(run)
            else:
                edge = edge or run.kind == EDGE
                print(f"{PROG}: skipped {run.path} ({reason})", file=sys.stderr)
        if not runs:
            named = " ".join(map(str, args.runs))
            why = "every one was skipped (above)" if edge else "every one failed at start-up"
            raise DataError(f"no run to report in {named}: {why}")
        report = write_report(runs, args.out)
        if args.readme is not None:
            write_readme(
                args.readme, results_section(runs, args.out, args.readme, args.sinusoid, args.pending)
            )
            print(f"{PROG}: wrote the results section of {args.readme}")
    print(f"{PROG}: wrote {report} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
