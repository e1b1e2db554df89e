"""Levels that end on a validation plateau (``patience``, ``min_delta``): the lottery's rounds and the
prune-while-training levels, their records, resume mid-round, and the options' errors."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassification, assert_same, fit, round_folder
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import LotteryTicket, MetaGradientPruning, Powerprop
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.nets.models import MLP
from lthmaml.rounds import RoundRecord, round_table

# TinyClassification trains 3 optimizer steps per epoch.
PLATEAUS = (0.5, 0.7, 0.6, 0.65) + (0.3, 0.4, 0.5, 0.6, 0.7) + (0.2, 0.2, 0.1) + (0.0,) * 3
"""By epoch, for patience 2 and 5-epoch rounds: round 0 plateaus after epoch 3 (best: epoch 1),
round 1 improves to its full length (epochs 4-8), round 2 plateaus after epoch 11 (best: epoch 9,
an equal value does not improve)."""


class Scripted(Classifier):
    """Logs ``val/scripted`` from ``scores``, indexed by the epoch (or the global step) validated."""

    scores: Sequence[float] = ()
    by_step = False

    def on_validation_epoch_end(self) -> None:
        self.log("val/scripted", self.scores[self.global_step if self.by_step else self.current_epoch])


def scripted(scores: Sequence[float], by_step: bool = False) -> Scripted:
    torch.manual_seed(0)
    model = Scripted(
        MLP(in_features=4, hidden=(16,), out_features=3), optimizer=partial(torch.optim.Adam, lr=0.05)
    )
    model.scores, model.by_step = tuple(scores), by_step
    return model


def boundaries(history: Sequence[dict]) -> list[tuple]:
    """Per record: (start step, end step, best epoch, best step, best epoch in round, stopped early)."""
    keys = ("round_start_step", "global_step", "val_epoch", "val_step", "val_epoch_in_round", "stopped_early")
    return [tuple(record[key] for key in keys) for record in history]


def monitored(**kwargs) -> dict:
    return {"monitor": "val/scripted", "mode": "max", **kwargs}


# ---------------------------------------------------------------------- rounds of the lottery
@pytest.mark.parametrize(
    ("rounds", "patience", "min_delta", "scores", "expected"),
    [
        (2, 2, 0.0, PLATEAUS, [(0, 12, 1, 6, 2, True), (12, 27, 8, 27, 5, False), (27, 36, 9, 30, 1, True)]),
        # 0.6 and 0.4 beat the best by no more than min_delta: they do not improve.
        (1, 1, 0.15, (0.5, 0.6, 0.1, 0.3, 0.4, 0.0), [(0, 6, 0, 3, 1, True), (6, 15, 3, 12, 2, True)]),
    ],
    ids=["patience", "min_delta"],
)
def test_a_round_ends_after_patience_validations_without_improvement(
    tmp_path, rounds, patience, min_delta, scores, expected
):
    lottery = LotteryTicket(
        rounds=rounds, epochs_per_round=5, **monitored(patience=patience, min_delta=min_delta)
    )
    model = scripted(scores)
    trainer = fit(model, TinyClassification(), [lottery], tmp_path)
    assert boundaries(lottery.history) == expected
    assert trainer.global_step == expected[-1][1]  # the last round's record ended the fit
    assert [record["val"] for record in lottery.history] == [pytest.approx(scores[e[2]]) for e in expected]
    for r, record in enumerate(lottery.history):  # the round's best weights, recorded and pruned
        assert record["recorded"] == "best"
        checkpoint = torch.load(round_folder(tmp_path, r) / "model.ckpt", weights_only=False)
        assert checkpoint["callbacks"]["LotteryTicket"]["history"][-1] == record
    table = round_table(lottery.history).splitlines()
    assert "round_start_step" in table[0] and "stopped_early" in table[0]
    column = table[0].split().index("stopped_early")
    assert [line.split()[column] for line in table[1:]] == [str(e[-1]) for e in expected]


def test_without_patience_rounds_keep_their_fixed_length_whatever_the_validations(tmp_path):
    lottery = LotteryTicket(rounds=2, epochs_per_round=5, **monitored())
    trainer = fit(scripted(PLATEAUS), TinyClassification(), [lottery], tmp_path)
    assert trainer.current_epoch == 15 and trainer.global_step == 45
    assert boundaries(lottery.history) == [
        (0, 15, 1, 6, 2, False),
        (15, 30, 8, 27, 4, False),
        (30, 45, 10, 33, 1, False),
    ]
    assert [record["epoch"] for record in lottery.history] == [4, 9, 14]


def test_rounds_of_steps_end_at_the_plateaus_validation_mid_epoch(tmp_path):
    scores = (0.0, 0.5, 0.8, 0.7, 0.6) + tuple(0.1 * step for step in range(5, 20))  # by global step
    lottery = LotteryTicket(rounds=1, steps_per_round=6, **monitored(patience=2))
    trainer = fit(
        scripted(scores, by_step=True), TinyClassification(), [lottery], tmp_path, val_check_interval=1
    )
    assert trainer.global_step == 10  # round 0: steps 1-4 (a plateau), round 1: steps 5-10 (full)
    # round 1's best is the validation of its last step, which Lightning runs after that step
    assert boundaries(lottery.history) == [(0, 4, 0, 2, None, True), (4, 10, 3, 10, None, False)]


def test_a_round_of_steps_that_ends_on_an_epochs_validation_records_that_validation(tmp_path):
    """Rounds of 6 steps, epochs of 3 batches, validation at each epoch's end, scores rising: each
    round's best is the validation of its last step, which Lightning runs after that step's hooks
    (a round that ended before it recorded the validation 3 steps earlier)."""
    lottery = LotteryTicket(rounds=1, steps_per_round=6, **monitored())
    trainer = fit(
        scripted(tuple(0.1 * epoch for epoch in range(10))), TinyClassification(), [lottery], tmp_path
    )
    assert trainer.global_step == 12
    assert boundaries(lottery.history) == [(0, 6, 1, 6, None, False), (6, 12, 3, 12, None, False)]
    assert [record["val"] for record in lottery.history] == pytest.approx([0.1, 0.3])


def test_a_plateau_at_a_rounds_last_step_ends_that_round_once(tmp_path):
    """Round 0's best is step 4; steps 5 and 6 make the plateau (patience 2) at the validation of
    its last step: one end, and round 1 still runs its 6 steps."""
    scores = (0.0, 0.5, 0.6, 0.7, 0.9, 0.8, 0.7) + tuple(0.1 * step for step in range(7, 20))  # by step
    lottery = LotteryTicket(rounds=1, steps_per_round=6, **monitored(patience=2))
    trainer = fit(
        scripted(scores, by_step=True), TinyClassification(), [lottery], tmp_path, val_check_interval=1
    )
    assert trainer.global_step == 12
    assert boundaries(lottery.history) == [(0, 6, 1, 4, None, False), (6, 12, 3, 12, None, False)]


def test_a_plateau_ends_round_0_no_earlier_than_the_late_rewinding_point(tmp_path):
    """Round 0 plateaus at epoch 1 (step 6), before the rewind point, step 7: it trains on to the
    end of epoch 2, so round 1 has the step-7 weights to start from."""
    lottery = LotteryTicket(rounds=1, epochs_per_round=5, rewind_to=7, **monitored(patience=1))
    fit(scripted((0.5, 0.4, 0.3, 0.9, 0.8, 0.0)), TinyClassification(), [lottery], tmp_path)
    assert boundaries(lottery.history) == [(0, 9, 0, 3, 1, True), (9, 15, 3, 12, 1, True)]
    assert lottery.rewind_state is not None


# ---------------------------------------------------------------------- resume mid-round
@pytest.mark.parametrize(
    "resume_from",
    ["ckpt/epoch=2.ckpt", "ckpt/epoch=3.ckpt", "ckpt/epoch=6.ckpt", "rounds/round_00/model.ckpt"],
    ids=[
        "mid-round-0-one-validation-without-improvement",
        "after-a-plateau",
        "mid-round-1",
        "round-0-record",
    ],
)
def test_a_fit_resumed_mid_round_ends_its_rounds_where_the_uninterrupted_fit_did(tmp_path, resume_from):
    def run(root: Path, ckpt_path=None):
        lottery = LotteryTicket(rounds=2, epochs_per_round=5, **monitored(patience=2))
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        model = scripted(PLATEAUS)
        callbacks = [lottery, checkpoints]
        fit(model, TinyClassification(), callbacks, root, enable_checkpointing=True, ckpt_path=ckpt_path)
        return model, lottery

    full, full_lottery = run(tmp_path / "full")
    resumed, resumed_lottery = run(tmp_path / "resumed", tmp_path / "full" / resume_from)
    assert boundaries(full_lottery.history) == boundaries(resumed_lottery.history)
    assert resumed_lottery.history == full_lottery.history and len(full_lottery.history) == 3
    assert_same(sparsity.snapshot(resumed), sparsity.snapshot(full))
    assert_same(sparsity.masks_of(resumed), sparsity.masks_of(full))
    for r in (1, 2):  # written by the resumed fit
        assert_same(
            sparsity.read_masks(round_folder(tmp_path / "resumed", r) / "mask.safetensors"),
            sparsity.read_masks(round_folder(tmp_path / "full", r) / "mask.safetensors"),
        )


# ---------------------------------------------------------------------- pruning while training
def levels(history: Sequence[dict]) -> list[tuple]:
    keys = ("pruning_step", "round_start_step", "global_step", "stopped_early", "tasks_scored")
    return [tuple(record[key] for key in keys) for record in history]


def test_a_pruning_step_comes_at_the_plateau_scoring_every_batch_since_the_last(tmp_path):
    """Level 0 plateaus after 4 of its 6 batches, before the window of the last 2 opens: its step
    sums all 4 batches. Level 1 improves to its full 6 batches: its step sums the window's 2."""
    scores = (0.0, 0.5, 0.6, 0.55, 0.55) + tuple(0.1 * step for step in range(5, 20))  # by global step
    metagrad = MetaGradientPruning(
        prune_rate=0.2, steps=2, steps_between=6, accumulate_batches=2, **monitored(patience=2)
    )
    model = scripted(scores, by_step=True)
    fit(model, TinyClassification(), [metagrad], tmp_path, max_epochs=4, val_check_interval=1)
    assert levels(metagrad.history) == [(0, 0, 4, True, None), (1, 4, 10, False, 4), (2, 10, 12, False, 2)]
    assert metagrad.history[0]["val_step"] == 4  # recorded at the plateau's validation
    assert metagrad.history[2]["sparsity"] == pytest.approx(1 - 0.8**2, abs=0.01)


def test_the_final_level_ends_the_fit_on_its_plateau(tmp_path):
    """Level 0 runs its 6 batches, level 1 (the target) plateaus 2 validations after its best at
    step 8: the fit stops at step 10 of the 30 that max_epochs allows, recorded as stopped early."""
    scores = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.7, 0.7) + (0.9,) * 20  # by global step
    metagrad = MetaGradientPruning(
        prune_rate=0.2, steps=1, steps_between=6, accumulate_batches=2, **monitored(patience=2)
    )
    model = scripted(scores, by_step=True)
    trainer = fit(model, TinyClassification(), [metagrad], tmp_path, max_epochs=10, val_check_interval=1)
    assert trainer.global_step == 10
    assert levels(metagrad.history) == [(0, 0, 6, False, None), (1, 6, 10, True, 2)]
    assert metagrad.best.step == 8  # what the plateau counted from


def test_without_patience_pruning_steps_keep_their_interval_and_window(tmp_path):
    metagrad = MetaGradientPruning(
        prune_rate=0.2, steps=2, steps_between=6, accumulate_batches=2, **monitored()
    )
    model = scripted((0.5,) * 20, by_step=True)
    fit(model, TinyClassification(), [metagrad], tmp_path, max_epochs=5, val_check_interval=1)
    assert levels(metagrad.history) == [(0, 0, 6, False, None), (1, 6, 12, False, 2), (2, 12, 15, False, 2)]


@pytest.mark.parametrize("resume_from", ["epoch=0.ckpt", "epoch=3.ckpt", "epoch=4.ckpt"])
def test_a_resumed_prune_while_training_fit_keeps_its_plateau_count_and_scores(tmp_path, resume_from):
    # By epoch: level 0 plateaus at epoch 1; level 1 runs its 9 batches (to epoch 4), whose
    # validation is its last; level 2 plateaus at epoch 6, the fit's last (its first validation is
    # epoch 5's); level 3 is recorded at the fit's end without a batch.
    scores = (0.5, 0.4, 0.3, 0.4, 0.5, 0.45, 0.0, 0.0)

    def run(root: Path, ckpt_path=None):
        metagrad = MetaGradientPruning(
            prune_rate=0.2, steps=3, steps_between=9, accumulate_batches=3, **monitored(patience=1)
        )
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        model = scripted(scores)
        callbacks = [metagrad, checkpoints]
        fit(
            model,
            TinyClassification(),
            callbacks,
            root,
            max_epochs=7,
            enable_checkpointing=True,
            ckpt_path=ckpt_path,
        )
        return model, metagrad

    full, full_metagrad = run(tmp_path / "full")
    expected = [(0, 0, 6, True, None), (1, 6, 15, False, 6), (2, 15, 21, True, 3), (3, None, 21, False, 6)]
    assert levels(full_metagrad.history) == expected
    resumed, resumed_metagrad = run(tmp_path / "resumed", tmp_path / "full" / "ckpt" / resume_from)
    assert resumed_metagrad.history == full_metagrad.history
    assert_same(sparsity.snapshot(resumed), sparsity.snapshot(full))


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patience": 0}, r"patience must be >= 1 \(validations\) or null, got 0"),
        ({"patience": -2}, "patience must be >= 1"),
        ({"patience": 2, "min_delta": -0.1}, r"min_delta must be >= 0, got -0.1"),
        ({"min_delta": float("nan")}, "min_delta must be >= 0"),
    ],
)
@pytest.mark.parametrize(
    "strategy",
    [partial(LotteryTicket, epochs_per_round=1), partial(MetaGradientPruning, weights_per_step=1)],
    ids=["lottery", "metagrad"],
)
def test_bad_patience_or_min_delta_is_a_one_line_config_error(strategy, options, message):
    with pytest.raises(ConfigError, match=message) as error:
        strategy(**options)
    assert "\n" not in str(error.value)


def test_patience_without_rounds_or_without_a_monitor_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Powerprop.patience: this strategy has no rounds"):
        Powerprop(final_sparsity=0.5, patience=2)
    lottery = LotteryTicket(rounds=1, epochs_per_round=2, patience=2)
    with pytest.raises(ConfigError, match="LotteryTicket.patience needs a monitored metric"):
        fit(scripted(PLATEAUS), TinyClassification(), [lottery], tmp_path)


def test_records_carry_the_round_start_and_the_early_stop():
    record = RoundRecord(
        round=1,
        sparsity=0.2,
        pruning_step=1,
        global_step=30,
        epoch=9,
        round_start_step=12,
        stopped_early=True,
    )
    assert RoundRecord.from_dict(record.as_dict()) == record


def test_a_recorded_best_level_carries_the_batchnorm_statistics_it_was_validated_with(tmp_path):
    """A net with running statistics: the round's record restores the best validation's weights
    *and* its BatchNorm statistics (testing the best weights with a later epoch's statistics
    scored a ResNet-18 level far below its validation)."""

    class Statistics(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.seen.append(pl_module.net[1].running_mean.clone())

    torch.manual_seed(0)
    model = Scripted(
        nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
        optimizer=partial(torch.optim.Adam, lr=0.05),
    )
    model.scores = (0.9, 0.5, 0.4) * 2  # the first epoch's validation is round 0's best
    lottery = LotteryTicket(rounds=1, epochs_per_round=3, **monitored())
    statistics = Statistics()
    fit(model, TinyClassification(), [lottery, statistics], tmp_path)
    recorded = torch.load(round_folder(tmp_path, 0) / "model.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(recorded["net.1.running_mean"], statistics.seen[0])
    assert not torch.equal(statistics.seen[0], statistics.seen[2])  # the statistics did move
