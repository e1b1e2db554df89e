"""FLOPs-regularised Taylor pruning (Molchanov et al. 2017, section 2.4): the multiply-add and
activation counts of a Conv4 against hand counts, the activations of a ResNet-12's channel
groups, the ranking they move, weight 0 as the plain criterion, bad options."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyImageTasks
from helpers import quiet_trainer as trainer
from torch import Tensor, nn

from callbacks.taylor import TaylorFilterPruning, layer_normalized
from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.nets.flops import filter_activations, filter_cost, filter_flops, forward_flops, layer_flops
from lthmaml.nets.models import Conv4
from lthmaml.nets.resnet import ResNet12
from lthmaml.nets.shrink import shrink

CONVS = ("net.features.0.0", "net.features.1.0")


def small_net(widths=(4, 8)) -> Conv4:
    """8x8 inputs, two blocks: convs at 8x8 and 4x4, a head on 2x2 maps, 3 classes."""
    torch.manual_seed(0)
    return Conv4(out_features=3, hidden_channels=list(widths), image_size=8, blocks=2)


def alive_of(model: nn.Module) -> dict[str, list[int]]:
    return {
        name: sparsity.alive_channels(model, name).nonzero().flatten().tolist()
        for name in sparsity.channel_groups(model)
    }


# ---------------------------------------------------------------------------------- the count
def test_flops_of_a_small_conv4_match_a_hand_count_on_alive_channels():
    net = small_net()
    # conv 0: 3x3 x 1 in x 4 out x 8x8; conv 1: 3x3 x 4 x 8 x 4x4; head: 8 channels x 2x2 x 3 classes.
    assert layer_flops(net) == {"features.0.0": 2304, "features.1.0": 4608, "head": 96}
    assert forward_flops(net) == 7008
    # A filter of block 0: its map (9 x 1 x 64) and its input channel to conv 1 (9 x 8 x 16);
    # of block 1: its map (9 x 4 x 16) and its 2x2 positions x 3 classes in the head.
    assert filter_flops(net) == {"features.0.0": 576 + 1152, "features.1.0": 576 + 12}

    sparsity.prune_channels(net, "features.0.0", [1])
    sparsity.prune_channels(net, "features.1.0", [0, 2, 7])  # 3 and 5 filters left
    assert layer_flops(net) == {"features.0.0": 9 * 3 * 64, "features.1.0": 9 * 3 * 5 * 16, "head": 5 * 4 * 3}
    assert filter_flops(net) == {"features.0.0": 576 + 9 * 5 * 16, "features.1.0": 9 * 3 * 16 + 12}
    assert forward_flops(shrink(net)[0]) == forward_flops(net) == 1728 + 2160 + 60
    # Named as in the module that holds the net; a headless Conv4 has no head to feed.
    assert filter_flops(MAML(net)) == {f"net.{name}": n for name, n in filter_flops(net).items()}
    headless = Conv4(out_features=None, hidden_channels=[4, 8], image_size=8, blocks=2)
    assert filter_flops(headless)["features.1.0"] == 576 and "head" not in layer_flops(headless)


def test_the_maml_omniglot_conv4_counts_9_8_million_multiply_adds():
    assert layer_flops(Conv4()) == {
        "features.0.0": 9 * 1 * 64 * 28 * 28,
        "features.1.0": 9 * 64 * 64 * 14 * 14,
        "features.2.0": 9 * 64 * 64 * 7 * 7,
        "features.3.0": 9 * 64 * 64 * 3 * 3,
        "head": 64 * 5,
    }
    assert forward_flops(Conv4()) == 9_815_360
    assert filter_flops(Conv4()) == {
        "features.0.0": 7056 + 112_896,
        "features.1.0": 112_896 + 28_224,
        "features.2.0": 28_224 + 5184,
        "features.3.0": 5184 + 5,
    }


def test_activations_of_a_small_conv4_are_its_maps_positions_whatever_the_widths():
    net = small_net()
    # One more filter of block 0 adds an 8x8 map, of block 1 (after a 2x2 pooling) a 4x4 one.
    assert filter_activations(net) == {"features.0.0": 64, "features.1.0": 16}
    sparsity.prune_channels(net, "features.0.0", [1])
    sparsity.prune_channels(net, "features.1.0", [0, 2, 7])
    assert (
        filter_activations(net)
        == filter_activations(shrink(net)[0])
        == {"features.0.0": 64, "features.1.0": 16}
    )
    assert filter_activations(MAML(net)) == {"net.features.0.0": 64, "net.features.1.0": 16}
    assert filter_cost(net, "activations") == filter_activations(net)
    assert filter_cost(net, "flops") == filter_flops(net)
    assert filter_activations(Conv4()) == {
        "features.0.0": 28 * 28,
        "features.1.0": 14 * 14,
        "features.2.0": 7 * 7,
        "features.3.0": 3 * 3,
    }


# ---------------------------------------------------------------------------------- the ranking
def uniform(model: nn.Module) -> dict[str, Tensor]:
    """Every filter scores the same: the raw Taylor criterion ties everywhere."""
    return {name: torch.ones(group.width) for name, group in sparsity.channel_groups(model).items()}


@pytest.mark.parametrize(
    ("flops_weight", "removed"),
    [(0.0, {CONVS[1]: [0, 1, 2]}), (0.2, {CONVS[1]: [0, 1, 2]}), (0.25, {CONVS[0]: [0, 1, 2]})],
)
def test_the_flops_term_moves_removals_to_the_expensive_full_resolution_block(flops_weight, removed):
    model = Classifier(small_net())
    callback = TaylorFilterPruning(filters_per_step=3, target_fraction=0.5, flops_weight=flops_weight)
    # Layer-normalised ties: 1/2 in the 4-filter block, 1/sqrt(8) in the 8-filter one, so the plain
    # criterion takes the wider block 1. Normalised FLOPs: block 0 costs 1728, block 1 588 of 1728.
    # The expensive block goes first above (1/2 - 1/sqrt(8)) / (1 - 588/1728) = 0.222.
    criterion = callback.criterion(model, uniform(model))
    torch.testing.assert_close(criterion[CONVS[0]], torch.full((4,), 0.5 - flops_weight), rtol=0, atol=1e-7)
    torch.testing.assert_close(
        criterion[CONVS[1]], torch.full((8,), 1 / math.sqrt(8) - flops_weight * 588 / 1728), rtol=0, atol=1e-7
    )
    assert callback.prune_level(None, model, uniform(model)) == {"filters_removed": 3}
    kept = {CONVS[0]: list(range(4)), CONVS[1]: list(range(8))}
    for name, channels in removed.items():
        kept[name] = [c for c in kept[name] if c not in channels]
    assert alive_of(model) == kept


def test_the_flops_term_is_recounted_on_the_widths_left_at_each_step():
    model = Classifier(small_net())
    callback = TaylorFilterPruning(filters_per_step=3, target_fraction=0.5, flops_weight=0.25)
    callback.prune_level(None, model, uniform(model))  # block 0 down to 1 filter: 9 x 64 + 9 x 8 x 16
    assert filter_flops(model) == {CONVS[0]: 576 + 1152, CONVS[1]: 9 * 1 * 16 + 12}
    criterion = callback.criterion(model, uniform(model))
    torch.testing.assert_close(criterion[CONVS[1]], torch.full((8,), 1 / math.sqrt(8) - 0.25 * 156 / 1728))
    callback.prune_level(None, model, uniform(model))  # the target, 6 of 12: 3 more, block 0 keeps one
    assert alive_of(model) == {CONVS[0]: [3], CONVS[1]: [3, 4, 5, 6, 7]}
    assert callback.pruned_enough(model)


@pytest.mark.parametrize(("cost", "block"), [("flops", 1), ("activations", 0)])
def test_with_the_activations_cost_ties_leave_the_full_resolution_block_first(cost, block):
    # The Omniglot Conv4, 64 filters a block, every filter scoring the same (0.125 once normalised).
    # FLOPs: block 1 costs most (block 0: 0.85 of it); activations: block 0, 784 positions (block 1:
    # 196, a quarter). Either way at weight 0.05 the 8 filters go from the costliest block.
    model = Classifier(Conv4(out_features=5))
    callback = TaylorFilterPruning(filters_per_step=8, target_fraction=0.5, flops_weight=0.05, cost=cost)
    assert callback.prune_level(None, model, uniform(model)) == {"filters_removed": 8}
    widths = [len(channels) for channels in alive_of(model).values()]
    assert widths == [56 if b == block else 64 for b in range(4)]


def test_the_activations_criterion_takes_the_full_resolution_block_where_flops_would_not():
    # Small net: ties are 1/2 (block 0, 4 filters) and 1/sqrt(8) (block 1); positions 64 and 16,
    # so block 1 weighs 1/4. Block 0 goes first above (1/2 - 1/sqrt(8)) / (3/4) = 0.195; with the
    # FLOPs cost above 0.222 (see above): at 0.21 the two costs disagree.
    scores = {}
    for cost in ("activations", "flops"):
        model = Classifier(small_net())
        callback = TaylorFilterPruning(filters_per_step=3, target_fraction=0.5, flops_weight=0.21, cost=cost)
        scores[cost] = callback.criterion(model, uniform(model))
        callback.prune_level(None, model, uniform(model))
        scores[cost, "widths"] = [len(channels) for channels in alive_of(model).values()]
    torch.testing.assert_close(scores["activations"][CONVS[0]], torch.full((4,), 0.5 - 0.21))
    torch.testing.assert_close(scores["activations"][CONVS[1]], torch.full((8,), 1 / math.sqrt(8) - 0.21 / 4))
    assert scores["activations", "widths"] == [1, 8]
    assert scores["flops", "widths"] == [4, 5]


# ---------------------------------------------------------------------------------- weight 0
class SpyTaylor(TaylorFilterPruning):
    """At each step: whether the criterion and the filters removed are the plain rule's (the code
    before ``flops_weight``: the lowest layer-normalised scores go)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checks: list[tuple[bool, bool]] = []

    def prune_level(self, trainer, pl_module, scores):
        before = alive_of(pl_module)
        total, left, goal = self.target(pl_module)
        plain = layer_normalized(scores)
        alive = {name: sparsity.alive_channels(pl_module, name) for name in self.layers(pl_module)}
        expected = sparsity.lowest_channels(plain, alive, min(self.filters_per_step, goal - (total - left)))
        criterion = self.criterion(pl_module, scores)
        result = super().prune_level(trainer, pl_module, scores)
        after = alive_of(pl_module)
        removed = {n: [c for c in before[n] if c not in after[n]] for n in before if before[n] != after[n]}
        same = all(torch.equal(criterion[n], plain[n]) for n in plain)
        self.checks.append((same, removed == {n: sorted(c) for n, c in expected.items()}))
        return result


def fit_maml(tmp_path, **options) -> MAML:
    torch.manual_seed(0)
    model = MAML(Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2), inner_lr=0.3)
    callback = SpyTaylor(
        filters_per_step=3, steps_between=2, target_fraction=0.5, accumulate_batches=1, **options
    )
    torch.manual_seed(0)
    data = TinyImageTasks(meta_batch_size=2, tasks_per_epoch=10)
    trainer(max_steps=5, callbacks=[callback], default_root_dir=tmp_path).fit(model, datamodule=data)
    model.spy = callback
    return model


def test_flops_weight_zero_prunes_the_masks_of_the_plain_criterion(tmp_path):
    default, zero = fit_maml(tmp_path / "default"), fit_maml(tmp_path / "zero", flops_weight=0.0)
    # The filters the code before flops_weight left on this fit (2 steps: 3 then 1 filter).
    assert alive_of(default) == alive_of(zero) == {CONVS[0]: [0, 3], CONVS[1]: [1, 3]}
    assert all(
        torch.equal(a, b)
        for a, b in zip(sparsity.masks_of(default).values(), sparsity.masks_of(zero).values())
    )
    assert default.spy.checks == zero.spy.checks == [(True, True)] * 2
    # A large weight takes block 0 (1152 multiply-adds a filter, block 1: 588) down to one filter first.
    heavy = fit_maml(tmp_path / "heavy", flops_weight=2.0)
    assert [len(channels) for channels in alive_of(heavy).values()] == [1, 3]


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("flops_weight", [-0.1, float("nan")])
def test_a_negative_flops_weight_is_a_config_error_naming_the_option(flops_weight):
    with pytest.raises(ConfigError, match="TaylorFilterPruning: flops_weight must be >= 0"):
        TaylorFilterPruning(flops_weight=flops_weight)


@pytest.mark.parametrize("cost", ["memory", "FLOPs", None])
def test_an_unknown_cost_is_a_config_error_naming_the_option(cost):
    with pytest.raises(
        ConfigError, match=r"TaylorFilterPruning: cost must be one of \['activations', 'flops'\]"
    ):
        TaylorFilterPruning(cost=cost)


def test_the_flops_cost_on_a_net_other_than_conv4_is_a_config_error_at_setup():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    callback = TaylorFilterPruning(filters_per_step=1, target_fraction=0.25, flops_weight=0.1)
    with pytest.raises(ConfigError, match="FLOPs are counted on a lthmaml.nets.models.Conv4"):
        callback.setup(None, Classifier(net), "fit")
    TaylorFilterPruning(filters_per_step=1, target_fraction=0.25).layers(
        Classifier(net)
    )  # weight 0: any conv net
    # The activations are measured on any net (on a copy: the user's lazy layer stays unset).
    assert filter_activations(Classifier(net)) == {"net.0": 6 * 6}  # traced on 8x8, the first side it takes
    assert isinstance(net[3], nn.LazyLinear)


# ---------------------------------------------------------------------------------- any graph
def test_activations_of_a_resnet12_count_every_map_of_a_group_and_move_removals_to_full_resolution():
    torch.manual_seed(0)
    model = MAML(ResNet12(3, in_channels=1, widths=(4, 4, 4, 4), image_size=16))
    # Stages at 16, 8, 4 and 2 a side; a stage's output channel is two maps (main path, skip path).
    expected = {}
    for index, side in enumerate((16, 8, 4, 2)):
        for conv, maps in (("conv1", 1), ("conv2", 1), ("conv3", 2)):
            expected[f"net.stages.{index}.{conv}"] = maps * side * side
    assert filter_activations(model) == filter_cost(model, "activations") == expected
    # Every channel scoring the same, a heavy weight takes the 3 filters from the costliest group.
    callback = TaylorFilterPruning(
        filters_per_step=3, target_fraction=0.5, flops_weight=1.0, cost="activations"
    )
    callback.prune_level(None, model, uniform(model))
    left = {name: len(channels) for name, channels in alive_of(model).items()}
    assert left == {name: 1 if name == "net.stages.0.conv3" else 4 for name in expected}
