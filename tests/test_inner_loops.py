"""The torch.func inner loop against the higher one: same meta-gradients (1e-5), same evaluations."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyImageTasks, quiet_trainer

from lthmaml import sparsity
from lthmaml.data import EpisodeDataset, SinusoidDataModule, TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta import MAML
from lthmaml.nets import MLP, Conv4
from lthmaml.nets.reparam import PowerTransform, install_power


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
        elif variant == "powerprop":
            with torch.no_grad():
                for layer in sparsity.prunable_layers(model).values():
                    layer.weight.copy_(PowerTransform(2.0).inverse(layer.weight))
            install_power(model, 2.0)
    batch = meta_batch(TinyImageTasks(meta_batch_size=5))
    expected, got = meta_gradient(higher_model, batch), meta_gradient(func_model, batch)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)
    if variant == "pruned":  # a pruned weight gets no meta-gradient
        for name, layer in sparsity.prunable_layers(func_model).items():
            assert torch.all(got[f"{name}.weight"][layer.mask == 0] == 0)


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
    quiet_trainer(max_steps=3).fit(model, datamodule=TinyImageTasks(meta_batch_size=4, tasks_per_epoch=12))
    for layer in sparsity.prunable_layers(model).values():
        assert torch.all(layer.weight[layer.mask == 0] == 0)


@pytest.mark.parametrize("option, value", [("inner_loop", "jax"), ("task_chunk", 0)])
def test_bad_loop_options_are_config_errors(option, value):
    with pytest.raises(ConfigError, match=option):
        MAML(MLP(), **{option: value})
