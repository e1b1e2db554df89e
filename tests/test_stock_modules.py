"""Any stock ``nn.Module`` meta-trains and prunes: masks beside the model, the model as written.

The reference for the meta-gradient is the mask-aware computation the engine replaced: the mask
multiplies the weight in every forward pass (``w * m``, plus Top-KAST's backward set), and
``torch.func`` differentiates through the inner loop. On the kept weights the engine's two inner
loops (stored zeros, masked inner steps) must give the same meta-gradient in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from helpers import (
    STRATEGIES,
    TinyImageTasks,
    assert_adapted_weights_zero,
    assert_pruned_weights_zero,
    quiet_trainer,
)
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call, grad

from lthmaml import rewiring, sparsity
from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import task_loss
from lthmaml.meta.protonet import ProtoNet
from lthmaml.nets import Conv4
from lthmaml.nets.reparam import PowerTransform, install_power


class Residual(nn.Module):
    """A user's own net: a conv stem, one residual block (its sum of two paths), a linear head."""

    def __init__(self, classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width, track_running_stats=False)
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width, track_running_stats=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width, track_running_stats=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def sequential(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, classes),
    )


NETS = {"sequential": sequential, "residual": Residual}


@pytest.mark.parametrize("net_name", sorted(NETS))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_prunes_a_stock_module_and_keeps_its_layers(strategy, net_name, tmp_path):
    torch.manual_seed(0)
    net = NETS[net_name]()
    classes = {name: type(m) for name, m in net.named_modules()}
    model = MAML(net, inner_lr=0.1, inner_loop="higher")
    callback = STRATEGIES[strategy]()
    trainer = quiet_trainer(callbacks=[callback], default_root_dir=tmp_path, max_steps=6, max_epochs=-1)
    trainer.fit(model, datamodule=TinyImageTasks(meta_batch_size=2, tasks_per_epoch=4))

    # The user's layers, each still an instance of the class it was built as (Powerprop's
    # parametrisation subclasses it) and never replaced.
    assert all(isinstance(net.get_submodule(name), cls) for name, cls in classes.items())
    assert model.net is net
    assert_pruned_weights_zero(model)
    assert_adapted_weights_zero(model, _batch(dtype=torch.float32).task(0))


# ---------------------------------------------------------------------- equal to the masked forward
def _reference_meta_gradient(
    net: nn.Module,
    masks: dict[str, Tensor],
    batch: TaskBatch,
    lr: float,
    steps: int,
    backward: Optional[dict[str, Tensor]] = None,
    alpha: Optional[float] = None,
) -> dict[str, Tensor]:
    """The replaced design: every forward computes with ``transform(w) * m`` (Top-KAST: plus the
    zero-valued backward set), the inner loop adapts the raw ``w``; torch.func, one task at a time."""
    power = PowerTransform(alpha) if alpha is not None else None
    weights = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = {name: p.detach().clone().requires_grad_() for name, p in net.named_parameters()}

    def effective(p: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, value in p.items():
            w = power(value) if power is not None and name in weights else value
            if name in masks:
                m = masks[name]
                b = (backward or {}).get(name)
                w = w * m if b is None else w * m + (w * (b - m) - (w * (b - m)).detach())
            out[name] = w
        return out

    def loss(p, x, y):
        return task_loss(functional_call(net, effective(p), (x,)), y)

    total = 0.0
    for i in range(batch.num_tasks):
        task = batch.task(i)
        fast = params
        for _ in range(steps):
            grads = grad(loss)(fast, task.support_x, task.support_y)
            fast = {n: fast[n] - lr * grads[n] for n in fast}
        total = total + loss(fast, task.query_x, task.query_y)
    grads = torch.autograd.grad(total / batch.num_tasks, list(params.values()))
    return dict(zip(params, grads))


def _batch(ways: int = 3, tasks: int = 3, dtype: torch.dtype = torch.float64) -> TaskBatch:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(tasks, ways, 1, 8, 8, generator=generator, dtype=dtype)
    q = torch.rand(tasks, 2 * ways, 1, 8, 8, generator=generator, dtype=dtype)
    y = torch.arange(ways).repeat(tasks, 1)
    return TaskBatch(x, y, q, torch.arange(ways).repeat_interleave(2).repeat(tasks, 1))


def _meta_gradient(model: MAML, batch: TaskBatch, loop: str) -> dict[str, Tensor]:
    model.inner_loop = loop
    model.manual_backward = lambda loss: loss.backward()  # no Trainer attached
    model.zero_grad()
    model.meta_train(batch, 1.0 / batch.num_tasks)
    return {name: p.grad.detach().clone() for name, p in model.net.named_parameters()}


@pytest.mark.parametrize("state", ["pruned", "powerprop", "topkast"])
@pytest.mark.parametrize("net_name", ["conv4", "residual"])
def test_meta_gradient_equals_the_masked_forward_on_kept_weights(state, net_name):
    torch.manual_seed(0)
    net = (
        Conv4(3, hidden_channels=4, image_size=8, blocks=2) if net_name == "conv4" else Residual()
    ).double()
    model = MAML(net, inner_lr=0.3, inner_steps=2)
    names = sparsity.prunable(model)
    if state == "powerprop":
        install_power(model, 2.0, [n.removesuffix(".weight") for n in names])
    sparsity.prune_by_magnitude(model, 0.6)
    sparsity.prune_channels(model, next(iter(sparsity.channel_groups(model))), [0])
    masks = {name[len("net.") :]: m for name, m in model.masks.items()}
    backward = None
    if state == "topkast":  # theta dense behind A, the gradient reaching B as well
        torch.manual_seed(1)
        with torch.no_grad():
            for name in names:
                sparsity.stored(model, name).add_(0.01 * torch.randn_like(sparsity.stored(model, name)))
        kept = {n: m for n, m in sparsity.masks_of(model, names).items()}
        grown = {n: torch.where(m.bool(), m, (torch.rand_like(m) < 0.3).to(m)) for n, m in kept.items()}
        rewiring.set_forward_masks(model, kept, grown)
        backward = {name[len("net.") :]: b for name, b in grown.items()}
    batch = _batch()
    # The reference reads the raw parameters by the names the net's parametrisations give them.
    raw = {n.replace(".parametrizations.weight.original", ".weight"): n for n, _ in net.named_parameters()}
    reference = _reference_meta_gradient(
        _stock_twin(net, raw), masks, batch, 0.3, 2, backward, 2.0 if state == "powerprop" else None
    )
    scale = max(float(g.abs().max()) for g in reference.values())  # a conv bias before BN gets ~0
    for loop in ("higher", "func"):
        ours = _meta_gradient(model, batch, loop)
        for twin_name, name in raw.items():
            keep = masks.get(twin_name, torch.ones_like(ours[name])).bool()
            if backward is not None and twin_name in backward:
                keep = backward[twin_name].bool()  # Top-KAST trains its whole backward set
            expected, actual = reference[twin_name][keep], ours[name][keep]
            assert float((actual - expected).abs().max()) / scale < 1e-10, (loop, name)


def _stock_twin(net: nn.Module, raw: dict[str, str]) -> nn.Module:
    """A copy of ``net`` without parametrisations, holding its raw (stored) parameters."""
    twin = sparsity.folded(net)
    stored = dict(net.named_parameters())
    with torch.no_grad():
        for twin_name, name in raw.items():
            twin.get_parameter(twin_name).copy_(stored[name])
    return twin


def test_protonet_on_a_user_module_keeps_pruned_weights_and_their_adam_moments_zero():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 8))
    model = ProtoNet(net)
    sparsity.prune_by_magnitude(model, 0.5)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(model, datamodule=TinyImageTasks(meta_batch_size=2, tasks_per_epoch=4))
    state = trainer.optimizers[0].state
    for name, mask in model.masks.items():
        assert bool((sparsity.weight(model, name)[mask == 0] == 0).all())
        moments = state[sparsity.stored(model, name)]
        assert bool((moments["exp_avg"][mask == 0] == 0).all())
        assert bool((moments["exp_avg_sq"][mask == 0] == 0).all())
        assert bool((moments["exp_avg"][mask == 1] != 0).any())


def test_layers_the_engine_cannot_prune_are_left_dense_and_named():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    assert sparsity.prunable(net) == ["2.weight"]
    assert sparsity.left_dense(net) == ["0.weight"]
    sparsity.prune_by_magnitude(net, 0.5)
    assert int((net[2].weight == 0).sum()) == 8
    assert float((net[0].weight == 0).float().mean()) == 0.0


def test_a_module_without_conv_or_linear_layers_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="no conv or linear layer to prune"):
        sparsity.prunable(nn.Sequential(nn.ReLU()))


class TinyRegressor(nn.Module):
    """A user's own regressor, named in a config by its class path."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))


def test_a_config_names_a_users_own_module_as_the_net_and_prunes_it(tmp_path, monkeypatch):
    from helpers import TINY_FIT

    from lthmaml.cli import main

    monkeypatch.chdir(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    main(
        [
            "fit",
            *(
                "-c",
                str(repo / "configs" / "sinusoid.yaml"),
                "-c",
                str(repo / "configs" / "prune" / "lottery.yaml"),
            ),
            *("--model.init_args.net.class_path", "test_stock_modules.TinyRegressor"),
            *("--model.init_args.net.init_args.hidden", "6"),
            *("--trainer.callbacks.init_args.layer_rates", "{net.out: 0.5}"),
            *(
                "--trainer.callbacks.init_args.rounds",
                "2",
                "--trainer.callbacks.init_args.epochs_per_round",
                "1",
            ),
            *TINY_FIT[2:],
        ]
    )
    run = next((tmp_path / "runs").glob("*/version_0"))
    masks = load_file(str(run / "rounds" / "round_02" / "mask.safetensors"))
    assert sorted(masks) == ["net.body.0.weight", "net.out.weight"]
    kept = {name: float(mask.float().mean()) for name, mask in masks.items()}
    assert kept["net.body.0.weight"] == pytest.approx(0.64, abs=0.1)  # two rounds of 20%
    checkpoint = torch.load(run / "rounds" / "round_02" / "model.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    assert torch.equal(state["masks.net.body.0.weight"].bool(), masks["net.body.0.weight"])
    assert bool((state["net.body.0.weight"][~masks["net.body.0.weight"]] == 0).all())
