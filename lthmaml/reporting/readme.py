"""The "Results" document: the cross-run summary of a report, written between markers in a Markdown
file (``docs/results.md``).

``lthmaml-report RUN_DIR ... -o docs/results --readme docs/results.md [--sinusoid SINUSOID.json]``
(``make results``) replaces the text between ``<!-- results:begin -->`` and ``<!-- results:end -->``
with: the commands that made the runs, the machine and wall time of each run (``machine.json`` and
the TensorBoard events), the report's plots, one table of every run's metric at every sparsity,
findings computed from that table, and the sinusoid table of ``bench/sinusoid.py`` against the MAML
paper. Nothing in the section is typed by hand, so rerunning the experiments and ``make results``
regenerates all of it. Links are written relative to the document's folder, so the section reads
the same wherever the document lives.

"Apart" in the findings means the two means differ by more than the sum of their 95% CI
half-widths: a conservative test (non-overlapping intervals).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lthmaml.errors import DataError
from lthmaml.reporting.plots import PLOTS, percent_scale
from lthmaml.reporting.runs import Run, accuracy_points, dense_reference, round_seconds, run_name
from lthmaml.reporting.sparse import CAPPED, sparse_findings, sparse_table

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
EXPERIMENT_CONFIGS = Path("configs/experiments")


# ---------------------------------------------------------------------- per-run facts
def wall_minutes(run: Run) -> Optional[float]:
    ends = [event[0] for events in run.scalars.values() for event in events]
    if run.start_time is None or not ends:
        return None
    return (max(ends) - run.start_time) / 60.0


def read_machine(run: Run) -> Optional[dict[str, Any]]:
    file = run.path / "machine.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{file}: not valid JSON ({error})") from None


def describe_machine(machine: Optional[dict[str, Any]]) -> str:
    if machine is None:
        return "not recorded"
    parts = [
        f"{machine.get('cpu_count')} CPU cores",
        f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU",
        f"{machine.get('torch_threads')} torch thread(s)",
        f"{machine.get('processes', 1)} process(es)",
    ]
    versions = [
        f"{name} {machine[key]}"
        for key, name in (("torch", "torch"), ("lightning", "Lightning"))
        if machine.get(key)
    ]
    return ", ".join(parts) + ("; " + ", ".join(versions) if versions else "")


def command(run: Run) -> str:
    """The command that reruns the experiment: its configs when ``configs/experiments`` has them."""
    name, base = run_name(run), f"lthmaml fit -c {EXPERIMENT_CONFIGS}/base.yaml"
    method, _, percent = name.removeprefix("sparse_").rpartition("_")
    sparse = EXPERIMENT_CONFIGS / "sparse" / f"{method}.yaml"  # sparse_<method>_<percent> (make)
    if name.startswith("sparse_") and sparse.is_file():
        return f"{base} -c {sparse} --trainer.callbacks.init_args.sparsity 0.{percent}"
    for config in (EXPERIMENT_CONFIGS / f"{name}.yaml", EXPERIMENT_CONFIGS / "sparse" / f"{name}.yaml"):
        if config.is_file():
            return f"{base} -c {config}"
    rerun = EXPERIMENT_CONFIGS / f"{name.removesuffix('_rerun')}.yaml"  # <experiment>_rerun (make)
    if name.endswith("_rerun") and rerun.is_file():
        return f"{base} -c {rerun} --trainer.logger.init_args.name {name}"
    return f"lthmaml fit --config {run.path / 'config.yaml'}"


# ---------------------------------------------------------------------- the comparison table
def level(sparsity: float) -> float:
    """Sparsities that print the same (to 0.1%) are one level of the table."""
    return round(100.0 * sparsity, 1)


def points_by_level(run: Run) -> dict[float, dict[str, Any]]:
    return {level(1.0 - p["x"]): p for p in accuracy_points(run)}


def cell(run: Run, value: float, ci: Optional[float], source: str) -> str:
    scale = percent_scale(run)
    text = f"{value * scale:.2f}" + ("" if ci is None else f" ± {ci * scale:.2f}")
    return text if source == "test" else f"{text} ({source.replace('_', ' ')})"


def comparison_table(runs: Sequence[Run]) -> str:
    """One row per sparsity level, one column per pruned run: the round's metric ± 95% CI."""
    pruned = [run for run in runs if run.rounds]
    if not pruned:
        return "_No run has pruning rounds._"
    values: dict[str, dict[float, dict[str, Any]]] = {run_name(run): points_by_level(run) for run in pruned}
    levels = sorted({key for by_level in values.values() for key in by_level})
    header = "| sparsity | weights remaining | " + " | ".join(run_name(run) for run in pruned) + " |"
    rule = "|---:|---:|" + "---:|" * len(pruned)
    rows = [header, rule]
    for key in levels:
        cells = []
        for run in pruned:
            point = values[run_name(run)].get(key)
            cells.append("" if point is None else cell(run, point["y"], point["ci"], point["source"]))
        rows.append(f"| {key:.1f}% | {100 - key:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------- findings
def apart(a: float, a_ci: Optional[float], b: float, b_ci: Optional[float]) -> bool:
    return abs(a - b) > (a_ci or 0.0) + (b_ci or 0.0)


def better(run: Run, a: float, b: float) -> bool:
    return a > b if "acc" in run.metric else a < b


def level_comparison(run: Run, other: Run) -> tuple[list[float], list[float], list[float]]:
    """The pruned levels both runs recorded, and those where ``run`` is better / worse and apart."""
    ours, theirs = points_by_level(run), points_by_level(other)
    common = [key for key in sorted(ours) if key in theirs and key > 0]

    def is_apart(key: float) -> bool:
        return apart(ours[key]["y"], ours[key]["ci"], theirs[key]["y"], theirs[key]["ci"])

    above = [k for k in common if better(run, ours[k]["y"], theirs[k]["y"]) and is_apart(k)]
    below = [k for k in common if better(run, theirs[k]["y"], ours[k]["y"]) and is_apart(k)]
    return common, above, below


def distillation_effect(run: Run, undistilled: Run) -> str:
    """Level by level, the distilled rounds against the same rounds without the teacher."""
    common, above, below = level_comparison(run, undistilled)
    if not common:
        name = run_name(undistilled)
        return f"No pruned level in common with the same rounds without distillation ({name})."
    ours, theirs = points_by_level(run), points_by_level(undistilled)
    scale = percent_scale(run)
    unit = " points" if "acc" in run.metric else ""
    levels = []
    for key in common:
        a, b = ours[key], theirs[key]
        verdict = "better, apart" if key in above else "worse, apart" if key in below else "within the CIs"
        levels.append(
            f"{key:.1f}%: {a['y'] * scale:.2f} ± {(a['ci'] or 0) * scale:.2f} against "
            f"{b['y'] * scale:.2f} ± {(b['ci'] or 0) * scale:.2f} "
            f"({(a['y'] - b['y']) * scale:+.2f}{unit}, {verdict})"
        )
    start = ""
    if round_zero(run) != round_zero(undistilled):
        start = (
            f" Their dense rounds differ ({(round_zero(run) or 0) * scale:.2f} against "
            f"{(round_zero(undistilled) or 0) * scale:.2f}: another trajectory, so these differences "
            "mix the teacher's effect with run-to-run variation)."
        )
    return (
        f"Distillation's effect, against the same rounds without it ({run_name(undistilled)}) at "
        f"{len(common)} pruned levels: " + "; ".join(levels) + "." + start
    )


def strategy_args(run: Run) -> Optional[tuple[str, dict[str, Any]]]:
    """The pruning callback's class path and init_args, as the run's config names them."""
    for callback in (run.config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).startswith("callbacks."):
            return str(callback["class_path"]), dict(callback.get("init_args") or {})
    return None


DISTILL_OPTIONS = ("distill_weight", "distill_temperature")


def round_zero(run: Run) -> Optional[float]:
    dense = points_by_level(run).get(0.0)
    return None if dense is None else dense["y"]


def undistilled_twin(run: Run, runs: Sequence[Run]) -> Optional[Run]:
    """For a run that distils, the finished run with the same strategy and options but no teacher.

    Of several, the one whose dense round 0 tests the same as ours: that run trained the same
    trajectory (same seed and machine), so the pruned levels differ by the teacher alone.
    """
    ours = strategy_args(run)
    if ours is None or not ours[1].get("distill_weight"):
        return None
    strip = lambda args: {k: v for k, v in args.items() if k not in DISTILL_OPTIONS}  # noqa: E731
    twins = [
        other
        for other in runs
        if other is not run
        and other.rounds
        and (theirs := strategy_args(other)) is not None
        and theirs[0] == ours[0]
        and not theirs[1].get("distill_weight")
        and strip(theirs[1]) == strip(ours[1])
    ]
    same_start = [other for other in twins if round_zero(other) == round_zero(run)]
    return (same_start or twins or [None])[0]


def run_findings(run: Run, control: Optional[Run], undistilled: Optional[Run] = None) -> list[str]:
    """What one pruned run's curve shows, in numbers: start, peak, the sparsest level that holds."""
    points = accuracy_points(run)
    if not points:
        return []
    scale, name = percent_scale(run), run_name(run)
    unit = " points" if "acc" in run.metric else ""
    first = points[0]
    best = max(points, key=lambda p: p["y"] if "acc" in run.metric else -p["y"])

    def fmt(point: dict[str, Any]) -> str:
        value, ci = point["y"] * scale, (point["ci"] or 0.0) * scale
        return f"{value:.2f} ± {ci:.2f} at {level(1 - point['x']):.1f}% sparsity"

    lines = [f"**{name}** starts at {fmt(first)}; its best level is {fmt(best)}."]
    if best is not first:
        gain = (best["y"] - first["y"]) * scale
        verdict = "apart" if apart(best["y"], best["ci"], first["y"], first["ci"]) else "within the CIs"
        lines.append(f"Rise from the first level to the best: {abs(gain):.2f}{unit} ({verdict}).")
    holding = [
        p
        for p in points
        if not better(run, first["y"], p["y"]) or not apart(p["y"], p["ci"], first["y"], first["ci"])
    ]
    sparsest = max(holding, key=lambda p: 1 - p["x"])
    lines.append(
        f"Sparsest level not apart below the first: {level(1 - sparsest['x']):.1f}% ({fmt(sparsest)})."
    )
    last = points[-1]
    if last is not best:
        lines.append(f"Last level: {fmt(last)}.")
    epochs = [r.get("val_epoch_in_round") for r in run.rounds]
    if all(isinstance(e, int) for e in epochs) and len(epochs) > 1:
        lines.append(
            f"Epoch of best validation within each round, round 0 on: {', '.join(map(str, epochs))}."
        )
    seconds = round_seconds(run)
    if len(seconds) > 1:
        first_round, last_round = min(seconds), max(seconds)
        lines.append(
            f"Round wall time: {seconds[first_round]:.0f} s (round {first_round}) and "
            f"{seconds[last_round]:.0f} s (round {last_round})."
        )
    if control is not None and control is not run:
        common, above, below = level_comparison(run, control)
        if len(common) > 1:  # a single shared level is a coincidence of schedules, not a curve
            lines.append(
                f"Against the random-reinit control ({run_name(control)}) at {len(common)} pruned "
                f"levels: better and apart at {len(above)}, worse and apart at {len(below)}, "
                f"within the CIs at {len(common) - len(above) - len(below)}."
            )
    if undistilled is not None:
        lines.append(distillation_effect(run, undistilled))
    return lines


def is_control(run: Run) -> bool:
    args = strategy_args(run)
    return bool(args and args[1].get("reinit_random"))


def findings(runs: Sequence[Run]) -> list[str]:
    control = next((run for run in runs if run.rounds and is_control(run)), None)
    lines = []
    for run in runs:
        if not run.rounds and run.strategy != "dense":
            lines.append(f"**{run_name(run)}** has recorded no pruning level yet.")
            continue
        if run.dense:
            ref = dense_reference(run)
            if ref is not None:
                y, ci = ref
                lines.append(
                    f"**{run_name(run)}** (no pruning, one round's budget): "
                    f"{y * percent_scale(run):.2f}"
                    + ("" if ci is None else f" ± {ci * percent_scale(run):.2f}")
                    + "."
                )
            continue
        lines.append(" ".join(run_findings(run, control, undistilled_twin(run, runs))))
    return [f"- {line}" for line in lines if line]


# ---------------------------------------------------------------------- sinusoid
def link(target: Path | str, doc_dir: Path) -> str:
    """``target`` (relative to the working directory, or absolute) as a link from ``doc_dir``."""
    return Path(os.path.relpath(Path(target).resolve(), Path(doc_dir).resolve())).as_posix()


def sinusoid_table(file: Path, doc_dir: Path = Path(".")) -> str:
    """The MAML paper's sinusoid table (section 5.1) beside ours, from ``bench/sinusoid.py``'s JSON;
    its links are relative to ``doc_dir``, the folder of the document it goes into."""
    try:
        payload = json.loads(file.read_text())
        tests = payload["tests"]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise DataError(f"{file}: not a bench/sinusoid.py result ({error})") from None
    settings = payload.get("settings", {})
    lines = [
        f"Sinusoid regression, K = {settings.get('shots', 5)}, {payload.get('iterations')} meta-iterations "
        f"(paper: {payload.get('paper_iterations', 70000)}), {settings.get('test_tasks', 600)} test tasks; "
        f"trained in {payload.get('train_seconds', 0) / 60:.1f} min on "
        f"{describe_machine(payload.get('machine'))}. "
        "Command: `.venv/bin/python -m bench.sinusoid` "
        f"(details: [bench/README.md]({link('bench/README.md', doc_dir)})).",
        "",
        "| inner steps | MSE ± 95% CI | MAML paper | vs paper |",
        "|---:|---:|---:|---:|",
    ]
    for test in tests:
        lines.append(
            f"| {test['eval_inner_steps']} | {test['mse']:.3f} ± {test['ci95']:.3f} | {test['paper']:.2f} "
            f"| {100 * test['relative_to_paper']:+.1f}% |"
        )
    cnp = payload.get("cnp")
    if cnp:  # the Conditional Neural Process on the same tasks: one forward pass, no steps
        lines.append(f"| CNP (no steps) | {cnp['mse']:.3f} ± {cnp['ci95']:.3f} | | |")
    if payload.get("plot"):
        plot = link(payload["plot"], doc_dir)
        lines += ["", f"![MAML and the CNP on four sinusoid test tasks]({plot})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- the results section
def results_section(
    runs: Sequence[Run], out: Path, readme: Path, sinusoid: Optional[Path], pending: Sequence[str] = ()
) -> str:
    """The section for the document ``readme``; ``pending`` names the experiments not finished yet."""
    doc_dir = readme.parent

    def image(key: str, alt: str) -> str:
        file = out / PLOTS[key]
        return f"![{alt}]({link(file, doc_dir)})" if file.is_file() else ""

    report_md = link(out / "report.md", doc_dir)
    folders = {
        run.path.parent.parent if run.path.name.startswith("version_") else run.path.parent for run in runs
    }
    records = link(os.path.commonpath([str(f.resolve()) for f in folders]), doc_dir)
    lines = [
        BEGIN,
        "<!-- Generated by `make results` (lthmaml/reporting/readme.py) from the runs listed below: "
        "do not edit. -->",
        "",
        "Commands: `make -j2 experiments` (all of them, two at a time; each one alone is the command in "
        f"the table), then `make results`. Per-round tables: [{report_md}]({report_md}); the records "
        "these figures are read from (config, TensorBoard events, round metrics): "
        f"[`{records}/`]({records}/).",
        "",
        "| experiment | command | rounds | wall time | machine |",
        "|---|---|---:|---:|---|",
    ]
    for run in runs:
        minutes = wall_minutes(run)
        lines.append(
            f"| {run_name(run)} | `{command(run)}` | {len(run.rounds)} "
            f"| {'—' if minutes is None else f'{minutes:.1f} min'} | {describe_machine(read_machine(run))} |"
        )
    if pending:
        lines += [
            "",
            f"Not finished yet ({len(pending)}; `make experiments` / `make sparse-experiments` run them, "
            "and this section is rebuilt from whatever is finished): " + ", ".join(pending) + ".",
        ]
    lines += ["", image("remaining", "Accuracy vs. weights remaining"), ""]
    lines += [
        "Test metric (query accuracy after adaptation, %, mean ± 95% CI over the same meta-test tasks) "
        "of every recorded level:",
        "",
        comparison_table(runs),
        "",
    ]
    lines += [
        'What the numbers show (computed; "apart": the means differ by more than the sum of their '
        "95% CI half-widths):",
        "",
        *findings(runs),
        "",
    ]
    table = sparse_table(runs)
    if table is not None:
        lines += [
            "Always-sparse training against iterative pruning (test accuracy %, mean ± 95% CI, and "
            "training FLOPs relative to training the dense net; `~`: interpolated between the two "
            f"recorded levels around the column; `{CAPPED}`: the fit ran to its `max_epochs` cap still "
            "learning, not to its plateau, so the figure is a lower bound):",
            "",
            table,
            "",
            *sparse_findings(runs),
            "",
        ]
    lines += [image("rounds", "Best-validation epoch and wall time per round"), ""]
    lines += [image("time", "Validation accuracy vs. meta-training time"), ""]
    lines += [image("layers", "Per-layer sparsity of the final models"), ""]
    if sinusoid is not None:
        lines += [sinusoid_table(sinusoid, doc_dir), ""]
    lines.append(END)
    return "\n".join(line for line in lines if line is not None)


def write_readme(readme: Path, section: str) -> None:
    """Replace the text between the results markers (inclusive) of the document ``readme`` with
    ``section``."""
    if not readme.is_file():
        raise DataError(f"{readme}: no such file (--readme names the document to write the results into)")
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise DataError(f"{readme} has no '{BEGIN}' ... '{END}' markers: add them where the results go")
    readme.write_text(text[:start] + section + text[end + len(END) :])
