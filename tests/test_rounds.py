"""The shared round record and testing each level after the fit with the public Trainer API."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import LotteryTicket, MetaGradientPruning
from lthmaml import sparsity
from lthmaml.data import SinusoidDataModule
from lthmaml.meta import MAML
from lthmaml.nets import MLP
from lthmaml.tracking import BestWeights

# test/loss_post of each level as an in-fit test loop recorded it for exactly these runs; testing
# the round checkpoints after the fit must agree.
IN_FIT_TEST_LOSSES = {
    "metagrad": [2.968275785446167, 3.055601119995117, 3.0501351356506348, 3.018587827682495],
    "lottery": [2.968275785446167, 3.4205734729766846, 3.231332540512085],
}


@pytest.mark.parametrize("strategy", sorted(IN_FIT_TEST_LOSSES))
def test_levels_tested_after_the_fit_give_the_numbers_the_in_fit_loop_gave(tmp_path, strategy):
    torch.manual_seed(0)
    data = SinusoidDataModule(
        shots=4, query_shots=5, meta_batch_size=3, tasks_per_epoch=18, val_tasks=6, test_tasks=9
    )
    model = MAML(
        MLP(hidden=(8, 8)), inner_lr=0.05, inner_steps=1, optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )
    if strategy == "metagrad":
        callback = MetaGradientPruning(prune_rate=0.2, steps=3, steps_between=2, test_each_round=True)
        limits = {"max_steps": 6}
    else:
        callback = LotteryTicket(rounds=2, steps_per_round=2, test_each_round=True)
        limits = {"max_epochs": 10}
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss_post", mode="min")
    trainer = quiet_trainer(
        default_root_dir=str(tmp_path),
        callbacks=[callback, best],
        enable_checkpointing=True,
        limit_val_batches=None,
        **limits,
    )
    trainer.fit(model, datamodule=data)
    best_path, history = best.best_model_path, [dict(r) for r in callback.history]
    callback.test_rounds(trainer, model, data)
    got = [record["test_metrics"]["test/loss_post"] for record in callback.history]
    assert got == pytest.approx(IN_FIT_TEST_LOSSES[strategy], rel=1e-6)
    assert [r["test"] for r in callback.history] == got  # the monitor's test counterpart
    for index, record in enumerate(callback.history):  # written into each level's metrics.json
        saved = json.loads((tmp_path / "rounds" / f"round_{index:02d}" / "metrics.json").read_text())
        assert saved["test"] == record["test"]
        # Report rows are named by layer, the mask file's masks by parameter name.
        assert list(saved["layers"]) == ["net.net.0", "net.net.2", "net.net.4"]
        masks = sparsity.read_masks(tmp_path / "rounds" / f"round_{index:02d}" / "mask.safetensors")
        assert sorted(masks) == ["net.net.0.weight", "net.net.2.weight", "net.net.4.weight"]
        for layer, row in saved["layers"].items():
            assert row["zeros"] == int((masks[f"{layer}.weight"] == 0).sum())
        assert {k: v for k, v in record.items() if not k.startswith("test")} == {
            k: v for k, v in history[index].items() if not k.startswith("test")
        }
    assert best.best_model_path == best_path  # the callbacks' states were put back after each test
    calls = []
    trainer.test = lambda *args, **kwargs: calls.append(kwargs)  # a resumed run tests nothing twice
    callback.test_rounds(trainer, model, data)
    assert calls == []


@pytest.mark.parametrize("mode, values, best", [("max", [0.5, 0.7, 0.69, 0.7], 1), ("min", [3, 2, 2.5], 1)])
def test_best_weights_follow_early_stoppings_rule(mode, values, best):
    tracker = BestWeights("val/x", mode)
    snapshots = iter(range(100))
    for step, value in enumerate(values):
        tracker.update(value, lambda: {"w": torch.tensor(float(next(snapshots)))}, step=step)
    assert tracker.step == best and tracker.value == values[best]
    assert tracker.validations_since_best == len(values) - best - 1
    assert not tracker.update(float("nan"), lambda: {})
    strict = BestWeights("val/x", "max", min_delta=0.1)
    strict.update(0.5, dict)
    assert not strict.update(0.55, dict) and strict.update(0.61, dict)
    restored = BestWeights("val/x", mode)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()
