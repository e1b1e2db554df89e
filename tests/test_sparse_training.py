"""Always-sparse training: ERK densities, drop/grow, SNIP by hand, TopKAST's two sets, exact
densities after every update, grown weights at zero, adapted weights sparse, resume, configs."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TINY_FIT, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import SET, SNIP, PruningCallback, RigL, StaticSparse, TopKAST
from callbacks.powerprop import Powerprop
from lthmaml import rewiring, sparsity
from lthmaml.cli import main
from lthmaml.data import SinusoidDataModule
from lthmaml.errors import ConfigError
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import task_loss
from lthmaml.nets.models import MLP, Conv4
from lthmaml.nets.reparam import ORIGINAL

REPO = Path(__file__).resolve().parents[1]
META_BATCH = 3


def sinusoid_maml(inner_loop: str = "higher") -> tuple[MAML, SinusoidDataModule]:
    """MAML on a 1-16-16-1 MLP (16 + 256 + 16 weights): layers of very different sizes for ERK."""
    torch.manual_seed(0)
    datamodule = SinusoidDataModule(
        shots=4, query_shots=5, meta_batch_size=META_BATCH, tasks_per_epoch=3 * META_BATCH
    )
    model = MAML(
        MLP(hidden=(16, 16)),
        inner_lr=0.05,
        inner_steps=1,
        inner_loop=inner_loop,
        optimizer=lambda params: torch.optim.Adam(params, lr=0.01),
    )
    return model, datamodule


def masks(module) -> dict[str, torch.Tensor]:
    """The mask of every prunable weight (ones where nothing is pruned), by parameter name."""
    return sparsity.masks_of(module, sparsity.prunable(module))


def plain_names(params: dict) -> dict:
    """``a.parametrizations.weight.original`` (a forward-masked weight) -> ``a.weight``."""
    return {name.replace(ORIGINAL, ".weight"): value for name, value in params.items()}


class Densities(Callback):
    """The kept count of every prunable weight after every training batch (after the callbacks)."""

    def __init__(self) -> None:
        self.kept: list[dict[str, int]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.kept.append({name: int(mask.sum()) for name, mask in masks(pl_module).items()})


def fit(model, datamodule, callbacks, root: Path, ckpt_path=None, **kwargs) -> pl.Trainer:
    options = {"default_root_dir": str(root), "max_epochs": 4, **kwargs}
    trainer = quiet_trainer(callbacks=callbacks, **options)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------------- the engine
def test_erk_keeps_the_target_density_and_small_layers_denser():
    modules = {"a": torch.nn.Conv2d(1, 8, 3), "b": torch.nn.Conv2d(8, 32, 3), "c": torch.nn.Linear(32, 5)}
    layers = {name: module.weight.shape for name, module in modules.items()}
    sizes = {name: shape.numel() for name, shape in layers.items()}
    for density in (0.05, 0.1, 0.2, 0.5):
        erk = rewiring.layer_densities(layers, density, "erk")
        kept = sum(erk[name] * sizes[name] for name in layers)
        assert kept == pytest.approx(density * sum(sizes.values()))
        assert erk["b"] < erk["c"] and erk["b"] < erk["a"] and max(erk.values()) <= 1.0
        # Raw ERK ratio (sum of the shape over its product) among the layers not capped at 1.
        free = [name for name in layers if erk[name] < 1.0]
        ratios = {name: sum(layers[name]) / sizes[name] for name in free}
        scale = {erk[name] / ratios[name] for name in free}
        assert max(scale) == pytest.approx(min(scale))
    assert rewiring.layer_densities(layers, 0.5, "erk")["a"] == 1.0  # 72 weights: capped, dense
    assert rewiring.layer_densities(layers, 0.3, "uniform") == {"a": 0.3, "b": 0.3, "c": 0.3}
    with pytest.raises(ConfigError, match="distribution"):
        rewiring.layer_densities(layers, 0.3, "random")


def test_keep_highest_keeps_exact_counts_ties_to_the_lower_index():
    scores = {"x": torch.tensor([[0.5, 0.1], [0.5, 0.9]]), "y": torch.zeros(5)}
    masks = rewiring.keep_highest(scores, {"x": 0.5, "y": 0.4})
    assert masks["x"].tolist() == [[1.0, 0.0], [0.0, 1.0]]  # 0.9, then the first 0.5
    assert masks["y"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_drop_and_grow_keeps_the_count_drops_the_lowest_grows_the_highest_inactive():
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    drop = torch.tensor([0.3, 0.1, 0.2, 0.0, 0.0, 0.0])
    grow = torch.tensor([9.0, 9.0, 9.0, 0.5, 0.7, 0.1])  # the active entries' gradients never count
    new, grown = rewiring.drop_and_grow(mask, drop, grow, 2)
    assert new.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert grown.tolist() == [False, False, False, True, True, False]
    assert int(new.sum()) == int(mask.sum())


def test_a_grown_weight_starts_at_zero_with_a_fresh_optimizer_state():
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    grown = torch.zeros_like(layer.weight, dtype=torch.bool)
    grown[0, 1] = True
    before = {key: value.clone() for key, value in optimizer.state[layer.weight].items()}
    weight = layer.weight.detach().clone()
    rewiring.start_at_zero(layer, "weight", grown, [optimizer])
    assert layer.weight[0, 1] == 0 and torch.equal(layer.weight[~grown], weight[~grown])
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizer.state[layer.weight][key]
        assert state[0, 1] == 0 and torch.equal(state[~grown], before[key][~grown])


def test_the_backward_mask_changes_no_output_and_sends_the_gradient_to_its_weights():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x = torch.randn(5, 4)
    theta = net[0].weight.detach().clone()
    mask = (torch.rand(3, 4) > 0.6).float()
    backward = torch.maximum(mask, (torch.rand(3, 4) > 0.5).float())
    rewiring.set_forward_masks(net, {"0.weight": mask})  # A only
    stored = sparsity.stored(net, "0.weight")
    assert torch.equal(stored, theta)  # the dense theta is kept behind the mask
    plain = net(x)
    torch.testing.assert_close(
        plain, torch.nn.functional.linear(x, theta * mask, net[0].bias), rtol=0, atol=0
    )
    plain.square().sum().backward()
    masked_grad = stored.grad.clone()
    stored.grad = None
    rewiring.set_forward_masks(net, {"0.weight": mask}, {"0.weight": backward})  # A and B
    assert sparsity.stored(net, "0.weight") is stored
    explored = net(x)
    assert torch.equal(explored, plain)
    explored.square().sum().backward()
    # The dense gradient of the output w.r.t. the computing weight, restricted to B.
    weight = (theta * mask).requires_grad_()
    torch.nn.functional.linear(x, weight, net[0].bias).square().sum().backward()
    torch.testing.assert_close(stored.grad, weight.grad * backward)
    torch.testing.assert_close(stored.grad * mask, masked_grad)
    rewiring.set_forward_masks(net, None)  # removed: the layer computes with theta again
    assert sparsity.forward_masked(net, "0.weight") is None and torch.equal(net[0].weight, theta)


# ---------------------------------------------------------------------- the strategies in a fit
@pytest.mark.parametrize(
    "make",
    [
        lambda: StaticSparse(sparsity=0.8),
        lambda: SNIP(sparsity=0.8),
        lambda: SET(sparsity=0.8, update_every=2),
        lambda: RigL(sparsity=0.8, update_every=2, stop_updates_at=1.0),
        lambda: TopKAST(sparsity=0.8, backward_sparsity=0.6, update_every=1),
    ],
    ids=["static", "snip", "set", "rigl", "topkast"],
)
def test_every_layer_keeps_its_exact_count_after_every_update_and_records_flops(tmp_path, make):
    model, datamodule = sinusoid_maml()
    strategy, counts = make(), Densities()
    fit(model, datamodule, [strategy, counts], tmp_path)
    layers = {name: sparsity.weight(model, name).shape for name in sparsity.prunable(model)}
    assert len(counts.kept) == 12 and all(kept == counts.kept[0] for kept in counts.kept)
    if strategy.distribution is not None:
        densities = rewiring.layer_densities(layers, 0.2, strategy.distribution)
        assert counts.kept[0] == {name: round(densities[name] * layers[name].numel()) for name in layers}
    kept, total = sum(counts.kept[-1].values()), sum(shape.numel() for shape in layers.values())
    assert 1 - kept / total == pytest.approx(0.8, abs=0.01)
    for name, mask in masks(model).items():  # exactly zero under the mask, stored too, after the fit
        assert sparsity.forward_masked(model, name) is None  # TopKAST's forward set is removed
        assert torch.all(sparsity.stored(model, name)[mask == 0] == 0)
        assert torch.all(sparsity.weight(model, name)[mask == 0] == 0)
    (record,) = strategy.history
    flops = record["details"]["train_flops_vs_dense"]
    # The record counts zero effective weights: a kept weight SET grew behind a dead unit stays 0.
    assert 0.0 < flops < 1.0 and record["sparsity"] >= 1 - kept / total - 1e-9
    assert (record["forward_flops"], record["dense_forward_flops"]) == (kept, total)  # an MLP: one use each
    metrics = json.loads((tmp_path / "rounds" / "round_00" / "metrics.json").read_text())
    assert metrics["details"]["train_flops_vs_dense"] == flops


def test_dynamic_masks_change_and_grown_weights_start_at_zero(tmp_path):
    class Grown(Callback):
        """The weights of entries that the update before batch ``k`` grew, right after it."""

        def __init__(self) -> None:
            self.before, self.grown_values, self.changes = None, [], 0

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.before = sparsity.masks_of(pl_module)

        def on_train_batch_start(self, trainer, pl_module, *args) -> None:  # after the strategy's
            if self.before is None:
                return
            for name, mask in masks(pl_module).items():
                grown = (mask == 1) & (self.before[name] == 0)
                self.changes += int(grown.sum())
                self.grown_values.append(sparsity.stored(pl_module, name)[grown])

    for strategy in (
        SET(sparsity=0.8, update_every=3, stop_updates_at=1.0),
        RigL(sparsity=0.8, update_every=3, stop_updates_at=1.0),
    ):
        model, datamodule = sinusoid_maml()
        grown = Grown()
        fit(model, datamodule, [strategy, grown], tmp_path / type(strategy).__name__)  # grown runs after
        assert strategy.mask_updates == 3 and grown.changes > 0  # before steps 3, 6, 9 of 12
        assert all(torch.all(values == 0) for values in grown.grown_values)


def test_rigl_grows_the_largest_dense_gradients_and_its_fraction_decays_by_cosine(tmp_path):
    model, datamodule = sinusoid_maml()
    rigl = RigL(sparsity=0.8, update_every=100, distribution="uniform", drop_fraction=0.5)
    fit(model, datamodule, [rigl], tmp_path, max_epochs=1)
    batch = next(iter(datamodule.train_dataloader()))
    before = masks(model)["net.net.2.weight"]
    with torch.enable_grad():  # the dense gradient by hand: the computing weight as one leaf
        weight = sparsity.weight(model, "net.net.2.weight").detach().requires_grad_()
        total = sum(
            task_loss(
                torch.func.functional_call(model.net, {"net.2.weight": weight}, (t.support_x,)), t.support_y
            )
            for t in (batch.task(i) for i in range(META_BATCH))
        )
        (grad,) = torch.autograd.grad(total, [weight])
    assert (grad.abs()[before == 0] > 0).any()  # pruned entries get their dL/dw too
    trainer = quiet_trainer(max_steps=4)
    rigl.update_masks(trainer, model, batch, 0.5)
    after = masks(model)["net.net.2.weight"]
    grown = (after == 1) & (before == 0)
    count = int(grown.sum())
    assert count == round(0.5 * float(before.sum()))
    inactive = grad.abs()[before == 0]
    assert torch.equal(torch.sort(grad.abs()[grown]).values, torch.sort(inactive).values[-count:])
    assert rigl.current_fraction(trainer) == pytest.approx(0.5)  # step 0 of the cosine


def test_snip_keeps_the_largest_gradient_times_weight_by_hand(tmp_path):
    model, datamodule = sinusoid_maml()
    batch = next(iter(datamodule.train_dataloader()))
    total = sum(
        task_loss(model.net(t.support_x), t.support_y) for t in (batch.task(i) for i in range(META_BATCH))
    )
    names = sparsity.prunable(model)
    weights = [sparsity.weight(model, n) for n in names]
    grads = torch.autograd.grad(total, weights)
    by_hand = {name: (g * w).abs().detach() for name, g, w in zip(names, grads, weights)}
    snip = SNIP(sparsity=0.7)
    scores = snip.sensitivities(model, batch)
    for name in names:
        torch.testing.assert_close(scores[name], by_hand[name])
    flat = torch.cat([by_hand[n].flatten() for n in names])
    keep = round(0.3 * flat.numel())
    threshold = torch.sort(flat, descending=True).values[keep - 1]
    masks = snip.initial_masks(model, batch)
    kept = torch.cat([masks[n].flatten() for n in names]).bool()
    assert int(kept.sum()) == keep and torch.all(flat[kept] >= threshold)


def test_topkast_backward_set_contains_the_forward_set_and_only_a_computes(tmp_path):
    class Sets(Callback):
        def __init__(self, topkast: TopKAST) -> None:
            self.topkast, self.checked = topkast, 0

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            for name, mask in masks(pl_module).items():
                backward = self.topkast.backward_masks[name]
                assert torch.all(backward >= mask) and backward.sum() > mask.sum()
                forward = sparsity.forward_masked(pl_module, name)  # A computes, B gets the gradient
                assert torch.equal(forward.mask, mask) and torch.equal(forward.backward, backward)
                assert torch.all(sparsity.weight(pl_module, name)[mask == 0] == 0)
                self.checked += 1

    model, datamodule = sinusoid_maml()
    topkast = TopKAST(sparsity=0.8, backward_sparsity=0.5, update_every=1, distribution="uniform")
    sets = Sets(topkast)
    fit(model, datamodule, [topkast, sets], tmp_path)
    assert sets.checked == 12 * 3
    for name, mask in masks(model).items():  # after the fit: only A, stored as zeros elsewhere
        assert sparsity.forward_masked(model, name) is None
        assert torch.all(sparsity.stored(model, name)[mask == 0] == 0)
    details = topkast.history[0]["details"]
    # 2 f_A + f_B over 3 f: with uniform densities 0.2 and 0.5 exactly (2 * 0.2 + 0.5) / 3.
    assert details["train_flops_vs_dense"] == pytest.approx((2 * 0.2 + 0.5) / 3, abs=0.01)


def test_topkast_exploration_regulariser_penalises_outside_a_by_one_over_d():
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0], [2.0, 1.0]]))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(layer)

    module = Module()
    topkast = TopKAST(sparsity=0.5, backward_sparsity=0.25, regularization=0.1, distribution="uniform")
    topkast.select(module)
    assert masks(module)["net.0.weight"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert topkast.backward_masks["net.0.weight"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    theta = sparsity.stored(module, "net.0.weight")
    assert theta.tolist() == [[4.0, 3.0], [2.0, 1.0]]  # dense behind A: what may re-enter it
    assert layer.weight.tolist() == [[4.0, 3.0], [0.0, 0.0]]  # the layer computes with A
    theta.grad = torch.zeros(2, 2)
    topkast.on_before_optimizer_step(None, module, None)
    # 2 lambda w on A, 2 lambda w / D on B \ A (D = 0.5), nothing outside B.
    assert theta.grad.flatten().tolist() == pytest.approx([0.8, 0.6, 0.8, 0.0])


@pytest.mark.parametrize("inner_loop", ["higher", "func"])
def test_adapted_weights_are_sparse_inside_the_inner_loop(tmp_path, inner_loop):
    """MAML's adaptation takes gradient steps on the support set: every adapted raw weight under the
    forward mask stays exactly zero (RigL), and TopKAST's backward set, which lets the inner
    gradient reach B \\ A, changes no adapted output (only A computes)."""

    def adapted_weights(model, task) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if inner_loop == "func":
            loop = model.functional_loop()
            params = loop.adapt(loop.params(), task.support_x, task.support_y, 3)
            return plain_names(params), loop.forward(params, task.query_x)
        with model.adapt(task.support_x, task.support_y, 3, False) as adapted:
            names = [name for name, _ in model.net.named_parameters()]
            return plain_names(dict(zip(names, adapted.parameters()))), adapted(task.query_x)

    for strategy in (
        RigL(sparsity=0.8, update_every=2, stop_updates_at=1.0),
        TopKAST(sparsity=0.8, backward_sparsity=0.5),
    ):
        model, datamodule = sinusoid_maml(inner_loop)
        fit(model, datamodule, [strategy], tmp_path / f"{inner_loop}-{type(strategy).__name__}", max_epochs=1)
        task = next(iter(datamodule.train_dataloader())).task(0)
        weights, outputs = adapted_weights(model, task)
        kept = {name.removeprefix("net."): mask for name, mask in masks(model).items()}
        assert any(bool((mask == 0).any()) for mask in kept.values())
        for name, mask in kept.items():
            assert torch.all(weights[name][mask == 0] == 0), name
        if isinstance(strategy, RigL):
            continue
        # As during TopKAST's training: A computes (the dense theta behind it), B gets the gradient.
        rewiring.set_forward_masks(model, masks(model), strategy.backward_masks)
        explored, explored_outputs = adapted_weights(model, task)
        torch.testing.assert_close(explored_outputs, outputs, rtol=1e-6, atol=1e-7)
        moved = sum(int(((explored[n] - weights[n]).abs() > 0)[m == 0].sum()) for n, m in kept.items())
        assert moved > 0  # the inner gradient reached B \\ A, and no output changed


def test_powerprop_stacks_with_topkast(tmp_path):
    model, datamodule = sinusoid_maml()
    topkast = TopKAST(sparsity=0.8, backward_sparsity=0.6)
    fit(model, datamodule, [Powerprop(alpha=2.0, final_sparsity=None), topkast], tmp_path, max_epochs=2)
    report = sparsity.sparsity_report(model)
    assert report.sparsity == pytest.approx(0.8, abs=0.01)
    # Ranked by the effective magnitude |phi|^alpha: the kept entries are the largest |phi|.
    for name, mask in masks(model).items():
        phi = sparsity.stored(model, name).detach().abs()
        assert sparsity.forward_masked(model, name) is None  # only Powerprop's transform is left
        assert torch.all(phi[mask == 1] > 0) and torch.all(phi[mask == 0] == 0)


class FirstBatch(Callback):
    """The stored prunable weights at the first training batch, after the strategy's hook."""

    def __init__(self) -> None:
        self.stored = None

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if self.stored is None:
            self.stored = {
                n: sparsity.stored(pl_module, n).detach().clone() for n in sparsity.prunable(pl_module)
            }


@pytest.mark.parametrize(
    "make",
    [
        lambda: SET(sparsity=0.8, update_every=2, seed=3),
        lambda: TopKAST(sparsity=0.8, backward_sparsity=0.6, update_every=2),
    ],
    ids=["set", "topkast"],
)
def test_a_resumed_fit_rewires_exactly_as_an_uninterrupted_one(tmp_path, make):
    def run(root: Path, ckpt=None):
        model, datamodule = sinusoid_maml()
        strategy, first = make(), FirstBatch()
        every_epoch = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        callbacks = [strategy, first, every_epoch]
        fit(model, datamodule, callbacks, root, ckpt_path=ckpt, enable_checkpointing=True)
        return model, strategy, first

    full_model, full, _ = run(tmp_path / "full")
    resume_point = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"
    resumed_model, resumed, first = run(tmp_path / "resumed", ckpt=str(resume_point))
    assert resumed.mask_updates == full.mask_updates == 4  # steps 2, 4, 6, 8: to 0.75 of 12
    if isinstance(full, TopKAST):
        # The checkpoint is exactly sparse under the plain names (what any loader expects) ...
        checkpoint = torch.load(resume_point, weights_only=False)
        state = checkpoint["state_dict"]
        assert not any(".parametrizations." in key for key in state)
        theta = checkpoint["callbacks"][full.state_key]["theta"]
        assert sorted(theta) == sorted(sparsity.prunable(full_model))
        for name, value in theta.items():
            mask = state[f"masks.{name}"]
            assert torch.equal(state[name], value * mask)
            assert (value[mask == 0] != 0).any()  # ... the dense theta behind A is in TopKAST's state
            assert torch.equal(first.stored[name], value)  # and back in the weights on resume
        loaded = MAML.load_from_checkpoint(resume_point, net=MLP(hidden=(16, 16)))
        assert sparsity.sparsity_report(loaded).sparsity == pytest.approx(0.8, abs=0.01)
    assert resumed.flops == pytest.approx(full.flops)
    for name, mask in sparsity.masks_of(full_model).items():
        assert torch.equal(sparsity.masks_of(resumed_model)[name], mask), name
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="sparsity"):
        RigL(sparsity=1.0)
    with pytest.raises(ConfigError, match="backward_sparsity"):
        TopKAST(sparsity=0.8, backward_sparsity=0.9)
    with pytest.raises(ConfigError, match="distribution"):
        SET(distribution="random")
    with pytest.raises(ConfigError, match="update_every"):
        RigL(update_every=0)
    with pytest.raises(ConfigError, match="regularization"):
        TopKAST(regularization=-1.0)
    assert TopKAST(sparsity=0.9).backward_sparsity == pytest.approx(0.8)  # twice the density
    assert issubclass(RigL, PruningCallback)


def test_a_conv_net_counts_flops_by_weight_use():
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Conv4(out_features=5, in_channels=1, hidden_channels=4, image_size=8, blocks=2)

    module = Module()
    static = StaticSparse(sparsity=0.5, distribution="uniform")
    sparse, dense = static.forward_cost(module)
    assert sparse == dense  # nothing pruned yet
    masks = static.initial_masks(module, None)
    half, _ = static.forward_cost(module, masks)
    assert half == pytest.approx(0.5 * dense, rel=0.02)


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["topkast", "rigl", "set", "snip", "static", "powerprop_topkast"])
def test_each_config_stacks_and_a_tiny_cli_fit_records_the_sparse_net(
    tmp_path, monkeypatch, name, resolved_config
):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "prune" / f"{name}.yaml")
    *_, callback = resolved_config("-c", REPO / "configs" / "omniglot_5way1shot.yaml", "-c", config)[
        "trainer"
    ]["callbacks"]
    assert callback["class_path"].startswith("callbacks.")
    main(["fit", "-c", str(REPO / "configs" / "sinusoid.yaml"), "-c", config, *TINY_FIT])
    (run,) = (tmp_path / "runs" / "sinusoid").iterdir()
    metrics = json.loads((run / "rounds" / "round_00" / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(callback["init_args"]["sparsity"], abs=0.02)
    assert 0 < metrics["details"]["train_flops_vs_dense"] < 1


@pytest.mark.parametrize(
    ("make", "updates"),
    [
        (SET, 8),  # before every step but the first
        (lambda **kwargs: TopKAST(backward_sparsity=0.6, **kwargs), 9),  # after every step
    ],
    ids=["set", "topkast"],
)
def test_the_record_holds_the_best_validations_masks_and_weights(tmp_path, make, updates):
    """SET and TopKAST rewire at every step, so the masks of the best validation (the first: no
    later one beats it by min_delta 100) differ from the last; the record restores and writes those."""

    class FirstValidation(Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 0:
                self.masks = sparsity.masks_of(pl_module)
            self.last = sparsity.masks_of(pl_module)  # the last: before the record restores the best

    torch.manual_seed(0)
    datamodule = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=3, tasks_per_epoch=9, val_tasks=6)
    model, _ = sinusoid_maml()
    strategy = make(
        sparsity=0.8, update_every=1, stop_updates_at=1.0, monitor="val/loss_post", mode="min", min_delta=100
    )
    first = FirstValidation()
    fit(model, datamodule, [strategy, first], tmp_path, limit_val_batches=None, max_epochs=3)
    (record,) = strategy.history
    assert record["recorded"] == "best" and record["val_step"] == 3 and record["val_epoch"] == 0
    written = sparsity.read_masks(tmp_path / "rounds" / "round_00" / "mask.safetensors")
    assert any(not torch.equal(first.last[name], mask) for name, mask in first.masks.items())
    for name, mask in first.masks.items():
        assert torch.equal(written[name], mask), name
        assert torch.equal(sparsity.masks_of(model)[name], mask), name  # restored in the module too
        assert torch.all(sparsity.weight(model, name)[mask == 0] == 0), name  # and computed with
    assert strategy.mask_updates == updates
    checkpoint = torch.load(tmp_path / "rounds" / "round_00" / "model.ckpt", weights_only=False)
    for name, mask in first.masks.items():  # the recorded weights: exactly sparse by those masks
        assert torch.all(checkpoint["state_dict"][name][mask == 0] == 0), name
        assert torch.equal(checkpoint["state_dict"][name], sparsity.weight(model, name)), name


def test_a_validation_never_scores_connections_just_grown_at_zero(tmp_path):
    """The mask update comes before a step, so every validation (here each one follows an update
    step) scores a net whose grown weights have trained: with half the kept weights rewired, an
    update right before it would leave about half of them at zero."""

    class ZerosAtValidation(Callback):
        def __init__(self) -> None:
            self.fractions: list[float] = []

        def on_validation_start(self, trainer, pl_module) -> None:
            kept, zeros = 0, 0
            for name, mask in masks(pl_module).items():
                kept += int(mask.sum())
                zeros += int(((sparsity.weight(pl_module, name) == 0) & (mask == 1)).sum())
            self.fractions.append(zeros / kept)

    from helpers import TinyClassification

    from lthmaml.meta.classifier import Classifier

    torch.manual_seed(0)  # a net whose connections all get gradients (the tiny sinusoid MLP has dead units)
    model = Classifier(
        MLP(in_features=4, hidden=(16,), out_features=3), optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )
    strategy = SET(
        sparsity=0.5, update_every=3, drop_fraction=0.5, stop_updates_at=1.0, distribution="uniform"
    )
    probe = ZerosAtValidation()
    fit(model, TinyClassification(), [strategy, probe], tmp_path, limit_val_batches=None, max_epochs=3)
    assert strategy.mask_updates == 2 and len(probe.fractions) == 3
    assert max(probe.fractions) < 0.1, probe.fractions


@pytest.mark.parametrize(
    "make",
    [
        lambda: SNIP(sparsity=0.7, monitor="val/acc", mode="max"),
        lambda: RigL(sparsity=0.7, update_every=1, stop_updates_at=1.0, monitor="val/acc", mode="max"),
        lambda: TopKAST(sparsity=0.7, monitor="val/acc", mode="max"),
    ],
    ids=["snip", "rigl", "topkast"],
)
def test_the_supervised_classifier_trains_sparse_too(tmp_path, make):
    from helpers import TinyClassification

    from lthmaml.meta.classifier import Classifier

    torch.manual_seed(0)
    model = Classifier(
        MLP(in_features=4, hidden=(16,), out_features=3), optimizer=lambda p: torch.optim.Adam(p, lr=0.05)
    )
    strategy, counts = make(), Densities()
    fit(model, TinyClassification(), [strategy, counts], tmp_path, max_epochs=3, limit_val_batches=None)
    assert len(counts.kept) == 9 and all(kept == counts.kept[0] for kept in counts.kept)
    total = sum(mask.numel() for mask in masks(model).values())
    assert 1 - sum(counts.kept[0].values()) / total == pytest.approx(0.7, abs=0.02)
    (record,) = strategy.history
    assert record["recorded"] == "best" and record["monitor"] == "val/acc"
    for name, mask in masks(model).items():
        assert torch.all(sparsity.stored(model, name)[mask == 0] == 0)


@pytest.mark.parametrize("stopping_first", [True, False], ids=["stopping-first", "stopping-after"])
def test_a_fit_ended_by_early_stopping_still_records_the_sparse_net(tmp_path, stopping_first):
    from lightning.pytorch.callbacks import EarlyStopping

    torch.manual_seed(0)
    datamodule = SinusoidDataModule(shots=4, query_shots=5, meta_batch_size=3, tasks_per_epoch=9, val_tasks=6)
    model, _ = sinusoid_maml()
    strategy = SET(sparsity=0.8, update_every=1, monitor="val/loss_post", mode="min")
    stopping = EarlyStopping(monitor="val/loss_post", mode="min", patience=1, min_delta=100)
    callbacks = [stopping, strategy] if stopping_first else [strategy, stopping]
    trainer = fit(model, datamodule, callbacks, tmp_path, limit_val_batches=None, max_epochs=10)
    assert trainer.current_epoch < 9  # stopped early
    (record,) = strategy.history
    assert record["recorded"] == "best" and (tmp_path / "rounds" / "round_00" / "model.ckpt").is_file()
