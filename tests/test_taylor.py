"""Taylor filter pruning (Molchanov et al. 2017) and ``shrink``: the criterion against a hand
computation, the ranking, the schedule, pruned channels held at zero, whole channel groups of a
ResNet-12 under MAML and ProtoNet, shrunk nets, YAML runs."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import TinyImageTasks
from helpers import quiet_trainer as trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.taylor import TaylorFilterPruning, layer_normalized, taylor_scores
from lthmaml import sparsity
from lthmaml.cli import main
from lthmaml.data import SinusoidDataModule
from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.meta.protonet import ProtoNet
from lthmaml.nets.models import MLP, Conv4
from lthmaml.nets.resnet import ResNet12
from lthmaml.nets.shrink import removed_channels, shrink
from lthmaml.sparsity import lowest_channels as lowest_filters

REPO = Path(__file__).resolve().parents[1]
CONVS = ("net.features.0.0", "net.features.1.0")


def conv_net(hidden: int = 4, blocks: int = 2) -> Conv4:
    torch.manual_seed(0)
    return Conv4(out_features=3, hidden_channels=hidden, image_size=8, blocks=blocks)


class TinyImages(pl.LightningDataModule):
    """24 labelled 8x8 random images in batches of 6, for the supervised Classifier."""

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(24, 1, 8, 8, generator=generator)
        y = torch.randint(0, 3, (24,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=6)


def batchnorms_of(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Each conv's BatchNorm, by the conv's name (in a Conv4 each conv is its own channel group)."""
    groups = sparsity.channel_groups(model).values()
    return {group.name: model.get_submodule(bn) for group in groups for bn in group.batchnorms}


def hand_taylor(net: Conv4, loss_of) -> list[Tensor]:
    """|mean over examples and positions of a * dL/da| per channel of each BatchNorm output,
    with plain forward hooks and retained gradients (no gates)."""
    outputs: list[Tensor] = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    handles = [block[1].register_forward_hook(keep) for block in net.features]
    loss_of(net).backward()
    for handle in handles:
        handle.remove()
    query = outputs[-len(net.features) :]  # the last forward pass is the loss's
    return [(a * a.grad).mean(dim=(0, 2, 3)).abs().detach() for a in query]


def normalized(values: Tensor) -> Tensor:
    return values / values.norm()


def alive_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: sparsity.alive_channels(model, name) for name in sparsity.channel_groups(model)}


# ---------------------------------------------------------------------------------- the criterion
def test_taylor_score_of_the_classifier_batch_loss_matches_a_hand_computation():
    net = conv_net()
    model = Classifier(net)
    sparsity.prune_channels(model, "net.features.0.0", [2])
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    scores, count = taylor_scores(batchnorms_of(model), model.task_losses((x, y), adapted=True))
    expected = hand_taylor(copy.deepcopy(net), lambda n: F.cross_entropy(n(x), y))
    assert count == 1
    for name, want in zip(CONVS, expected):
        torch.testing.assert_close(scores[name], want, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(layer_normalized(scores)[name], normalized(want), rtol=0, atol=1e-6)
    assert scores[CONVS[0]][2] == 0 and torch.all(scores[CONVS[0]][[0, 1, 3]] > 0)
    assert all(not bn._forward_hooks for bn in batchnorms_of(model).values())  # gates removed
    # The removed channel's map is exactly 0 (BatchNorm scale and shift 0), so it scores 0.
    assert removed_channels(net.features[0][1]).tolist() == [False, False, True, False]


def test_taylor_score_of_maml_is_the_adapted_query_loss_summed_over_tasks_of_abs():
    net = conv_net()
    model = MAML(net, inner_lr=0.3, inner_steps=2)
    generator = torch.Generator().manual_seed(1)
    batch = TaskBatch(
        torch.rand(2, 3, 1, 8, 8, generator=generator),
        torch.tensor([[0, 1, 2], [2, 1, 0]]),
        torch.rand(2, 6, 1, 8, 8, generator=generator),
        torch.tensor([[0, 1, 2, 0, 1, 2], [1, 1, 0, 0, 2, 2]]),
    )
    scores, count = taylor_scores(batchnorms_of(model), model.task_losses(batch, adapted=True))

    def adapted_query_loss(task: TaskBatch):
        def loss_of(copy_net: Conv4) -> Tensor:
            for _ in range(2):  # the inner loop by hand: plain SGD at the inner learning rate
                grads = torch.autograd.grad(
                    F.cross_entropy(copy_net(task.support_x), task.support_y), list(copy_net.parameters())
                )
                with torch.no_grad():
                    for param, grad in zip(copy_net.parameters(), grads):
                        param -= 0.3 * grad
            return F.cross_entropy(copy_net(task.query_x), task.query_y)

        return loss_of

    per_task = [hand_taylor(copy.deepcopy(net), adapted_query_loss(batch.task(i))) for i in range(2)]
    unadapted = hand_taylor(
        copy.deepcopy(net), lambda n: F.cross_entropy(n(batch.query_x[0]), batch.query_y[0])
    )
    assert count == 2
    for layer, name in enumerate(CONVS):
        want = per_task[0][layer] + per_task[1][layer]
        torch.testing.assert_close(scores[name], want, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(layer_normalized(scores)[name], normalized(want), rtol=0, atol=1e-6)
    # The query pass ran through the gated modules with the adapted weights: adapting changed the scores.
    assert (per_task[0][0] - unadapted[0]).abs().max() > 1e-3 * per_task[0][0].max()


def test_layer_normalisation_decides_the_global_ranking_and_lowest_filters_go_first():
    raw = {"a": torch.tensor([1.0, 100.0, 100.0, 100.0]), "b": torch.tensor([0.5, 0.6, 0.7, 0.8])}
    alive = {name: torch.ones(4, dtype=torch.bool) for name in raw}
    assert lowest_filters(raw, alive, 2) == {"b": [0, 1]}  # unnormalised, layer b would lose two
    assert lowest_filters(layer_normalized(raw), alive, 2) == {"a": [0], "b": [0]}
    assert lowest_filters(layer_normalized(raw), alive, 3) == {"a": [0], "b": [0, 1]}
    # Already pruned filters are not candidates; a layer never loses its last filter.
    alive = {"a": torch.tensor([False, True, False, False]), "b": torch.tensor([True, True, False, True])}
    scores = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([9.0, 0.3, 0.0, 0.2])}
    assert lowest_filters(scores, alive, 2) == {"b": [3, 1]}
    assert lowest_filters(scores, alive, 5) == {"b": [3, 1]}
    # Ties go to the earlier layer, then the lower index.
    assert lowest_filters(
        {"a": torch.ones(3), "b": torch.ones(3)}, {"a": torch.ones(3), "b": torch.ones(3)}, 3
    ) == {
        "a": [0, 1],
        "b": [0],
    }


# ---------------------------------------------------------------------------------- the schedule
class SpyTaylor(TaylorFilterPruning):
    """Records the normalised scores and living filters just before each pruning step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def prune_level(self, trainer, pl_module, scores):
        sums = {name: s.clone() for name, s in scores.items()}
        self.seen.append((layer_normalized(sums), alive_of(pl_module)))
        return super().prune_level(trainer, pl_module, scores)


def test_maml_schedule_prunes_lowest_filters_stops_at_target_and_keeps_them_at_zero(tmp_path):
    net = conv_net()  # 2 blocks x 4 = 8 filters
    model = MAML(net, inner_lr=0.3)
    callback = SpyTaylor(filters_per_step=3, steps_between=2, target_fraction=0.5, accumulate_batches=1)
    data = TinyImageTasks(meta_batch_size=2, tasks_per_epoch=14)
    trainer(max_steps=7, callbacks=[callback], default_root_dir=tmp_path).fit(model, datamodule=data)

    # Steps 2 and 4 prune 3 then 1 filter (the target is round(0.5 * 8) = 4); steps 5-7 only train.
    # A round records the net trained with its filters: before each step, and the last at the end.
    assert [
        (
            r["pruning_step"],
            r["global_step"],
            r["details"]["filters_pruned"],
            r["details"]["filters_remaining"],
        )
        for r in callback.history
    ] == [(0, 2, 0, 8), (1, 4, 3, 5), (2, 7, 4, 4)]
    assert callback.pruning_steps == 2 and callback.score_sums == {} and callback.tasks_scored == 0
    assert [r.get("tasks_scored") for r in callback.history] == [None, 2, 2]  # one batch of 2 tasks each
    alive = alive_of(model)
    assert sum(int(a.sum()) for a in alive.values()) == 4 and all(a.sum() >= 1 for a in alive.values())

    # Each step removed filters scoring no higher than any filter it left in a layer of more than one.
    for index, (scores, alive_before) in enumerate(callback.seen):
        alive_after = callback.seen[index + 1][1] if index + 1 < len(callback.seen) else alive
        removed = [
            float(scores[n][c])
            for n in scores
            for c in (alive_before[n] & ~alive_after[n]).nonzero().flatten()
        ]
        kept = [
            float(scores[n][c])
            for n in scores
            if int(alive_after[n].sum()) > 1
            for c in alive_after[n].nonzero().flatten()
        ]
        assert removed and max(removed) <= min(kept)

    # Round folders: the full net and each pruned one, with the masks and the filters left per layer.
    rounds = sorted((tmp_path / "rounds").iterdir())
    assert [p.name for p in rounds] == ["round_00", "round_01", "round_02"]
    metrics = json.loads((rounds[2] / "metrics.json").read_text())
    assert metrics["details"]["filters_remaining"] == 4 and sum(metrics["details"]["channels"].values()) == 4
    saved = sparsity.read_masks(rounds[2] / "mask.safetensors")
    current = sparsity.masks_of(model)
    assert set(saved) == set(current) and all(torch.equal(saved[name], current[name]) for name in current)
    for name in CONVS:  # a removed filter masks its conv weights and bias and its BatchNorm channel
        assert set(sparsity.channel_parameters(model, name)) <= set(saved)
    assert (rounds[2] / "model.ckpt").is_file()

    # Pruned channels: zero raw weights after three Adam steps, zero maps after BN and after adaptation.
    task = data.task_source("train").sample(np.random.default_rng(0))
    for block, name in zip(net.features, CONVS):
        dead = ~alive[name]
        assert torch.all(block[0].weight[dead] == 0)
        assert torch.all(block[1].weight[dead] == 0) and torch.all(block[1].bias[dead] == 0)
    maps = block_outputs(net, task.query_x)
    with model.adapt(task.support_x, task.support_y, 3, False) as adapted:
        adapted_maps = block_outputs(adapted, task.query_x)
    for name, out, adapted_out in zip(CONVS, maps, adapted_maps):
        dead = ~alive[name]
        assert torch.all(out[:, dead] == 0) and torch.all(adapted_out[:, dead] == 0)
        assert out[:, ~dead].abs().sum() > 0
    # A fresh optimizer step (no mask re-application) moves nothing into a pruned map either.
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(net(task.support_x), task.support_y).backward()
        optimizer.step()
    for name, out in zip(CONVS, block_outputs(net, task.query_x)):
        assert torch.all(out[:, ~alive[name]] == 0)


def block_outputs(net: nn.Module, x: Tensor) -> list[Tensor]:
    """The map after each block's BatchNorm."""
    outs = []
    with torch.no_grad():
        for block in net.features:
            outs.append(block[1](block[0](x)))
            x = block[3](block[2](outs[-1]))
    return outs


def test_classifier_prunes_by_the_batch_loss_and_logs_filters_remaining(tmp_path):
    model = Classifier(conv_net())
    callback = TaylorFilterPruning(
        filters_per_step=2, steps_between=1, target_fraction=0.5, accumulate_batches=1
    )
    fit = trainer(max_epochs=2, callbacks=[callback], default_root_dir=tmp_path)
    fit.fit(model, datamodule=TinyImages())
    assert [(r["pruning_step"], r["details"]["filters_remaining"]) for r in callback.history] == [
        (0, 8),
        (1, 6),
        (2, 4),
    ]
    assert fit.callback_metrics["filters_remaining"] == 4
    assert sorted(p.name for p in (tmp_path / "rounds").iterdir()) == ["round_00", "round_01", "round_02"]
    assert sum(int(a.sum()) for a in alive_of(model).values()) == 4
    x = torch.rand(5, 1, 8, 8)
    for name, out in zip(CONVS, block_outputs(model.net, x)):
        assert torch.all(out[:, ~alive_of(model)[name]] == 0)


def test_state_survives_a_checkpoint_round_trip():
    callback = TaylorFilterPruning(steps_between=4, accumulate_batches=2)
    callback.level_batches, callback.pruning_steps, callback.tasks_scored = 1, 6, 10
    callback.score_sums = {"net.features.0.0": torch.tensor([1.0, 2.0])}
    callback.history = [{"round": 0, "filters_remaining": 7}]
    restored = TaylorFilterPruning(steps_between=4)
    restored.load_state_dict(callback.state_dict())
    restored_counts = (restored.level_batches, restored.pruning_steps, restored.tasks_scored)
    assert restored_counts == (1, 6, 10) and restored.history == callback.history
    assert torch.equal(restored.score_sums["net.features.0.0"], torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------------------------- any graph
def tiny_resnet12(out_features=3) -> ResNet12:
    """16x16 inputs, 3 + 4 + 5 + 6 channels: 12 channel groups, 54 channels."""
    torch.manual_seed(0)
    return ResNet12(out_features, in_channels=1, widths=(3, 4, 5, 6), image_size=16)


def assert_whole_groups_removed(model: nn.Module) -> dict[str, Tensor]:
    """Every group's removed channel is gone from all its convs and BatchNorms together, stored as
    zero; the alive channels of each group, by group."""
    alive = alive_of(model)
    for name, group in sparsity.channel_groups(model).items():
        dead = ~alive[name]
        for conv in group.convs:  # the filters of every coupled conv went together
            assert torch.equal(
                sparsity.masks_of(model, [f"{conv}.weight"])[f"{conv}.weight"].flatten(1).any(1), alive[name]
            )
        for parameter in group.parameters:
            assert torch.all(sparsity.weight(model, parameter)[dead] == 0), parameter
    return alive


def stage_outputs(net: nn.Module, x: Tensor) -> list[Tensor]:
    """Each ResNet-12 stage's output (after the residual add)."""
    outs: list[Tensor] = []
    handles = [stage.register_forward_hook(lambda m, i, out: outs.append(out)) for stage in net.stages]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return outs


def test_maml_on_a_resnet12_prunes_whole_channel_groups_and_keeps_them_zero(tmp_path):
    model = MAML(tiny_resnet12(), inner_lr=0.3)
    callback = TaylorFilterPruning(
        filters_per_step=6, steps_between=1, target_fraction=0.25, accumulate_batches=1
    )
    data = TinyImageTasks(image_size=16, meta_batch_size=2, tasks_per_epoch=8)
    trainer(max_steps=4, callbacks=[callback], default_root_dir=tmp_path).fit(model, datamodule=data)
    # round(0.25 * 54) = 14 channels in steps of 6, 6 and 2; a group's channel counts once.
    assert [r["details"]["filters_remaining"] for r in callback.history] == [54, 48, 42, 40]
    alive = assert_whole_groups_removed(model)
    assert sum(int(a.sum()) for a in alive.values()) == 40
    summed = [f"net.stages.{i}.conv3" for i in range(4)]
    assert any(not bool(alive[name].all()) for name in summed)  # a skip path lost channels too
    # The stage outputs (main path + skip path, after the add) are exactly 0 there, adapted too.
    task = data.task_source("train").sample(np.random.default_rng(0))
    with model.adapt(task.support_x, task.support_y, 2, False) as adapted:
        for net in (model.net, adapted):
            outs = stage_outputs(net, task.query_x)
            for index, name in enumerate(summed):
                assert torch.all(outs[index][:, ~alive[name]] == 0)
                assert outs[index][:, alive[name]].abs().sum() > 0
    # Optimizer steps with the engine's invariants (what fine-tuning does) keep every slice zero.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model.net(task.support_x), task.support_y).backward()
        sparsity.mask_gradients(model)
        optimizer.step()
        sparsity.apply_masks(model, [optimizer])
    assert_whole_groups_removed(model)
    # The shrunk net: smaller, the same outputs.
    small, _ = shrink(model.net, sparsity.masks_within(model, "net."))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.net.parameters())
    assert sum(group.width for group in sparsity.channel_groups(small).values()) == 40
    torch.testing.assert_close(small(task.query_x), model.net(task.query_x), rtol=0, atol=1e-5)


def test_protonet_on_a_resnet12_embedding_prunes_whole_groups_and_shrinks_to_the_same_distances(tmp_path):
    torch.manual_seed(0)
    model = ProtoNet(tiny_resnet12(out_features=None), optimizer=partial(torch.optim.Adam, lr=0.01))
    callback = TaylorFilterPruning(
        filters_per_step=9, steps_between=1, target_fraction=0.5, accumulate_batches=1
    )
    data = TinyImageTasks(image_size=16, meta_batch_size=2, tasks_per_epoch=8)
    trainer(max_steps=4, callbacks=[callback], default_root_dir=tmp_path).fit(model, datamodule=data)
    assert callback.history[-1]["details"]["filters_remaining"] == 27
    alive = assert_whole_groups_removed(model)
    small, small_masks = shrink(model.net, sparsity.masks_within(model, "net."))
    assert small.embedding_features == int(alive["net.stages.3.conv3"].sum())
    task = data.task_source("val").sample(np.random.default_rng(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model.task_log_probabilities(task),
            model.log_probabilities(small(task.support_x), task.support_y, small(task.query_x), 3),
            rtol=0,
            atol=1e-5,
        )


def test_flops_terms_count_a_conv4_only():
    callback = TaylorFilterPruning(filters_per_step=1, target_fraction=0.25, flops_weight=0.1)
    with pytest.raises(ConfigError, match="holds none: a cost-regularised criterion"):
        callback.setup(None, MAML(tiny_resnet12()), "fit")


# ---------------------------------------------------------------------------------- errors
def test_a_net_without_conv_layers_is_a_config_error_naming_the_callback():
    model = MAML(MLP(hidden=(8, 8)))
    data = SinusoidDataModule(shots=2, query_shots=2, meta_batch_size=2, tasks_per_epoch=2)
    with pytest.raises(
        ConfigError, match="TaylorFilterPruning prunes conv filters, but MAML has no nn.Conv2d layer"
    ):
        trainer(max_steps=1, callbacks=[TaylorFilterPruning()]).fit(model, datamodule=data)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="target_fraction"):
        TaylorFilterPruning(target_fraction=1.0)
    with pytest.raises(ConfigError, match="accumulate_batches"):
        TaylorFilterPruning(accumulate_batches=0)
    with pytest.raises(ConfigError, match="filters_per_step"):
        TaylorFilterPruning(filters_per_step=0)
    # 0.9 of 8 filters would leave one of the two layers empty.
    with pytest.raises(ConfigError, match="keeps at least one"):
        trainer(max_steps=1, callbacks=[TaylorFilterPruning(target_fraction=0.9)]).fit(
            Classifier(conv_net()), datamodule=TinyImages()
        )
    with pytest.raises(ConfigError, match="net.features.7.0"):
        trainer(max_steps=1, callbacks=[TaylorFilterPruning(exclude=["net.features.7.0"])]).fit(
            Classifier(conv_net()), datamodule=TinyImages()
        )


# ---------------------------------------------------------------------------------- shrink
def pruned_conv_net() -> Conv4:
    """5 filters a block; channels pruned in both blocks, plus unstructured zeros everywhere and
    BatchNorm parameters away from their defaults (so a wrongly kept beta would show)."""
    net = conv_net(hidden=5)
    with torch.no_grad():
        for block in net.features:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
    sparsity.load_masks(
        net, sparsity.prune_lowest(sparsity.masks_of(net), sparsity.magnitude_scores(net), 0.3, "layerwise")
    )
    sparsity.prune_channels(net, "features.0.0", [1, 3])
    sparsity.prune_channels(net, "features.1.0", [0, 4])
    return net


def test_shrink_preserves_outputs_and_adaptation_with_fewer_parameters():
    net = pruned_conv_net()
    masks = sparsity.masks_of(net)
    shrunk, shrunk_masks = shrink(net, masks)
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(shrunk(x), net(x), rtol=0, atol=1e-5)
    # Exactly the removed channels' weights are gone: conv0 3x1x9+3, bn0 2x3, conv1 3x3x9+3, bn1 2x3,
    # head 3x(3x2x2)+3.
    assert sum(p.numel() for p in shrunk.parameters()) == 30 + 6 + 84 + 6 + 39
    assert sum(p.numel() for p in net.parameters()) == 50 + 10 + 230 + 10 + 63
    assert shrunk.architecture == {
        "out_features": 3,
        "in_channels": 1,
        "hidden_channels": [3, 3],
        "image_size": 8,
        "blocks": 2,
    }
    # Stock layers again, with the kept weights' masks beside: the unstructured zeros survive.
    conv1 = shrunk.features[1][0]
    assert type(conv1) is nn.Conv2d and type(shrunk.head) is nn.Linear
    assert type(shrunk.features[1][1]) is nn.BatchNorm2d
    keep0, keep1 = torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3])
    assert torch.equal(shrunk_masks["features.0.0.weight"], masks["features.0.0.weight"][keep0])
    assert torch.equal(shrunk_masks["features.1.0.weight"], masks["features.1.0.weight"][keep1][:, keep0])
    assert int((shrunk_masks["features.1.0.weight"] == 0).sum()) > 0
    assert int((shrunk_masks["head.weight"] == 0).sum()) > 0
    for name, mask in shrunk_masks.items():  # stored as zero where the cut masks say
        assert torch.all(sparsity.weight(shrunk, name)[mask == 0] == 0), name
    assert not removed_channels(shrunk.features[0][1]).any()  # nothing left to remove
    # The MAML inner loop (steps masked) adapts both to the same outputs.
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    outs = []
    for model, model_masks in ((net, masks), (shrunk, shrunk_masks)):
        learner = MAML(model, inner_lr=0.3)
        sparsity.load_masks(learner, {f"net.{name}": mask for name, mask in model_masks.items()})
        with learner.adapt(x, y, 2, False) as adapted:
            outs.append(adapted(x).detach())
            fast = dict(zip(dict(model.named_parameters()), adapted.parameters()))
            for name, mask in learner.net_masks().items():  # pruned entries stay zero when adapted
                assert torch.all(fast[name][mask == 0] == 0), name
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    # The architecture record rebuilds the shape: the state dict loads and gives the same outputs.
    rebuilt = Conv4(**shrunk.architecture)
    rebuilt.load_state_dict(shrunk.state_dict())
    torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=1e-5)


def test_shrink_keeps_the_original_and_the_random_state_untouched():
    net = pruned_conv_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    shrink(net, sparsity.masks_of(net))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------- from YAML
OMNIGLOT = str(REPO / "configs" / "omniglot_5way1shot.yaml")
TAYLOR = str(REPO / "configs" / "prune" / "taylor.yaml")


def test_prune_config_stacks_on_the_omniglot_config(resolved_config):
    config = resolved_config("-c", OMNIGLOT, "-c", TAYLOR)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "callbacks.TaylorFilterPruning"
    assert callback["init_args"] == {
        "filters_per_step": 8,
        "steps_between": 20,
        "target_fraction": 0.5,
        "flops_weight": 0.0,  # the plain criterion unless asked
        "cost": "flops",
        "accumulate_batches": 5,
        "write_every": 1,
        "scope": "global",
        "layer_rates": None,
        "monitor": None,
        "mode": None,
        "exclude": [],
        "test_each_round": False,
        "patience": None,  # levels of fixed length, no plateau rule
        "min_delta": 0.0,
    }
    assert config["trainer"]["logger"]["init_args"]["name"] == "omniglot_5way1shot"
    assert config["checkpoint"]["monitor"] == "val/acc_post"


def test_sinusoid_mlp_with_the_taylor_config_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "-c", str(REPO / "configs" / "sinusoid.yaml"), "-c", TAYLOR, "--trainer.logger", "false"]
        )
    assert exit_info.value.code == 2
    assert "TaylorFilterPruning prunes conv filters" in capsys.readouterr().err


def test_tiny_omniglot_fit_from_yaml_writes_rounds_and_a_pruned_checkpoint(
    tmp_path, monkeypatch, fake_omniglot, lthmaml_cache
):
    root = fake_omniglot.folder({"Alpha": [f"character{i:02d}" for i in range(1, 11)]})
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "max_epochs": 1,
                    "enable_progress_bar": False,
                    "callbacks": [
                        {
                            "class_path": "callbacks.TaylorFilterPruning",
                            "init_args": {"filters_per_step": 2, "steps_between": 2, "accumulate_batches": 1},
                        }
                    ],
                },
                "model": {
                    "init_args": {
                        "net": {
                            "init_args": {
                                "out_features": 3,
                                "hidden_channels": 4,
                                "image_size": 8,
                                "blocks": 2,
                            }
                        }
                    }
                },
                "data": {
                    "init_args": {
                        "root": str(root),
                        "ways": 3,
                        "query_shots": 1,
                        "eval_query_shots": 1,
                        "image_size": 8,
                        "class_split": [4, 3, 3],
                        "meta_batch_size": 2,
                        "tasks_per_epoch": 8,
                        "val_tasks": 2,
                        "test_tasks": 2,
                    }
                },
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", OMNIGLOT, "-c", TAYLOR, "-c", str(tiny)])
    run = tmp_path / "runs" / "omniglot_5way1shot" / "version_0"
    remaining = [json.loads((run / "rounds" / f"round_0{i}" / "metrics.json").read_text()) for i in range(3)]
    assert [(m["pruning_step"], m["details"]["filters_remaining"]) for m in remaining] == [
        (0, 8),
        (1, 6),
        (2, 4),
    ]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    assert sum(int(state[f"masks.{conv}.weight"].flatten(1).any(1).sum()) for conv in CONVS) == 4
    assert sum(int(state[f"masks.{conv[:-2]}.1.weight"].sum()) for conv in CONVS) == 4  # BN scales
    assert sum(int(state[f"masks.{conv[:-2]}.1.bias"].sum()) for conv in CONVS) == 4  # and shifts
    for conv in CONVS:  # stored as zero
        dead = state[f"masks.{conv}.weight"].flatten(1).any(1) == 0
        assert torch.all(state[f"{conv}.weight"][dead] == 0)
        assert torch.all(state[f"{conv[:-2]}.1.bias"][dead] == 0)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "TaylorFilterPruning" in k]
    assert len(state["history"]) == 3 and state["pruning_steps"] == 2
