"""Mixed precision and the device a tensor lands on: MAML's meta-gradient under bf16 autocast and
under a 16-bit loss scaler (first and second order), no false stop when the scaler overflows, and
pruning on whatever device the scores live (CUDA when there is one)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lthmaml import sparsity
from lthmaml.data import SinusoidDataModule
from lthmaml.meta import MAML
from lthmaml.nets import MLP

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


class FirstGradient(Callback):
    """The meta-gradient the optimizer's first step sees (unscaled, masked)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().float().clone() for n, p in pl_module.named_parameters()}


def meta_gradient(first_order: bool, **trainer_args) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MAML(
        MLP(hidden=(16, 16)),
        inner_lr=0.01,
        first_order=first_order,
        inner_loop="higher",
        optimizer=partial(torch.optim.SGD, lr=0.0),
    )
    data = SinusoidDataModule(
        shots=5, query_shots=5, meta_batch_size=2, tasks_per_epoch=2, val_tasks=2, seed=0
    )
    probe = FirstGradient()
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[probe],
        **trainer_args,
    )
    trainer.fit(model, datamodule=data)
    return probe.grads


def relative_error(got: dict, expected: dict) -> float:
    num = sum(float((got[n] - expected[n]).norm() ** 2) for n in expected) ** 0.5
    return num / sum(float(expected[n].norm() ** 2) for n in expected) ** 0.5


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_bf16_autocast_meta_gradient_is_within_five_percent_of_float32(first_order):
    full = meta_gradient(first_order)
    half = meta_gradient(first_order, precision="bf16-mixed")
    assert relative_error(half, full) < 0.05  # bf16 keeps 8 mantissa bits (measured: 3.5-3.9%)


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_a_loss_scaler_hands_the_optimizer_the_true_meta_gradient(first_order):
    """16-mixed's GradScaler (the CUDA recipe, here on the CPU): the step sees dL/dw, not
    scale x dL/dw (first order computes its gradient by hand and must scale it as backward does)."""
    full = meta_gradient(first_order)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = meta_gradient(first_order, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert relative_error(scaled, full) < 0.02


def test_an_overflowing_scale_skips_the_step_instead_of_stopping_the_fit():
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)  # the scaled loss is inf at once
    grads = meta_gradient(True, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert grads  # the step ran (and was skipped by the scaler): no TrainingError
    assert scaler.get_scale() < 3e38  # the scaler backed off, as it does on a GPU


@pytest.mark.parametrize("device", DEVICES)
def test_pruning_runs_where_the_scores_are(device):
    scores = {"w": torch.arange(10.0, device=device).flip(0)}
    masks = sparsity.prune_lowest({"w": torch.ones(10, device=device)}, scores, 0.3)
    assert masks["w"].device.type == device
    assert masks["w"].cpu().tolist() == [1.0] * 7 + [0.0] * 3
