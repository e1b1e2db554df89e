"""The ``lthmaml`` LightningCLI: configs, subcommands, run folders and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_FIT as TINY

from lthmaml.cli import main
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_print_config_resolves_every_option(resolved_config):
    config = resolved_config("-c", SINUSOID)
    assert config["model"]["class_path"] == "lthmaml.meta.maml.MAML"
    assert config["model"]["init_args"]["inner_lr"] == 0.01
    assert config["trainer"]["inference_mode"] is False
    assert config["checkpoint"]["monitor"] == "val/loss_post"


def test_configs_stack_with_repeated_c(tmp_path, resolved_config):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    inner_lr: 0.05\n    first_order: true\n")
    config = resolved_config("-c", SINUSOID, "-c", override)
    assert config["model"]["init_args"]["inner_lr"] == 0.05
    assert config["model"]["init_args"]["first_order"] is True
    assert config["model"]["init_args"]["eval_inner_steps"] == 10  # kept from the first file


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    inner_learning_rate: 0.05\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, "-c", str(bad)])
    assert exit_info.value.code == 2
    assert "inner_learning_rate" in capsys.readouterr().err


def test_fit_writes_run_folder_then_test_and_predict_from_the_checkpoint(in_tmp, capsys, caplog):
    main(["fit", "-c", SINUSOID, *TINY, "--test_after_fit", "true"])
    run = in_tmp / "runs" / "sinusoid" / "version_0"
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    machine = json.loads((run / "machine.json").read_text())  # where the wall times were measured
    assert machine["cpu_count"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert machine["torch_threads"] == 1 and machine["processes"] == 1
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert "Post-adaptation on 20 test tasks (10 inner steps), mean +- 95% CI" in caplog.text

    model = MAML.load_from_checkpoint(last)
    assert isinstance(model.net, MLP) and model.inner_lr == 0.01

    for sub in ("validate", "test", "predict"):
        main([sub, "-c", SINUSOID, *TINY, "--ckpt_path", str(last)])
    captured = capsys.readouterr()
    assert "test/loss_post" in captured.out and "val/loss_post" in captured.out
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # all beside the checkpoint
    assert len((run / "predictions.csv").read_text().splitlines()) == 1 + 20 * 10


def test_resume_from_last_checkpoint_continues_the_step_count_in_its_own_folder(in_tmp):
    main(["fit", "-c", SINUSOID, *TINY])
    run = in_tmp / "runs" / "sinusoid" / "version_0"
    config = (run / "config.yaml").read_text()
    main(["fit", "-c", SINUSOID, *TINY, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 10 and resumed["epoch"] == 1
    assert [p.name for p in run.parent.iterdir()] == ["version_0"] and (
        run / "config.yaml"
    ).read_text() == config
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # one run's curves in one folder


def test_a_fixed_version_run_resumes_in_place_and_is_never_overwritten(in_tmp, capsys):
    """``make experiments`` fixes the logger version so masks_from and resume find the run: resuming
    writes into the same folder and keeps its config.yaml; a fresh fit into it is a one-line error."""
    fixed = [*TINY, "--trainer.logger.init_args.version", "0"]
    main(["fit", "-c", SINUSOID, *fixed])
    run = in_tmp / "runs" / "sinusoid" / "version_0"
    config = (run / "config.yaml").read_text()
    main(
        [
            "fit",
            "-c",
            SINUSOID,
            *fixed,
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
        ]
    )
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 10 and resumed["epoch"] == 1
    assert (run / "config.yaml").read_text() == config and not (run.parent / "version_1").exists()

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, *fixed])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "runs/sinusoid/version_0 already holds a run" in err and "--ckpt_path" in err and "last.ckpt" in err
    )
    assert (run / "config.yaml").read_text() == config


def test_ways_mismatch_is_a_one_line_config_error(in_tmp, capsys, monkeypatch):
    from lthmaml.data import SinusoidDataModule

    monkeypatch.setattr(SinusoidDataModule, "ways", 5, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, *TINY])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lthmaml: error:") and "out_features=1" in err and "ways=5" in err


PRUNE_CONFIGS = sorted((REPO / "configs" / "prune").glob("*.yaml"))
BASE_CONFIGS = ["omniglot_5way1shot.yaml", "supervised_omniglot.yaml"]


@pytest.mark.parametrize("prune", PRUNE_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("base", BASE_CONFIGS)
def test_every_pruning_config_stacks_on_maml_and_supervised_configs(base, prune, resolved_config):
    config = resolved_config("-c", REPO / "configs" / base, "-c", prune)
    assert config["trainer"]["callbacks"] and all(
        c["class_path"].startswith("callbacks.") for c in config["trainer"]["callbacks"]
    )
    assert config["model"]["class_path"].startswith("lthmaml.")


@pytest.mark.slow
@pytest.mark.ci
def test_the_readme_ddp_command_finishes_through_the_cli(tmp_path):
    """``lthmaml fit -c configs/sinusoid.yaml -c configs/ddp_cpu.yaml``: 2 gloo processes, the CLI's
    own callbacks (machine.json, last.ckpt) included. Rank 0 once hung in a broadcast rank 1
    skipped; the hard timeout fails the test instead of stalling CI."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "lthmaml"), "fit", "-c", SINUSOID]
    command += ["-c", str(REPO / "configs" / "ddp_cpu.yaml"), "--trainer.max_epochs", "1"]
    command += ["--data.init_args.meta_batch_size", "4", "--data.init_args.tasks_per_epoch", "8"]
    command += ["--data.init_args.val_tasks", "4", "--data.init_args.test_tasks", "4"]
    command += ["--model.init_args.eval_inner_steps", "1", "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "sinusoid" / "version_0"
    assert json.loads((run / "machine.json").read_text())["processes"] == 2
    assert (run / "checkpoints" / "last.ckpt").is_file()
