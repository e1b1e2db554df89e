"""LotteryTicket: the schedule's sparsities, rewinding, round records, best-weight selection, resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import TinyClassification, TinyImageTasks, assert_same, fit, round_folder
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.lottery import LotteryTicket
from lthmaml import sparsity
from lthmaml.cli import main
from lthmaml.data import SinusoidDataModule
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP, Conv4

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid.yaml")
OMNIGLOT = str(REPO / "configs" / "omniglot_5way1shot.yaml")
LOTTERY = str(REPO / "configs" / "prune" / "lottery.yaml")
LATE_REWIND = str(REPO / "configs" / "prune" / "late_rewind.yaml")


# ---------------------------------------------------------------------- tiny models and data
def maml(hidden=(8, 8), lr: float = 0.01, **kwargs) -> MAML:
    torch.manual_seed(0)
    return MAML(
        MLP(hidden=hidden),
        inner_lr=0.01,
        eval_inner_steps=1,
        optimizer=partial(torch.optim.Adam, lr=lr),
        **kwargs,
    )


def sinusoid() -> SinusoidDataModule:
    """Two meta-batches of two tasks per epoch."""
    return SinusoidDataModule(shots=5, query_shots=5, meta_batch_size=2, tasks_per_epoch=4, val_tasks=2)


def classifier(lr: float = 0.05) -> Classifier:
    torch.manual_seed(0)
    return Classifier(
        MLP(in_features=4, hidden=(16,), out_features=3), optimizer=partial(torch.optim.Adam, lr=lr)
    )


class Probe(Callback):
    """Records the state the callbacks before it leave: weights, masks, optimizer, per hook."""

    def __init__(self) -> None:
        self.epoch_start: dict[int, dict] = {}
        self.epoch_end: dict[int, dict] = {}
        self.step_end: dict[int, dict] = {}
        self.batch_start_optimizer_state: dict[int, int] = {}
        self.val: dict[int, float] = {}
        self.monitor = None

    def on_train_epoch_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.epoch_start[trainer.current_epoch] = {
            "params": sparsity.snapshot(pl_module),
            "masks": sparsity.masks_of(pl_module),
            "optimizer_state": len(optimizer.state),
            "lr": optimizer.param_groups[0]["lr"],
        }

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.batch_start_optimizer_state[trainer.global_step] = len(trainer.optimizers[0].state)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.step_end[trainer.global_step] = sparsity.snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end[trainer.current_epoch] = sparsity.snapshot(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.monitor in trainer.callback_metrics:
            self.val[trainer.current_epoch] = float(trainer.callback_metrics[self.monitor])


class ZeroWatch(Callback):
    """Placed before LotteryTicket: sees raw weights right after each optimizer step, before the
    masks are re-applied, and counts pruned weights that the optimizer moved off zero."""

    def __init__(self) -> None:
        self.sparse_steps = 0
        self.revived = 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        for name, mask in sparsity.masks_of(pl_module, sparsity.prunable(pl_module)).items():
            pruned = mask == 0
            if pruned.any():
                self.sparse_steps += 1
                self.revived += int((sparsity.stored(pl_module, name).detach()[pruned] != 0).sum())


def masked(params: dict, masks: dict) -> dict:
    """``params`` with each masked weight multiplied by its mask (what a rewind must give)."""
    out = dict(params)
    for name, mask in masks.items():
        out[name] = params[name] * mask
    return out


# ---------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_sparsity_after_round_r_is_one_minus_keep_to_the_r(tmp_path, scope):
    model = maml(hidden=(16, 16))
    lottery = LotteryTicket(prune_rate=0.2, rounds=4, epochs_per_round=1, scope=scope)
    trainer = fit(model, sinusoid(), [lottery], tmp_path, limit_val_batches=0)
    assert trainer.current_epoch == 5 and len(lottery.history) == 5  # rounds + 1 trained rounds
    for r in range(5):
        masks = sparsity.read_masks(round_folder(tmp_path, r) / "mask.safetensors")
        zeros = {name: int((mask == 0).sum()) for name, mask in masks.items()}
        sizes = {name: mask.numel() for name, mask in masks.items()}
        groups = [list(masks)] if scope == "global" else [[name] for name in masks]
        for group in groups:
            pruned, size = sum(zeros[name] for name in group), sum(sizes[name] for name in group)
            assert abs(pruned - size * (1 - 0.8**r)) <= 1, group
            # Exactly the rounded target: pruning 20% of the remaining each round would drift from
            # it (a 16-weight layer has 10 pruned after 4 rounds instead of 9).
            assert pruned == round(size * (1 - 0.8**r)), group
        metrics = json.loads((round_folder(tmp_path, r) / "metrics.json").read_text())
        assert metrics["round"] == r
        assert metrics["sparsity"] == pytest.approx(sum(zeros.values()) / sum(sizes.values()))
    assert_same(sparsity.masks_of(model), sparsity.read_masks(round_folder(tmp_path, 4) / "mask.safetensors"))
    assert not round_folder(tmp_path, 5).exists()


def test_steps_per_round_ends_rounds_mid_epoch_and_restarts_the_optimizer_there(tmp_path):
    probe = Probe()
    lottery = LotteryTicket(prune_rate=0.5, rounds=2, steps_per_round=3)  # 2 steps per epoch
    trainer = fit(maml(), sinusoid(), [lottery, probe], tmp_path, limit_val_batches=0)
    assert trainer.global_step == 9 and len(lottery.history) == 3
    assert [record["sparsity"] for record in lottery.history] == pytest.approx([0.0, 0.5, 0.75], abs=1 / 80)
    assert probe.batch_start_optimizer_state[3] == 0 and probe.batch_start_optimizer_state[6] == 0
    assert probe.batch_start_optimizer_state[4] > 0 and probe.batch_start_optimizer_state[2] > 0


# ---------------------------------------------------------------------- rewind, reinit, none
def test_rewind_to_init_restores_every_survivor_bit_exactly_and_restarts_optimizer_and_scheduler(tmp_path):
    model = maml(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    init = sparsity.snapshot(model)
    probe = Probe()
    fit(
        model, sinusoid(), [LotteryTicket(rounds=2, epochs_per_round=2), probe], tmp_path, limit_val_batches=0
    )
    for epoch in (2, 4):  # the first epochs of rounds 1 and 2
        start = probe.epoch_start[epoch]
        assert any(bool((mask == 0).any()) for mask in start["masks"].values())
        assert_same(start["params"], masked(init, start["masks"]))
        assert start["optimizer_state"] == 0 and start["lr"] == 0.01
    # Within a round the optimizer keeps its state and the scheduler decays.
    assert probe.epoch_start[1]["optimizer_state"] > 0 and probe.epoch_start[1]["lr"] == 0.005
    assert probe.epoch_start[3]["lr"] == 0.005


def test_late_rewinding_restores_the_weights_after_step_k(tmp_path):
    model = maml()
    init = sparsity.snapshot(model)
    probe = Probe()
    fit(
        model,
        sinusoid(),
        [LotteryTicket(rounds=1, epochs_per_round=2, rewind_to=3), probe],
        tmp_path,
        limit_val_batches=0,
    )
    step_3, start = probe.step_end[3], probe.epoch_start[2]
    assert not torch.equal(step_3["net.net.2.weight"], init["net.net.2.weight"])
    assert_same(start["params"], masked(step_3, start["masks"]))


def test_rewind_point_past_round_zero_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="rewind_to=4 must be below the 4 steps of round 0"):
        fit(maml(), sinusoid(), [LotteryTicket(rounds=1, epochs_per_round=2, rewind_to=4)], tmp_path)


def test_reinit_random_draws_fresh_seeded_weights_under_the_same_masks(tmp_path):
    model = maml()
    init = sparsity.snapshot(model)
    probe = Probe()
    lottery = LotteryTicket(rounds=1, epochs_per_round=1, reinit_random=True, seed=7)
    fit(model, sinusoid(), [lottery, probe], tmp_path, limit_val_batches=0)
    start = probe.epoch_start[1]
    assert_same(start["masks"], sparsity.read_masks(round_folder(tmp_path, 1) / "mask.safetensors"))
    expected = maml()
    sparsity.reinitialize(expected, generator_seed=8)  # seed + round
    sparsity.load_masks(expected, start["masks"])
    assert_same(start["params"], sparsity.snapshot(expected))
    for name in ("net.net.0.weight", "net.net.2.weight", "net.net.4.weight"):
        assert not torch.equal(start["params"][name], masked(init, start["masks"])[name])
        assert not torch.equal(start["params"][name], masked(probe.step_end[2], start["masks"])[name])


def test_masks_from_gives_the_control_the_tickets_masks_with_fresh_weights(tmp_path):
    """The paper's random-reinit control: round r trains the earlier run's round-r mask from fresh
    weights (not a mask of its own magnitudes), so both curves share their sparsity patterns."""
    fit(
        maml(),
        sinusoid(),
        [LotteryTicket(rounds=2, epochs_per_round=1)],
        tmp_path / "ticket",
        limit_val_batches=0,
    )
    probe = Probe()
    control = LotteryTicket(
        rounds=2, epochs_per_round=1, reinit_random=True, masks_from=str(tmp_path / "ticket")
    )
    fit(maml(lr=0.5), sinusoid(), [control, probe], tmp_path / "control", limit_val_batches=0)
    for r in (1, 2):
        ticket = sparsity.read_masks(round_folder(tmp_path / "ticket", r) / "mask.safetensors")
        assert_same(probe.epoch_start[r]["masks"], ticket)
        assert_same(sparsity.read_masks(round_folder(tmp_path / "control", r) / "mask.safetensors"), ticket)
        expected = maml()
        sparsity.reinitialize(expected, generator_seed=r)  # seed + round
        sparsity.load_masks(expected, ticket)
        assert_same(probe.epoch_start[r]["params"], sparsity.snapshot(expected))


def test_masks_from_a_run_without_enough_rounds_fails_before_training_naming_the_file(tmp_path):
    fit(
        maml(),
        sinusoid(),
        [LotteryTicket(rounds=1, epochs_per_round=1)],
        tmp_path / "short",
        limit_val_batches=0,
    )
    control = LotteryTicket(rounds=2, epochs_per_round=1, masks_from=str(tmp_path / "short"))
    with pytest.raises(ConfigError, match=r"short/rounds/round_02/mask.safetensors does not exist"):
        fit(maml(), sinusoid(), [control], tmp_path / "control")
    other_net = LotteryTicket(rounds=1, epochs_per_round=1, masks_from=str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="do not fit this model"):
        fit(maml(hidden=(4, 4)), sinusoid(), [other_net], tmp_path / "other")


def test_rewind_to_none_keeps_training_the_pruned_trained_weights(tmp_path):
    probe = Probe()
    fit(
        maml(),
        sinusoid(),
        [LotteryTicket(rounds=1, epochs_per_round=1, rewind_to="none"), probe],
        tmp_path,
        limit_val_batches=0,
    )
    start = probe.epoch_start[1]
    assert int(sum((mask == 0).sum() for mask in start["masks"].values())) == 16  # 20% of 80
    assert_same(start["params"], masked(probe.step_end[2], start["masks"]))


def test_pruned_weights_stay_zero_through_adam_steps_and_checkpoints(tmp_path):
    watch = ZeroWatch()
    model = maml(lr=0.05)
    trainer = fit(
        model, sinusoid(), [watch, LotteryTicket(rounds=2, epochs_per_round=2)], tmp_path, limit_val_batches=0
    )
    assert watch.sparse_steps >= 8 and watch.revived == 0
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    for path in (tmp_path / "final.ckpt", round_folder(tmp_path, 2) / "model.ckpt"):
        restored = MAML.load_from_checkpoint(path, net=MLP(hidden=(8, 8)))
        assert_same(sparsity.masks_of(restored), sparsity.masks_of(model))
        for name, mask in sparsity.masks_of(restored).items():
            assert torch.all(sparsity.stored(restored, name)[mask == 0] == 0), name
        assert sparsity.sparsity_report(restored).sparsity == pytest.approx(1 - 0.8**2, abs=1 / 80)


# ---------------------------------------------------------------------- round records
def test_round_folders_hold_masks_metrics_and_a_loadable_checkpoint_on_conv4_maml(tmp_path):
    def conv4():
        return Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)

    torch.manual_seed(0)
    model = MAML(conv4(), inner_lr=0.4, eval_inner_steps=1, optimizer=partial(torch.optim.Adam, lr=0.01))
    data = TinyImageTasks(meta_batch_size=2, tasks_per_epoch=4, val_tasks=4)
    probe = Probe()
    probe.monitor = "val/loss_post"
    lottery = LotteryTicket(
        rounds=2, epochs_per_round=2, layer_rates={"net.head": 0.5}, monitor="val/loss_post", mode="min"
    )
    fit(model, data, [lottery, probe], tmp_path)
    features = [name for name in sparsity.masks_of(model) if name != "net.head.weight"]
    for r in range(3):
        folder = round_folder(tmp_path, r)
        masks = sparsity.read_masks(folder / "mask.safetensors")
        assert_same(masks, probe.epoch_start[2 * r]["masks"])  # the masks round r trained with
        head_zeros = int((masks["net.head.weight"] == 0).sum())
        assert abs(head_zeros - masks["net.head.weight"].numel() * (1 - 0.9**r)) <= 1  # half rate
        feature_zeros = sum(int((masks[name] == 0).sum()) for name in features)
        assert abs(feature_zeros - sum(masks[name].numel() for name in features) * (1 - 0.8**r)) <= 1
        metrics = json.loads((folder / "metrics.json").read_text())
        values = {epoch: probe.val[epoch] for epoch in (2 * r, 2 * r + 1)}
        best_epoch = min(values, key=values.get)
        assert metrics["round"] == r and metrics["monitor"] == "val/loss_post"
        assert (metrics["val_epoch"], metrics["val"]) == (best_epoch, pytest.approx(values[best_epoch]))
        assert metrics["val_epoch_in_round"] == best_epoch - 2 * r + 1  # 1 or 2 of the round's epochs
        total = sum(mask.numel() for mask in masks.values())
        assert metrics["sparsity"] == pytest.approx((head_zeros + feature_zeros) / total)
        restored = MAML.load_from_checkpoint(folder / "model.ckpt", net=conv4())
        assert_same(sparsity.masks_of(restored), masks)
        assert sparsity.sparsity_report(restored).zeros == head_zeros + feature_zeros


class ScriptedClassifier(Classifier):
    """Logs ``val/scripted`` from a table: epoch 1 is round 0's best by construction."""

    SCORES = (0.2, 0.9, 0.5, 0.1, 0.3, 0.2)

    def on_validation_epoch_end(self) -> None:
        self.log("val/scripted", self.SCORES[self.current_epoch])


def test_the_round_best_validation_weights_are_the_ones_pruned_on_a_classifier(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    probe = Probe()
    lottery = LotteryTicket(rounds=1, epochs_per_round=3, monitor="val/scripted", mode="max")
    torch.manual_seed(0)
    model = ScriptedClassifier(
        MLP(in_features=4, hidden=(16,), out_features=3), optimizer=partial(torch.optim.Adam, lr=0.05)
    )
    fit(model, TinyClassification(), [lottery, probe], tmp_path)
    record = lottery.history[0]
    assert (record["val_epoch"], record["val"]) == (1, pytest.approx(0.9))
    best, last = probe.epoch_end[1], probe.step_end[9]  # 3 steps per epoch: step 9 ends round 0

    def pruned(params):  # round 0's pruning, from dense masks, of these weights
        scores = {name: params[name].abs() for name in ("net.net.0.weight", "net.net.2.weight")}
        dense = {name: torch.ones_like(score) for name, score in scores.items()}
        return sparsity.prune_lowest(dense, scores, 0.2, "global", level=1)

    expected, from_last = pruned(best), pruned(last)
    assert any(not torch.equal(expected[name], from_last[name]) for name in expected)  # the choice matters
    assert_same(sparsity.read_masks(round_folder(tmp_path, 1) / "mask.safetensors"), expected)
    checkpoint = torch.load(round_folder(tmp_path, 0) / "model.ckpt", weights_only=False)
    for name, value in best.items():
        assert torch.equal(checkpoint["state_dict"][name], value), name
    assert "val" in caplog.text and "val_epoch" in caplog.text  # the per-round table
    table = caplog.text[caplog.text.index("val_epoch") :].splitlines()
    sparsity_1 = f"{lottery.history[1]['sparsity']:.4f}"
    assert [line.split()[:4] for line in table[1:3]] == [
        ["0", "0.0000", "0.9000", "1"],
        ["1", sparsity_1, "0.3000", "4"],
    ]


def test_test_each_round_records_the_test_metric_of_the_round_best_weights(tmp_path):
    lottery = LotteryTicket(rounds=1, epochs_per_round=2, monitor="val/acc", mode="max", test_each_round=True)
    data = TinyClassification()
    model = classifier()
    trainer = fit(model, data, [lottery], tmp_path)
    assert trainer.current_epoch == 4 and trainer.state.fn == "fit"
    lottery.test_rounds(trainer, model, data)  # what the lthmaml CLI does after fit
    x, y = data.data["test"].tensors
    for r, record in enumerate(lottery.history):
        restored = Classifier.load_from_checkpoint(
            round_folder(tmp_path, r) / "model.ckpt", net=MLP(in_features=4, hidden=(16,), out_features=3)
        )
        accuracy = float((restored(x).argmax(-1) == y).float().mean())
        assert record["test_metric"] == "test/acc" and record["test"] == pytest.approx(accuracy)
        assert record["test_metrics"]["test/acc"] == record["test"] and "test/loss" in record["test_metrics"]
        saved = json.loads((round_folder(tmp_path, r) / "metrics.json").read_text())
        assert saved["test"] == pytest.approx(accuracy)


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "resume_from",
    ["ckpt/epoch=1.ckpt", "ckpt/epoch=2.ckpt", "rounds/round_00/model.ckpt"],
    ids=["after-round-0-pruning", "mid-round-1", "round-0-record-before-pruning"],
)
def test_a_resumed_fit_continues_exactly(tmp_path, resume_from):
    def run(root: Path, ckpt_path=None):
        lottery = LotteryTicket(rounds=2, epochs_per_round=2, monitor="val/loss_post", mode="min")
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        model = maml(lr=0.05)
        fit(model, sinusoid(), [lottery, checkpoints], root, enable_checkpointing=True, ckpt_path=ckpt_path)
        return model, lottery

    full, full_lottery = run(tmp_path / "full")
    resumed, resumed_lottery = run(tmp_path / "resumed", tmp_path / "full" / resume_from)
    assert_same(sparsity.snapshot(resumed), sparsity.snapshot(full))
    assert_same(sparsity.masks_of(resumed), sparsity.masks_of(full))
    assert resumed_lottery.history == full_lottery.history and len(full_lottery.history) == 3
    for r in (1, 2):  # written by the resumed fit (round 1 ends at epoch 3, after every resume point)
        assert_same(
            sparsity.read_masks(round_folder(tmp_path / "resumed", r) / "mask.safetensors"),
            sparsity.read_masks(round_folder(tmp_path / "full", r) / "mask.safetensors"),
        )
    assert not round_folder(tmp_path / "resumed", 0).exists()


def test_resuming_a_finished_fit_trains_nothing_and_tests_its_rounds(tmp_path):
    """Killed after the last round was recorded (while testing the rounds): the resumed fit must not
    train on to max_epochs, only test what is untested."""
    lottery = LotteryTicket(
        rounds=1, epochs_per_round=2, monitor="val/loss_post", mode="min", test_each_round=True
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    fit(maml(lr=0.05), sinusoid(), [lottery, checkpoints], tmp_path, enable_checkpointing=True, max_epochs=10)
    last = tmp_path / "ckpt" / "epoch=3.ckpt"
    assert len(lottery.history) == 2 and not (tmp_path / "ckpt" / "epoch=4.ckpt").exists()

    class Batches(Callback):
        count = 0

        def on_train_batch_start(self, *args) -> None:
            Batches.count += 1

    resumed_lottery = LotteryTicket(
        rounds=1, epochs_per_round=2, monitor="val/loss_post", mode="min", test_each_round=True
    )
    model, data = maml(lr=0.05), sinusoid()
    trainer = fit(model, data, [resumed_lottery, Batches()], tmp_path, ckpt_path=last, max_epochs=10)
    assert Batches.count == 0 and trainer.global_step == torch.load(last, weights_only=False)["global_step"]
    resumed_lottery.test_rounds(trainer, model, data)
    assert [r["round"] for r in resumed_lottery.history] == [0, 1]
    assert all(r["test"] is not None for r in resumed_lottery.history)


PLATEAU_ROUNDS = [
    *("--trainer.callbacks.init_args.epochs_per_round", "3", "--trainer.callbacks.init_args.patience", "1"),
    *("--trainer.callbacks.init_args.min_delta", "100", "--data.init_args.tasks_per_epoch", "50"),
]
"""Rounds of at most 3 epochs that plateau after 2: with a min_delta no loss can beat, only a round's
first validation improves. Round 1 is then epochs 2-3, so the kill lands mid-round (last.ckpt of
epoch 2) or just after it."""


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize(
    ("options", "round_ends"),
    [([], [0, 1, 2, 3]), (PLATEAU_ROUNDS, [1, 3, 5, 7])],
    ids=["fixed-rounds", "plateau-rounds"],
)
def test_a_killed_cli_fit_resumes_to_the_same_tickets(tmp_path, options, round_ends):
    """SIGKILL right after round 1 (the second round) is written, resume from last.ckpt: the same
    tickets as an uninterrupted run. last.ckpt is written every epoch (LastCheckpoint), although the
    monitored val/loss_post gets worse after each prune. With rounds that end on a plateau, the same
    round boundaries too."""
    command = [
        *(sys.executable, "-m", "lthmaml.cli", "fit", "-c", SINUSOID, "-c", LOTTERY),
        *("--trainer.callbacks.init_args.layer_rates", "{net.net.4: 0.5}"),
        *("--trainer.callbacks.init_args.rounds", "3", "--trainer.callbacks.init_args.epochs_per_round", "1"),
        *(
            "--trainer.callbacks.init_args.monitor",
            "val/loss_post",
            "--trainer.callbacks.init_args.mode",
            "min",
        ),
        *("--trainer.enable_progress_bar", "false"),
        *("--data.init_args.tasks_per_epoch", "100", "--data.init_args.meta_batch_size", "10"),
        *("--data.init_args.val_tasks", "10"),
        *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(folder: Path, *extra: str) -> subprocess.Popen:
        folder.mkdir(exist_ok=True)
        with open(folder / "log.txt", "a") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [*command, *extra], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log(folder: str) -> str:
        return (tmp_path / folder / "log.txt").read_text()[-3000:]

    full, cut = start(tmp_path / "full"), start(tmp_path / "cut")
    killed = tmp_path / "cut" / "runs" / "sinusoid" / "version_0"
    deadline = time.monotonic() + 180
    while not round_folder(killed, 1).exists():
        assert cut.poll() is None, log("cut")
        assert time.monotonic() < deadline, log("cut")
        time.sleep(0.02)
    os.kill(cut.pid, signal.SIGKILL)
    cut.wait()
    last = killed / "checkpoints" / "last.ckpt"
    resume_point = torch.load(last, weights_only=False)["callbacks"]["LotteryTicket"]
    assert len(resume_point["history"]) in (1, 2)  # killed after round 0's or round 1's end
    assert full.wait(timeout=180) == 0, log("full")
    round_0 = (round_folder(killed, 0) / "metrics.json").stat().st_mtime_ns
    resumed = start(tmp_path / "cut", "--ckpt_path", str(last))
    assert resumed.wait(timeout=180) == 0, log("cut")

    runs = [tmp_path / "full" / "runs" / "sinusoid" / "version_0", killed]  # resumed in its own folder
    assert (round_folder(killed, 0) / "metrics.json").stat().st_mtime_ns == round_0  # not started over
    ends = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False) for run in runs]
    histories = [end["callbacks"]["LotteryTicket"]["history"] for end in ends]
    assert len(histories[0]) == len(histories[1]) == 4 and histories[0] == histories[1]
    assert [record["epoch"] for record in histories[0]] == round_ends
    assert all(record["stopped_early"] == bool(options) for record in histories[0])
    assert_same(ends[0]["state_dict"], ends[1]["state_dict"])  # masks and weights, bit-equal
    masks = [sparsity.read_masks(round_folder(run, 3) / "mask.safetensors") for run in runs]
    assert_same(masks[0], masks[1])
    assert_same(  # the checkpoint keeps the masks beside the net, by parameter name
        masks[0],
        {k[len("masks.") :]: v for k, v in ends[0]["state_dict"].items() if k.startswith("masks.")},
    )
    assert histories[0][3]["sparsity"] == pytest.approx(1 - 0.8**3, abs=0.01)


# ---------------------------------------------------------------------- configuration
def test_schedule_longer_than_max_epochs_is_a_config_error_naming_the_need(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_epochs >= 6 .*got 5"):
        fit(maml(), sinusoid(), [LotteryTicket(rounds=2, epochs_per_round=2)], tmp_path, max_epochs=5)


def test_a_longer_max_epochs_is_cut_to_the_schedule(tmp_path):
    lottery = LotteryTicket(rounds=1, epochs_per_round=1)
    trainer = fit(maml(), sinusoid(), [lottery], tmp_path, max_epochs=10, limit_val_batches=0)
    assert trainer.current_epoch == 2 and len(lottery.history) == 2


def test_options_that_cannot_work_are_config_errors():
    with pytest.raises(ConfigError, match="exactly one of epochs_per_round and steps_per_round"):
        LotteryTicket(rounds=2)
    with pytest.raises(ConfigError, match="exactly one"):
        LotteryTicket(rounds=2, epochs_per_round=1, steps_per_round=5)
    with pytest.raises(ConfigError, match="prune_rate"):
        LotteryTicket(prune_rate=1.0, epochs_per_round=1)
    with pytest.raises(ConfigError, match="rewind_to"):
        LotteryTicket(epochs_per_round=1, rewind_to="start")
    with pytest.raises(ConfigError, match="reinit_random"):
        LotteryTicket(epochs_per_round=1, rewind_to=3, reinit_random=True)
    with pytest.raises(ConfigError, match="set mode"):
        LotteryTicket(epochs_per_round=1, monitor="val/acc")


def test_layer_rates_naming_another_nets_layer_fails_at_setup_listing_the_layers(tmp_path):
    lottery = LotteryTicket(epochs_per_round=1, layer_rates={"net.head": 0.5})
    with pytest.raises(ConfigError, match=r"\['net.head'\].*net\.net\.4"):
        fit(maml(), sinusoid(), [lottery], tmp_path)


@pytest.mark.parametrize(
    ("base", "prune", "extra", "rewind_to", "head"),
    [
        (OMNIGLOT, LOTTERY, [], "init", "net.head"),
        (
            SINUSOID,
            LATE_REWIND,
            ["--trainer.callbacks.init_args.layer_rates", "{net.net.4: 0.5}"],
            20,
            "net.net.4",
        ),
    ],
    ids=["lottery-on-omniglot", "late-rewind-on-sinusoid"],
)
def test_prune_configs_stack_on_the_base_configs(resolved_config, base, prune, extra, rewind_to, head):
    config = resolved_config("-c", base, "-c", prune, *extra)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "callbacks.LotteryTicket"
    options = callback["init_args"]
    assert (options["prune_rate"], options["rounds"], options["scope"]) == (0.2, 5, "global")
    assert options["rewind_to"] == rewind_to and options["layer_rates"] == {head: 0.5}
    assert config["trainer"]["max_epochs"] == -1
    assert config["trainer"]["logger"]["class_path"].endswith("TensorBoardLogger")  # the base's, kept
    assert config["checkpoint"]["monitor"] in ("val/acc_post", "val/loss_post")  # the base's, kept


def test_lottery_config_on_the_sinusoid_mlp_needs_its_head_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, "-c", LOTTERY, "--trainer.logger", "false"])
    assert exit_info.value.code == 2
    assert "layer_rates names ['net.head']" in capsys.readouterr().err
