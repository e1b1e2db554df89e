"""A new user's bad-input matrix (issue 16): every case is one stderr line ``<prog>: error: ...``
naming the option or file, exit status 2, and no run folder left that passes for a result."""

from __future__ import annotations

import csv
import errno
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import COLOURS, write_photos
from PIL import Image
from test_export import _arch, _meta, conv_net, prune, rewrite

from lthmaml.cli import main
from lthmaml.data.taskfolder_build import make_sinusoid_task
from lthmaml.edge import export
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.cli import FINETUNED
from lthmaml.edge.cli import main as edge_main
from lthmaml.edge.export import export_net
from lthmaml.environment import FAILED
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.cnp import CNP
from lthmaml.meta.maml import MAML
from lthmaml.meta.matching import MatchingNet
from lthmaml.meta.protonet import ProtoNet
from lthmaml.nets.models import MLP, CNPNet, Conv4
from lthmaml.reporting import report

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SINUSOID = str(CONFIGS / "sinusoid.yaml")
OMNIGLOT = str(CONFIGS / "omniglot_5way1shot.yaml")
CNP_SINUSOID = str(CONFIGS / "cnp_sinusoid.yaml")
MINI = str(CONFIGS / "miniimagenet_5way1shot.yaml")
PI = str(CONFIGS / "edge" / "pi.yaml")
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
    # torch checks an optimizer's values only as configure_optimizers builds it, inside fit
    "outer lr -1": (
        [SINUSOID, "--model.init_args.optimizer.init_args.lr", "-1"],
        "lthmaml: error: model.init_args.optimizer.init_args.lr: Invalid learning rate: -1.0; give a "
        "learning rate > 0",
    ),
    "CNP outer lr -1": (
        [CNP_SINUSOID, "--model.init_args.optimizer.init_args.lr", "-1"],
        "model.init_args.optimizer.init_args.lr: Invalid learning rate: -1.0",
    ),
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
    # 26 classes: the default 60/20/20 split gives val and test the 5 classes of a 5-way episode
    characters = {f"Alphabet_{a}": [f"character{c:02d}" for c in range(1, 14)] for a in range(2)}
    root = fake_omniglot.folder(characters, drawers=4)
    args = ["--data.init_args.root", str(root), "--data.init_args.image_size", "14"]
    args += ["--data.init_args.eval_query_shots", "3"]  # 1 + 3 of the 4 drawers
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
    resumed = torch.load(runs / "sinusoid" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not (runs / "sinusoid" / "version_4").exists()  # the resumed fit continues in its own folder
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


# ---------------------------------------------------------------------------------- optimizers
def bad_lr(params):
    return torch.optim.Adam(params, lr=-1.0)


LEARNERS = {
    "MAML": lambda: MAML(MLP(hidden=(4,)), optimizer=bad_lr),
    "Classifier": lambda: Classifier(MLP(hidden=(4,)), optimizer=bad_lr),
    "ProtoNet": lambda: ProtoNet(Conv4(out_features=None, hidden_channels=2, image_size=8, blocks=2), bad_lr),
    "MatchingNet": lambda: MatchingNet(
        Conv4(out_features=None, hidden_channels=2, image_size=8, blocks=2), optimizer=bad_lr
    ),
    "CNP": lambda: CNP(CNPNet(representation=4, encoder_hidden=(4,), decoder_hidden=(4,)), bad_lr),
}


@pytest.mark.parametrize("learner", LEARNERS)
def test_every_learner_names_the_optimizer_option_torch_refuses(learner):
    with pytest.raises(ConfigError) as info:
        LEARNERS[learner]().configure_optimizers()
    assert str(info.value) == (
        "model.init_args.optimizer.init_args.lr: Invalid learning rate: -1.0; give a learning rate > 0"
    )


def test_a_scheduler_torch_refuses_names_its_option():
    model = MAML(
        MLP(hidden=(4,)), lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LinearLR(optimizer, 2.0)
    )
    with pytest.raises(ConfigError, match=r"^model.init_args.lr_scheduler: Starting multiplicative factor"):
        model.configure_optimizers()


def test_an_edge_optimizer_torch_refuses_is_one_line_naming_it(in_tmp, capsys):
    artifact = export_net(MLP(hidden=(8,)), in_tmp / "net.safetensors", {"inner_lr": 0.01})
    task = make_sinusoid_task(in_tmp / "task", shots=5, val_shots=5, query_shots=5)
    args = ["fit", "-c", PI, "--model.artifact", str(artifact), "--data.root", str(task), "--threads", "1"]
    args += ["--model.optimizer", "torch.optim.Adam", "--model.optimizer.init_args.lr", "-2"]
    with pytest.raises(SystemExit) as exit_info:
        edge_main(args)
    line = one_error_line(capsys, exit_info, "lthmaml-edge")
    assert line.endswith(
        "model.optimizer.init_args.lr: Invalid learning rate: -2.0; give a learning rate > 0"
    )


# ---------------------------------------------------------------------------------- wrong files
def export_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The single stderr line of ``lthmaml-export`` refusing its input (status 2), no traceback."""
    assert export.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lthmaml-export: error: "), lines
    return lines[0]


NOT_CHECKPOINTS = {
    "photo.png": ("a PNG image", lambda path: Image.new("RGB", (4, 4), (200, 30, 30)).save(path)),
    "model.safetensors": (
        "a safetensors file (an artifact? lthmaml-edge reads it as --model.artifact)",
        lambda path: export_net(MLP(hidden=(4,)), path, {}),
    ),
    "empty.ckpt": ("an empty file", lambda path: path.write_bytes(b"")),
}


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_export_of_a_file_that_is_no_checkpoint_says_what_it_is(name, tmp_path, capsys):
    """Not torch's ``A load persistent id instruction was encountered``; and an artifact given
    by mistake is not overwritten by its own export (the default output is the same path)."""
    what, make = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    make(path)
    before = path.read_bytes()
    line = export_error_line(capsys, [str(path)])
    assert line == (
        f"lthmaml-export: error: {path}: not a PyTorch checkpoint but {what}; give the .ckpt that "
        "`lthmaml fit` wrote (runs/<name>/version_N/checkpoints/last.ckpt)"
    )
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_a_checkpoint_given_as_the_edge_artifact_points_to_lthmaml_export(sinusoid_run, in_tmp, capsys):
    last = sinusoid_run / "checkpoints" / "last.ckpt"
    task = make_sinusoid_task(in_tmp / "task", shots=5, val_shots=5, query_shots=5)
    with pytest.raises(SystemExit) as exit_info:
        edge_main(["fit", "-c", PI, "--model.artifact", str(last), "--data.root", str(task)])
    line = one_error_line(capsys, exit_info, "lthmaml-edge")
    assert line == (
        f"lthmaml-edge: error: {last}: a PyTorch checkpoint, not an artifact: export it first, "
        f"`lthmaml-export {last} -o model.safetensors`, and give that (lthmaml-edge also reads a "
        "checkpoint as --model.checkpoint)"
    )


# ---------------------------------------------------------------------------------- writing files
def test_export_under_a_regular_file_is_one_line_and_leaves_nothing(sinusoid_run, tmp_path, capsys):
    last = sinusoid_run / "checkpoints" / "last.ckpt"
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    target = blocker / "out" / "model.safetensors"
    line = export_error_line(capsys, [str(last), "-o", str(target)])
    assert line == (
        f"lthmaml-export: error: cannot write the artifact to {target}: {blocker} is a file, not a folder; "
        "choose a writable location"
    )
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_export_into_a_read_only_folder_is_one_line_and_leaves_nothing(
    sinusoid_run, tmp_path, capsys, monkeypatch
):
    last = sinusoid_run / "checkpoints" / "last.ckpt"
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: refuse as the kernel refuses anyone else

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        line = export_error_line(capsys, [str(last), "-o", str(folder / "model.safetensors")])
        assert line == (
            f"lthmaml-export: error: cannot write the artifact to {folder / 'model.safetensors'}: {folder} "
            "is not writable (Permission denied); choose a writable location"
        )
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_predictions_of_a_query_file_named_in_no_utf8_are_written_escaped(in_tmp, capsys, umask_022):
    """The file ``b<0xff>x.jpg`` (Python holds the byte as a lone surrogate, which UTF-8 refuses)
    is the row ``b\\xffx.jpg``; the CSV is readable by all, as any new file (0644 under umask 022)."""
    task = in_tmp / "task"
    for c, colour in enumerate(("red", "blue")):
        write_photos(task / "support" / colour, colour, 2, seed=c)
    (task / "query").mkdir()
    odd = task / "query" / os.fsdecode(b"b\xffx.jpg")
    shutil.copy(write_photos(in_tmp / "extra", "blue", 1, seed=7)[0], odd)
    shutil.copy(write_photos(in_tmp / "extra", "red", 1, seed=8)[0], task / "query" / "red.jpg")
    torch.manual_seed(0)
    net = Conv4(out_features=2, in_channels=3, hidden_channels=2, image_size=16, blocks=2)
    artifact = export_net(net, in_tmp / "rgb.safetensors", {"inner_steps": 1, "eval_inner_steps": 1})
    out = in_tmp / "out" / "predictions.csv"
    args = ["predict", "-c", PI, "--model.artifact", str(artifact), "--data.root", str(task)]
    edge_main([*args, "--output", str(out), "--threads", "1"])
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == ["b\\xffx.jpg", "red.jpg"]
    assert {row["label"] for row in rows} <= {"red", "blue"}
    assert (out.stat().st_mode & 0o777) == 0o644 and (artifact.stat().st_mode & 0o777) == 0o644
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------- own images
def test_own_images_a_split_too_small_for_ways_fails_before_decoding_naming_the_fix(in_tmp, capsys):
    """README's command on 12 colour classes with ways 3: the default 60/20/20 split leaves the test
    split 2 classes. Said at setup, before any image is decoded (the cache stays empty), not after
    the fit; the class_split it suggests then runs."""
    photos = in_tmp / "photos"
    for c, colour in enumerate(COLOURS):
        write_photos(photos / colour, colour, 3, seed=c)
    args = ["fit", "-c", MINI, "--data.init_args.root", str(photos), "--data.init_args.layout", "classes"]
    args += ["--data.init_args.ways", "3", "--model.init_args.net.init_args.out_features", "3"]
    args += ["--data.init_args.image_size", "16", "--model.init_args.net.init_args.image_size", "16"]
    args += ["--model.init_args.net.init_args.hidden_channels", "2", "--model.init_args.inner_steps", "1"]
    args += ["--model.init_args.eval_inner_steps", "1", "--data.init_args.query_shots", "1"]
    args += ["--data.init_args.eval_query_shots", "1", "--data.init_args.meta_batch_size", "2"]
    args += ["--data.init_args.tasks_per_epoch", "2", "--data.init_args.val_tasks", "2"]
    args += ["--data.init_args.test_tasks", "2", "--trainer.max_epochs", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--data.init_args.cache_dir", str(in_tmp / "cache")]
    line = one_error_line(capsys, run_main(args))
    assert line == (
        "lthmaml: error: data.init_args.ways=3 but the test split has only 2 classes: lower "
        "data.init_args.ways, or give the test split more classes: data.init_args.class_split [6, 3, 3] "
        "(class counts)"
    )
    assert not list(in_tmp.glob("runs/*/version_*")) and not (in_tmp / "cache").exists()
    main([*args, "--data.init_args.class_split", "[6, 3, 3]"])
    assert list(in_tmp.glob("runs/miniimagenet_5way1shot/*/checkpoints/last.ckpt"))


# ---------------------------------------------------------------------------------- set-up noise
def test_pyproject_metadata_builds_without_a_setuptools_deprecation(tmp_path):
    """``project.license`` as an SPDX string (setuptools >= 77), not the deprecated table that
    printed a warning three times at every install."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("lthmaml", "callbacks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "meta").mkdir()
    code = "import setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel('meta'))"
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deprecat" not in (done.stdout + done.stderr).lower()
    metadata = (tmp_path / "meta" / done.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata
