"""What a new user meets on the main path: ``lthmaml predict`` writes its CSV, every command keeps
to the run folder it belongs to, Ctrl-C says how to resume, and an output location, a config file
or a float that cannot work is one line naming it, before any work."""

from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers import TINY_FIT
from test_metric_learners import tiny_protonet_config

from lthmaml.cli import main
from lthmaml.data import SinusoidDataModule
from lthmaml.data.taskfolder_build import make_image_task, make_sinusoid_task
from lthmaml.edge import pi
from lthmaml.edge.cli import main as edge
from lthmaml.edge.export import export_checkpoint
from lthmaml.environment import FAILED
from lthmaml.meta.maml import MAML
from lthmaml.progress import EpochProgress
from lthmaml.reporting import report

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid.yaml")
PROTONET = str(REPO / "configs" / "protonet_5way1shot.yaml")
PI = str(REPO / "configs" / "edge" / "pi.yaml")
EDGE = ["-c", PI, "--threads", "1", "--trainer.max_epochs", "2"]

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One tiny sinusoid fit (5 meta-steps); each test works on its own copy."""
    root = tmp_path_factory.mktemp("fitted")
    main(["fit", "-c", SINUSOID, *TINY_FIT, "--trainer.logger.init_args.save_dir", str(root / "runs")])
    return root / "runs"


@pytest.fixture
def run(fitted: Path, in_tmp: Path) -> Path:
    """The fit's run folder, copied to ``runs/sinusoid/version_0`` of the test's working folder."""
    shutil.copytree(fitted, in_tmp / "runs")
    return in_tmp / "runs" / "sinusoid" / "version_0"


def events(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------- predict
def test_predict_writes_predictions_csv_beside_the_checkpoint(run: Path, caplog):
    last = run / "checkpoints" / "last.ckpt"
    before = events(run)
    with caplog.at_level("INFO"):
        main(["predict", "-c", SINUSOID, *TINY_FIT, "--ckpt_path", str(last)])
    table = rows(run / "predictions.csv")
    assert list(table[0]) == ["task", "query", "x", "prediction", "target"]
    assert len(table) == 20 * 10 and [int(r["task"]) for r in table[::10]] == list(range(20))
    assert [int(r["query"]) for r in table[:10]] == list(range(10))
    assert f"Wrote 200 predictions (20 tasks) to {run / 'predictions.csv'}" in caplog.text
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"] and events(run) == before

    # The rows are the adapted MAML's: the first predict batch recomputed from the checkpoint.
    model = MAML.load_from_checkpoint(last)
    data = SinusoidDataModule(meta_batch_size=10, tasks_per_epoch=50, val_tasks=20, test_tasks=20)
    batch = next(iter(data.predict_dataloader()))
    outputs = model.predict_step(batch, 0)
    for t in (0, 9):
        for q in range(10):
            row = table[10 * t + q]
            assert float(row["x"]) == pytest.approx(float(batch.query_x[t, q, 0]), rel=1e-5)
            assert float(row["target"]) == pytest.approx(float(batch.query_y[t, q, 0]), rel=1e-5)
            assert float(row["prediction"]) == pytest.approx(float(outputs[t, q, 0]), rel=1e-4, abs=1e-6)


def test_predict_on_a_task_folder_keys_rows_by_file(run: Path, tmp_path: Path):
    task = make_sinusoid_task(tmp_path / "wave", shots=5, query_shots=7, labelled_query=False)
    out = tmp_path / "out" / "wave.csv"
    main(
        ["predict", "-c", SINUSOID, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
        + ["--task_folder", str(task), "--output", str(out)]
    )
    table = rows(out)
    queries = rows(task / "query.csv")
    assert list(table[0]) == ["file", "x", "prediction"]
    assert [r["file"] for r in table] == [f"row_{i}" for i in range(1, 8)]
    assert [float(r["x"]) for r in table] == pytest.approx([float(q["x"]) for q in queries], rel=1e-5)
    assert all(abs(float(r["prediction"])) < 10 for r in table)  # a sinusoid's amplitude is below 5
    assert not (run / "predictions.csv").exists()


def test_protonet_predict_gives_labels_and_probabilities(
    tmp_path, monkeypatch, fake_omniglot, lthmaml_cache, caplog, recwarn
):
    tiny = tiny_protonet_config(tmp_path, fake_omniglot)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        main(["fit", "-c", PROTONET, "-c", tiny, "--test_after_fit", "true"])
    summary = next(line for line in caplog.text.splitlines() if "Post-adaptation on 2 test tasks" in line)
    assert re.search(
        r"mean \+- 95% CI: accuracy [\d.]+ \+- [\d.]+; cross-entropy [\d.]+ \+- [\d.]+$", summary
    )
    assert not [w for w in recwarn if "multiple `ModelCheckpoint`" in str(w.message)]
    run = tmp_path / "runs" / "protonet_5way1shot" / "version_0"
    last = str(run / "checkpoints" / "last.ckpt")
    main(["predict", "-c", PROTONET, "-c", tiny, "--ckpt_path", last])
    table = rows(run / "predictions.csv")
    assert list(table[0]) == ["task", "query", "label", "probability", "target"]
    assert len(table) == 2 * 3 * 2  # 2 test tasks, 3 ways, 2 query images a class
    assert {r["label"] for r in table} <= {"0", "1", "2"} and {r["target"] for r in table} == {"0", "1", "2"}
    assert all(1 / 3 - 1e-6 <= float(r["probability"]) <= 1 for r in table)  # the most probable of 3

    images = torch.rand(3, 3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    task = make_image_task(
        tmp_path / "pets", images, ["cat", "dog", "fox"], shots=1, query_shots=2, labelled_query=False
    )
    with caplog.at_level("INFO"):
        main(["predict", "-c", PROTONET, "-c", tiny, "--ckpt_path", last, "--task_folder", str(task)])
    table = rows(run / "predictions.csv")
    assert list(table[0]) == ["file", "label", "probability"]
    assert [r["file"] for r in table] == sorted(p.name for p in (task / "query").glob("*.png"))
    assert {r["label"] for r in table} <= {"cat", "dog", "fox"}
    assert all(1 / 3 - 1e-6 <= float(r["probability"]) <= 1 for r in table)
    assert f"Wrote 6 predictions (1 task) to {run / 'predictions.csv'}" in caplog.text


# ---------------------------------------------------------------------------------- run folders
def test_test_logs_into_the_checkpoints_run_folder_without_lightning_noise(run: Path, caplog, recwarn):
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    checkpoint["callbacks"]["LotteryTicket{'rounds': 3}"] = {}  # as a pruning fit's checkpoint holds
    pruned = run / "checkpoints" / "pruned.ckpt"
    torch.save(checkpoint, pruned)
    config, before = (run / "config.yaml").read_text(), events(run)
    with caplog.at_level("INFO"):
        main(["test", "-c", SINUSOID, *TINY_FIT, "--ckpt_path", str(pruned)])
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert len(events(run)) == len(before) + 1 and (run / "config.yaml").read_text() == config
    assert "mean +- 95% CI: MSE " in caplog.text and "loss (MSE" not in caplog.text
    said = [str(w.message) for w in recwarn] + [caplog.text]
    assert not any("Please add the following callbacks" in s or "dirpath has changed" in s for s in said)
    assert not (run / FAILED).exists()


def test_ctrl_c_prints_the_resume_command_and_the_resumed_fit_keeps_its_folder(
    in_tmp, monkeypatch, capsys, caplog
):
    original = EpochProgress.on_train_epoch_end

    def interrupt_second_epoch(self, trainer, pl_module):
        original(self, trainer, pl_module)
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(EpochProgress, "on_train_epoch_end", interrupt_second_epoch)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with caplog.at_level("INFO"), pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", SINUSOID, *TINY_FIT, "--trainer.max_epochs", "3"])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C once it shuts down
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    run = Path("runs") / "sinusoid" / "version_0"
    line = captured.err.strip().splitlines()[-1]
    command = shlex.join(["lthmaml", "fit", "-c", SINUSOID, *TINY_FIT, "--trainer.max_epochs", "3"])
    assert (
        line
        == f"lthmaml: interrupted; resume with: {command} --ckpt_path {run / 'checkpoints' / 'last.ckpt'}"
    )
    assert "Detected KeyboardInterrupt" not in caplog.text + captured.out + captured.err
    assert "interrupted" in (run / FAILED).read_text()

    monkeypatch.setattr(EpochProgress, "on_train_epoch_end", original)
    main(shlex.split(line.split("resume with: ", 1)[1])[1:])
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"] and not (run / FAILED).exists()
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 15  # 3 epochs of 5 steps, in one folder
    assert len(events(run)) == 2


@pytest.fixture
def edge_task(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    artifact = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "model.safetensors")
    task = make_sinusoid_task(tmp_path / "wave", shots=5, val_shots=3, query_shots=4)
    return artifact, task


def test_edge_commands_keep_one_folder_per_task_folder(edge_task, in_tmp, recwarn):
    artifact, task = edge_task
    data = ["--data.root", str(task)]
    for _ in range(2):  # a second fit on the task replaces the first, without complaint
        edge(["fit", *EDGE, "--model.artifact", str(artifact), *data])
    folder = in_tmp / "runs" / "edge" / "wave"
    tuned = folder / "finetuned.safetensors"
    edge(["test", *EDGE, "--model.artifact", str(tuned), *data])
    edge(["predict", *EDGE, "--model.artifact", str(tuned), *data])
    assert [p.name for p in (in_tmp / "runs" / "edge").iterdir()] == ["wave"]
    assert {"config.yaml", "metrics.csv", "finetuned.safetensors", "predictions.csv"} <= {
        p.name for p in folder.iterdir()
    }
    assert [r["file"] for r in rows(folder / "predictions.csv")] == [f"row_{i}" for i in range(1, 5)]
    assert not any("exists and is not empty" in str(w.message) for w in recwarn)
    assert not (in_tmp / "config.yaml").exists()  # test and predict log nothing anywhere


# ---------------------------------------------------------------------------------- one-line errors
@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A regular file, for output locations under it that can never be made."""
    path = tmp_path / "notes.txt"
    path.write_text("not a folder")
    return path


def test_unwritable_outputs_are_one_line_errors_before_any_work(run, edge_task, a_file, capsys):
    artifact, task = edge_task
    last = str(run / "checkpoints" / "last.ckpt")
    edge_args = [*EDGE, "--model.artifact", str(artifact), "--data.root", str(task)]
    cases = [
        (
            main,
            ["fit", "-c", SINUSOID, *TINY_FIT, "--trainer.logger.init_args.save_dir", f"{a_file}/runs"],
            "lthmaml",
            "--trainer.logger.init_args.save_dir",
        ),
        (
            main,
            ["predict", "-c", SINUSOID, "--ckpt_path", last, "--output", f"{a_file}/p.csv"],
            "lthmaml",
            "--output",
        ),
        (edge, ["fit", *edge_args, "--output", f"{a_file}/tuned.safetensors"], "lthmaml-edge", "--output"),
        (
            edge,
            ["fit", *edge_args, "--trainer.logger.init_args.save_dir", f"{a_file}/runs"],
            "lthmaml-edge",
            "--trainer.logger.init_args.save_dir",
        ),
        (edge, ["predict", *edge_args, "--output", f"{a_file}/p.csv"], "lthmaml-edge", "--output"),
        (report.main, [str(run), "-o", f"{a_file}/report"], "lthmaml-report", "-o"),
    ]
    for command, args, prog, option in cases:
        with pytest.raises(SystemExit) as exit_info:
            command(args)
        assert exit_info.value.code == 2, args
        line = error_line(capsys)
        assert line.startswith(f"{prog}: error: {option}") and str(a_file) in line, line
        assert "not a folder" in line or "Not a directory" in line, line
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_log_folder_is_a_one_line_error(in_tmp, capsys):
    (in_tmp / "runs").mkdir(mode=0o555)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, *TINY_FIT])
    assert exit_info.value.code == 2 and "runs is not writable" in error_line(capsys)


@pytest.mark.parametrize(
    "text, where",
    [
        ("model:\n  init_args: {inner_lr: 0.1\n", "line 3, column 1: expected ',' or '}'"),
        ("data:\n  init_args:\n    shots: 5\n   - 3\n", "line 4, column 4"),
    ],
)
@pytest.mark.parametrize("command, prog", [(main, "lthmaml"), (edge, "lthmaml-edge")])
def test_a_malformed_yaml_config_names_the_file_and_line(tmp_path, capsys, text, where, command, prog):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        command(["fit", "-c", str(bad)])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.startswith(f"{prog}: error: {bad}: not valid YAML at {where}") and "fix the file" in line


@pytest.mark.parametrize(
    "option, value",
    [
        ("--model.init_args.optimizer.init_args.lr", "nan"),
        ("--trainer.gradient_clip_val", "inf"),
        ("--model.init_args.inner_lr", "-inf"),
    ],
)
def test_a_non_finite_float_option_says_it_must_be_finite(in_tmp, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, f"{option}={value}"])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.startswith("lthmaml: error: --") and f" {value}: must be a finite number" in line
    assert option.split(".")[-1] in line and "<class" not in line
    assert not (in_tmp / "runs").exists()


def test_the_pi_demo_drops_lightning_tips_and_torch_leafspec_notices(edge_task, in_tmp, recwarn, capsys):
    artifact, task = edge_task
    assert pi.main(["--artifact", str(artifact), "--task", str(task), "--config", PI, "--threads", "1"]) == 0
    said = capsys.readouterr()
    assert "MSE after" in said.out and "Tip" not in said.out + said.err
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]  # Lightning's fit raises it twice


def test_predict_options_are_refused_elsewhere_and_a_classifier_has_no_tasks_to_predict(in_tmp, capsys):
    from lthmaml.cli import LthmamlCLI
    from lthmaml.errors import ConfigError
    from lthmaml.meta.classifier import Classifier
    from lthmaml.nets.models import MLP

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, "--task_folder", "task", "--output", "p.csv"])
    assert exit_info.value.code == 2
    assert error_line(capsys) == "lthmaml: error: --task_folder and --output: for predict, not fit"
    with pytest.raises(ConfigError, match="Classifier adapts to none: use `lthmaml test`"):
        LthmamlCLI.predict(None, Classifier(MLP(in_features=1, hidden=[4], out_features=2)))
