"""The GPU path against the CPU's: every learner and both inner loops train a few steps on CUDA,
every strategy prunes (and grows) there with its weights kept exactly zero, and the meta-gradients
and masks computed on the GPU equal the CPU's (1e-4). Skipped, with the reason, without CUDA:
``bench/gpu_check.py`` runs them on a GPU machine."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyImageTasks, assert_pruned_weights_zero

from callbacks import (
    SET,
    SNIP,
    LotteryTicket,
    MetaGradientPruning,
    Powerprop,
    RigL,
    StaticSparse,
    TaylorFilterPruning,
    TopKAST,
)
from lthmaml import sparsity
from lthmaml.meta import MAML, MatchingNet, ProtoNet
from lthmaml.nets import Conv4

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: run bench/gpu_check.py on one"
)

STRATEGIES = {
    "lottery": lambda: LotteryTicket(prune_rate=0.5, rounds=1, steps_per_round=2),
    "metagrad": lambda: MetaGradientPruning(prune_rate=0.3, steps=2, steps_between=1),
    "taylor": lambda: TaylorFilterPruning(
        filters_per_step=1, target_fraction=0.25, steps_between=1, accumulate_batches=1
    ),
    "powerprop": lambda: Powerprop(alpha=2.0, final_sparsity=0.5),
    "static": lambda: StaticSparse(sparsity=0.5),
    "snip": lambda: SNIP(sparsity=0.5),
    "set": lambda: SET(sparsity=0.5, update_every=1),
    "rigl": lambda: RigL(sparsity=0.5, update_every=1),
    "topkast": lambda: TopKAST(sparsity=0.5, update_every=1),
}


def maml(loop: str) -> MAML:
    torch.manual_seed(0)
    return MAML(
        Conv4(3, 1, 4, 8, blocks=2),
        inner_lr=0.1,
        inner_loop=loop,
        optimizer=partial(torch.optim.Adam, lr=0.01),
    )


def fit(model: pl.LightningModule, device: str, callbacks=(), steps: int = 4) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,
        callbacks=list(callbacks),
        default_root_dir="/tmp/lthmaml-devices",
    )
    trainer.fit(model, datamodule=TinyImageTasks(meta_batch_size=2, tasks_per_epoch=4, val_tasks=2))
    return trainer


@pytest.mark.parametrize("loop", ["higher", "func"])
@pytest.mark.parametrize("first_order", [False, True])
def test_the_gpu_meta_gradient_equals_the_cpus(loop, first_order):
    data = TinyImageTasks(meta_batch_size=2, tasks_per_epoch=2, val_tasks=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grads = {}
    for device in ("cpu", "cuda"):
        model = maml(loop).to(device)
        model.first_order = first_order
        model.manual_backward = lambda loss: loss.backward()  # outside a Trainer
        model.meta_train(
            batch.to(device) if hasattr(batch, "to") else type(batch)(*(t.to(device) for t in batch)), 0.5
        )
        grads[device] = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][name], grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("learner", ["maml-higher", "maml-func", "protonet", "matchingnet"])
def test_every_learner_trains_on_the_gpu(learner):
    torch.manual_seed(0)
    if learner.startswith("maml"):
        model = maml(learner.split("-")[1])
    else:
        cls = ProtoNet if learner == "protonet" else MatchingNet
        model = cls(Conv4(None, 1, 4, 8, blocks=2), optimizer=partial(torch.optim.Adam, lr=0.01))
    trainer = fit(model, "cuda")
    assert trainer.global_step == 4
    assert all(p.device.type == "cuda" and p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_prunes_on_the_gpu_as_on_the_cpu(strategy):
    masks = {}
    for device in ("cpu", "cuda"):
        model = maml("func")
        fit(model, device, [STRATEGIES[strategy]()])
        assert_pruned_weights_zero(model)
        masks[device] = {n: m.cpu() for n, m in sparsity.masks_of(model).items()}
    assert any(bool((m == 0).any()) for m in masks["cuda"].values())
    if strategy in ("lottery", "static", "snip", "powerprop"):  # no training-order-dependent draws
        for name, mask in masks["cpu"].items():
            agree = float((masks["cuda"][name] == mask).float().mean())
            assert agree > 0.99, (name, agree)  # ties may break apart at float rounding
