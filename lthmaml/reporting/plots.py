"""The four plots of a pruning report (matplotlib, imported only when drawing)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from lthmaml.reporting.runs import (
    SOURCES,
    Run,
    accuracy_points,
    dense_reference,
    metric_over_time,
    remaining_ticks,
    round_seconds,
)

PLOTS = {
    "remaining": "accuracy_vs_remaining.png",
    "rounds": "rounds.png",
    "time": "accuracy_vs_time.png",
    "layers": "layer_sparsity.png",
}


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
        key = "val_epoch_in_round" if any(r.get("val_epoch_in_round") for r in run.rounds) else "val_epoch"
        in_round = in_round or key == "val_epoch_in_round"
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
        (left, any_epoch, "no val_epoch in metrics.json"),
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
