"""Powerpropagation: the reparametrisation, its gradient, MAML's inner loop, one-shot pruning,
checkpoints and resume, the Adam correction, and the YAML configs."""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyImageTasks
from helpers import quiet_trainer as trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from callbacks.powerprop import Powerprop
from lthmaml import sparsity
from lthmaml.cli import main
from lthmaml.data import EpisodeDataset, SinusoidDataModule
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import task_loss
from lthmaml.nets.models import MLP, Conv4
from lthmaml.nets.reparam import (
    ORIGINAL,
    PowerTransform,
    checkpoint_alpha,
    install_power,
    installed_alpha,
    power_of,
    reparametrized_layers,
)

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid.yaml")
POWERPROP = str(REPO / "configs" / "prune" / "powerprop.yaml")
POWERPROP_LOTTERY = str(REPO / "configs" / "prune" / "powerprop_lottery.yaml")


# ---------------------------------------------------------------------- helpers


class TinyClassification(pl.LightningDataModule):
    """24 random 8x8 images of 3 classes, in a fixed order."""

    def __init__(self) -> None:
        super().__init__()
        self.x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.y = torch.arange(24) % 3

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=6)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=12)


def tiny_conv() -> Conv4:
    return Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def build(kind: str, seed: int = 0, optimizer=adam):
    torch.manual_seed(seed)
    if kind == "maml":
        model = MAML(tiny_conv(), inner_lr=0.1, inner_steps=1, eval_inner_steps=1, optimizer=optimizer)
        return model, TinyImageTasks(meta_batch_size=2, tasks_per_epoch=4, val_tasks=2)
    return Classifier(tiny_conv(), optimizer=optimizer), TinyClassification()


def effective(model: nn.Module) -> dict[str, Tensor]:
    """The weights the prunable layers compute with (``w``), by weight name."""
    return {name: sparsity.weight(model, name).detach().clone() for name in sparsity.prunable(model)}


def raw(model: nn.Module) -> dict[str, Tensor]:
    """The stored parameters of the prunable layers (``phi`` once converted), by weight name."""
    return {name: sparsity.stored(model, name).detach().clone() for name in sparsity.prunable(model)}


def layers_of(model: nn.Module) -> list[str]:
    return [name.removesuffix(".weight") for name in sparsity.prunable(model)]


def without_transform(net: nn.Module) -> nn.Module:
    """A copy of stock layers computing with ``net``'s stored weights as they are: the
    hand-written reference."""
    plain = sparsity.folded(net)
    with torch.no_grad():
        for name in sparsity.prunable(plain):
            sparsity.stored(plain, name).copy_(sparsity.stored(net, name))
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    return plain


def plain_names(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``a.parametrizations.weight.original`` -> ``a.weight``: the names in :func:`without_transform`."""
    return {name.replace(ORIGINAL, ".weight"): value for name, value in params.items()}


class Probe(Callback):
    """Records weights (and an output) when training starts: after checkpoint restore and conversion."""

    def __init__(self, x: Tensor | None = None) -> None:
        self.x = x

    def on_train_start(self, trainer, pl_module) -> None:
        self.effective, self.raw = effective(pl_module), raw(pl_module)
        if self.x is not None:
            with torch.no_grad():
                self.output = pl_module.net(self.x)


class GradProbe(Callback):
    """Records each masked layer's parameter and gradient at every ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self.records: list[dict[str, tuple[Tensor, Tensor]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.records.append(
            {
                name: (phi.detach().clone(), phi.grad.detach().clone())
                for name, phi in ((n, sparsity.stored(pl_module, n)) for n in sparsity.prunable(pl_module))
            }
        )


# ---------------------------------------------------------------------- the reparametrisation
@pytest.mark.parametrize("kind", ["maml", "classifier"])
def test_first_forward_pass_is_unchanged_and_the_parameters_become_phi(kind):
    model, datamodule = build(kind)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.net(x)
    theta = raw(model)
    probe = Probe(x)
    trainer(max_steps=1, callbacks=[Powerprop(alpha=3.0), probe]).fit(model, datamodule=datamodule)
    torch.testing.assert_close(probe.output, before, atol=1e-6, rtol=0)
    for name, weight in theta.items():
        torch.testing.assert_close(
            probe.raw[name], weight.sign() * weight.abs() ** (1 / 3), atol=0, rtol=1e-6
        )
        torch.testing.assert_close(probe.effective[name], weight, atol=1e-7, rtol=1e-5)
        assert (probe.raw[name] - weight).abs().max() > 0.1  # the parameters really are phi now


@pytest.mark.parametrize("kind", ["maml", "classifier"])
def test_alpha_one_trains_bit_identically_to_no_callback(kind):
    runs = []
    for callbacks in ([], [Powerprop(alpha=1.0, adam_correction=True)], [Powerprop(alpha=2.0)]):
        model, datamodule = build(kind)
        initial = copy.deepcopy(model.state_dict())
        trainer(max_steps=3, callbacks=callbacks).fit(model, datamodule=datamodule)
        runs.append(plain_names(model.state_dict()))  # phi under the plain weight names
    baseline, alpha_one, alpha_two = runs
    assert any(not torch.equal(baseline[k], initial[k]) for k in baseline)  # it trained
    assert baseline.keys() == alpha_one.keys() == alpha_two.keys()
    assert all(torch.equal(baseline[k], alpha_one[k]) for k in baseline)
    assert not torch.equal(baseline["net.head.weight"], alpha_two["net.head.weight"])


def test_transform_matches_the_formula_pickles_and_deep_copies():
    phi = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    for alpha in (1.0, 1.5, 2.0, 4.0):
        transform = PowerTransform(alpha)
        torch.testing.assert_close(transform(phi), phi * phi.abs() ** (alpha - 1))
        torch.testing.assert_close(transform(transform.right_inverse(phi)), phi)
        assert pickle.loads(pickle.dumps(transform)).alpha == alpha
    net = MLP(hidden=(4,))
    x = torch.randn(3, 1)
    before = net(x)
    install_power(net, 2.5, layers_of(net))
    torch.testing.assert_close(net(x), before)  # registering converts theta -> phi
    install_power(net, 2.5, layers_of(net))  # installed already: left as it is, not converted twice
    torch.testing.assert_close(net(x), before)
    # torch serialises a parametrised module through its state_dict only (pickling it raises):
    # a net rebuilt with install_power and loaded from it computes the same.
    rebuilt = MLP(hidden=(4,))
    install_power(rebuilt, 2.5, reparametrized_layers(net.state_dict()))
    rebuilt.load_state_dict(net.state_dict())
    for clone in (copy.deepcopy(net), rebuilt):
        assert all(power_of(clone.get_submodule(name)).alpha == 2.5 for name in layers_of(clone))
        assert installed_alpha(clone) == 2.5
        assert torch.equal(clone(x), net(x))
    with pytest.raises(ConfigError, match="alpha"):
        Powerprop(alpha=0.5)


# ---------------------------------------------------------------------- gradients
def test_gradient_wrt_phi_is_dl_dw_times_alpha_abs_phi_to_the_alpha_minus_one():
    torch.manual_seed(0)
    net = MLP(hidden=(8, 8))
    sparsity.load_masks(
        net, sparsity.prune_lowest(sparsity.masks_of(net), sparsity.magnitude_scores(net), 0.5)
    )
    alpha = 2.5
    Powerprop(alpha=alpha).install(net)
    x, y = torch.randn(7, 1), torch.randn(7, 1)
    F.mse_loss(net(x), y).backward()

    # dL/dw by hand: the same function of w, with w = phi * |phi|^(alpha-1) * mask as the leaf.
    plain = without_transform(net)
    masks = sparsity.masks_of(net)
    at_w = {name: p.detach() for name, p in plain.named_parameters()}
    for name, mask in masks.items():
        at_w[name] = PowerTransform(alpha)(sparsity.stored(net, name).detach()) * mask
        torch.testing.assert_close(at_w[name], sparsity.weight(net, name).detach(), atol=0, rtol=0)
    dl_dw = grad(lambda p: F.mse_loss(functional_call(plain, p, (x,)), y))(at_w)
    factors = []
    for name, mask in masks.items():
        phi = sparsity.stored(net, name)
        factor = alpha * phi.detach().abs() ** (alpha - 1)
        expected = dl_dw[name] * mask * factor
        torch.testing.assert_close(phi.grad, expected, atol=1e-7, rtol=1e-5)
        assert torch.all(phi.grad[mask == 0] == 0)
        factors.append(factor[mask.bool()])
    factors = torch.cat(factors)
    assert factors.max() > 2 * factors.min()  # a real, magnitude-dependent factor


def test_second_order_meta_gradient_through_the_transform_matches_torch_func_and_is_finite():
    """alpha in (1, 2) with pruned (zero) parameters: a naive |phi|^(alpha-1) gives 0 * inf = NaN."""
    torch.manual_seed(0)
    net = MLP(hidden=(8, 8))
    datamodule = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=2, tasks_per_epoch=2)
    model = MAML(net, inner_lr=0.05, inner_steps=2, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5)
    )
    Powerprop(alpha=1.5).install(model)
    tasks = EpisodeDataset(datamodule.task_source("train"), 2, datamodule.seed, "train")
    tasks = [tasks[0], tasks[1]]
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss_at(p, x, y):
        return task_loss(functional_call(net, (p, buffers), (x,)), y)

    def meta_loss(p):
        total = 0.0
        for task in tasks:
            q = p
            for _ in range(2):
                g = grad(loss_at)(q, task.support_x, task.support_y)
                q = {k: q[k] - 0.05 * g[k] for k in q}
            total = total + loss_at(q, task.query_x, task.query_y)
        return total / len(tasks)

    expected = grad(meta_loss)(params)
    trainer(max_steps=1, callbacks=[Powerprop(alpha=1.5)]).fit(model, datamodule=datamodule)
    for name, param in net.named_parameters():
        delta = params[name] - param.detach()
        assert torch.isfinite(delta).all(), name
        torch.testing.assert_close(delta, expected[name], atol=1e-6, rtol=1e-4)
    masks = sparsity.masks_of(model)
    assert any(bool((mask == 0).any()) for mask in masks.values())
    for name, mask in masks.items():
        assert torch.all(sparsity.stored(model, name)[mask == 0] == 0), name


def test_maml_inner_loop_computes_with_the_transform_of_the_adapted_phi_times_the_mask():
    torch.manual_seed(0)
    net = MLP(hidden=(8, 8))
    model = MAML(net, inner_lr=0.1, inner_steps=1)
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5)
    )
    alpha, transform = 2.0, PowerTransform(2.0)
    Powerprop(alpha=alpha).install(model)
    datamodule = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=1, tasks_per_epoch=1)
    task = EpisodeDataset(datamodule.task_source("train"), 1, 0, "train")[0]

    masks = model.net_masks()  # by the net's parameter names: the stored phi
    assert len(masks) == 3 and all(name.endswith(ORIGINAL) for name in masks)
    plain = without_transform(net)

    def computed_with(p):  # phi -> the weights the layers compute with, written out by hand
        return plain_names({k: transform(v) * masks[k] if k.endswith(ORIGINAL) else v for k, v in p.items()})

    phi = {k: v.detach() for k, v in net.named_parameters()}
    g = grad(
        lambda p: task_loss(functional_call(plain, computed_with(p), (task.support_x,)), task.support_y)
    )(phi)
    adapted_phi = {k: phi[k] - 0.1 * g[k] for k in phi}
    expected_output = functional_call(plain, computed_with(adapted_phi), (task.query_x,))

    with model.adapt(task.support_x, task.support_y, 1, False) as fnet:
        assert installed_alpha(fnet) == alpha
        assert all(power_of(fnet.get_submodule(name)) is not None for name in layers_of(net))
        fast = dict(zip(phi, fnet.parameters()))
        output = fnet(task.query_x)
    for name in phi:
        torch.testing.assert_close(fast[name], adapted_phi[name], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(output, expected_output, atol=1e-6, rtol=1e-5)
    for name, mask in masks.items():
        assert torch.all(fast[name][mask == 0] == 0)
        assert not torch.equal(fast[name], phi[name])


# ---------------------------------------------------------------------- pruning, checkpoints, resume
@pytest.mark.parametrize("kind", ["maml", "classifier"])
def test_one_shot_pruning_survives_adam_steps_checkpoint_load_and_resume(kind, tmp_path):
    model, datamodule = build(kind)
    trainer(
        max_epochs=1, default_root_dir=tmp_path, callbacks=[Powerprop(alpha=2.0, final_sparsity=0.8)]
    ).fit(model, datamodule=datamodule)
    total = sum(weight.numel() for weight in effective(model).values())
    report = sparsity.sparsity_report(model)
    assert report.zeros == round(0.8 * total)
    masks, pruned = sparsity.masks_of(model), effective(model)
    for name, weight in pruned.items():
        assert torch.all(weight[masks[name] == 0] == 0) and torch.all(weight[masks[name] == 1] != 0)
    folder = tmp_path / "rounds" / "round_00"
    record = json.loads((folder / "metrics.json").read_text())
    assert record["sparsity"] == pytest.approx(0.8, abs=1 / total) and record["details"]["alpha"] == 2.0
    checkpoint = folder / "model.ckpt"

    # load_from_checkpoint: the checkpoint names the transform, which the learner installs before
    # loading its phi; installing it again changes nothing (no second conversion).
    loaded = type(model).load_from_checkpoint(checkpoint, net=tiny_conv())
    assert checkpoint_alpha(checkpoint) == 2.0 and installed_alpha(loaded) == 2.0
    assert all(torch.equal(raw(loaded)[name], raw(model)[name]) for name in pruned)  # phi, as saved
    assert all(torch.equal(effective(loaded)[name], pruned[name]) for name in pruned)
    install_power(loaded, checkpoint_alpha(checkpoint), layers_of(loaded))
    assert all(torch.equal(effective(loaded)[name], pruned[name]) for name in pruned)
    for name, mask in masks.items():
        assert torch.equal(sparsity.masks_of(loaded)[name], mask)

    # Resume into a fresh model: restored phi are not converted again, Adam steps keep the zeros.
    resumed, datamodule = build(kind, seed=1)
    probe = Probe()
    callback = Powerprop(alpha=2.0, final_sparsity=0.8)
    trainer(max_epochs=3, default_root_dir=tmp_path, callbacks=[callback, probe]).fit(
        resumed, datamodule=datamodule, ckpt_path=checkpoint
    )
    assert all(torch.equal(probe.effective[name], pruned[name]) for name in pruned)
    after = effective(resumed)
    for name, mask in sparsity.masks_of(resumed).items():
        assert torch.equal(mask, masks[name])
        assert torch.all(after[name][mask == 0] == 0)
        assert torch.all(raw(resumed)[name][mask == 0] == 0)
    assert any(not torch.equal(after[name], pruned[name]) for name in pruned)  # it trained on
    assert len(callback.history) == 1 and not (tmp_path / "rounds" / "round_01").exists()

    # validate / test runs install the transform on a checkpoint's model, with the callback or
    # without it (the learner reads the checkpoint's weight_transform).
    def validate(module, callbacks, ckpt_path=None):
        evaluator = trainer(callbacks=callbacks, limit_val_batches=None)
        evaluator.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        return {k: float(v) for k, v in evaluator.callback_metrics.items()}

    reference = validate(loaded, [])
    assert validate(build(kind, seed=2)[0], [Powerprop(alpha=2.0)], checkpoint) == reference
    assert validate(build(kind, seed=2)[0], [], checkpoint) == reference
    assert validate(build(kind, seed=2)[0], []) != reference  # a fresh net's, as a control


def test_a_checkpoint_of_a_run_without_powerprop_is_converted_once(tmp_path):
    model, datamodule = build("classifier")
    dense = trainer(max_steps=1)
    dense.fit(model, datamodule=datamodule)
    dense.save_checkpoint(tmp_path / "dense.ckpt")
    theta = raw(model)
    moments = {name: dense.optimizers[0].state[p]["exp_avg"].clone() for name, p in model.named_parameters()}

    class Moments(Callback):
        """Adam's first moments by (plain) parameter name, once the checkpoint is restored."""

        def on_train_start(self, trainer, pl_module) -> None:
            state = trainer.optimizers[0].state
            self.moments = plain_names(
                {name: state[p]["exp_avg"].clone() for name, p in pl_module.named_parameters()}
            )

    callback, probe, restored = Powerprop(alpha=2.0), Probe(), Moments()
    fresh = build("classifier", seed=1)[0]
    trainer(max_steps=2, callbacks=[callback, probe, restored]).fit(
        fresh, datamodule=datamodule, ckpt_path=tmp_path / "dense.ckpt"
    )
    for name, weight in theta.items():
        torch.testing.assert_close(probe.effective[name], weight, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(probe.raw[name], weight.sign() * weight.abs().sqrt(), atol=0, rtol=1e-6)
    # The parametrisation reorders the parameters (phi after its layer's bias): each one still gets
    # its own optimizer state from the dense checkpoint.
    assert restored.moments.keys() == moments.keys()
    assert all(torch.equal(restored.moments[name], value) for name, value in moments.items())
    # The same callback object on another fresh model converts that one too.
    other, probe = build("classifier", seed=2)[0], Probe()
    theta = raw(other)
    trainer(max_steps=1, callbacks=[callback, probe]).fit(other, datamodule=datamodule)
    assert all(torch.allclose(probe.effective[name], theta[name], atol=1e-7) for name in theta)


def test_resuming_with_another_alpha_is_a_config_error():
    state = Powerprop(alpha=2.0).state_dict()
    with pytest.raises(ConfigError, match="alpha=2.0"):
        Powerprop(alpha=3.0).load_state_dict(state)
    net = MLP(hidden=(4,))
    install_power(net, 2.0, layers_of(net))
    with pytest.raises(ConfigError, match="alpha=2.0"):
        Powerprop(alpha=3.0).install(net)


class EpochStartProbe(Callback):
    """Raw parameters of the masked layers at the start of every training epoch."""

    def __init__(self) -> None:
        self.raw: list[dict[str, Tensor]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.raw.append(raw(pl_module))


@pytest.mark.parametrize("kind", ["maml", "classifier"])
def test_with_lottery_ticket_the_rewind_point_is_the_converted_phi(kind, tmp_path):
    from callbacks.lottery import LotteryTicket

    model, datamodule = build(kind)
    theta = raw(model)
    lottery = LotteryTicket(prune_rate=0.5, rounds=1, epochs_per_round=1)
    probe = EpochStartProbe()
    callbacks = [Powerprop(alpha=2.0), lottery, probe]
    trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=callbacks).fit(model, datamodule=datamodule)
    assert len(lottery.history) == 2
    total = sum(weight.numel() for weight in theta.values())
    assert sparsity.sparsity_report(model).zeros == round(0.5 * total)
    masks = sparsity.masks_of(model)
    for name, weight in theta.items():  # round 1 starts from phi_init = sign|theta|^(1/2), masked
        phi_init = weight.sign() * weight.abs().sqrt()
        torch.testing.assert_close(probe.raw[1][name], phi_init * masks[name], atol=0, rtol=1e-6)
        assert torch.all(effective(model)[name][masks[name] == 0] == 0)


# ---------------------------------------------------------------------- the Adam correction
class OneWeight(pl.LightningModule):
    """The loss (w - 2)^2 of a single weight, trained by Adam(lr=0.1)."""

    def __init__(self, w0: float) -> None:
        super().__init__()
        self.net = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.net.weight.fill_(w0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(1, 1), torch.full((1, 1), 2.0)), batch_size=1)


def one_weight_by_hand(w0: float, alpha: float, steps: int, corrected: bool) -> list[float]:
    """phi after each Adam step, the update computed for w (then scaled) or for phi."""
    phi = torch.tensor([[math.copysign(abs(w0) ** (1 / alpha), w0)]])
    shadow = torch.zeros(1, 1, requires_grad=True)
    optimizer = torch.optim.Adam([shadow], lr=0.1)
    trajectory = []
    for _ in range(steps):
        factor = alpha * phi.abs() ** (alpha - 1)
        dl_dw = 2 * (phi * phi.abs() ** (alpha - 1) - 2)
        with torch.no_grad():
            shadow.copy_(phi)
        shadow.grad = dl_dw if corrected else dl_dw * factor
        optimizer.step()
        update = shadow.detach() - phi
        phi = phi + update * factor if corrected else phi + update
        trajectory.append(float(phi))
    return trajectory


class Record(Callback):
    """The single weight after every training batch (after the optimizer step)."""

    def __init__(self) -> None:
        self.trajectory: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.trajectory.append(sparsity.stored(pl_module, "net.weight").item())  # phi


def test_adam_correction_hands_adam_dl_dw_and_scales_its_update_by_the_factor():
    results = {}
    for corrected in (False, True):
        record = Record()
        callbacks = [Powerprop(alpha=2.0, adam_correction=corrected), record]
        trainer(max_steps=3, callbacks=callbacks).fit(OneWeight(0.5))
        expected = one_weight_by_hand(0.5, 2.0, 3, corrected)
        assert record.trajectory == pytest.approx(expected, rel=1e-6, abs=1e-7)
        results[corrected] = record.trajectory
    phi0 = 0.5**0.5
    # Adam's first step is lr * sign(gradient); corrected, it is scaled by alpha * |phi0|.
    assert results[False][0] - phi0 == pytest.approx(0.1, rel=1e-4)
    assert results[True][0] - phi0 == pytest.approx(0.1 * 2 * phi0, rel=1e-4)


def test_adam_correction_fires_under_maml_manual_optimization():
    torch.manual_seed(0)
    model = MAML(MLP(hidden=(8, 8)), inner_lr=0.05, inner_steps=1, optimizer=adam)
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.3)
    )
    datamodule = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=2, tasks_per_epoch=2)
    seen, handed = GradProbe(), GradProbe()
    trainer(max_steps=1, callbacks=[seen, Powerprop(alpha=2.0, adam_correction=True), handed]).fit(
        model, datamodule=datamodule
    )
    (record,), (swapped,) = seen.records, handed.records
    masks = sparsity.masks_of(model)
    assert record.keys() == masks.keys() and any(bool((mask == 0).any()) for mask in masks.values())
    for name, mask in masks.items():
        phi, dl_dphi = record[name]
        factor = 2.0 * phi.abs()
        dl_dw = torch.where(factor > 0, dl_dphi / torch.where(factor > 0, factor, 1.0), 0.0)
        torch.testing.assert_close(swapped[name][1], dl_dw)
        shadow = phi.clone().requires_grad_(True)
        shadow.grad = dl_dw
        torch.optim.Adam([shadow], lr=0.01).step()
        expected = phi + (shadow.detach() - phi) * factor
        torch.testing.assert_close(sparsity.stored(model, name).detach(), expected, atol=1e-7, rtol=1e-6)
        assert torch.all(sparsity.stored(model, name)[mask == 0] == 0)
        assert torch.isfinite(swapped[name][1]).all()


# ---------------------------------------------------------------------- configs
def test_powerprop_config_stacks_on_a_base_config(resolved_config):
    config = resolved_config("-c", SINUSOID, "-c", POWERPROP)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "callbacks.Powerprop"
    assert callback["init_args"]["alpha"] == 2.0 and callback["init_args"]["final_sparsity"] == 0.8
    assert config["trainer"]["logger"]["init_args"]["name"] == "sinusoid"  # the base logger is kept
    assert config["checkpoint"]["monitor"] == "val/loss_post"


def test_powerprop_lottery_config_parses(resolved_config):
    config = resolved_config("-c", SINUSOID, "-c", POWERPROP_LOTTERY)
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    # Powerprop first: it converts theta -> phi before LotteryTicket snapshots the initial weights.
    assert paths == ["callbacks.Powerprop", "callbacks.LotteryTicket"]
    assert config["trainer"]["callbacks"][0]["init_args"]["final_sparsity"] is None


def test_cli_run_prunes_to_final_sparsity_and_writes_the_round(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        ["fit", "-c", SINUSOID, "-c", POWERPROP, "--trainer.max_epochs", "1"]
        + ["--trainer.enable_progress_bar", "false", "--data.init_args.tasks_per_epoch", "20"]
        + ["--data.init_args.meta_batch_size", "10", "--data.init_args.val_tasks", "10"]
    )
    run = tmp_path / "runs" / "sinusoid" / "version_0"
    record = json.loads((run / "rounds" / "round_00" / "metrics.json").read_text())
    assert record["sparsity"] == pytest.approx(0.8, abs=1e-3)
    (last,) = run.glob("checkpoints/last*.ckpt")
    checkpoint = torch.load(last, weights_only=False)
    state = checkpoint["state_dict"]
    phi = {k[: -len(ORIGINAL)] + ".weight": v for k, v in state.items() if k.endswith(ORIGINAL)}
    masks = {k.removeprefix("masks."): v for k, v in state.items() if k.startswith("masks.")}
    assert phi and set(masks) <= set(phi)  # masks beside the net, by parameter name
    total = sum(w.numel() for w in phi.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.8 * total)
    assert all(torch.all(phi[name][mask == 0] == 0) for name, mask in masks.items())
    assert checkpoint_alpha(checkpoint) == 2.0
