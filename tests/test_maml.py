"""MAML correctness: meta-gradients against an independent torch.func computation, masks, metrics."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyImageTasks, sgd_lr1
from helpers import quiet_trainer as trainer
from torch.func import functional_call, grad

from lthmaml import sparsity
from lthmaml.data import EpisodeDataset, EpisodicDataModule, SinusoidDataModule, SinusoidTasks
from lthmaml.errors import ConfigError
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import mean_and_ci95, task_loss
from lthmaml.nets.models import MLP, Conv4

META_BATCH = 3


def first_training_tasks(datamodule: EpisodicDataModule):
    dataset = EpisodeDataset(datamodule.task_source("train"), META_BATCH, datamodule.seed, "train")
    return [dataset[i] for i in range(META_BATCH)]


def meta_step_delta(model: MAML, datamodule) -> dict[str, torch.Tensor]:
    """theta_before - theta_after of one meta-step through Trainer.fit (= the meta-gradient)."""
    before = {k: v.detach().clone() for k, v in model.net.named_parameters()}
    trainer(max_steps=1).fit(model, datamodule=datamodule)
    return {k: before[k] - v.detach() for k, v in model.net.named_parameters()}


def reference_meta_gradient(net, tasks, inner_lr, steps, first_order, masks=None):
    """MAML's meta-gradient written directly with torch.func, independent of higher; ``masks`` (by
    the net's parameter names) multiply the weights in every forward pass (the textbook pruned net)."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    masks = masks or {}

    def loss_at(p, x, y):
        p = {k: v * masks[k] if k in masks else v for k, v in p.items()}
        return task_loss(functional_call(net, (p, buffers), (x,)), y)

    def adapt(p, task):
        for _ in range(steps):
            g = grad(loss_at)(p, task.support_x, task.support_y)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = {k: p[k] - inner_lr * g[k] for k in p}
        return p

    def meta_loss(p):
        return sum(loss_at(adapt(p, t), t.query_x, t.query_y) for t in tasks) / len(tasks)

    return grad(meta_loss)(params)


def sinusoid_setup(**maml_kwargs):
    torch.manual_seed(0)
    net = MLP(hidden=(8, 8))
    dm = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=META_BATCH, tasks_per_epoch=META_BATCH)
    model = MAML(net, inner_lr=0.05, inner_steps=2, optimizer=sgd_lr1, **maml_kwargs)
    return net, dm, model


@pytest.mark.parametrize("first_order", [False, True])
def test_sinusoid_meta_gradient_matches_torch_func(first_order):
    net, dm, model = sinusoid_setup(first_order=first_order)
    expected = reference_meta_gradient(net, first_training_tasks(dm), 0.05, 2, first_order)
    delta = meta_step_delta(model, dm)
    for name in expected:
        torch.testing.assert_close(delta[name], expected[name], atol=1e-5, rtol=1e-4)


def test_second_order_differs_from_first_order():
    net, dm, _ = sinusoid_setup()
    tasks = first_training_tasks(dm)
    so = reference_meta_gradient(net, tasks, 0.05, 2, first_order=False)
    fo = reference_meta_gradient(net, tasks, 0.05, 2, first_order=True)
    assert max((so[k] - fo[k]).abs().max().item() for k in so) > 1e-4


def test_first_order_is_query_gradient_at_adapted_weights():
    """One inner step by hand: theta' = theta - a * dLs/dtheta; FOMAML's step is dLq/dtheta'."""
    net, dm, model = sinusoid_setup(first_order=True)
    model.inner_steps = 1
    tasks = first_training_tasks(dm)
    expected = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    for task in tasks:
        adapted = MLP(hidden=(8, 8))
        adapted.load_state_dict(net.state_dict())
        task_loss(adapted(task.support_x), task.support_y).backward()
        with torch.no_grad():
            for p in adapted.parameters():
                p -= 0.05 * p.grad
                p.grad = None
        task_loss(adapted(task.query_x), task.query_y).backward()
        for k, p in adapted.named_parameters():
            expected[k] += p.grad / len(tasks)
    delta = meta_step_delta(model, dm)
    for name in expected:
        torch.testing.assert_close(delta[name], expected[name], atol=1e-6, rtol=1e-5)


def test_conv4_classification_meta_gradient_matches_torch_func():
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    dm = TinyImageTasks(meta_batch_size=META_BATCH, tasks_per_epoch=META_BATCH)
    model = MAML(net, inner_lr=0.3, inner_steps=1, optimizer=sgd_lr1)
    expected = reference_meta_gradient(net, first_training_tasks(dm), 0.3, 1, first_order=False)
    delta = meta_step_delta(model, dm)
    for name in expected:
        torch.testing.assert_close(delta[name], expected[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("first_order", [False, True])
def test_pruned_weight_gets_zero_meta_gradient_and_stays_zero_when_adapted(first_order):
    net, dm, model = sinusoid_setup(first_order=first_order)
    hidden = net.net[2]
    mask = torch.ones(8, 8)
    mask[3, :] = 0
    mask[:, 5] = 0
    sparsity.load_masks(model, {"net.net.2.weight": mask})  # beside the net, keyed by parameter name
    pruned = mask == 0
    assert torch.all(hidden.weight[pruned] == 0)  # stored as zero, no mask in the forward pass
    # On the kept entries the meta-gradient is the one a mask in the forward pass gives.
    expected = reference_meta_gradient(
        net, first_training_tasks(dm), 0.05, 2, first_order, masks={"net.2.weight": mask}
    )
    delta = meta_step_delta(model, dm)
    assert torch.all(delta["net.2.weight"][pruned] == 0)
    assert torch.all(hidden.weight[pruned] == 0)
    assert delta["net.2.weight"][~pruned].abs().sum() > 0
    for name in expected:
        kept = ~pruned if name == "net.2.weight" else torch.ones_like(expected[name], dtype=torch.bool)
        torch.testing.assert_close(delta[name][kept], expected[name][kept], atol=1e-5, rtol=1e-4)
    task = first_training_tasks(dm)[0]
    with torch.enable_grad(), model.adapt(task.support_x, task.support_y, 3, not first_order) as adapted:
        assert torch.all(adapted.net[2].weight[pruned] == 0)
        assert not torch.equal(adapted.net[2].weight[~pruned], hidden.weight[~pruned])
    params = model.functional_loop().adapted_params(task.support_x, task.support_y, 3)  # torch.func too
    assert torch.all(params["net.2.weight"][pruned] == 0)
    assert not torch.equal(params["net.2.weight"][~pruned], hidden.weight[~pruned])


def test_learned_inner_learning_rates_receive_meta_gradient():
    _, dm, model = sinusoid_setup(learn_inner_lr=True)
    before = torch.stack(list(model.inner_lrs)).detach().clone()
    trainer(max_steps=1).fit(model, datamodule=dm)
    after = torch.stack(list(model.inner_lrs)).detach()
    assert len(after) == 6 and torch.all(after != before)


def test_learned_inner_lr_with_first_order_is_a_config_error():
    with pytest.raises(ConfigError, match="first_order"):
        MAML(MLP(), first_order=True, learn_inner_lr=True)


def test_evaluation_is_deterministic_and_reports_pre_and_post_metrics():
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    dm = TinyImageTasks(meta_batch_size=4, val_tasks=8)
    model = MAML(net, inner_lr=0.3, eval_inner_steps=2)
    first = trainer(limit_val_batches=None).validate(model, datamodule=dm, verbose=False)[0]
    second = trainer(limit_val_batches=None).validate(model, datamodule=dm, verbose=False)[0]
    assert first == second
    assert set(first) == {"val/loss_pre", "val/loss_post", "val/acc_pre", "val/acc_post"}


def test_evaluation_under_inference_mode_gives_a_clear_error():
    _, dm, model = sinusoid_setup()
    with pytest.raises(ConfigError, match="inference_mode: false"):
        trainer(inference_mode=True, limit_val_batches=None).validate(model, datamodule=dm, verbose=False)


def test_test_reports_mean_and_ci95_over_tasks():
    torch.manual_seed(0)
    _, _, model = sinusoid_setup()
    dm = SinusoidDataModule(shots=5, query_shots=5, meta_batch_size=10, test_tasks=30)
    results = trainer().test(model, datamodule=dm, verbose=False)[0]
    assert model.test_results["loss_post"] == pytest.approx(results["test/loss_post"], rel=1e-5)
    assert 0 < model.test_results["loss_post_ci95"] < model.test_results["loss_post"]


def test_mean_and_ci95_matches_the_normal_interval():
    mean, ci = mean_and_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert ci == pytest.approx(1.96 * 1.2909944 / 2.0, rel=1e-6)


def test_short_sinusoid_run_adapts_well_below_the_unadapted_mse():
    torch.manual_seed(0)
    net = MLP()
    dm = SinusoidDataModule(
        shots=10, query_shots=10, meta_batch_size=10, tasks_per_epoch=4000, test_tasks=100
    )
    model = MAML(
        net,
        inner_lr=0.02,
        inner_steps=1,
        eval_inner_steps=10,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
    )
    trainer(max_epochs=1).fit(model, datamodule=dm)
    results = trainer().test(model, datamodule=dm, verbose=False)[0]
    assert results["test/loss_post"] < 0.6 * results["test/loss_pre"]


def test_sinusoid_tasks_follow_the_paper_distribution():
    dataset = EpisodeDataset(SinusoidTasks(shots=5, query_shots=10), 200, seed=1, split="train")
    xs = torch.cat([dataset[i].support_x for i in range(200)])
    assert xs.min() >= -5 and xs.max() <= 5
    ys = torch.stack([dataset[i].query_y.abs().max() for i in range(200)])
    assert ys.max() <= 5.0
    assert torch.equal(dataset[7].query_y, dataset[7].query_y)
    assert not torch.equal(dataset[7].query_y, dataset[8].query_y)


def test_gradient_clipping_measures_the_meta_gradient_of_the_kept_weights_only():
    """A pruned entry's meta-gradient is masked before the step, and before the clip measures the
    norm: the step is the masked meta-gradient scaled to ``gradient_clip_val``."""
    net, dm, model = sinusoid_setup(gradient_clip_val=1e-3)
    mask = torch.ones(8, 8)
    mask[:, :6] = 0  # most of the hidden layer pruned: its dense gradient would dominate the norm
    sparsity.load_masks(model, {"net.net.2.weight": mask})
    expected = reference_meta_gradient(
        net, first_training_tasks(dm), 0.05, 2, False, masks={"net.2.weight": mask}
    )
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()]))
    assert norm > 1e-2  # the clip acts
    delta = meta_step_delta(model, dm)
    for name in expected:
        torch.testing.assert_close(delta[name], expected[name] * 1e-3 / (norm + 1e-6), atol=1e-8, rtol=1e-4)
