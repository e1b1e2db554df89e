"""Mask-aware layers and the models built from them."""

import higher
import pytest
import torch

from lthmaml.nets.layers import MaskedConv2d, MaskedLinear, masked_layers
from lthmaml.nets.models import MLP, Conv4


def test_masked_linear_computes_with_weight_times_mask():
    layer = MaskedLinear(3, 2)
    layer.mask[0, 1] = 0
    x = torch.randn(4, 3)
    expected = x @ (layer.weight * layer.mask).T + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_masked_conv_matches_conv_with_masked_weight():
    layer = MaskedConv2d(2, 3, 3, padding=1)
    layer.mask[1] = 0
    x = torch.randn(2, 2, 5, 5)
    expected = torch.nn.functional.conv2d(x, layer.weight * layer.mask, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
    assert torch.all(layer(x)[:, 1] == layer.bias[1])


def test_weight_transform_hook_is_applied_before_the_mask():
    layer = MaskedLinear(2, 2, bias=False)
    layer.weight_transform = lambda w: w * w.abs()
    layer.mask[0, 0] = 0
    expected = layer.weight * layer.weight.abs() * layer.mask
    torch.testing.assert_close(layer.effective_weight(), expected)


def test_mask_rides_in_state_dict():
    model = MLP()
    model.net[0].mask[:5] = 0
    restored = MLP()
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.net[0].mask, model.net[0].mask)
    assert int(restored.net[0].mask.sum()) == 35


def test_higher_keeps_mask_and_transform_in_the_functional_copy():
    layer = MaskedLinear(3, 2)
    layer.mask[1, 2] = 0
    layer.weight_transform = lambda w: 2 * w
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with higher.innerloop_ctx(layer, opt, copy_initial_weights=False) as (fnet, diffopt):
        diffopt.step(fnet(torch.randn(6, 3)).pow(2).sum())
        assert fnet.effective_weight()[1, 2].item() == 0.0
        assert not torch.equal(fnet.weight, layer.weight)  # it did adapt
        torch.testing.assert_close(fnet.effective_weight(), 2 * fnet.weight * layer.mask)


def test_conv4_shapes_and_prunable_layers():
    model = Conv4(out_features=5, hidden_channels=8, image_size=28)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    names = list(masked_layers(model))
    assert len(names) == 5 and names[-1] == "head"
    assert model.head.in_features == 8  # 28 -> 14 -> 7 -> 3 -> 1


def test_conv4_batchnorm_uses_batch_statistics():
    model = Conv4(hidden_channels=4)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not bn.track_running_stats for bn in bns)


def test_conv4_rejects_too_small_images():
    with pytest.raises(ValueError, match="image_size=8"):
        Conv4(image_size=8, blocks=4)


def test_mlp_default_is_the_maml_sinusoid_net():
    model = MLP()
    shapes = [tuple(m.weight.shape) for m in masked_layers(model).values()]
    assert shapes == [(40, 1), (40, 40), (1, 40)]
