"""Always-sparse training against iterative pruning, as the talk's table compares them.

One row per method, one column per sparsity (80, 90, 95 %): the test accuracy (mean ± 95% CI) and
the training FLOPs relative to training the dense net (the dense experiment's steps at its dense
forward cost, ``3 x dense_forward_flops`` a step). An always-sparse run (``sparse_<method>_<level>``)
gives its record's ``details.train_flops``; an iterative run (lottery tickets, Powerprop, ...) the
FLOPs of every round up to the level (``3 x forward_flops x`` the round's steps), and its accuracy at
a column's sparsity by linear interpolation between its two recorded levels around it (marked ``~``:
the lottery schedule's levels are 50, 75, 87.5, 93.75 %, none of them at a column). An always-sparse
cell is marked ``*`` when its fit ran to the trainer's ``max_epochs`` cap instead of ending on its
plateau: the net was still learning, so the figure is a lower bound on what the method reaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from lthmaml.reporting.runs import Run, last_scalar, round_value, run_name, sparse_method

LEVELS = (0.8, 0.9, 0.95)
CAPPED = "*"


def training_flops(run: Run, upto_round: int) -> Optional[float]:
    """An iterative run's training cost per example up to the end of round ``upto_round``."""
    total = 0.0
    for record in run.rounds[: upto_round + 1]:
        forward, start = record.get("forward_flops"), record.get("round_start_step")
        if forward is None or start is None:
            return None
        total += 3 * forward * (record["global_step"] - start)
    return total


def point(run: Run, record: dict[str, Any]) -> Optional[tuple[float, Optional[float]]]:
    value, ci, _ = round_value(run, record)
    return None if value is None else (value, ci)


def at_level(run: Run, target: float) -> Optional[dict[str, Any]]:
    """The run's accuracy at sparsity ``target``: a record within 0.5 points of it, or the linear
    interpolation between the two records around it; with the FLOPs spent to reach it."""
    records = [(float(r["sparsity"]), index, r) for index, r in enumerate(run.rounds)]
    for sparsity, index, record in records:
        found = point(run, record)
        if abs(sparsity - target) <= 0.005 and found is not None:
            return {"value": found[0], "ci": found[1], "flops": flops_of(run, index, record), "exact": True}
    below = [(s, i, r) for s, i, r in records if s < target and point(run, r) is not None]
    above = [(s, i, r) for s, i, r in records if s > target and point(run, r) is not None]
    if not below or not above:
        return None
    (s0, _, r0), (s1, i1, r1) = max(below, key=lambda x: x[0]), min(above, key=lambda x: x[0])
    (v0, c0), (v1, c1) = point(run, r0), point(run, r1)
    w = (target - s0) / (s1 - s0)
    ci = None if c0 is None or c1 is None else max(c0, c1)
    return {"value": v0 + w * (v1 - v0), "ci": ci, "flops": flops_of(run, i1, r1), "exact": False}


def flops_of(run: Run, index: int, record: dict[str, Any]) -> Optional[float]:
    details = record.get("details") or {}
    if "train_flops" in details:
        return float(details["train_flops"])
    return training_flops(run, index)


def dense_flops(dense: Optional[Run], runs: Sequence[Run]) -> Optional[float]:
    """Training the dense net: the dense run's steps x 3 x the dense forward cost (any record's)."""
    if dense is None:
        return None
    forward = next(
        (r["dense_forward_flops"] for run in runs for r in run.rounds if r.get("dense_forward_flops")), None
    )
    steps = max((step for events in dense.scalars.values() for _, step, _ in events), default=0)
    return None if forward is None or not steps else 3.0 * forward * steps


def ran_to_cap(run: Run, record: dict[str, Any]) -> bool:
    """Whether a one-round fit trained all its ``max_epochs`` epochs instead of ending on its plateau
    (EarlyStopping stops it before): the ``epoch`` Lightning logs with the fit's last training step."""
    cap = (run.config.get("trainer") or {}).get("max_epochs")
    trained = [epoch for _, step, epoch in run.scalars.get("epoch", []) if step < record["global_step"]]
    return isinstance(cap, int) and cap > 0 and bool(trained) and max(trained) + 1 >= cap


def cells_by_method(runs: Sequence[Run]) -> dict[str, dict[float, dict[str, Any]]]:
    """Every method's cells by column sparsity: always-sparse runs first, then iterative ones."""
    sparse = [run for run in runs if sparse_method(run) and run.rounds]
    methods: dict[str, dict[float, dict[str, Any]]] = {}
    for run in sparse:
        method = sparse_method(run)
        record = run.rounds[0]
        found = point(run, record)
        if found is not None:
            level = min(LEVELS, key=lambda x: abs(x - float(record["sparsity"])))
            methods.setdefault(method, {})[level] = {
                "value": found[0],
                "ci": found[1],
                "flops": flops_of(run, 0, record),
                "exact": True,
                "capped": ran_to_cap(run, record),
            }
    for run in runs:
        if run.rounds and not sparse_method(run) and len(run.rounds) > 1:
            methods[run_name(run)] = {x: p for x in LEVELS if (p := at_level(run, x)) is not None}
    return methods


def dense_run(runs: Sequence[Run]) -> Optional[Run]:
    """The dense fit of the always-sparse runs' learner and data (``dense`` by name first)."""
    settings = {run.setting for run in runs if sparse_method(run) and run.rounds}
    candidates = [run for run in runs if run.dense and run.setting in settings]
    return next((run for run in candidates if run_name(run) == "dense"), None) or next(iter(candidates), None)


def sparse_table(runs: Sequence[Run]) -> Optional[str]:
    """The comparison table, or None when there is no always-sparse run."""
    if not any(sparse_method(run) and run.rounds for run in runs):
        return None
    dense = dense_run(runs)
    reference = dense_flops(dense, runs)
    methods = cells_by_method(runs)
    header = (
        "| method | " + " | ".join(f"{100 * x:.0f}% sparse: accuracy, training FLOPs" for x in LEVELS) + " |"
    )
    lines = [header, "|---|" + "---:|" * len(LEVELS)]
    for method, cells in methods.items():
        lines.append(
            f"| {method} | " + " | ".join(format_cell(cells.get(x), reference) for x in LEVELS) + " |"
        )
    dense_ref = last_scalar(dense, f"test/{dense.metric}") if dense is not None else None
    if dense_ref is not None:
        lines.append(f"| dense ({run_name(dense)}) | {100 * dense_ref:.2f}, 1.00x | | |")
    return "\n".join(lines)


def format_cell(cell: Optional[dict[str, Any]], reference: Optional[float]) -> str:
    if cell is None:
        return "—"
    text = ("" if cell["exact"] else "~") + f"{100 * cell['value']:.2f}"
    if cell["ci"] is not None:
        text += f" ± {100 * cell['ci']:.2f}"
    if cell["flops"] is not None and reference:
        text += f", {cell['flops'] / reference:.2f}x"
    return text + (f" {CAPPED}" if cell.get("capped") else "")


def sparse_findings(runs: Sequence[Run], target: float = 0.9) -> list[str]:
    """The issue's target at ``target`` sparsity: the best always-sparse method against the best
    iterative one, the accuracy gap and the ratio of their training FLOPs."""
    methods = cells_by_method(runs)
    sparse_names = {method for r in runs if (method := sparse_method(r))}
    scored = {m: c[target] for m, c in methods.items() if target in c}
    always = {m: c for m, c in scored.items() if m in sparse_names}
    iterative = {m: c for m, c in scored.items() if m not in sparse_names}
    if not always or not iterative:
        return []
    best_sparse = max(always, key=lambda m: always[m]["value"])
    best_iterative = max(iterative, key=lambda m: iterative[m]["value"])
    a, b = always[best_sparse], iterative[best_iterative]
    gap = 100 * (b["value"] - a["value"])
    ratio = None if not a["flops"] or not b["flops"] else a["flops"] / b["flops"]
    met = gap <= 2.0 and ratio is not None and ratio < 0.5
    return [
        f"- At {100 * target:.0f}% sparsity the best always-sparse method, {best_sparse} "
        f"({100 * a['value']:.2f}%), is {gap:.2f} points below the best iterative pruning, "
        f"{best_iterative} ({'~' if not b['exact'] else ''}{100 * b['value']:.2f}%), at "
        + ("unknown" if ratio is None else f"{ratio:.2f}x")
        + " its training FLOPs: target (within 2 points at under half the FLOPs) "
        + ("met." if met else "missed.")
    ]
