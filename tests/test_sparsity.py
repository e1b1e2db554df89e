"""The sparsity engine: score -> mask, schedules, rewind, channels, reports and mask files."""

from __future__ import annotations

import higher
import pytest
import torch
from torch import nn

from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.nets.layers import MaskedLinear
from lthmaml.nets.models import MLP, Conv4


class TwoLayers(nn.Module):
    """A crafted net: layer ``small`` holds small weights, layer ``large`` large ones."""

    def __init__(self):
        super().__init__()
        self.small = MaskedLinear(4, 5, bias=False)
        self.large = MaskedLinear(5, 2, bias=False)
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
    assert int((global_masks["small"] == 0).sum()) == 15 and int((global_masks["large"] == 0).sum()) == 0
    layerwise = sparsity.prune_lowest(masks, scores, 0.5, scope="layerwise")
    assert int((layerwise["small"] == 0).sum()) == 10 and int((layerwise["large"] == 0).sum()) == 5
    assert torch.equal(layerwise["large"].flatten()[:5], torch.zeros(5))  # the five smallest
    assert torch.equal(layerwise["large"].flatten()[5:], torch.ones(5))


def test_iterative_schedule_hits_one_minus_keep_to_the_r_within_one_weight_per_layer():
    torch.manual_seed(0)
    model = MLP()
    for round_index in range(1, 8):
        scores = sparsity.magnitude_scores(model)
        masks = sparsity.prune_lowest(sparsity.masks_of(model), scores, 0.2, "layerwise", rounds=round_index)
        sparsity.load_masks(model, masks)
        for name, layer in sparsity.prunable_layers(model).items():
            expected = layer.weight.numel() * (1 - 0.8**round_index)
            assert abs(int((layer.mask == 0).sum()) - expected) <= 1, name
    assert sparsity.sparsity_report(model).sparsity == pytest.approx(1 - 0.8**7, abs=1 / 1680)


def test_without_rounds_a_fraction_of_the_remaining_weights_is_pruned():
    model = MLP()
    masks = sparsity.masks_of(model)
    for _ in range(3):
        remaining = int(masks["net.2"].sum())
        masks = sparsity.prune_lowest(masks, sparsity.magnitude_scores(model), 0.2, "layerwise")
        assert int(masks["net.2"].sum()) == remaining - round(0.2 * remaining)


def test_pruned_weights_stay_pruned_and_scores_of_pruned_weights_are_ignored():
    model = TwoLayers()
    masks = sparsity.prune_lowest(
        sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.5, "layerwise"
    )
    sparsity.load_masks(model, masks)
    # A score that would favour the pruned weights must not bring them back.
    scores = {name: -layer.weight.detach().abs() for name, layer in sparsity.prunable_layers(model).items()}
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
        sparsity.masks_of(model), sparsity.magnitude_scores(model), 0.4, "global", {"net.4": 0.5}
    )
    assert int((masks["net.4"] == 0).sum()) == round(0.2 * 40)
    rest = sum(int((masks[n] == 0).sum()) for n in ("net.0", "net.2"))
    assert rest == round(0.4 * (40 + 1600))


def test_exclude_and_unknown_names_are_config_errors():
    model = MLP()
    assert set(sparsity.prunable_layers(model, exclude=["net.4"])) == {"net.0", "net.2"}
    with pytest.raises(ConfigError, match="net.9"):
        sparsity.prunable_layers(model, exclude=["net.9"])
    with pytest.raises(ConfigError, match="no mask-aware layers"):
        sparsity.prunable_layers(nn.Linear(2, 2))


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
    for name, param in model.named_parameters():
        layer_name = name.rsplit(".", 1)[0]
        layer = dict(model.named_modules())[layer_name]
        if name.endswith("weight") and hasattr(layer, "mask"):
            kept = layer.mask.bool()
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
    assert torch.all(model.net[2].weight[masks["net.2"] == 0] == 0)


def test_pruned_channel_is_zero_after_batchnorm_and_after_adaptation():
    torch.manual_seed(0)
    model = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    sparsity.prune_channels(model, "features.0.0", [1, 3])
    block = model.features[0]
    x = torch.randn(5, 1, 8, 8)
    out = block(x)
    assert torch.all(out[:, [1, 3]] == 0) and out[:, [0, 2]].abs().sum() > 0
    assert torch.all(block[1].bias[[1, 3]] == 0)
    assert not sparsity.alive_channels(block[0])[[1, 3]].any()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(nn.functional.cross_entropy(fmodel(x), torch.tensor([0, 1, 2, 0, 1])))
        assert torch.all(fmodel.features[0](x)[:, [1, 3]] == 0)


def test_report_counts_effective_zeros_and_prints_a_table():
    model = TwoLayers()
    model.small.mask[0] = 0
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
    torch.save(model.state_dict(), tmp_path / "model.pt")
    reloaded = MLP()
    reloaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert sparsity.sparsity_report(reloaded).zeros == sparsity.sparsity_report(model).zeros > 0


def test_mask_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ConfigError, match="net.0"):
        sparsity.load_masks(MLP(), {"net.0": torch.ones(3, 3)})
