"""The evidence experiments (configs/experiments/, `make experiments`): one budget, every level tested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lthmaml import sparsity

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "base")


def experiment(resolved_config, name: str, *extra: str) -> dict:
    """The config of experiment ``name`` (a path under configs/experiments, e.g. ``sparse/rigl``)."""
    return resolved_config("-c", EXPERIMENTS / "base.yaml", "-c", EXPERIMENTS / f"{name}.yaml", *extra)


def test_every_experiment_has_the_same_seed_data_model_and_round_budget(resolved_config):
    assert NAMES == [
        "dense",
        "lth_late_rewind",
        "lth_random_reinit",
        "lth_rewind_init",
        "metagrad",
        "powerprop_lottery",
        "taylor",
    ]
    configs = {name: experiment(resolved_config, name) for name in NAMES}
    reference = configs["lth_rewind_init"]
    round_updates = 2400  # the cap of a round; patience ends most rounds sooner
    plateau = {"patience": 2, "min_delta": 0.005}
    for name, config in configs.items():
        assert config["trainer"]["logger"]["init_args"]["name"] == name  # its own run folder
        assert config["trainer"]["logger"]["init_args"]["version"] == 0  # masks_from and resume find it
        assert (config["seed_everything"], config["data"], config["model"]) == (
            reference["seed_everything"],
            reference["data"],
            reference["model"],
        )
        data = config["data"]["init_args"]
        assert (data["ways"], data["shots"], data["test_tasks"], data["eval_query_shots"]) == (5, 1, 600, 15)
        updates_per_epoch = data["tasks_per_epoch"] // data["meta_batch_size"]
        assert updates_per_epoch == 200
        for callback in config["trainer"]["callbacks"] or []:
            args = callback["init_args"]
            if "LotteryTicket" in callback["class_path"]:
                assert args["epochs_per_round"] * updates_per_epoch == round_updates
                assert 1 - (1 - args["prune_rate"]) ** args["rounds"] > 0.9  # 93.75% sparsity
            if "MetaGradient" in callback["class_path"] or "Taylor" in callback["class_path"]:
                assert args["steps_between"] == round_updates
            if "EarlyStopping" in callback["class_path"] or (
                callback["class_path"].startswith("callbacks.") and "Powerprop" not in callback["class_path"]
            ):
                assert {key: args[key] for key in plateau} == plateau  # every level ends on one rule
            if callback["class_path"].startswith("callbacks.") and "Powerprop" not in callback["class_path"]:
                assert args["test_each_round"] is True  # every level on the same 600 test tasks
    dense = configs["dense"]
    assert dense["trainer"]["max_epochs"] * 200 == round_updates and dense["test_after_fit"]
    assert dense["trainer"]["callbacks"][0]["init_args"]["monitor"] == dense["checkpoint"]["monitor"]
    assert configs["metagrad"]["trainer"]["max_epochs"] * 200 == 5 * round_updates  # 4 steps + the last level
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
    assert f"bench.sinusoid --threads 1 --json {tmp_path}/sinusoid.json --plot docs/results/" in out


@pytest.mark.slow
@pytest.mark.ci
def test_make_experiments_then_results_fills_the_readme_with_the_logged_numbers(tmp_path, fake_omniglot):
    """The whole chain on tiny data: the tickets, the control on their masks, the README section."""
    characters = {f"Alphabet_{a}": [f"character{c:02d}" for c in range(1, 16)] for a in range(2)}
    root = fake_omniglot.folder(characters, drawers=6)
    tiny = [
        *("--data.init_args.root", str(root), "--data.init_args.tasks_per_epoch", "10"),
        *("--data.init_args.meta_batch_size", "5", "--data.init_args.val_tasks", "5"),
        *("--data.init_args.eval_query_shots", "2"),  # 6 drawers a character: 1 support + 2 query
        *("--data.init_args.test_tasks", "10", "--model.init_args.net.init_args.hidden_channels", "4"),
        *("--trainer.callbacks.init_args.rounds", "2", "--trainer.callbacks.init_args.epochs_per_round", "1"),
    ]
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\n<!-- results:begin -->\n<!-- results:end -->\n")
    runs, experiments = tmp_path / "runs", "lth_rewind_init lth_random_reinit"
    sinusoid = tmp_path / "sinusoid.json"  # present, so make does not run bench/sinusoid.py
    sinusoid.write_text(json.dumps({"iterations": 1, "tests": []}))
    evidence = tmp_path / "evidence"
    common = [f"EXP_DIR={runs}", f"EXPERIMENTS={experiments}", f"SINUSOID={sinusoid}", f"EVIDENCE={evidence}"]
    env = {**os.environ, "LTHMAML_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    make = ["make", "--no-print-directory", "-s"]
    subprocess.run(
        [*make, "experiments", *common, f"EXP_ARGS={' '.join(tiny)}"], cwd=REPO, env=env, check=True
    )
    subprocess.run(
        [*make, "results", *common, f"RESULTS={tmp_path / 'docs'}", f"RESULTS_DOC={readme}"],
        cwd=REPO,
        env=env,
        check=True,
    )

    tickets, control = (runs / name / "version_0" for name in experiments.split())
    for r in (1, 2):  # the control trained the tickets' masks
        mask = f"rounds/round_{r:02d}/mask.safetensors"
        assert sparsity.read_masks(control / mask).keys() == sparsity.read_masks(tickets / mask).keys()
        for name, value in sparsity.read_masks(tickets / mask).items():
            assert torch.equal(sparsity.read_masks(control / mask)[name], value)
    text = readme.read_text()
    for run in (tickets, control):
        for r in range(3):
            record = json.loads((run / "rounds" / f"round_{r:02d}" / "metrics.json").read_text())
            ci = record["test_metrics"]["test/acc_post_ci95"]
            assert f"{100 * record['test']:.2f} ± {100 * ci:.2f}" in text  # the table cell
    assert (tmp_path / "docs" / "accuracy_vs_remaining.png").is_file()
    assert "| lth_random_reinit | `lthmaml fit -c configs/experiments/base.yaml" in text
    assert "Against the random-reinit control (lth_random_reinit) at 2 pruned levels" in text

    # Each finished experiment left its records, and no weights, in the evidence folder, and the
    # section is rebuilt from there alone once the run folders are gone (another sitting).
    for name in experiments.split():
        kept = [p for p in (evidence / name / "version_0").rglob("*") if p.is_file()]
        assert len([p for p in kept if p.name == "metrics.json"]) == 3
        assert not [p for p in kept if p.suffix in (".ckpt", ".safetensors") or "tfevents" in p.name]
    shutil.rmtree(runs)
    readme.write_text("# Results\n\n<!-- results:begin -->\n<!-- results:end -->\n")
    subprocess.run(
        [*make, "results", *common, f"RESULTS={tmp_path / 'docs'}", f"RESULTS_DOC={readme}"],
        cwd=REPO,
        env=env,
        check=True,
    )
    assert readme.read_text() == text


def test_make_sparse_experiments_runs_every_method_at_80_90_95_on_the_dense_protocol(
    tmp_path, resolved_config
):
    out = subprocess.run(
        ["make", "-n", "-B", "sparse-experiments", f"EXP_DIR={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count("lthmaml fit") == 18 + 1  # and lth_distill
    methods = sorted(p.stem for p in (EXPERIMENTS / "sparse").glob("*.yaml") if p.stem != "lth_distill")
    assert methods == ["powerprop_topkast", "rigl", "set", "snip", "static", "topkast"]
    dense = experiment(resolved_config, "dense")
    for method in methods:
        config = experiment(
            resolved_config, f"sparse/{method}", "--trainer.callbacks.init_args.sparsity", "0.95"
        )
        assert (config["data"], config["model"], config["trainer"]["max_epochs"]) == (
            dense["data"],
            dense["model"],
            dense["trainer"]["max_epochs"],
        )
        stopping, *_, strategy = config["trainer"]["callbacks"]
        assert stopping == dense["trainer"]["callbacks"][0]  # the dense run's plateau rule
        assert strategy["init_args"]["sparsity"] == 0.95 and strategy["init_args"]["test_each_round"] is True


def test_lth_distill_is_lth_rewind_init_with_distillation(resolved_config):
    ticket = experiment(resolved_config, "lth_rewind_init")
    distill = experiment(resolved_config, "sparse/lth_distill")
    (a,), (b,) = ticket["trainer"]["callbacks"], distill["trainer"]["callbacks"]
    assert b["init_args"].pop("distill_weight") == 1.0 and b["init_args"].pop("distill_temperature") == 4.0
    a["init_args"].pop("distill_weight"), a["init_args"].pop("distill_temperature")
    assert a == b and (ticket["data"], ticket["model"]) == (distill["data"], distill["model"])
