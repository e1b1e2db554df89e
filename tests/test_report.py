"""The report command: pictures from run folders, tables that equal the logged numbers, clear errors."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from lthmaml.errors import DataError
from lthmaml.reporting import plots, report
from lthmaml.reporting import runs as reading

T0 = 1_700_000_000.0  # the fit's start: the event file's first event
SPARSITY = [0.0, 0.2, 0.36]
TEST = [0.91234, 0.88765, 0.80001]
CI = [0.01111, 0.02222, 0.03333]
BEST_VAL = [0.9, 0.87654, 0.81]
ROUND_ENDS = [70.0, 130.0, 200.0]  # seconds after T0 of each prune/round event
VAL = [(60.0, 9, 0.5), (120.0, 19, 0.7), (180.0, 29, 0.8)]  # (seconds after T0, step, val/acc_post)


def write_events(folder: Path, scalars: list[tuple[str, float, int, float]]) -> None:
    """An event file with known wall times: (tag, seconds after T0, step, value)."""
    with open(folder / "events.out.tfevents.1.test.0", "wb") as file:
        writer = RecordWriter(file)
        writer.write(event_pb2.Event(wall_time=T0, file_version="brain.Event:2").SerializeToString())
        for tag, seconds, step, value in scalars:
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
            event = event_pb2.Event(wall_time=T0 + seconds, step=step, summary=summary)
            writer.write(event.SerializeToString())


def config(callbacks: list[dict]) -> dict:
    return {
        "trainer": {"callbacks": callbacks, "max_epochs": -1},
        "model": {"class_path": "lthmaml.meta.maml.MAML"},
        "data": {"class_path": "lthmaml.data.OmniglotDataModule"},
        "checkpoint": {"monitor": "val/acc_post", "mode": "max"},
    }


@pytest.fixture
def lottery_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "omniglot" / "version_0"
    run.mkdir(parents=True)
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},  # not a strategy
        {"class_path": "callbacks.lottery.LotteryTicket", "init_args": {"rounds": 2}},
    ]
    (run / "config.yaml").write_text(yaml.safe_dump(config(callbacks)))
    for r, s in enumerate(SPARSITY):
        folder = run / "rounds" / f"round_{r:02d}"
        folder.mkdir(parents=True)
        layers = {
            "net.features.0": {"name": "net.features.0", "total": 100, "zeros": int(100 * s), "sparsity": s},
            "net.head": {"name": "net.head", "total": 50, "zeros": int(25 * s), "sparsity": s / 2},
        }
        record = {
            "round": r,
            "sparsity": s,
            "pruning_step": r,
            "global_step": 20 * r + 10,
            "epoch": 2 * r + 1,
            "recorded": "best",
            "monitor": "val/acc_post",
            "val": BEST_VAL[r],
            "val_epoch": 2 * r + 1,
            "val_step": 20 * r + 10,
            "val_metrics": {"val/acc_post": BEST_VAL[r]},
            "test": TEST[r],
            "test_metric": "test/acc_post",
            "test_metrics": {"test/acc_post": TEST[r], "test/acc_post_ci95": CI[r]},
            "layers": layers,
        }
        (folder / "metrics.json").write_text(json.dumps(record))
    write_events(
        run,
        [("val/acc_post", t, step, v) for t, step, v in VAL]
        + [("prune/round", t, 10 * r + 10, float(r)) for r, t in enumerate(ROUND_ENDS)]
        # test_each_round logs every round's record again, at its step, when the fit's tests run
        # (here at once, within the last event's second)
        + [("prune/round", ROUND_ENDS[-1], 10 * r + 10, float(r)) for r in range(len(ROUND_ENDS))],
    )
    return run


@pytest.fixture
def dense_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "dense" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config([])))
    write_events(
        run,
        [("val/acc_post", 30.0, 9, 0.6), ("val/acc_post", 90.0, 19, 0.85)]
        + [("test/acc_post", 100.0, 20, 0.93), ("test/acc_post_ci95", 100.0, 20, 0.015)],
    )
    return run


def parse_table(markdown: str) -> list[dict[str, str]]:
    """The first Markdown table after the run's heading, as one dict per row."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_report_writes_four_pngs_and_the_logged_numbers(lottery_run: Path, dense_run: Path, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(lottery_run), str(dense_run), "-o", str(out)]) == 0
    for name in plots.PLOTS.values():
        with Image.open(out / name) as image:
            image.verify()  # a complete, valid PNG
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
            assert len(set(image.convert("L").getdata())) > 10  # something drawn, not a blank canvas
    text = (out / "report.md").read_text()
    for name in plots.PLOTS.values():
        assert f"]({name})" in text
    assert "Skipped" not in text
    section = text.split("## LotteryTicket")[1].split("## dense")[0]
    rows = parse_table(section)
    assert [int(row["round"]) for row in rows] == [0, 1, 2]
    for r, row in enumerate(rows):
        assert row["sparsity"] == f"{100 * SPARSITY[r]:.2f}%"
        assert float(row["weights remaining"].rstrip("%")) == pytest.approx(100 * (1 - SPARSITY[r]), abs=5e-3)
        assert float(row["best val"]) == pytest.approx(BEST_VAL[r], abs=5e-5)
        assert int(row["best epoch (0-based)"]) == 2 * r + 1
        test, ci = (float(x) for x in row["test +- 95% CI"].split("±"))
        assert (test, ci) == (pytest.approx(TEST[r], abs=5e-5), pytest.approx(CI[r], abs=5e-5))
        assert float(row["round time (s)"]) == pytest.approx(ROUND_ENDS[r] - ([0.0] + ROUND_ENDS)[r])
    assert "no pruning rounds (dense): acc_post 0.9300 ± 0.0150" in text


def test_plot_data_follow_the_logs(lottery_run: Path):
    run = reading.load_run(lottery_run)
    assert run.strategy == "LotteryTicket" and run.metric == "acc_post" and not run.regression
    points = reading.accuracy_points(run)
    assert [p["x"] for p in points] == [1.0 - s for s in SPARSITY]
    assert [p["y"] for p in points] == pytest.approx(TEST)
    assert [p["ci"] for p in points] == pytest.approx(CI)
    assert reading.round_seconds(run) == pytest.approx({0: 70.0, 1: 60.0, 2: 70.0})
    minutes, values = zip(*reading.metric_over_time(run))
    assert minutes == pytest.approx((1.0, 2.0, 3.0)) and values == pytest.approx((0.5, 0.7, 0.8))
    ticks = reading.remaining_ticks(0.64)
    assert ticks == pytest.approx([1.0, 0.8, 0.64])
    assert reading.remaining_ticks(0.8**24) == pytest.approx([0.8**k for k in range(0, 25, 3)])


def test_untested_rounds_fall_back_to_best_val(lottery_run: Path):
    for file in (lottery_run / "rounds").glob("*/metrics.json"):
        record = json.loads(file.read_text())
        del record["test"], record["test_metrics"]
        file.write_text(json.dumps(record))
    points = reading.accuracy_points(reading.load_run(lottery_run))
    assert [p["y"] for p in points] == pytest.approx(BEST_VAL)
    assert [p["ci"] for p in points] == [None] * 3


@pytest.mark.parametrize(
    "class_paths, name",
    [
        ([], "dense"),
        (["callbacks.taylor.TaylorFilterPruning"], "TaylorFilterPruning"),
        (["callbacks.powerprop.Powerprop", "callbacks.lottery.LotteryTicket"], "Powerprop+LotteryTicket"),
    ],
)
def test_strategy_is_read_from_config(tmp_path: Path, class_paths: list[str], name: str):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config([{"class_path": c} for c in class_paths])))
    assert reading.load_run(tmp_path).strategy == name


def test_dense_run_is_the_reference_line(lottery_run: Path, dense_run: Path, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, file: figures.append(fig))
    runs = [reading.load_run(lottery_run), reading.load_run(dense_run)]
    assert reading.dense_reference(runs[1]) == pytest.approx((0.93, 0.015))
    assert plots.plot_remaining(runs, tmp_path / "x.png") is None
    (ax,) = figures[0].axes
    dense = [line for line in ax.get_lines() if line.get_label().startswith("dense reference")]
    assert len(dense) == 1 and list(dense[0].get_ydata()) == pytest.approx([93.0, 93.0])
    assert "LotteryTicket (omniglot/version_0), test" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_run_without_rounds_or_events_is_reported_not_fatal(tmp_path: Path):
    run = tmp_path / "bare"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # it trained: not a failed start
    (run / "config.yaml").write_text(yaml.safe_dump(config([])))
    out = tmp_path / "report"
    assert report.main([str(run), "-o", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text.count("_Skipped:") == 4 and "no TensorBoard events" in text
    assert not any((out / name).exists() for name in plots.PLOTS.values())


@pytest.mark.parametrize("kind", ["missing", "not_a_run", "bad_json"])
def test_bad_input_is_one_line_data_error(tmp_path: Path, kind: str, capsys):
    path = tmp_path / kind
    if kind == "not_a_run":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif kind == "bad_json":
        (path / "rounds" / "round_00").mkdir(parents=True)
        (path / "rounds" / "round_00" / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(str(path))):
        reading.load_run(path)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(path), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lthmaml-report: error: ") and str(path) in err


def test_experiment_folder_expands_to_its_versions(lottery_run: Path):
    assert reading.expand([lottery_run.parent]) == [lottery_run]
    assert reading.expand([lottery_run.parent.parent]) == [lottery_run]  # runs/


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_real_lottery_fit_then_report(tmp_path: Path, monkeypatch):
    """A tiny sinusoid lottery fit through the CLI, then the report of its run folder."""
    from lthmaml.cli import main as lthmaml

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    lthmaml(
        [
            "fit",
            "-c",
            str(root / "configs/sinusoid.yaml"),
            "-c",
            str(root / "configs/prune/lottery.yaml"),
            "--trainer.callbacks.init_args.layer_rates",
            "{net.net.4: 0.5}",
            "--trainer.callbacks.init_args.rounds",
            "2",
            "--trainer.callbacks.init_args.epochs_per_round",
            "1",
            "--trainer.callbacks.init_args.test_each_round",
            "true",
            "--model.init_args.net.init_args.hidden",
            "[8, 8]",
            "--data.init_args.tasks_per_epoch",
            "20",
            "--data.init_args.meta_batch_size",
            "5",
            "--data.init_args.val_tasks",
            "5",
            "--data.init_args.test_tasks",
            "5",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    run = tmp_path / "runs" / "sinusoid" / "version_0"
    assert report.main([str(run), "-o", "report"]) == 0
    assert time.monotonic() - start < 60
    for name in plots.PLOTS.values():
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and image.width > 400
    loaded = reading.load_run(run)
    assert loaded.strategy == "LotteryTicket" and loaded.regression and loaded.metric == "loss_post"
    assert sorted(reading.round_seconds(loaded)) == [0, 1, 2]
    rows = parse_table((tmp_path / "report" / "report.md").read_text().split("## LotteryTicket")[1])
    for row, record in zip(rows, loaded.rounds, strict=True):
        assert row["sparsity"] == f"{100 * record['sparsity']:.2f}%"
        assert row["best val"] == f"{record['val']:.4f}"
        ci = record["test_metrics"]["test/loss_post_ci95"]
        assert row["test +- 95% CI"] == f"{record['test']:.4f} ± {ci:.4f}"
    text = (tmp_path / "report" / "report.md").read_text()
    assert "MSE" in text


# ---------------------------------------------------------------------- what each folder is


def folder_with(path: Path, config_: dict, scalars: list) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config_))
    write_events(path, scalars)
    return path


def drawn(monkeypatch, plot, runs, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, file: figures.append(fig))
    assert plot(runs, tmp_path / "x.png") is None
    return figures[0]


def test_a_folder_that_only_tested_a_checkpoint_is_no_dense_run(lottery_run, tmp_path, monkeypatch):
    ckpt = str(lottery_run / "rounds" / "round_02" / "model.ckpt")
    tested = folder_with(
        tmp_path / "runs" / "omniglot" / "version_1",
        {**config([]), "ckpt_path": ckpt},
        [("test/acc_post", 5.0, 30, 0.8), ("test/acc_post_ci95", 5.0, 30, 0.02)],
    )
    run = reading.load_run(tested)
    assert run.kind == reading.TEST and not run.dense and run.strategy == "checkpoint test"
    out = tmp_path / "report"
    assert report.main([str(lottery_run), str(tested), "-o", str(out)]) == 0
    section = (out / "report.md").read_text().split("## checkpoint test")[1]
    assert (
        f"- a test of the checkpoint `{ckpt}` (nothing trained in this folder): acc_post 0.8000 ± 0.0200"
        in section
    )
    assert "dense" not in section
    (ax,) = drawn(monkeypatch, plots.plot_remaining, [reading.load_run(lottery_run), run], tmp_path).axes
    assert not [line for line in ax.get_lines() if "dense" in line.get_label()]


def test_the_dense_reference_is_a_dense_run_of_the_same_learner_and_data(lottery_run, tmp_path, monkeypatch):
    scalars = [("test/acc_post", 100.0, 20, 0.93), ("test/acc_post_ci95", 100.0, 20, 0.015)]
    protonet = {**config([]), "model": {"class_path": "lthmaml.meta.protonet.ProtoNet"}}
    other = folder_with(tmp_path / "runs" / "protonet" / "version_0", protonet, scalars)
    same = folder_with(tmp_path / "runs" / "dense" / "version_0", config([]), scalars)
    lottery, other, same = (reading.load_run(p) for p in (lottery_run, other, same))
    assert other.setting != lottery.setting == same.setting

    (ax,) = drawn(monkeypatch, plots.plot_remaining, [lottery, other], tmp_path).axes
    assert not [line for line in ax.get_lines() if "dense" in line.get_label()]
    (ax,) = drawn(monkeypatch, plots.plot_remaining, [lottery, other, same], tmp_path).axes
    labels = [line.get_label() for line in ax.get_lines() if "dense" in line.get_label()]
    assert labels == [f"dense reference: {same.label}"]
    (ax,) = drawn(
        monkeypatch, plots.plot_remaining, [other], tmp_path
    ).axes  # alone: a dense run, no reference
    assert [line.get_label() for line in ax.get_lines()] == [f"dense: {other.label}"]


def test_report_md_gives_accuracy_as_the_fraction_it_is(lottery_run, dense_run, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(lottery_run), str(dense_run), "-o", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "(%)" not in text and text.count("query accuracy after adaptation, a fraction: 1 = 100%") == 2


def test_rounds_plot_draws_the_tables_epochs_on_a_whole_number_axis(lottery_run, tmp_path, monkeypatch):
    run = reading.load_run(lottery_run)
    left, _ = drawn(monkeypatch, plots.plot_rounds, [run], tmp_path).axes
    (line,) = left.get_lines()
    assert list(line.get_ydata()) == [record["val_epoch"] for record in run.rounds] == [1, 3, 5]
    assert left.get_ylim() == (-0.5, 5.5) and "0-based" in left.get_ylabel()
    for file in (lottery_run / "rounds").glob("*/metrics.json"):  # every best epoch the same
        record = json.loads(file.read_text())
        file.write_text(json.dumps({**record, "val_epoch": 1}))
    left, _ = drawn(monkeypatch, plots.plot_rounds, [reading.load_run(lottery_run)], tmp_path).axes
    ticks = [t for t in left.get_yticks() if -0.5 <= t <= 1.5]
    assert left.get_ylim() == (-0.5, 1.5) and ticks == [0.0, 1.0]


def test_the_legends_leave_the_other_panel_free(lottery_run, tmp_path, monkeypatch):
    sinusoid = tmp_path / "runs" / "sinusoid" / "version_0"
    shutil.copytree(lottery_run, sinusoid)
    (sinusoid / "config.yaml").write_text(
        yaml.safe_dump({**config([]), "data": {"class_path": "lthmaml.data.SinusoidDataModule"}})
    )
    for file in (sinusoid / "rounds").glob("*/metrics.json"):
        record = json.loads(file.read_text())
        record.update(monitor="val/loss_post", test_metric="test/loss_post", test=0.5)
        record["test_metrics"] = {"test/loss_post": 0.5, "test/loss_post_ci95": 0.1}
        file.write_text(json.dumps(record))
    runs = [reading.load_run(lottery_run), reading.load_run(sinusoid)]
    assert runs[1].regression and runs[0].y_label != runs[1].y_label
    figure = drawn(monkeypatch, plots.plot_remaining, runs, tmp_path)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = figure.axes
    assert len(axes) == 2
    for ax in axes:
        legend = ax.get_legend().get_window_extent(renderer)
        for other in axes:
            if other is not ax:
                assert not legend.overlaps(other.get_window_extent(renderer))


def test_an_edge_run_is_skipped_as_what_it_is(lottery_run, tmp_path, capsys):
    tuned = tmp_path / "runs" / "edge" / "wave"
    tuned.mkdir(parents=True)
    (tuned / "config.yaml").write_text(yaml.safe_dump({"model": {"artifact": "model.safetensors"}}))
    (tuned / "metrics.csv").write_text("epoch,step,val/loss\n0,0,0.5\n")
    assert reading.load_run(tuned).kind == reading.EDGE
    assert report.main([str(lottery_run), str(tuned), "-o", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert f"lthmaml-report: skipped {tuned} (an lthmaml-edge fine-tuning on a task folder" in err
    assert "failed at start-up" not in err
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tuned), "-o", str(tmp_path / "report")])
    assert exit_info.value.code == 2 and "every one was skipped" in capsys.readouterr().err


def test_a_later_validate_of_the_checkpoint_is_no_point_of_the_training_curve(lottery_run):
    (lottery_run / "events.out.tfevents.1.test.0").rename(lottery_run / "events.out.tfevents.0.fit.0")
    write_events(lottery_run, [("val/acc_post", 9000.0, 0, 0.81)])  # `lthmaml validate`, hours later
    minutes, values = zip(*reading.metric_over_time(reading.load_run(lottery_run)))
    assert minutes == pytest.approx((1.0, 2.0, 3.0)) and values == pytest.approx((0.5, 0.7, 0.8))
