"""The four plots of a pruning report (matplotlib, imported only when drawing)."""

from __future__ import annotations

import math
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
    sparse_level,
    sparse_method,
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


def _panels(n: int, width: float = 7.5, height: float = 5.0, columns: Optional[int] = None):
    """A row of ``n`` panels, or a grid of ``columns`` a row; unused grid cells are hidden."""
    import matplotlib.pyplot as plt

    columns = min(n, columns or n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _colors(n: int) -> list:
    """``n`` distinguishable colours: tab10 while it lasts, tab20 beyond (repeating only past 20)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _legend_outside(ax) -> None:
    """The legend right of the axes, so that no curve hides behind it however many runs there are."""
    legend = ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    legend.set_in_layout(False)  # tight_layout keeps the axes' size; the saved bbox takes the legend


def series(group: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """What plot 1 draws as one curve: a pruning run's rounds, or an always-sparse method's runs at
    their levels (``sparse_<method>_<level>``, one round each), in the order first met."""
    found: dict[str, list[Run]] = {}
    for run in group:
        method = sparse_method(run)
        key = f"{run.strategy} (always sparse: sparse_{method}_*)" if method else run.label
        found.setdefault(key, []).append(run)
    return list(found.items())


def family(run: Run) -> str:
    """Plot 3's panel for a run: always-sparse runs by level (they would bury the rest), the others
    together."""
    level = sparse_level(run)
    return f"always sparse, {level}%" if level else "pruning rounds and dense"


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
    fig, axes = _panels(len(groups), columns=1)  # one above the other: each legend has the right side
    for ax, (label, group) in zip(axes, groups.items()):
        xs = [p["x"] for r in group for p in accuracy_points(r) if p["x"] > 0] or [1.0]
        smallest = min(xs)
        pruned = {run.setting for run in group if accuracy_points(run)}
        curves = series(group)
        for (name, members), color in zip(curves, _colors(len(curves))):
            scale = percent_scale(members[0])
            points = sorted(
                (p for run in members for p in accuracy_points(run) if p["x"] > 0), key=lambda p: -p["x"]
            )
            if points:
                always_sparse = sparse_method(members[0]) is not None
                ax.errorbar(
                    [p["x"] for p in points],
                    [p["y"] * scale for p in points],
                    yerr=[(p["ci"] or 0.0) * scale for p in points],
                    marker="s" if always_sparse else "o",
                    linestyle="--" if always_sparse else "-",
                    color=color,
                    capsize=3,
                    label=f"{name}, {'/'.join(sorted({SOURCES[p['source']] for p in points}))}",
                )
            for run in members:
                # the reference of the pruned runs of its learner and data; alone, just a dense run
                if not run.dense or (pruned and run.setting not in pruned):
                    continue
                if (ref := dense_reference(run)) is not None:
                    y, ci = ref
                    name = "dense reference" if pruned else "dense"
                    line = ax.axhline(y * scale, linestyle="--", color="black", label=f"{name}: {run.label}")
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
        _legend_outside(ax)
    _save(fig, file)
    return None


def plot_rounds(runs: Sequence[Run], file: Path) -> Optional[str]:
    """Plot 2: best-validation epoch and wall time per round, or the reason it was skipped. The
    epoch is the table's ``best epoch``: the trainer's global epoch index, 0-based as in the
    checkpoint file names."""
    from matplotlib.ticker import MaxNLocator

    pruned = [r for r in runs if r.rounds]
    if not pruned:
        return "no run has pruning rounds (rounds/round_XX/metrics.json)"
    # A one-round run (always-sparse) is a single dot on both panels: drawn only when nothing else is.
    pruned = [r for r in pruned if len(r.rounds) > 1] or pruned
    fig, (left, right) = _panels(2, width=6.5)
    epochs_seen: list[int] = []
    any_time = False
    for run in pruned:
        epochs = [(r["round"], r["val_epoch"]) for r in run.rounds if r.get("val_epoch") is not None]
        if epochs:
            epochs_seen += [epoch for _, epoch in epochs]
            left.plot(*zip(*epochs), marker="o", label=run.label)
        seconds = round_seconds(run)
        if seconds:
            any_time = True
            rounds = sorted(seconds)
            right.plot(rounds, [seconds[r] for r in rounds], marker="s", label=run.label)
    for ax, ok, what in (
        (left, bool(epochs_seen), "no val_epoch in metrics.json"),
        (right, any_time, "no prune/round TensorBoard events"),
    ):
        ax.set_xlabel("pruning round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ok and ax is right:
            _legend_outside(ax)
        elif not ok:
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)
    if epochs_seen:  # whole epochs, from epoch 0: never a 0.96-1.04 axis around one value
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_ylim(-0.5, max(epochs_seen) + 0.5)
    left.set_ylabel("epoch of the best validation (0-based, as the table)")
    left.set_title("When each round's best validation came")
    right.set_ylabel("wall time of the round (s)")
    right.set_title("Wall time per round (between prune/round events)")
    _save(fig, file)
    return None


def plot_time(runs: Sequence[Run], file: Path) -> Optional[str]:
    """Plot 3: validation metric vs. meta-training time, or the reason it was skipped."""
    panels: dict[tuple[str, str], list[Run]] = {}
    for label, group in _groups(runs).items():
        for run in group:
            if metric_over_time(run):
                panels.setdefault((label, family(run)), []).append(run)
    if not panels:
        return "no run has TensorBoard events with a val/ metric"
    fig, axes = _panels(len(panels), width=7.0, height=4.5, columns=2)
    for ax, ((label, kind), group) in zip(axes, panels.items()):
        for run, color in zip(group, _colors(len(group))):
            minutes, values = zip(*metric_over_time(run))
            scale = percent_scale(run)
            ax.plot(minutes, [v * scale for v in values], marker=".", color=color, label=run.label)
        ax.set_xlabel("meta-training wall time since the fit started (min)")
        ax.set_ylabel(label.replace("query", "validation query"))
        ax.set_title(f"Validation metric vs. meta-training time: {kind}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")  # curves rise from the left: that corner is free
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
    table = layer_table(finals, names)
    fig, (ax,) = _panels(1, width=max(7.0, 2.0 + 1.3 * len(names)), height=max(3.5, 1.5 + 0.32 * len(finals)))
    image = ax.imshow(table, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            if not math.isnan(value):  # the layer exists in this run
                ink = "black" if value > 60 else "white"
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize="x-small", color=ink)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(
        names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center"
    )
    ax.set_yticks(range(len(finals)))
    ax.set_yticklabels(
        [
            f"{run.label}: round {run.rounds[-1]['round']}, {run.rounds[-1]['sparsity']:.1%}"
            for run, _ in finals
        ],
        fontsize="small",
    )
    ax.set_xlabel("layer")
    ax.set_title("Per-layer sparsity of the final model (% of the layer's weights pruned)")
    fig.colorbar(image, ax=ax, label="weights pruned (%)")
    _save(fig, file)
    return None


def layer_table(finals: Sequence[tuple[Run, dict]], names: Sequence[str]) -> list[list[float]]:
    """Plot 4's cells: % of each layer pruned in each run's final round, NaN where a run lacks it."""
    return [
        [100.0 * layers[n]["sparsity"] if n in layers else float("nan") for n in names]
        for _, layers in finals
    ]


def _save(fig, file: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    legends = [legend for ax in fig.axes if (legend := ax.get_legend()) is not None]
    fig.savefig(file, dpi=110, bbox_inches="tight", bbox_extra_artists=legends)  # outside legends too
    plt.close(fig)
