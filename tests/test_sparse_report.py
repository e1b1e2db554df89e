"""README's always-sparse table: accuracy at 80/90/95%, interpolated for iterative runs, and
training FLOPs relative to the dense run, computed from the records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_report import config, write_events

from lthmaml.reporting import runs as reading
from lthmaml.reporting.sparse import dense_run, sparse_findings, sparse_table

DENSE_FORWARD = 1000.0


def record(folder: Path, index: int, sparsity: float, test: float, ci: float, **extra) -> None:
    folder = folder / "rounds" / f"round_{index:02d}"
    folder.mkdir(parents=True)
    values = {
        "round": index,
        "pruning_step": index,
        "epoch": index,
        "sparsity": sparsity,
        "global_step": extra.pop("global_step", 100),
        "monitor": "val/acc_post",
        "test": test,
        "test_metric": "test/acc_post",
        "test_metrics": {"test/acc_post": test, "test/acc_post_ci95": ci},
        "dense_forward_flops": DENSE_FORWARD,
        **extra,
    }
    (folder / "metrics.json").write_text(json.dumps(values))


def make_run(root: Path, name: str, callbacks: list[dict]) -> Path:
    run = root / name / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config(callbacks)))
    write_events(run, [("val/acc_post", 10.0, 100, 0.5)])
    return run


@pytest.fixture
def runs(tmp_path: Path) -> list:
    dense = tmp_path / "dense" / "version_0"
    dense.mkdir(parents=True)
    (dense / "config.yaml").write_text(yaml.safe_dump(config([])))
    write_events(dense, [("val/acc_post", 10.0, 200, 0.9), ("test/acc_post", 20.0, 200, 0.95)])
    lottery = make_run(tmp_path, "lth_rewind_init", [{"class_path": "callbacks.LotteryTicket"}])
    # Levels 0, 87.5, 93.75 %: each round 200 steps at its own forward cost.
    for index, (s, test, forward) in enumerate(
        [(0.0, 0.95, 1000.0), (0.875, 0.92, 200.0), (0.9375, 0.90, 100.0)]
    ):
        record(
            lottery,
            index,
            s,
            test,
            0.01,
            forward_flops=forward,
            round_start_step=200 * index,
            global_step=200 * (index + 1),
        )
    rigl = make_run(tmp_path, "sparse_rigl_90", [{"class_path": "callbacks.RigL"}])
    record(rigl, 0, 0.9, 0.905, 0.02, details={"train_flops": 150_000.0})
    return [reading.load_run(p) for p in (dense, lottery, rigl)]


def test_the_table_holds_interpolated_iterative_accuracy_and_flops_against_dense(runs):
    table = sparse_table(runs).splitlines()
    rigl = next(line for line in table if line.startswith("| rigl |"))
    lottery = next(line for line in table if line.startswith("| lth_rewind_init |"))
    dense_flops = 3 * DENSE_FORWARD * 200  # the dense run's 200 steps
    assert f"90.50 ± 2.00, {150_000 / dense_flops:.2f}x" in rigl  # 0.25x
    # 90%: 2.5/6.25 of the way from 87.5% (92.0) to 93.75% (90.0): 91.20, FLOPs to reach 93.75%.
    lottery_flops = 3 * (1000 * 200 + 200 * 200 + 100 * 200)
    assert f"~91.20 ± 1.00, {lottery_flops / dense_flops:.2f}x" in lottery  # 1.30x: three rounds
    assert "—" in rigl and "| dense (dense) | 95.00, 1.00x" in table[-1]


def test_the_finding_compares_the_best_of_each_family_at_90(runs):
    (line,) = sparse_findings(runs)
    assert "rigl (90.50%)" in line and "0.70 points below" in line and "lth_rewind_init (~91.20%)" in line
    assert f"{150_000 / (3 * (1000 * 200 + 200 * 200 + 100 * 200)):.2f}x" in line and "met." in line


def test_the_dense_row_is_a_dense_run_of_the_same_learner_and_data(tmp_path, runs):
    other = tmp_path / "elsewhere" / "dense" / "version_0"
    other.mkdir(parents=True)
    protonet = {**config([]), "model": {"class_path": "lthmaml.meta.protonet.ProtoNet"}}
    (other / "config.yaml").write_text(yaml.safe_dump(protonet))
    write_events(other, [("val/acc_post", 10.0, 50, 0.9), ("test/acc_post", 20.0, 50, 0.97)])
    other = reading.load_run(other)
    assert dense_run([other, *runs]) is runs[0]  # the MAML one, though the ProtoNet one comes first
    table = sparse_table([other, *runs[1:]]).splitlines()
    assert not [row for row in table if row.startswith("| dense")]  # a ProtoNet is no MAML's reference
    assert "x" not in next(row for row in table if row.startswith("| rigl |"))  # no FLOPs reference


def test_no_sparse_run_no_table(runs):
    assert sparse_table(runs[:2]) is None


@pytest.mark.parametrize("epochs_trained, marked", [(12, True), (11, False)])
def test_a_fit_that_ran_to_its_epoch_cap_is_marked_a_lower_bound(tmp_path, runs, epochs_trained, marked):
    folder = make_run(tmp_path, "sparse_set_95", [{"class_path": "callbacks.SET"}])
    settings = yaml.safe_load((folder / "config.yaml").read_text())
    settings["trainer"]["max_epochs"] = 12
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    # 10 steps an epoch; Lightning logs the epoch with each training step, and the test epoch after.
    steps = 10 * epochs_trained
    events = [("epoch", float(s), s, float(s // 10)) for s in range(0, steps, 5)]
    write_events(folder, [("val/acc_post", 10.0, 100, 0.5), *events, ("epoch", 999.0, steps, 12.0)])
    record(folder, 0, 0.95, 0.88, 0.02, global_step=steps, details={"train_flops": 60_000.0})
    table = sparse_table([*runs, reading.load_run(folder)]).splitlines()
    (line,) = [row for row in table if row.startswith("| set |")]
    assert line.endswith("0.10x * |") is marked and "88.00 ± 2.00, 0.10x" in line
    rigl = next(row for row in table if row.startswith("| rigl |"))
    assert "*" not in rigl  # max_epochs -1: no cap to reach


def test_plots_draw_an_always_sparse_method_as_one_curve_and_its_levels_in_their_own_panels(
    tmp_path, runs, monkeypatch
):
    from lthmaml.reporting import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, file: figures.append(fig))
    rigl_80 = make_run(tmp_path, "sparse_rigl_80", [{"class_path": "callbacks.RigL"}])
    record(rigl_80, 0, 0.8, 0.93, 0.01, details={"train_flops": 200_000.0})
    everything = [*runs, reading.load_run(rigl_80)]
    assert plots.plot_remaining(everything, tmp_path / "x.png") is None
    (ax,) = figures[0].axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    (rigl,) = [label for label in labels if "RigL" in label]
    assert rigl == "RigL (always sparse: sparse_rigl_*), test"
    curve = next(c for c in ax.containers if c.get_label() == rigl)  # one errorbar, both levels
    xs, ys = curve.lines[0].get_data()
    assert list(xs) == pytest.approx([0.2, 0.1]) and list(ys) == pytest.approx([93.0, 90.5])
    assert plots.plot_time(everything, tmp_path / "y.png") is None
    titles = sorted(a.get_title().rpartition(": ")[2] for a in figures[1].axes if a.get_visible())
    assert titles == ["always sparse, 80%", "always sparse, 90%", "pruning rounds and dense"]


def test_the_layer_map_holds_each_final_rounds_layer_sparsity_and_nan_where_absent(runs):
    from lthmaml.reporting.plots import layer_table

    finals = [
        (runs[1], {"a": {"sparsity": 0.5}, "b": {"sparsity": 0.25}}),
        (runs[2], {"b": {"sparsity": 0.9}}),
    ]
    table = layer_table(finals, ["a", "b"])
    assert table[0] == [50.0, 25.0] and table[1][1] == pytest.approx(90.0) and table[1][0] != table[1][0]
