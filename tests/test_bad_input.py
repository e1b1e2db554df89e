"""A new user's bad-input matrix (issue 16): every case is one stderr line ``<prog>: error: ...``
naming the option or file, exit status 2, and no run folder left that passes for a result."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_export import _arch, _meta, conv_net, prune, rewrite

from lthmaml.cli import main
from lthmaml.data.taskfolder_build import make_sinusoid_task
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.cli import FINETUNED
from lthmaml.edge.cli import main as edge_main
from lthmaml.edge.export import export_net
from lthmaml.environment import FAILED
from lthmaml.errors import DataError
from lthmaml.nets.models import MLP
from lthmaml.reporting import report

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SINUSOID = str(CONFIGS / "sinusoid.yaml")
OMNIGLOT = str(CONFIGS / "omniglot_5way1shot.yaml")
LOTTERY = str(CONFIGS / "prune" / "lottery.yaml")
TINY = [
    *("--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"),
    *("--model.init_args.net.init_args.hidden", "[8, 8]", "--model.init_args.eval_inner_steps", "1"),
    *("--data.init_args.tasks_per_epoch", "20", "--data.init_args.meta_batch_size", "10"),
    *("--data.init_args.val_tasks", "10", "--data.init_args.test_tasks", "10"),
]
"""Two meta-steps and 10-task evaluations of an 8-8 MLP: a CLI fit in about a second."""


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_error_line(
    capsys: pytest.CaptureFixture, exit_info: pytest.ExceptionInfo, prog: str = "lthmaml"
) -> str:
    """The single stderr line of a command that failed on bad input (exit status 2)."""
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


def run_main(args: list[str]) -> pytest.ExceptionInfo:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info


# ---------------------------------------------------------------------------------- config errors
CONFIG_ERRORS = {
    # raised in an __init__ of ours: jsonargparse used to wrap them in 60-120 lines
    "inner_steps 0": ([SINUSOID, "--model.init_args.inner_steps", "0"], "model.init_args.inner_steps"),
    "eval_inner_steps -1": ([SINUSOID, "--model.init_args.eval_inner_steps", "-1"], "eval_inner_steps"),
    "prune_rate 1.5": (
        [SINUSOID, "-c", LOTTERY, "--trainer.callbacks.init_args.prune_rate", "1.5"],
        "prune_rate",
    ),
    "class_split over 1": ([OMNIGLOT, "--data.init_args.class_split", "[0.5,0.5,0.5]"], "class_split"),
    "net image_size 1": ([OMNIGLOT, "--model.init_args.net.init_args.image_size", "1"], "image_size=1"),
    # that reached torch or Lightning unchecked
    "inner_lr -0.01": ([SINUSOID, "--model.init_args.inner_lr", "-0.01"], "model.init_args.inner_lr"),
    "meta_batch_size 0": ([SINUSOID, "--data.init_args.meta_batch_size", "0"], "meta_batch_size"),
    "ways -1": ([OMNIGLOT, "--data.init_args.ways", "-1"], "data.init_args.ways"),
    "ways 1": ([OMNIGLOT, "--data.init_args.ways", "1"], "data.init_args.ways"),
    "shots 0": ([SINUSOID, "--data.init_args.shots", "0"], "data.init_args.shots"),
    "shots -3": ([SINUSOID, "--data.init_args.shots", "-3"], "data.init_args.shots"),
    "tasks_per_epoch below a meta-batch": (
        [SINUSOID, *TINY, "--data.init_args.tasks_per_epoch", "5"],
        "tasks_per_epoch",
    ),
    "checkpoint monitor never logged": (
        [SINUSOID, *TINY, "--checkpoint.monitor", "val/acc_post"],
        "--checkpoint.monitor 'val/acc_post' is never logged by MAML on this data: use one of "
        "val/loss_pre, val/loss_post",
    ),
    # jsonargparse's own: the option and the reason, without the usage
    "wrong type": ([SINUSOID, "--model.init_args.inner_lr", "abc"], "model.init_args.inner_lr: Expected"),
    "unknown key": ([SINUSOID, "--model.init_args.inner_learning_rate", "1"], "inner_learning_rate"),
    "unknown option": ([SINUSOID, "--no_such_option", "1"], "--no_such_option"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_a_bad_option_is_one_line_naming_it_and_leaves_no_run_folder(case, in_tmp, capsys):
    config, expected = CONFIG_ERRORS[case]
    line = one_error_line(capsys, run_main(["fit", "-c", *config]))
    assert expected in line
    assert "Traceback" not in line and "usage" not in line.lower()
    assert not list(in_tmp.glob("runs/*/version_*"))  # the start-up failure left nothing behind


def test_data_image_size_differing_from_the_net_is_one_line_and_no_run_folder(in_tmp, fake_omniglot, capsys):
    """Caught in MAML.setup, after the log folder's event file exists: that folder is removed."""
    characters = {f"Alphabet_{a}": [f"character{c:02d}" for c in range(1, 11)] for a in range(2)}
    root = fake_omniglot.folder(characters, drawers=4)
    args = ["--data.init_args.root", str(root), "--data.init_args.image_size", "14"]
    args += [
        "--data.init_args.cache_dir",
        str(in_tmp / "cache"),
        "--trainer.logger.init_args.save_dir",
        "runs",
    ]
    line = one_error_line(capsys, run_main(["fit", "-c", OMNIGLOT, *args]))
    assert "model.init_args.net.init_args.image_size=28" in line and "data.init_args.image_size=14" in line
    assert list(in_tmp.glob("runs/*")) and not list(in_tmp.glob("runs/*/version_*"))


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory) -> Path:
    """One finished tiny sinusoid fit: ``runs/sinusoid/version_0`` under a module folder."""
    base = tmp_path_factory.mktemp("sinusoid_run")
    main(["fit", "-c", SINUSOID, *TINY, "--trainer.logger.init_args.save_dir", str(base / "runs")])
    return base / "runs" / "sinusoid" / "version_0"


def test_predict_without_ckpt_path_refuses(in_tmp, capsys):
    line = one_error_line(capsys, run_main(["predict", "-c", SINUSOID, *TINY]))
    assert "--ckpt_path" in line and "random" in line


@pytest.mark.parametrize("kind", ["missing", "truncated", "empty"])
def test_a_missing_or_truncated_ckpt_path_is_one_line_naming_the_file(kind, sinusoid_run, in_tmp, capsys):
    bad = in_tmp / f"{kind}.ckpt"
    good = (sinusoid_run / "checkpoints" / "last.ckpt").read_bytes()
    if kind != "missing":
        bad.write_bytes(good[: len(good) // 2] if kind == "truncated" else b"")
    line = one_error_line(capsys, run_main(["validate", "-c", SINUSOID, *TINY, "--ckpt_path", str(bad)]))
    assert f"--ckpt_path {bad}" in line


def test_a_checkpoint_of_another_net_is_refused(sinusoid_run, in_tmp, capsys):
    """An MLP checkpoint resumed with the Omniglot config (a Conv4): the checkpoint's net would
    silently replace the configured one, then fail in conv2d."""
    last = sinusoid_run / "checkpoints" / "last.ckpt"
    line = one_error_line(capsys, run_main(["fit", "-c", OMNIGLOT, "--ckpt_path", str(last)]))
    assert str(last) in line and "MLP(" in line and "Conv4(" in line and "config.yaml" in line


def test_ckpt_path_last_resumes_the_newest_run_of_the_same_name(sinusoid_run, in_tmp, capsys):
    runs = in_tmp / "runs"
    shutil.copytree(sinusoid_run.parent, runs / "sinusoid")
    (runs / "sinusoid" / "version_3").mkdir()  # newer, but it has no last.ckpt (killed at start)
    main(["fit", "-c", SINUSOID, *TINY, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = torch.load(runs / "sinusoid" / "version_4" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1  # epoch 0's two steps, then two more


def test_ckpt_path_last_without_a_run_says_where_it_looked(in_tmp, capsys):
    line = one_error_line(capsys, run_main(["fit", "-c", SINUSOID, *TINY, "--ckpt_path", "last"]))
    assert "runs/sinusoid/version_*/checkpoints/last.ckpt" in line


def test_a_run_that_fails_after_checkpointing_is_marked_failed(in_tmp, capsys):
    """Its folder holds a real last.ckpt, so it is kept, with a FAILED note saying why."""
    args = ["--trainer.max_epochs", "2", "--trainer.callbacks+=test_robustness.InfiniteInnerLrAtEpoch1"]
    line = one_error_line(capsys, run_main(["fit", "-c", SINUSOID, *TINY, *args]))
    run = in_tmp / "runs" / "sinusoid" / "version_0"
    assert "non-finite meta-loss" in line and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / FAILED).read_text().startswith("TrainingError: non-finite meta-loss at global step 2")


# ---------------------------------------------------------------------------------- edge
def test_a_diverging_fine_tune_stops_naming_model_lr_and_writes_nothing(in_tmp, capsys):
    torch.manual_seed(0)
    artifact = export_net(
        MLP(hidden=(8, 8)),
        in_tmp / "net.safetensors",
        {"inner_lr": 0.01, "inner_steps": 1, "eval_inner_steps": 4},
    )
    task = make_sinusoid_task(in_tmp / "task", shots=5, val_shots=5, query_shots=5)
    args = ["fit", "-c", str(CONFIGS / "edge" / "pi.yaml"), "--model.artifact", str(artifact)]
    args += ["--data.root", str(task), "--threads", "1"]
    args += ["--model.lr", "1e30", "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_info:
        edge_main(args)
    line = one_error_line(capsys, exit_info, "lthmaml-edge")
    assert "non-finite fine-tuning" in line and "lower model.lr" in line
    assert not list(in_tmp.rglob(FINETUNED))


def test_edge_option_errors_are_one_line(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        edge_main(["fit", "--model.lr", "fast"])
    assert "model.lr" in one_error_line(capsys, exit_info, "lthmaml-edge")


ARTIFACT_METADATA = {
    "negative out_features": _arch(out_features=-3),
    "negative inner_lr": _meta(inner_lr=-0.1),
    "NaN inner_lr": _meta(inner_lr=math.nan),
    "negative inner_steps": _meta(inner_steps=-1),
    "negative eval_inner_steps": _meta(eval_inner_steps=-2),
    "ways not the head's width": _meta(ways=5),
}


@pytest.mark.parametrize("case", ARTIFACT_METADATA)
def test_artifact_metadata_out_of_range_is_a_one_line_data_error(case, tmp_path):
    net = conv_net()
    prune(net, 0.5)
    good = export_net(net, tmp_path / "good.safetensors", {})
    bad = rewrite(good, tmp_path / "bad.safetensors", metadata=ARTIFACT_METADATA[case])
    with pytest.raises(DataError) as info:
        load_artifact(bad)
    assert str(bad) in str(info.value) and len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------------------------- report
def test_report_skips_a_run_that_failed_at_start(sinusoid_run, tmp_path, capsys):
    failed = tmp_path / "runs" / "sinusoid" / "version_1"
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text(yaml.safe_dump({"trainer": {}}))
    (failed / "events.out.tfevents.0.host.1.0").write_bytes(b"")
    (failed / FAILED).write_text("ConfigError: data.init_args.shots must be >= 1 example, got 0\n")
    assert report.main([str(sinusoid_run), str(failed), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {failed} (ConfigError: data.init_args.shots" in err
    assert str(failed) not in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(failed), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "every one failed at start-up" in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------- make run
def test_make_run_prints_a_line_per_epoch_and_no_third_party_noise(tmp_path):
    """``make run``'s command: no progress bar, so a line per epoch; no Lightning tips or torch
    deprecations (what a user cannot act on)."""
    command = [str(Path(sys.executable).parent / "lthmaml"), "fit", "-c", SINUSOID, *TINY]
    command += ["--test_after_fit", "true", "--trainer.max_epochs", "2"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "epoch 1/2: val/loss_post " in output and "epoch 2/2: val/loss_post " in output
    assert "Tip" not in output and "LeafSpec" not in output and "Deprecat" not in output
