"""The sparsity engine: score -> mask, schedules, rewind, channels, reports and mask files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.meta import MAML
from lthmaml.meta.higher_loop import Adapted
from lthmaml.nets.models import MLP, Conv4


class TwoLayers(nn.Module):
    """A crafted net: layer ``small`` holds small weights, layer ``large`` large ones."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(4, 5, bias=False)
        self.large = nn.Linear(5, 2, bias=False)
        with torch.no_grad():
            self.small.weight.copy_(torch.arange(1, 21, dtype=torch.float32).view(5, 4) / 100)
            self.large.weight.copy_(torch.arange(1, 11, dtype=torch.float32).view(2, 5))

    def forward(self, x):
        return self.large(self.small(x))


def test_global_scope_prunes_the_globally_smallest_and_layerwise_each_layer():
    model = TwoLayers()
    scores = sparsity.magnitude_scores(model)
    masks = sparsity.masks_of(model)
    global_masks = sparsity.prune_lowest(masks, scores, 0.5, scope="global")  # 15 of 30
    assert set(masks) == set(scores) == {"small.weight", "large.weight"}  # by parameter name
    assert int((global_masks["small.weight"] == 0).sum()) == 15
    assert int((global_masks["large.weight"] == 0).sum()) == 0
    layerwise = sparsity.prune_lowest(masks, scores, 0.5, scope="layerwise")
    assert int((layerwise["small.weight"] == 0).sum()) == 10
    assert int((layerwise["large.weight"] == 0).sum()) == 5
    assert torch.equal(layerwise["large.weight"].flatten()[:5], torch.zeros(5))  # the five smallest
    assert torch.equal(layerwise["large.weight"].flatten()[5:], torch.ones(5))


def test_iterative_schedule_hits_one_minus_keep_to_the_r_within_one_weight_per_layer():
    torch.manual_seed(0)
    model = MLP()
    for round_index in range(1, 8):
        scores = sparsity.magnitude_scores(model)
        masks = sparsity.prune_lowest(sparsity.masks_of(model), scores, 0.2, "layerwise", level=round_index)
        sparsity.load_masks(model, masks)
        kept = sparsity.masks_of(model)
        for name in sparsity.prunable(model):
            weight = sparsity.weight(model, name)
            expected = weight.numel() * (1 - 0.8**round_index)
            assert abs(int((kept[name] == 0).sum()) - expected) <= 1, name
            assert torch.all(weight[kept[name] == 0] == 0), name  # a pruned entry is stored as zero
    assert sparsity.sparsity_report(model).sparsity == pytest.approx(1 - 0.8**7, abs=1 / 1680)


def test_without_rounds_a_fraction_of_the_remaining_weights_is_pruned():
    model = MLP()
    masks = sparsity.masks_of(model)
    for _ in range(3):
        remaining = int(masks["net.2.weight"].sum())
        masks = sparsity.prune_lowest(masks, sparsity.magnitude_scores(model), 0.2, "layerwise")
        assert int(masks["net.2.weight"].sum()) == remaining - round(0.2 * remaining)


def test_pruned_weights_stay_pruned_and_scores_of_pruned_weights_are_ignored():
    model = TwoLayers()
    masks = sparsity.prune_lowest(
        sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5, "layerwise"
    )
    sparsity.load_masks(model, masks)
    # A score that would favour the pruned weights must not bring them back.
    scores = {name: -sparsity.weight(model, name).detach().abs() for name in sparsity.prunable(model)}
    again = sparsity.prune_lowest(masks, scores, 0.2, "layerwise")
    for name in masks:
        assert torch.all(again[name][masks[name] == 0] == 0)
        assert int((again[name] == 0).sum()) == int((masks[name] == 0).sum()) + round(
            0.2 * masks[name].sum().item()
        )


def test_ties_are_broken_by_position():
    masks = {"a": torch.ones(2, 3)}
    pruned = sparsity.prune_lowest(masks, {"a": torch.ones(2, 3)}, 0.5, "layerwise")
    assert pruned["a"].flatten().tolist() == [0, 0, 0, 1, 1, 1]


def test_layer_rates_prune_the_output_layer_at_half_rate():
    model = MLP()
    masks = sparsity.prune_lowest(
        sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.4, "global", {"net.4.weight": 0.5}
    )
    assert int((masks["net.4.weight"] == 0).sum()) == round(0.2 * 40)
    rest = sum(int((masks[n] == 0).sum()) for n in ("net.0.weight", "net.2.weight"))
    assert rest == round(0.4 * (40 + 1600))
    # prune_by_magnitude takes the layer's name or its weight's for the same rate.
    for key in ("net.4", "net.4.weight"):
        torch.manual_seed(0)
        net = MLP()
        sparsity.prune_by_magnitude(net, 0.4, layer_rates={key: 0.5})
        installed = sparsity.masks_of(net)
        assert int((installed["net.4.weight"] == 0).sum()) == round(0.2 * 40)
        assert sum(int((installed[n] == 0).sum()) for n in ("net.0.weight", "net.2.weight")) == rest


def test_exclude_and_unknown_names_are_config_errors():
    model = MLP()
    assert sparsity.prunable(model, exclude=["net.4"]) == ["net.0.weight", "net.2.weight"]
    assert sparsity.prunable(model, exclude=["net.4.weight"]) == ["net.0.weight", "net.2.weight"]
    with pytest.raises(ConfigError, match="net.9"):
        sparsity.prunable(model, exclude=["net.9"])
    with pytest.raises(ConfigError, match="no conv or linear layer"):
        sparsity.prunable(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    assert sparsity.prunable(nn.Linear(2, 2)) == ["weight"]  # any stock layer is prunable


def test_rewind_restores_unpruned_weights_bit_exactly():
    torch.manual_seed(0)
    model = Conv4(hidden_channels=4, image_size=8, blocks=2)
    saved = sparsity.snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(6, 1, 8, 8)).pow(2).mean().backward()
        optimizer.step()
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5)
    )
    sparsity.rewind(model, saved)
    masks = sparsity.masks_of(model)
    assert set(masks) == set(sparsity.prunable(model))
    for name, param in model.named_parameters():
        if name in masks:
            kept = masks[name].bool()
            assert not kept.all(), name
            assert torch.equal(param[kept], saved[name][kept])
            assert torch.all(param[~kept] == 0)
        else:
            assert torch.equal(param, saved[name])


def test_reinitialize_draws_new_weights_under_the_same_masks():
    torch.manual_seed(0)
    model = MLP()
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5)
    )
    before, masks = sparsity.snapshot(model), sparsity.masks_of(model)
    sparsity.reinitialize(model, generator_seed=1)
    after = sparsity.masks_of(model)
    assert all(torch.equal(masks[k], after[k]) for k in masks)
    assert not torch.equal(before["net.2.weight"], model.net[2].weight)
    assert torch.all(model.net[2].weight[masks["net.2.weight"] == 0] == 0)


def test_pruned_channel_is_zero_after_batchnorm_and_after_adaptation():
    torch.manual_seed(0)
    model = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    sparsity.prune_channels(model, "features.0.0", [1, 3])
    block = model.features[0]
    # The conv's filters and bias and the BatchNorm's scale and shift of those channels, by name.
    assert sparsity.channel_parameters(model, "features.0.0") == [
        "features.0.0.weight",
        "features.0.0.bias",
        "features.0.1.weight",
        "features.0.1.bias",
    ]
    masks = sparsity.masks_of(model)
    for name in sparsity.channel_parameters(model, "features.0.0"):
        assert torch.all(masks[name][[1, 3]] == 0) and torch.all(masks[name][[0, 2]] == 1), name
    x = torch.randn(5, 1, 8, 8)
    out = block[1](block[0](x))  # stock BatchNorm: scale and shift 0 make the map exactly 0
    assert torch.all(out[:, [1, 3]] == 0) and out[:, [0, 2]].abs().sum() > 0
    assert torch.all(block[1].weight[[1, 3]] == 0) and torch.all(block[1].bias[[1, 3]] == 0)
    assert sparsity.alive_channels(model, "features.0.0").tolist() == [True, False, True, False]
    # The inner loop's steps multiplied by the masks (as MAML's): the channel stays 0 when adapted.
    y = torch.tensor([0, 1, 2, 0, 1])
    adapted = Adapted(model, 0.5, None, x, y, 2, True, sparsity.gradient_masks(model, model))
    with adapted as fmodel:
        assert not torch.equal(fmodel.features[0][0].weight, block[0].weight)  # it did adapt
        adapted_out = fmodel.features[0][1](fmodel.features[0][0](x))
        assert torch.all(adapted_out[:, [1, 3]] == 0) and adapted_out[:, [0, 2]].abs().sum() > 0
        assert torch.all(fmodel.features[0][1].bias[[1, 3]] == 0)


def test_report_counts_effective_zeros_and_prints_a_table():
    model = TwoLayers()
    mask = torch.ones(5, 4)
    mask[0] = 0
    sparsity.load_masks(model, {"small.weight": mask})
    assert torch.all(model.small.weight[0] == 0)  # stored as zero
    report = sparsity.sparsity_report(model)
    assert (report.total, report.zeros) == (30, 4)
    assert report.as_dict()["layers"]["small"]["sparsity"] == pytest.approx(0.2)
    assert "small" in report.table() and "13.33%" in report.table()


def test_masks_round_trip_through_safetensors_and_state_dict(tmp_path):
    model = MLP()
    sparsity.load_masks(
        model, sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.7)
    )
    sparsity.save_masks(tmp_path / "mask.safetensors", sparsity.masks_of(model), {"round": 3})
    restored = MLP()
    sparsity.load_masks(restored, sparsity.read_masks(tmp_path / "mask.safetensors"))
    assert all(
        torch.equal(a, b)
        for a, b in zip(sparsity.masks_of(model).values(), sparsity.masks_of(restored).values())
    )
    assert set(sparsity.read_masks(tmp_path / "mask.safetensors")) == set(sparsity.prunable(model))
    # The masks ride in state_dict under masks.<parameter name> (a bare net got its set attached).
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {k for k in state if k.startswith("masks.")} == {f"masks.{n}" for n in sparsity.prunable(model)}
    reloaded = MLP()
    sparsity.mask_set(reloaded)
    reloaded.load_state_dict(state)
    assert sparsity.sparsity_report(reloaded).zeros == sparsity.sparsity_report(model).zeros > 0
    assert all(torch.equal(sparsity.masks_of(reloaded)[k], m) for k, m in sparsity.masks_of(model).items())
    # A learner's masks ride in its checkpoint; loading replaces the set (a dense state clears it).
    learner = MAML(MLP())
    sparsity.load_masks(learner, {f"net.{k}": m for k, m in sparsity.masks_of(model).items()})
    restored_learner = MAML(MLP())
    restored_learner.load_state_dict(learner.state_dict())
    assert set(restored_learner.masks) == {f"net.{n}" for n in sparsity.prunable(model)}
    assert sparsity.sparsity_report(restored_learner).zeros == sparsity.sparsity_report(model).zeros
    restored_learner.load_state_dict(MAML(MLP()).state_dict())
    assert len(restored_learner.masks) == 0


def test_mask_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ConfigError, match="net.0"):
        sparsity.load_masks(MLP(), {"net.0.weight": torch.ones(3, 3)})
    with pytest.raises(ConfigError, match="keyed by parameter name"):  # a layer name: the old keys
        sparsity.load_masks(MLP(), {"net.0": torch.ones(40, 1)})


def test_apply_masks_zeros_pruned_entries_and_their_optimizer_state():
    """The invariant that replaces a mask in the forward pass: after a step, a pruned entry and its
    Adam moments are zero; mask_gradients zeroes its gradient before the step."""
    torch.manual_seed(0)
    model = MLP()
    sparsity.prune_by_magnitude(model, 0.5)
    pruned = sparsity.masks_of(model)["net.2.weight"] == 0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=0.1)
    model(torch.randn(8, 1)).pow(2).mean().backward()
    sparsity.mask_gradients(model)
    assert torch.all(model.net[2].weight.grad[pruned] == 0)
    with torch.no_grad():
        model.net[2].weight.grad[pruned] = 1.0  # a stale gradient reaches the optimizer anyway
    optimizer.step()
    assert torch.all(model.net[2].weight[pruned] != 0)
    sparsity.apply_masks(model, [optimizer])
    assert torch.all(model.net[2].weight[pruned] == 0)
    state = optimizer.state[model.net[2].weight]
    assert torch.all(state["exp_avg"][pruned] == 0) and torch.all(state["exp_avg_sq"][pruned] == 0)
    assert state["exp_avg"][~pruned].abs().sum() > 0
