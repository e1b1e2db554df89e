"""The evidence experiments (configs/experiments/, `make experiments`): one budget, every level tested."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from lthmaml.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "base")


def resolved(name: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "-c",
                str(EXPERIMENTS / "base.yaml"),
                "-c",
                str(EXPERIMENTS / f"{name}.yaml"),
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_experiment_has_the_same_seed_data_model_and_round_budget(capsys):
    assert NAMES == [
        "dense",
        "lth_late_rewind",
        "lth_random_reinit",
        "lth_rewind_init",
        "metagrad",
        "powerprop_lottery",
        "taylor",
    ]
    configs = {name: resolved(name, capsys) for name in NAMES}
    reference = configs["lth_rewind_init"]
    round_updates = 400
    for name, config in configs.items():
        assert config["trainer"]["logger"]["init_args"]["name"] == name  # its own run folder
        assert config["trainer"]["logger"]["init_args"]["version"] == 0  # masks_from and resume find it
        assert (config["seed_everything"], config["data"], config["model"]) == (
            reference["seed_everything"],
            reference["data"],
            reference["model"],
        )
        data = config["data"]["init_args"]
        assert (data["ways"], data["shots"], data["test_tasks"]) == (5, 1, 600)
        updates_per_epoch = data["tasks_per_epoch"] // data["meta_batch_size"]
        for callback in config["trainer"]["callbacks"] or []:
            args = callback["init_args"]
            if "LotteryTicket" in callback["class_path"]:
                assert args["epochs_per_round"] * updates_per_epoch == round_updates
                assert 1 - (1 - args["prune_rate"]) ** args["rounds"] > 0.9  # past 90% sparsity
            if "MetaGradient" in callback["class_path"] or "Taylor" in callback["class_path"]:
                assert args["steps_between"] == round_updates
            if callback["class_path"].startswith("callbacks.") and "Powerprop" not in callback["class_path"]:
                assert args["test_each_round"] is True  # every level on the same 600 test tasks
    assert (
        configs["dense"]["trainer"]["max_epochs"] * 50 == round_updates and configs["dense"]["test_after_fit"]
    )
    assert (
        configs["metagrad"]["trainer"]["max_epochs"] * 50 == 12 * round_updates
    )  # 11 steps + the last round
    control = configs["lth_random_reinit"]["trainer"]["callbacks"][0]["init_args"]
    assert control["reinit_random"] and control["masks_from"] == "runs/experiments/lth_rewind_init/version_0"


def test_make_experiments_runs_the_control_after_the_tickets_it_borrows(tmp_path):
    out = subprocess.run(
        ["make", "-n", "-B", "experiments", f"EXP_DIR={tmp_path}", f"SINUSOID={tmp_path}/sinusoid.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fits = [line for line in out.splitlines() if "lthmaml fit" in line]
    order = [next(n for n in NAMES if f"configs/experiments/{n}.yaml" in line) for line in fits]
    assert sorted(order) == sorted(NAMES)
    assert order.index("lth_rewind_init") < order.index("lth_random_reinit")
    assert f"--trainer.callbacks.init_args.masks_from {tmp_path}/lth_rewind_init/version_0" in out
    assert f"bench.sinusoid --threads 1 --json {tmp_path}/sinusoid.json" in out
