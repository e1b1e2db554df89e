"""Meta-gradient pruning: eq. 6-7 against plain autograd, the three criteria, the schedule, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_FIT, quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.metagrad import MetaGradientPruning
from lthmaml import sparsity
from lthmaml.cli import main
from lthmaml.data import EpisodeDataset, SinusoidDataModule
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import task_loss
from lthmaml.nets.models import MLP, Conv4

REPO = Path(__file__).resolve().parents[1]
META_BATCH = 3


def trainer(root: Path, callbacks, **kwargs) -> pl.Trainer:
    return quiet_trainer(default_root_dir=str(root), callbacks=callbacks, **kwargs)


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def adam(params):
    return torch.optim.Adam(params, lr=0.05)


def sinusoid_maml(optimizer, tasks_per_epoch: int) -> tuple[MAML, SinusoidDataModule]:
    """MAML on a 1-8-8-1 MLP: 8 + 64 + 8 = 80 prunable weights."""
    torch.manual_seed(0)
    dm = SinusoidDataModule(
        shots=4, query_shots=5, meta_batch_size=META_BATCH, tasks_per_epoch=tasks_per_epoch
    )
    return MAML(MLP(hidden=(8, 8)), inner_lr=0.05, inner_steps=1, optimizer=optimizer), dm


class TinyImages(pl.LightningDataModule):
    """16 random 8x8 images of 3 classes in batches of 4, unshuffled so a test can replay them."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.rand(16, 1, 8, 8, generator=generator)
        self.y = torch.arange(16) % 3

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=4, shuffle=False)


def tiny_classifier(optimizer) -> Classifier:
    """Conv4 with 36 + 144 + 48 = 228 prunable weights."""
    torch.manual_seed(0)
    return Classifier(Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2), optimizer=optimizer)


def zeros(masks) -> int:
    return sum(int((mask == 0).sum()) for mask in masks.values())


def hand_importance(model: pl.LightningModule, losses_of) -> dict[str, torch.Tensor]:
    """Eq. 6-7 written out: |w| * sum over tasks of (dL/dw)^2, divided by the layer's sum (a pruned
    weight is stored as zero: its importance is 0)."""
    weights = {name: sparsity.weight(model, name) for name in sparsity.prunable(model)}
    squares = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    for loss in losses_of(model):
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads):
            squares[name] += grad**2
    out = {}
    for name, weight in weights.items():
        imp = weight.detach().abs() * squares[name]
        out[name] = imp / imp.abs().sum()
    return out


# ---------------------------------------------------------------------- eq. 6-7
@pytest.mark.parametrize("kind", ["maml_sinusoid", "classifier"])
def test_importance_equals_eq_6_7_by_hand_over_the_tasks_seen(tmp_path, kind):
    """Two training steps at lr 0 (the meta-parameters never move): the accumulated importance is
    eq. 7 over all tasks of both batches, also with part of the net already pruned."""
    if kind == "maml_sinusoid":
        model, dm = sinusoid_maml(sgd(0.0), tasks_per_epoch=2 * META_BATCH)
        dataset = EpisodeDataset(dm.task_source("train"), 2 * META_BATCH, dm.seed, "train")
        tasks = [dataset[i] for i in range(2 * META_BATCH)]

        def losses_of(m):
            return [task_loss(m.net(t.support_x), t.support_y) for t in tasks]

        expected_tasks = 2 * META_BATCH
    else:
        model, dm = tiny_classifier(sgd(0.0)), TinyImages()

        def losses_of(m):
            return [F.cross_entropy(m.net(dm.x[i : i + 4]), dm.y[i : i + 4]) for i in (0, 4)]

        expected_tasks = 2
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.3)
    )
    callback = MetaGradientPruning(weights_per_step=1, steps=1, steps_between=100)
    trainer(tmp_path, [callback], max_steps=2).fit(model, datamodule=dm)
    assert callback.tasks_scored == expected_tasks and callback.pruning_steps == 0
    expected = hand_importance(model, losses_of)
    got = callback.importance(model, callback.score_sums)
    assert set(got) == set(expected) == set(sparsity.prunable(model))
    for name in expected:
        pruned = sparsity.masks_of(model)[name] == 0
        assert pruned.any() and torch.all(sparsity.weight(model, name)[pruned] == 0), name
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
        assert got[name].sum().item() == pytest.approx(1.0, abs=1e-5)  # normalised per layer
        assert torch.all(got[name][pruned] == 0)


# ---------------------------------------------------------------------- the three criteria
class Crafted(pl.LightningModule):
    """One 8-weight layer; its single task's loss is w . g, so dL/dw = g and the sum of squares g**2."""

    def __init__(self, weights: list[float], grad_squares: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([weights]))
        self.g = torch.tensor(grad_squares).sqrt().view(1, 8)

    def task_losses(self, batch, adapted: bool = False):
        yield self.layer(self.g).sum()


#                 index:  0    1   2   3  4   5  6    7
WEIGHTS = [1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, -8.0]
GRAD_SQUARES = [100.0, 90.0, 10.0, 2.0, 50.0, 3.0, 0.1, 0.1]
# product |w| g^2: 100 180 30 8 250 18 0.7 0.8 -> {6, 7}
# gradient_first: 4 smallest g^2 = {3, 5, 6, 7}, then the 2 smallest |w| -> {3, 5}
# weight_first: 4 smallest |w| = {0, 1, 2, 3}, then the 2 smallest g^2 -> {2, 3}


@pytest.mark.parametrize(
    "criterion, pruned",
    [("product", {6, 7}), ("gradient_first", {3, 5}), ("weight_first", {2, 3})],
)
def test_each_criterion_prunes_its_own_known_set(criterion, pruned):
    model = Crafted(WEIGHTS, GRAD_SQUARES)
    callback = MetaGradientPruning(
        weights_per_step=2, steps=1, steps_between=1, criterion=criterion, candidate_factor=2.0
    )
    callback.accumulate(model, batch=None)
    torch.testing.assert_close(callback.score_sums["layer.weight"].flatten(), torch.tensor(GRAD_SQUARES))
    assert callback.prune_level(None, model, callback.score_sums) == {"weights_pruned": 2}
    mask = sparsity.masks_of(model)["layer.weight"]
    assert set((mask.flatten() == 0).nonzero().flatten().tolist()) == pruned
    assert model.layer.weight.flatten()[sorted(pruned)].eq(0).all()


def test_two_stage_scores_are_inf_outside_the_candidate_pool():
    model = Crafted(WEIGHTS, GRAD_SQUARES)
    callback = MetaGradientPruning(weights_per_step=2, criterion="gradient_first", candidate_factor=2.0)
    callback.accumulate(model, batch=None)
    scores = callback.scores(model, callback.score_sums, fraction=2 / 8)["layer.weight"].flatten()
    assert torch.isinf(scores).nonzero().flatten().tolist() == [0, 1, 2, 4]
    assert scores[[3, 5, 6, 7]].tolist() == [4.0, 6.0, 7.0, 8.0]


def test_layerwise_scope_and_exclude(tmp_path):
    """Layerwise: the same fraction of each layer; an excluded layer is neither scored nor pruned."""
    model, dm = sinusoid_maml(sgd(0.0), tasks_per_epoch=META_BATCH)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    callback = MetaGradientPruning(weights_per_step=9, scope="layerwise", exclude=["net.net.4"])
    callback.accumulate(model, batch)
    assert set(callback.score_sums) == {"net.net.0.weight", "net.net.2.weight"}
    assert callback.tasks_scored == META_BATCH
    callback.prune_level(None, model, callback.score_sums)  # 9 / 72 of each of the 8- and 64-weight layers
    masks = sparsity.masks_of(model)
    names = ("net.net.0.weight", "net.net.2.weight", "net.net.4.weight")
    assert [int((masks[n] == 0).sum()) for n in names] == [1, 8, 0]


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="criterion"):
        MetaGradientPruning(weights_per_step=1, criterion="magnitude")
    with pytest.raises(ConfigError, match="candidate_factor"):
        MetaGradientPruning(weights_per_step=1, candidate_factor=0.5)
    with pytest.raises(ConfigError, match="accumulate_batches"):
        MetaGradientPruning(weights_per_step=1, steps_between=5, accumulate_batches=0)
    with pytest.raises(ConfigError, match="exactly one of weights_per_step"):
        MetaGradientPruning()
    with pytest.raises(ConfigError, match="exactly one of weights_per_step"):
        MetaGradientPruning(weights_per_step=5, prune_rate=0.2)
    with pytest.raises(ConfigError, match="prune_rate must be in"):
        MetaGradientPruning(prune_rate=1.0)


# ---------------------------------------------------------------------- schedule and zeros
class Probe(Callback):
    """After the pruning callback's batch end: pruned count, raw weights and adapted weights."""

    def __init__(self) -> None:
        self.zeros: list[int] = []
        self.raw_nonzero_under_mask: list[int] = []
        self.adapted_nonzero_under_mask: list[int] = []
        self.start = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = sparsity.snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks = sparsity.masks_of(pl_module, sparsity.prunable(pl_module))
        self.zeros.append(sum(int((mask == 0).sum()) for mask in masks.values()))
        self.raw_nonzero_under_mask.append(
            sum(int((sparsity.weight(pl_module, name)[mask == 0] != 0).sum()) for name, mask in masks.items())
        )
        if isinstance(pl_module, MAML):
            names = [n for n, _ in pl_module.net.named_parameters()]
            task = batch.task(0)
            with pl_module.adapt(task.support_x, task.support_y, 3, False) as fnet:
                fast = dict(zip(names, fnet.parameters()))
                self.adapted_nonzero_under_mask.append(
                    sum(int((fast[name[4:]][mask == 0] != 0).sum()) for name, mask in masks.items())
                )


def test_maml_schedule_prunes_exactly_weights_per_step_then_stops_and_zeros_stay_zero(tmp_path):
    model, dm = sinusoid_maml(adam, tasks_per_epoch=10 * META_BATCH)
    callback = MetaGradientPruning(weights_per_step=5, steps=3, steps_between=2)
    probe = Probe()
    trainer(tmp_path, [callback, probe], max_steps=10).fit(model, datamodule=dm)

    assert probe.zeros == [0, 5, 5, 10, 10, 15, 15, 15, 15, 15]
    # Adam's momentum keeps pushing pruned weights; they are exactly zero after every step,
    # and the inner loop never revives them.
    assert probe.raw_nonzero_under_mask == [0] * 10
    assert probe.adapted_nonzero_under_mask == [0] * 10
    moved = model.net.net[2].weight.detach() != probe.start["net.net.2.weight"]
    kept = sparsity.masks_of(model)["net.net.2.weight"].bool()
    assert moved[kept].float().mean() > 0.5  # survivors trained (bar dead ReLUs)

    # Round k: the net trained at the sparsity of step k, recorded just before step k + 1 (batches
    # 2, 4, 6), the last when the fit ends (batch 10); each names the step that made its sparsity.
    assert [
        (
            r["round"],
            r["pruning_step"],
            r["details"].get("weights_pruned"),
            r["tasks_scored"],
            r["global_step"],
        )
        for r in callback.history
    ] == [
        (0, 0, None, None, 2),
        (1, 1, 5, 2 * META_BATCH, 4),
        (2, 2, 5, 2 * META_BATCH, 6),
        (3, 3, 5, 2 * META_BATCH, 10),
    ]
    previous = None
    for k in range(4):
        folder = tmp_path / "rounds" / f"round_{k:02d}"
        masks = sparsity.read_masks(folder / "mask.safetensors")
        assert zeros(masks) == 5 * k
        if previous is not None:  # once pruned, always pruned
            assert all(torch.all(masks[n][previous[n] == 0] == 0) for n in masks)
        previous = masks
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["sparsity"] == pytest.approx(5 * k / 80)
        assert (folder / "model.ckpt").is_file()
    assert not (tmp_path / "rounds" / "round_04").exists()


def test_accumulate_batches_sums_only_the_last_batches_and_write_every_thins_rounds(tmp_path):
    model, dm = sinusoid_maml(adam, tasks_per_epoch=6 * META_BATCH)
    callback = MetaGradientPruning(
        weights_per_step=4, steps=2, steps_between=3, accumulate_batches=1, write_every=2
    )
    trainer(tmp_path, [callback], max_steps=6).fit(model, datamodule=dm)
    assert callback.pruning_steps == 2 and zeros(sparsity.masks_of(model)) == 8
    # write_every=2: the dense net (before step 1) and the final sparsity of step 2, whose scores
    # summed one batch of tasks; step 1's sparsity is not recorded.
    steps_and_tasks = [(r["pruning_step"], r["tasks_scored"]) for r in callback.history]
    assert steps_and_tasks == [(0, None), (2, META_BATCH)]
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["round_00", "round_01"]


def test_supervised_classifier_is_pruned_on_schedule_with_adam(tmp_path):
    model = tiny_classifier(adam)
    callback = MetaGradientPruning(weights_per_step=10, steps=2, steps_between=2)
    probe = Probe()
    trainer(tmp_path, [callback, probe], max_epochs=2).fit(model, datamodule=TinyImages())
    assert probe.zeros == [0, 10, 10, 20, 20, 20, 20, 20]
    assert probe.raw_nonzero_under_mask == [0] * 8
    pruned_and_tasks = [(r["details"].get("weights_pruned"), r["tasks_scored"]) for r in callback.history]
    assert pruned_and_tasks == [(None, None), (10, 2), (10, 2)]
    assert zeros(sparsity.read_masks(tmp_path / "rounds" / "round_02" / "mask.safetensors")) == 20


def test_prune_rate_reaches_the_lottery_schedule_sparsities_and_tests_each_level(tmp_path):
    """prune_rate 0.2: step k ends at 1 - 0.8^k of the 80 prunable weights (by the engine's rounding),
    and test_each_round tests every recorded level on the test split."""
    model, dm = sinusoid_maml(adam, tasks_per_epoch=6 * META_BATCH)
    callback = MetaGradientPruning(prune_rate=0.2, steps=3, steps_between=2, test_each_round=True)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss_post", mode="min")
    fit = trainer(tmp_path, [callback, best], max_steps=6, enable_checkpointing=True)
    fit.fit(model, datamodule=dm)
    callback.test_rounds(fit, model, dm)  # what the lthmaml CLI does after fit
    expected = [round(80 * (1 - 0.8**k)) for k in range(4)]  # 0, 16, 29, 39
    assert [
        zeros(sparsity.read_masks(tmp_path / "rounds" / f"round_{k:02d}" / "mask.safetensors"))
        for k in range(4)
    ] == expected
    for record in callback.history:
        assert record["test_metric"] == "test/loss_post"
        assert record["test"] == record["test_metrics"]["test/loss_post"] > 0


# ---------------------------------------------------------------------- resume
class Accumulated(Callback):
    """Records the pruning callback's accumulated squared gradients once each batch has added its."""

    def __init__(self, pruning: MetaGradientPruning) -> None:
        self.pruning = pruning
        self.trace: list[dict[str, list]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.trace.append({n: v.flatten().tolist() for n, v in self.pruning.score_sums.items()})


def test_resumed_fit_continues_schedule_and_accumulators_exactly(tmp_path):
    """Prunes after batches 3, 6, 9; the checkpoint after batch 4 holds one batch of accumulated
    importance, which the resumed fit must carry into the pruning step at batch 6."""

    def run(root, ckpt=None):
        model, dm = sinusoid_maml(adam, tasks_per_epoch=2 * META_BATCH)
        callback = MetaGradientPruning(weights_per_step=4, steps=3, steps_between=3)
        recorder = Accumulated(callback)
        every_epoch = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        fit = trainer(root, [callback, recorder, every_epoch], max_epochs=5, enable_checkpointing=True)
        fit.fit(model, datamodule=dm, ckpt_path=ckpt)
        return model, callback, recorder.trace

    full_model, full, full_trace = run(tmp_path / "full")
    mid = tmp_path / "full" / "ckpt" / "epoch=1.ckpt"  # after batch 4: one batch since step 1
    state = torch.load(mid, weights_only=True)["callbacks"]["MetaGradientPruning"]
    assert (state["pruning_steps"], state["level_batches"], state["tasks_scored"]) == (1, 1, META_BATCH)
    assert set(state["score_sums"]) == {"net.net.0.weight", "net.net.2.weight", "net.net.4.weight"}
    resumed_model, resumed, resumed_trace = run(tmp_path / "resumed", ckpt=str(mid))

    assert resumed.pruning_steps == full.pruning_steps == 3
    # The accumulated squared gradients after each of batches 5..10 match the uninterrupted run.
    assert resumed_trace == full_trace[4:] and len(resumed_trace) == 6
    assert resumed.history == full.history
    for name, mask in sparsity.masks_of(full_model).items():
        assert torch.equal(sparsity.masks_of(resumed_model)[name], mask)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------- CLI
def test_config_stacks_on_omniglot_and_keeps_logger_and_checkpoint(resolved_config):
    config = resolved_config(
        "-c", REPO / "configs" / "omniglot_5way1shot.yaml", "-c", REPO / "configs" / "prune" / "metagrad.yaml"
    )
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "callbacks.MetaGradientPruning"
    assert callback["init_args"]["weights_per_step"] == 1000
    assert callback["init_args"]["criterion"] == "product"
    assert config["trainer"]["logger"]["init_args"]["name"] == "omniglot_5way1shot"
    assert config["checkpoint"]["monitor"] == "val/acc_post"


def test_tiny_sinusoid_fit_through_the_cli_writes_rounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small.yaml"
    small.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.metagrad.MetaGradientPruning\n"
        "      init_args: {weights_per_step: 20, steps: 2, steps_between: 2, criterion: weight_first}\n"
    )
    main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "sinusoid.yaml"),
            "-c",
            str(REPO / "configs" / "prune" / "metagrad.yaml"),
            "-c",
            str(small),
            *TINY_FIT,
        ]
    )
    run = tmp_path / "runs" / "sinusoid" / "version_0"
    for k in range(3):
        masks = sparsity.read_masks(run / "rounds" / f"round_{k:02d}" / "mask.safetensors")
        assert zeros(masks) == 20 * k  # of the 1-40-40-1 MLP's 1680 weights
    last = run / "checkpoints" / "last.ckpt"
    model = MAML.load_from_checkpoint(last)
    assert zeros(sparsity.masks_of(model)) == 40
    state = torch.load(last, weights_only=True)["callbacks"]["MetaGradientPruning"]
    assert state["pruning_steps"] == 2 and len(state["history"]) == 3
