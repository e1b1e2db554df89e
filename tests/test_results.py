"""docs/results.md: the cross-run table, computed findings, sinusoid table and the results markers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_report import CI, SPARSITY, TEST, dense_run, lottery_run  # noqa: F401 (fixtures)

from lthmaml.errors import DataError
from lthmaml.reporting import readme as results
from lthmaml.reporting import report
from lthmaml.reporting import runs as reading

CONTROL_TEST = [0.91234, 0.80, 0.79]  # level 20%: 8.77 points below the ticket (apart); 36%: 1.0 (within)


@pytest.fixture
def control_run(lottery_run: Path) -> Path:  # noqa: F811
    """The lottery run's twin with reinit_random and its own test numbers."""
    run = lottery_run.parents[1] / "control" / "version_0"
    shutil.copytree(lottery_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"]["reinit_random"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for r, value in enumerate(CONTROL_TEST):
        file = run / "rounds" / f"round_{r:02d}" / "metrics.json"
        record = json.loads(file.read_text())
        record["test"] = record["test_metrics"]["test/acc_post"] = value
        file.write_text(json.dumps(record))
    return run


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_comparison_table_holds_each_runs_logged_test_metric_per_level(lottery_run, control_run, dense_run):  # noqa: F811
    runs = [reading.load_run(p) for p in (lottery_run, control_run, dense_run)]
    rows = table_rows(results.comparison_table(runs))
    assert rows[0] == ["sparsity", "weights remaining", "omniglot", "control"]  # dense: no column
    for r, s in enumerate(SPARSITY):
        assert rows[2 + r] == [
            f"{100 * s:.1f}%",
            f"{100 - 100 * s:.1f}%",
            f"{100 * TEST[r]:.2f} ± {100 * CI[r]:.2f}",
            f"{100 * CONTROL_TEST[r]:.2f} ± {100 * CI[r]:.2f}",
        ]


def test_findings_are_computed_from_the_levels(lottery_run, control_run, dense_run):  # noqa: F811
    for r, epoch in enumerate([3, 1, 2]):
        file = lottery_run / "rounds" / f"round_{r:02d}" / "metrics.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "val_epoch_in_round": epoch}))
    runs = [reading.load_run(p) for p in (lottery_run, control_run, dense_run)]
    text = "\n".join(results.findings(runs))
    # 88.77 vs 91.23 at 20% is within 1.11 + 2.22; 80.00 at 36% is 11.2 below, apart.
    assert "**omniglot** starts at 91.23 ± 1.11 at 0.0% sparsity; its best level is 91.23 ± 1.11" in text
    assert "Sparsest level not apart below the first: 20.0% (88.77 ± 2.22 at 20.0% sparsity)" in text
    assert "at 2 pruned levels: better and apart at 1, worse and apart at 0, within the CIs at 1" in text
    assert "Round wall time: 70 s (round 0) and 70 s (round 2)." in text  # events at 70, 130, 200 s
    assert "Epoch of best validation within each round, round 0 on: 3, 1, 2." in text
    assert "**dense** (no pruning, one round's budget): 93.00 ± 1.50." in text


# Against TEST: 20%: +2.23 points, under 2.22 + 2.22 (within); 36%: +1.00 (within).
DISTILLED_TEST = [0.91234, 0.91, 0.81]


def distilled_twin(undistilled: Path, name: str, **init_args) -> Path:
    """The lottery run again with a teacher (and any other option changed), its own test numbers."""
    run = undistilled.parents[1] / name / "version_0"
    shutil.copytree(undistilled, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"][1]["init_args"].update(
        distill_weight=1.0, distill_temperature=4.0, **init_args
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for r, value in enumerate(DISTILLED_TEST):
        file = run / "rounds" / f"round_{r:02d}" / "metrics.json"
        record = json.loads(file.read_text())
        record["test"] = record["test_metrics"]["test/acc_post"] = value
        record["test_metrics"]["test/acc_post_ci95"] = 0.02222
        file.write_text(json.dumps(record))
    return run


def test_distillation_is_compared_level_by_level_with_the_same_rounds_without_it(lottery_run, control_run):  # noqa: F811
    distilled = distilled_twin(lottery_run, "distilled")
    other = distilled_twin(lottery_run, "distilled_other_rate", rounds=3)  # no undistilled twin
    runs = [reading.load_run(p) for p in (lottery_run, control_run, distilled, other)]
    lines = results.findings(runs)
    (line,) = [line for line in lines if line.startswith("- **distilled**")]
    assert (
        "Distillation's effect, against the same rounds without it (omniglot) at 2 pruned levels: "
        "20.0%: 91.00 ± 2.22 against 88.77 ± 2.22 (+2.23 points, within the CIs); "
        "36.0%: 81.00 ± 2.22 against 80.00 ± 3.33 (+1.00 points, within the CIs)."
    ) in line
    assert "Distillation" not in next(line for line in lines if line.startswith("- **distilled_other_rate**"))
    assert "Distillation" not in next(line for line in lines if line.startswith("- **omniglot**"))
    assert results.undistilled_twin(runs[3], runs) is None and results.undistilled_twin(runs[0], runs) is None
    assert "differ" not in line  # the same round 0: the teacher is the only difference

    # A second run without a teacher whose round 0 tests otherwise (another machine's trajectory):
    # the twin that started the same is preferred, and alone it is compared with the caveat.
    rerun = lottery_run.parents[1] / "elsewhere" / "version_0"
    shutil.copytree(lottery_run, rerun)
    file = rerun / "rounds" / "round_00" / "metrics.json"
    record = json.loads(file.read_text())
    record["test"] = record["test_metrics"]["test/acc_post"] = 0.95
    file.write_text(json.dumps(record))
    elsewhere = reading.load_run(rerun)
    assert results.undistilled_twin(runs[2], [elsewhere, *runs]) is runs[0]
    (line,) = [x for x in results.findings([elsewhere, runs[2]]) if x.startswith("- **distilled**")]
    assert "against the same rounds without it (elsewhere)" in line
    assert "Their dense rounds differ (91.23 against 95.00" in line


def test_results_section_is_replaced_between_the_markers_only_and_regenerates_identically(
    lottery_run,  # noqa: F811
    dense_run,  # noqa: F811
    tmp_path,
):
    """docs/results.md is the section's home: its links are relative to docs/, not the repository."""
    readme = tmp_path / "docs" / "results.md"
    readme.parent.mkdir()
    readme.write_text(f"# Title\n\nBefore.\n\n{results.BEGIN}\nstale text\n{results.END}\n\nAfter.\n")
    sinusoid = tmp_path / "sinusoid.json"
    sinusoid.write_text(
        json.dumps(
            {
                "iterations": 20000,
                "paper_iterations": 70000,
                "train_seconds": 600.0,
                "machine": {"cpu_count": 2, "torch_threads": 1, "torch": "2.13.0+cpu", "lightning": "2.6.6"},
                "settings": {"shots": 5, "test_tasks": 600},
                "tests": [
                    {
                        "eval_inner_steps": 1,
                        "mse": 0.6631,
                        "ci95": 0.0582,
                        "paper": 0.67,
                        "relative_to_paper": -0.0104,
                    }
                ],
                "cnp": {"mse": 0.1234, "ci95": 0.0121},
                "plot": str(tmp_path / "docs" / "results" / "sinusoid_predictions.png"),
            }
        )
    )
    (lottery_run / "machine.json").write_text(json.dumps({"cpu_count": 2, "torch_threads": 1, "gpu": None}))
    argv = [
        str(lottery_run),
        str(dense_run),
        "-o",
        str(tmp_path / "docs" / "results"),
        "--readme",
        str(readme),
        "--sinusoid",
        str(sinusoid),
    ]
    assert report.main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n" + results.BEGIN) and text.endswith(
        results.END + "\n\nAfter.\n"
    )
    assert "stale text" not in text
    assert "![Accuracy vs. weights remaining](results/accuracy_vs_remaining.png)" in text
    assert "Per-round tables: [results/report.md](results/report.md)" in text
    assert "![MAML and the CNP on four sinusoid test tasks](results/sinusoid_predictions.png)" in text
    assert (tmp_path / "docs" / "results" / "accuracy_vs_remaining.png").is_file()
    assert "| 1 | 0.663 ± 0.058 | 0.67 | -1.0% |" in text
    assert "| CNP (no steps) | 0.123 ± 0.012 | | |" in text  # on the same test tasks
    assert "| 2 CPU cores, no GPU, 1 torch thread(s), 1 process(es) |" in text
    assert (
        "| omniglot | `lthmaml fit --config" in text and "| 3 | 3.3 min |" in text
    )  # 3 rounds, 200 s of events
    assert report.main(argv) == 0
    assert readme.read_text() == text


def test_missing_markers_or_bad_sinusoid_json_are_one_line_errors(lottery_run, tmp_path, capsys):  # noqa: F811
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        report.main([str(lottery_run), "-o", str(tmp_path / "out"), "--readme", str(readme)])
    assert "has no '<!-- results:begin -->' ... '<!-- results:end -->' markers" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="bad.json: not a bench/sinusoid.py result"):
        results.sinusoid_table(bad)
