"""Meta-training under Lightning's DDP: task shards, the averaged meta-gradient, identical masks.

The two-process tests start their ranks with ``torch.multiprocessing.spawn`` and give each the
environment a launcher would (``LOCAL_RANK``, ``NODE_RANK``, ``MASTER_ADDR=127.0.0.1``, a free
port), so Lightning's DDP strategy runs its real code path without relaunching pytest. Gloo
talks over the loopback interface only. Every rank writes what it ended with to a file; the
test process compares the files with each other and with the same run in one process.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET, TinyImageTasks, sgd_lr1
from lightning.pytorch.strategies import DDPStrategy

from callbacks.lottery import LotteryTicket
from callbacks.metagrad import MetaGradientPruning
from callbacks.taylor import TaylorFilterPruning
from lthmaml import sparsity
from lthmaml.data import EpisodicDataModule, SinusoidDataModule
from lthmaml.environment import release_process_group
from lthmaml.errors import ConfigError
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP, Conv4

RANKS = 2


def sgd_lr01(params):
    """Plain SGD: unlike Adam, it does not blow rounding noise in a zero gradient up to a step."""
    return torch.optim.SGD(params, lr=0.1)


def trainer(distributed: bool, **kwargs) -> pl.Trainer:
    options = {**QUIET, "limit_val_batches": None}
    if distributed:  # a short gloo timeout: a rank stuck in a collective fails the test, not CI
        options.update(strategy=DDPStrategy(timeout=timedelta(seconds=120)), devices=RANKS)
    return pl.Trainer(**{**options, **kwargs})


# ---------------------------------------------------------------------- the runs, in 1 or 2 processes
def meta_gradient_cases() -> dict[str, tuple[MAML, EpisodicDataModule]]:
    """Second order with learned inner rates (a Conv4), and first order (an MLP): 4 tasks a step."""
    torch.manual_seed(0)
    conv = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    second = MAML(conv, inner_lr=0.4, inner_steps=1, learn_inner_lr=True, optimizer=sgd_lr1)
    torch.manual_seed(1)
    first = MAML(MLP(hidden=(8, 8)), inner_lr=0.05, inner_steps=2, first_order=True, optimizer=sgd_lr1)
    counts = dict(meta_batch_size=4, tasks_per_epoch=4, val_tasks=5, test_tasks=5)  # 3 + 2 a rank
    return {
        "second_order": (second, TinyImageTasks(**counts)),
        "first_order": (first, SinusoidDataModule(shots=4, query_shots=5, **counts)),
    }


def meta_step_deltas(distributed: bool, out: Path, suffix: str) -> None:
    """theta_before - theta_after of one SGD(lr=1) meta-step, i.e. the meta-gradient, per case;
    then the validation metrics and the test mean and CI of the stepped model."""
    for name, (model, data) in meta_gradient_cases().items():
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        trainer(distributed, max_steps=1, limit_val_batches=0).fit(model, datamodule=data)
        delta = {k: before[k] - v.detach() for k, v in model.named_parameters()}
        torch.save(delta, out / f"{name}_{suffix}.pt")
        metrics = trainer(distributed).validate(model, datamodule=data, verbose=False)[0]
        trainer(distributed).test(model, datamodule=data, verbose=False)
        metrics.update({f"test/{key}": value for key, value in model.test_results.items()})
        torch.save({key: float(value) for key, value in metrics.items()}, out / f"{name}_{suffix}_eval.pt")


def pruning_cases() -> dict[str, tuple[MAML, EpisodicDataModule, pl.Callback]]:
    """One round of each kind of score: magnitude, accumulated meta-gradient, Taylor on filters."""
    cases = {}
    callbacks = {
        "lottery": lambda: LotteryTicket(
            prune_rate=0.5, rounds=1, steps_per_round=2, monitor="val/loss_post", mode="min"
        ),
        "metagrad": lambda: MetaGradientPruning(weights_per_step=40, steps=1, steps_between=2),
        "taylor": lambda: TaylorFilterPruning(
            filters_per_step=2, steps_between=2, target_fraction=0.25, accumulate_batches=None
        ),
    }
    for name, callback in callbacks.items():
        torch.manual_seed(0)
        net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
        model = MAML(net, inner_lr=0.4, eval_inner_steps=1, optimizer=sgd_lr01)
        data = TinyImageTasks(meta_batch_size=4, tasks_per_epoch=8, val_tasks=6)
        cases[name] = (model, data, callback())
    return cases


def pruned_runs(distributed: bool, out: Path, suffix: str) -> None:
    """Fit each pruning case for 4 meta-steps (2 epochs); save the masks and the final state.

    In float64: the ranks sum their tasks' gradients in another order than one process, and in
    float32 that rounding difference (~1e-7) can flip a ReLU or max-pool near a tie, which moves a
    later meta-gradient by ~0.5% (measured on the meta-gradient case: perturbing the weights after
    step 1 by 1e-7 moves the step-2 gradient by 4.6e-3, as much as 1e-6 does) and the end weights
    by ~1e-2. In float64 the rounding is 1e-16 and the runs agree to ~1e-15.
    """
    for name, (model, data, callback) in pruning_cases().items():
        run = out / f"{name}_{suffix}"
        max_epochs = None if name == "lottery" else 2  # the lottery sets its own schedule
        trainer(
            distributed,
            callbacks=[callback],
            default_root_dir=run,
            max_epochs=max_epochs,
            precision="64-true",
        ).fit(model, datamodule=data)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"masks": sparsity.masks_of(model), "state": state}, out / f"{name}_{suffix}.pt")


# ---------------------------------------------------------------------- two local processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, job: Callable[[bool, Path, str], None], out: Path) -> None:
    """A rank as a launcher would start it: Lightning reads the environment and launches nothing."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        GLOO_SOCKET_IFNAME=loopback_interface(),
    )
    torch.set_num_threads(1)
    try:
        job(True, out, f"rank{rank}")
    finally:
        release_process_group()


def loopback_interface() -> str:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def run_ranks(job: Callable[[bool, Path, str], None], out: Path) -> None:
    torch.multiprocessing.spawn(_rank_main, args=(free_port(), job, out), nprocs=RANKS, join=True)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float) -> None:
    """Per tensor, ``|actual - expected| <= rtol |expected|`` (L2 norms); a tensor that is about 0
    (a conv bias before BatchNorm has no gradient) is measured against the largest tensor."""
    floor = 1e-6 * max(float(e.norm()) for e in expected.values())
    for key, value in expected.items():
        error = float((actual[key] - value).norm()) / max(float(value.norm()), floor)
        assert error <= rtol, f"{key}: relative error {error:.2e}"


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("tasks_per_epoch", [8, 11])
def test_ranks_split_each_meta_batch_of_one_process(tasks_per_epoch):
    """Rank r loads tasks r, r+2, ... of the single-process order: per step, the union of the two
    shards is that step's meta-batch, every epoch; evaluation covers its set once, unpadded."""

    def loaders(world_size: int, rank: int):
        data = SinusoidDataModule(meta_batch_size=4, tasks_per_epoch=tasks_per_epoch, val_tasks=5)
        data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        return data.train_dataloader(), data.val_dataloader()

    single_train, single_val = loaders(1, 0)
    shards = [loaders(RANKS, rank) for rank in range(RANKS)]
    assert [train.batch_size for train, _ in shards] == [2, 2]
    for epoch in (0, 3):
        for train, _ in [(single_train, None), *shards]:
            train.sampler.set_epoch(epoch)  # what Lightning calls on the loader's sampler
        steps = [list(single_train.batch_sampler)] + [list(train.batch_sampler) for train, _ in shards]
        assert len(steps[0]) == 2 and all(len(s) == len(steps[0]) for s in steps)
        for k, expected in enumerate(steps[0]):
            assert expected == list(
                range(epoch * tasks_per_epoch + 4 * k, epoch * tasks_per_epoch + 4 * k + 4)
            )
            assert sorted(steps[1][k] + steps[2][k]) == expected
            assert not set(steps[1][k]) & set(steps[2][k])
    val = [i for _, v in shards for batch in v.batch_sampler for i in batch]
    assert sorted(val) == list(range(5)) == [i for batch in single_val.batch_sampler for i in batch]


def test_meta_batch_must_split_evenly_over_ranks():
    data = SinusoidDataModule(meta_batch_size=5, tasks_per_epoch=10, val_tasks=1)
    data.trainer = SimpleNamespace(world_size=RANKS, global_rank=0)
    with pytest.raises(ConfigError, match="multiple"):
        data.train_dataloader()
    data.meta_batch_size = 4
    with pytest.raises(ConfigError, match="val_tasks=1 leaves"):
        data.val_dataloader()


def test_maml_refuses_multi_process_strategies_other_than_ddp():
    """Only DDP is known to keep full parameters on every rank for the gradient all-reduce."""
    model = MAML(MLP(hidden=(8,)))
    model._trainer = SimpleNamespace(world_size=RANKS, strategy=object(), datamodule=None)
    with pytest.raises(ConfigError, match="DDP strategies only"):
        model.setup("fit")
    model.setup("test")  # evaluation has no gradient to exchange


@pytest.mark.slow
@pytest.mark.ci
def test_ddp_meta_gradient_equals_single_process(tmp_path):
    """One SGD(lr=1) meta-step on 4 tasks, 2 a rank: both ranks move every parameter (inner
    learning rates included) by the single-process meta-gradient, second and first order."""
    run_ranks(meta_step_deltas, tmp_path)
    meta_step_deltas(False, tmp_path, "single")
    for name in meta_gradient_cases():
        single = torch.load(tmp_path / f"{name}_single.pt")
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(RANKS)]
        assert set(single) == set(ranks[0]) == set(ranks[1])
        assert any(k.startswith("inner_lrs") for k in single) == (name == "second_order")
        # Every weight moves (a conv bias before BatchNorm has no gradient, so it may not).
        assert all(single[k].abs().max() > 1e-6 for k in single if k.endswith("weight")), name
        for key in single:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: ranks disagree on {key}"
        assert_close(ranks[0], single, rtol=1e-5)
        # Evaluation covers the same 5 tasks, split 3 + 2: synced means (and the test CI over the
        # gathered per-task values) equal one process's, on both ranks.
        single = torch.load(tmp_path / f"{name}_single_eval.pt")
        ranks = [torch.load(tmp_path / f"{name}_rank{r}_eval.pt") for r in range(RANKS)]
        assert {"val/loss_post", "test/loss_post", "test/loss_post_ci95"} <= set(single)
        for metrics in ranks:
            assert metrics.keys() == single.keys()
            for key, value in single.items():
                assert metrics[key] == pytest.approx(value, rel=1e-5), f"{name}: {key}"


@pytest.mark.slow
@pytest.mark.ci
def test_ddp_pruning_rounds_end_with_identical_masks(tmp_path):
    """A LotteryTicket round (magnitude), a meta-gradient and a Taylor pruning step under DDP:
    both ranks end with identical masks and weights, and the masks are those of one process."""
    run_ranks(pruned_runs, tmp_path)
    pruned_runs(False, tmp_path, "single")
    for name in pruning_cases():
        single = torch.load(tmp_path / f"{name}_single.pt")
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(RANKS)]
        masks = ranks[0]["masks"]
        assert 0 < sum(int((m == 0).sum()) for m in masks.values()) < sum(m.numel() for m in masks.values())
        for key in masks:
            assert torch.equal(masks[key], ranks[1]["masks"][key]), f"{name}: ranks' masks differ at {key}"
            assert torch.equal(masks[key], single["masks"][key]), f"{name}: masks differ from one process"
        for key, value in ranks[0]["state"].items():
            assert torch.equal(value, ranks[1]["state"][key]), f"{name}: ranks' {key} differ"
        assert_close(ranks[0]["state"], single["state"], rtol=1e-10)
    # Rank 0 alone wrote the lottery's round records; the pruned round's holds the ranks' masks.
    masks = ranks[0]["masks"] if name == "lottery" else torch.load(tmp_path / "lottery_rank0.pt")["masks"]
    record = sparsity.read_masks(tmp_path / "lottery_rank0" / "rounds" / "round_01" / "mask.safetensors")
    assert record.keys() == masks.keys() and all(torch.equal(record[k], masks[k]) for k in masks)
    assert not (tmp_path / "lottery_rank1").exists()
    # Task counts in the round records (round 1: the level the first step made) are totals over
    # the ranks, as one process counts them.
    for name, key in (("metagrad", "tasks_scored"), ("taylor", "tasks_scored")):
        records = [
            json.loads((tmp_path / f"{name}_{run}" / "rounds" / "round_01" / "metrics.json").read_text())
            for run in ("rank0", "single")
        ]
        assert records[0][key] == records[1][key] > 0, name
