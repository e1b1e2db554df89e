"""The torch.func inner loop against the higher one: same meta-gradients (1e-5), same evaluations;
and why BatchNorm is written out inside ``vmap`` (float64: the fused kernel's second order is wrong)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from helpers import TinyImageTasks, quiet_trainer

from lthmaml import sparsity
from lthmaml.data import EpisodeDataset, SinusoidDataModule, TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta import MAML
from lthmaml.meta import functional as functional_module
from lthmaml.nets import MLP, Conv4
from lthmaml.nets.reparam import install_power


def meta_batch(datamodule, tasks: int = 5, split: str = "train") -> TaskBatch:
    dataset = EpisodeDataset(datamodule.task_source(split), tasks, datamodule.seed, split)
    items = [dataset[i] for i in range(tasks)]
    return TaskBatch(*(torch.stack(field) for field in zip(*items)))


def meta_gradient(model: MAML, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """``.grad`` after the meta-training pass of one batch (the module's own code, no Trainer)."""
    model.zero_grad()
    model.manual_backward = lambda loss: loss.backward()  # no Trainer attached
    model.meta_train(batch, 1.0 / batch.num_tasks)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def conv_pair(**kwargs) -> tuple[MAML, MAML]:
    models = []
    for loop in ("higher", "func"):
        torch.manual_seed(0)
        net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
        models.append(MAML(net, inner_lr=0.3, inner_steps=2, inner_loop=loop, task_chunk=2, **kwargs))
    return models[0], models[1]


CASES = {
    "second order": {},
    "first order": {"first_order": True},
    "learned inner rates": {"learn_inner_lr": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", ["dense", "pruned", "powerprop"])
def test_both_loops_give_the_same_meta_gradient(case, variant):
    higher_model, func_model = conv_pair(**CASES[case])
    for model in (higher_model, func_model):
        if variant == "pruned":
            masks = sparsity.masks_of(model)
            scores = sparsity.magnitude_scores(model)
            sparsity.load_masks(model, sparsity.prune_lowest(masks, scores, 0.6))
        elif variant == "powerprop":  # phi stored, phi * |phi| computed: the same function
            install_power(model, 2.0, [name.removesuffix(".weight") for name in sparsity.prunable(model)])
    batch = meta_batch(TinyImageTasks(meta_batch_size=5))
    expected, got = meta_gradient(higher_model, batch), meta_gradient(func_model, batch)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    if variant == "pruned":  # a pruned weight gets no meta-gradient: masked before the step uses it
        func_model.on_before_optimizer_step(None)
        masks, grads = sparsity.masks_of(func_model), dict(func_model.named_parameters())
        for name in sparsity.prunable(func_model):
            pruned = masks[name] == 0
            assert pruned.any() and torch.all(grads[name].grad[pruned] == 0), name
            assert torch.equal(grads[name].grad[~pruned], got[name][~pruned]), name
    if variant == "powerprop":  # the stored phi is what both loops differentiate
        assert {
            f"{name[:-7]}.parametrizations.weight.original" for name in sparsity.prunable(func_model)
        } <= set(got)


def test_sinusoid_regression_meta_gradient_and_evaluation_agree():
    models = []
    for loop in ("higher", "func"):
        torch.manual_seed(0)
        models.append(MAML(MLP(hidden=(8, 8)), inner_lr=0.05, inner_steps=3, inner_loop=loop, task_chunk=4))
    data = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=6, tasks_per_epoch=6)
    batch = meta_batch(data, tasks=6)
    expected, got = meta_gradient(models[0], batch), meta_gradient(models[1], batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)
    with torch.enable_grad():
        a, b = (m.evaluate_batch(batch) for m in models)
    for x, y in zip(a, b):
        torch.testing.assert_close(y.loss_post, x.loss_post, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y.loss_pre, x.loss_pre)


def test_both_loops_give_the_same_test_numbers_through_the_trainer():
    numbers = []
    for loop in ("higher", "func"):
        torch.manual_seed(0)
        net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
        model = MAML(net, inner_lr=0.3, eval_inner_steps=3, inner_loop=loop, task_chunk=3)
        trainer = quiet_trainer(limit_test_batches=None)
        trainer.test(model, datamodule=TinyImageTasks(meta_batch_size=4, test_tasks=8), verbose=False)
        numbers.append(model.test_results)
    assert numbers[1] == pytest.approx(numbers[0], abs=1e-6)


def test_the_func_loop_trains_and_a_pruned_weight_stays_zero(tmp_path):
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    model = MAML(net, inner_lr=0.3, inner_loop="func", task_chunk=2)
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5)
    )
    before = {name: sparsity.weight(model, name).detach().clone() for name in sparsity.prunable(model)}
    quiet_trainer(max_steps=3).fit(model, datamodule=TinyImageTasks(meta_batch_size=4, tasks_per_epoch=12))
    masks = sparsity.masks_of(model)
    for name in sparsity.prunable(model):
        weight = sparsity.weight(model, name)
        assert torch.all(weight[masks[name] == 0] == 0), name
        assert not torch.equal(weight[masks[name] == 1], before[name][masks[name] == 1]), name  # it trained


@pytest.mark.parametrize("option, value", [("inner_loop", "jax"), ("task_chunk", 0)])
def test_bad_loop_options_are_config_errors(option, value):
    with pytest.raises(ConfigError, match=option):
        MAML(MLP(), **{option: value})


# ------------------------------------------------------------------ why BatchNorm is written out
def float64_pair() -> tuple[MAML, MAML, TaskBatch]:
    """The higher and func MAMLs of :func:`conv_pair` in float64 (second order, two inner steps),
    and a meta-batch of 5 tasks in chunks of 2."""
    higher_model, func_model = conv_pair()
    batch = meta_batch(TinyImageTasks(meta_batch_size=5))
    batch = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)
    return higher_model.double(), func_model.double(), batch


def test_batchnorm_is_written_out_under_vmap_because_the_fused_kernel_gets_second_order_wrong(monkeypatch):
    """In float64, where rounding is ~1e-16: the func loop (``vmap`` over a chunk of tasks, BatchNorm
    written out, :func:`lthmaml.meta.functional.batch_norm_written_out`) gives the meta-gradient of
    the per-task higher loop (the fused BatchNorm kernel, no ``vmap``) to ~1e-12. With the fused
    kernel under ``vmap`` instead, its forward values are still right but the second-order
    meta-gradient is wrong by percents: were this to pass one day with the fused kernel, torch would
    have fixed it and the written-out BatchNorm could go."""
    higher_model, func_model, batch = float64_pair()
    expected = meta_gradient(higher_model, batch)
    got = meta_gradient(func_model, batch)
    assert set(got) == set(expected) and all(g.dtype == torch.float64 for g in got.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-12, rtol=1e-10, msg=name)
    # A conv bias before BatchNorm is subtracted with the batch mean: its meta-gradient is 0.
    for name in ("net.features.0.0.bias", "net.features.1.0.bias"):
        assert got[name].abs().max() < 1e-12 and expected[name].abs().max() < 1e-12

    # The fused kernel under vmap: the same query outputs, a wrong second-order meta-gradient.
    loop = func_model.functional_loop()
    with torch.no_grad():
        written_outputs = loop.chunk_outputs(batch.support_x, batch.support_y, batch.query_x, 2, False)
        monkeypatch.setattr(functional_module, "batch_norm_written_out", lambda net: nullcontext())
        fused_outputs = loop.chunk_outputs(batch.support_x, batch.support_y, batch.query_x, 2, False)
    torch.testing.assert_close(fused_outputs, written_outputs, atol=1e-12, rtol=1e-10)
    fused = meta_gradient(func_model, batch)
    errors = {name: float((fused[name] - expected[name]).abs().max()) for name in expected}
    scale = max(float(g.abs().max()) for g in expected.values())
    assert max(errors.values()) > 1e-3 * scale, errors  # far beyond any rounding in float64
    assert errors["net.features.0.0.bias"] > 1e-3  # not even the zero bias gradient survives

    # First order differentiates no inner gradient: there the fused kernel under vmap is right.
    first = [
        MAML(m.net, inner_lr=0.3, inner_steps=2, inner_loop=m.inner_loop, task_chunk=2, first_order=True)
        for m in (higher_model, func_model)
    ]
    expected_first, fused_first = meta_gradient(first[0], batch), meta_gradient(first[1], batch)
    for name in expected_first:
        torch.testing.assert_close(fused_first[name], expected_first[name], atol=1e-12, rtol=1e-10, msg=name)


def test_auto_chunks_are_one_task_on_a_cpu_and_a_given_chunk_is_kept():
    """On a CPU ``vmap`` over tasks costs more than it saves, so ``auto`` adapts task by task, with
    the modules' own kernels; a chunk given in the config is used as given."""
    tasks = TinyImageTasks(meta_batch_size=4)
    tasks.setup("fit")
    batch = next(iter(tasks.train_dataloader()))
    assert (
        MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2), inner_loop="func").chunk_size(batch, 1) == 1
    )
    given = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2), inner_loop="func", task_chunk=3)
    assert [chunk.num_tasks for chunk in given.chunks(batch, 1)] == [3, 1]
