"""The evidence archive (lthmaml/reporting/archive.py): a run's records without its weights, from
which docs/results.md is rebuilt after the run folder is gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_report import dense_run, lottery_run  # noqa: F401 (fixtures)

from lthmaml.errors import DataError
from lthmaml.reporting import archive
from lthmaml.reporting import readme as results
from lthmaml.reporting import runs as reading


def add_weights(run: Path) -> None:
    """What a real run folder also holds and the archive must leave behind."""
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights" * 100)
    for folder in (run / "rounds").glob("round_*"):
        (folder / "model.ckpt").write_bytes(b"weights")
        (folder / "mask.safetensors").write_bytes(b"mask")
    (run / "machine.json").write_text('{"cpu_count": 2}')


def test_archive_keeps_what_the_report_reads_and_no_weights(lottery_run, tmp_path):  # noqa: F811
    add_weights(lottery_run)
    destination = tmp_path / "evidence" / "omniglot" / "version_0"
    copied = archive.archive_run(lottery_run, destination)

    kept = sorted(str(p.relative_to(destination)) for p in destination.rglob("*") if p.is_file())
    assert kept == sorted(map(str, copied))
    assert "config.yaml" in kept and "machine.json" in kept
    rounds = [f"rounds/round_{r:02d}/metrics.json" for r in range(3)]
    assert [k for k in kept if k.startswith("rounds/")] == rounds
    assert "scalars.json" in kept  # the events as text: no binary file is archived
    assert not [k for k in kept if k.endswith((".ckpt", ".safetensors")) or "tfevents" in k]
    assert not destination.with_name("version_0.partial").exists()

    original, kept_run = reading.load_run(lottery_run), reading.load_run(destination)
    assert results.comparison_table([kept_run]) == results.comparison_table([original])
    assert kept_run.scalars == original.scalars and kept_run.rounds == original.rounds
    assert kept_run.start_time == original.start_time


def test_archiving_again_replaces_the_previous_archive(lottery_run, tmp_path):  # noqa: F811
    destination = tmp_path / "evidence" / "omniglot" / "version_0"
    archive.archive_run(lottery_run, destination)
    (destination / "stale.txt").write_text("from an older run")
    shutil.rmtree(lottery_run / "rounds" / "round_02")  # the newer run has one round less
    archive.archive_run(lottery_run, destination)
    assert not (destination / "stale.txt").exists()
    assert not (destination / "rounds" / "round_02").exists()
    assert (destination / "rounds" / "round_01" / "metrics.json").is_file()


def test_archive_of_something_that_is_no_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DataError, match="not a run folder"):
        archive.archive_run(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_:
        archive.main([str(tmp_path), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err and "not a run folder" in err


def test_results_section_names_the_pending_experiments_and_where_the_records_are(
    lottery_run,  # noqa: F811
    dense_run,  # noqa: F811
    tmp_path,
):
    runs = [reading.load_run(p) for p in (lottery_run, dense_run)]
    readme = tmp_path / "README.md"
    section = results.results_section(runs, tmp_path / "docs", readme, None, ["taylor", "sparse_rigl_90"])
    assert "Not finished yet (2; " in section and ": taylor, sparse_rigl_90." in section
    records = "read from (config, TensorBoard events, round metrics): [`runs/`](runs/)"
    assert records in section
    assert "Not finished yet" not in results.results_section(runs, tmp_path / "docs", readme, None)


def test_the_command_of_an_always_sparse_run_names_its_method_config_and_sparsity(tmp_path):
    run = reading.Run(path=tmp_path / "sparse_rigl_90" / "version_0", strategy="RigL", config={}, rounds=[])
    assert results.command(run) == (
        "lthmaml fit -c configs/experiments/base.yaml -c configs/experiments/sparse/rigl.yaml"
        " --trainer.callbacks.init_args.sparsity 0.90"
    )
    run = reading.Run(path=tmp_path / "lth_distill" / "version_0", strategy="Lottery", config={}, rounds=[])
    assert results.command(run).endswith("-c configs/experiments/sparse/lth_distill.yaml")
    run = reading.Run(path=tmp_path / "taylor" / "version_0", strategy="TaylorPruning", config={}, rounds=[])
    assert results.command(run).endswith("-c configs/experiments/taylor.yaml")
    run = reading.Run(
        path=tmp_path / "lth_rewind_init_rerun" / "version_0", strategy="Lottery", config={}, rounds=[]
    )
    assert results.command(run).endswith(
        "-c configs/experiments/lth_rewind_init.yaml --trainer.logger.init_args.name lth_rewind_init_rerun"
    )
