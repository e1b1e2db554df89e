"""The nets that ship: stock layers, their shapes and errors, and the pruning invariants the engine
keeps on them (pruned entries stored as zero, a removed channel exactly 0 after its BatchNorm and
through MAML's inner loops, shrink)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lthmaml import sparsity
from lthmaml.data.tasks import TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta import MAML
from lthmaml.nets.models import MLP, CNPNet, Conv4
from lthmaml.nets.reparam import install_power, installed_alpha, power_of
from lthmaml.nets.shrink import removed_channels, shrink

STOCK = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def small_conv4(hidden=4) -> Conv4:
    torch.manual_seed(0)
    return Conv4(out_features=3, hidden_channels=hidden, image_size=8, blocks=2)


# ---------------------------------------------------------------------------------- the nets
def test_conv4_shapes_and_prunable_weights():
    model = Conv4(out_features=5, hidden_channels=8, image_size=28)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    names = sparsity.prunable(model)
    assert len(names) == 5 and names[0] == "features.0.0.weight" and names[-1] == "head.weight"
    assert model.head.in_features == 8  # 28 -> 14 -> 7 -> 3 -> 1
    # Stock layers, exactly (no subclass), under the parameter names checkpoints hold.
    for module in model.modules():
        if isinstance(module, STOCK):
            assert type(module) in STOCK, type(module)
    assert {"features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "head.weight"} <= set(
        dict(model.named_parameters())
    )
    assert not any("mask" in key for key in model.state_dict())  # no mask buffers in a net


def test_conv4_batchnorm_uses_batch_statistics():
    model = Conv4(hidden_channels=4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.track_running_stats for bn in bns)


def test_conv4_rejects_too_small_images_and_mismatched_widths():
    with pytest.raises(ValueError, match="image_size=8"):
        Conv4(image_size=8, blocks=4)
    with pytest.raises(ConfigError, match="hidden_channels has 3 widths for 2 blocks"):
        Conv4(hidden_channels=[4, 4, 4], image_size=8, blocks=2)
    with pytest.raises(ConfigError, match="out_features"):
        Conv4(out_features=0)


def test_mlp_default_is_the_maml_sinusoid_net():
    model = MLP()
    shapes = [tuple(sparsity.weight(model, name).shape) for name in sparsity.prunable(model)]
    assert shapes == [(40, 1), (40, 40), (1, 40)]
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_cnp_net_prunes_encoder_and_decoder():
    names = sparsity.prunable(CNPNet(representation=8, encoder_hidden=(8,), decoder_hidden=(8,)))
    assert any(n.startswith("encoder.") for n in names) and any(n.startswith("decoder.") for n in names)


# ---------------------------------------------------------------------------------- pruning stock layers
def test_a_pruned_net_computes_with_weight_times_mask_through_stock_layers():
    """What the mask-aware layers computed (``weight * mask``), a stock net computes once pruned:
    the pruned entries are stored as zero."""
    net = small_conv4()
    sparsity.prune_by_magnitude(net, 0.5)
    masks = sparsity.masks_of(net)
    assert all(not bool(m.all()) for m in masks.values())
    for name in sparsity.prunable(net):
        assert torch.all(sparsity.weight(net, name)[masks[name] == 0] == 0), name
    x = torch.rand(4, 1, 8, 8)
    conv, bn = net.features[0][0], net.features[0][1]
    masked = F.conv2d(x, conv.weight * masks["features.0.0.weight"], conv.bias, padding=1)
    torch.testing.assert_close(conv(x), masked, rtol=0, atol=0)
    flat = net.features(x).flatten(1)
    head = F.linear(flat, net.head.weight * masks["head.weight"], net.head.bias)
    torch.testing.assert_close(net(x), head, rtol=0, atol=0)
    assert isinstance(bn, nn.BatchNorm2d)


def test_adapted_weights_are_zero_at_pruned_entries_with_powerprop_in_both_loops():
    """Masks multiply the inner steps (higher and torch.func); a parametrisation (Powerprop) is
    differentiated through and computed with in the adapted net."""
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for loop in ("higher", "func"):
        model = MAML(small_conv4(), inner_lr=0.3, inner_steps=2, inner_loop=loop)
        sparsity.prune_by_magnitude(model, 0.6)
        layers = [name.removesuffix(".weight") for name in sparsity.prunable(model)]
        before = model.net(x).detach()
        install_power(model, 2.0, layers)
        torch.testing.assert_close(model.net(x), before, rtol=1e-5, atol=1e-6)  # the function kept
        masks = model.net_masks()  # by the net's own parameter names: Powerprop's phi
        assert set(masks) == {f"{layer[4:]}.parametrizations.weight.original" for layer in layers}
        names = [plain(n) for n, _ in model.net.named_parameters()]
        if loop == "higher":
            with model.adapt(x, y, 2, False) as fnet:
                adapted = {name: p.detach() for name, p in zip(names, fnet.parameters())}
                phi = adapted["head.weight"]
                torch.testing.assert_close(fnet.head.weight, phi * phi.abs(), rtol=0, atol=0)
                computed = F.linear(fnet.features(x).flatten(1), phi * phi.abs(), fnet.head.bias)
                torch.testing.assert_close(fnet(x), computed)  # the transform is computed with
        else:
            adapted = {plain(n): p for n, p in model.functional_loop().adapted_params(x, y, 2).items()}
        for name, mask in masks.items():
            phi = adapted[plain(name)]
            assert torch.all(phi[mask == 0] == 0), (loop, name)
            stored = sparsity.stored(model.net, plain(name)).detach()
            assert not torch.equal(phi[mask == 1], stored[mask == 1]), (loop, name)  # it adapted


def plain(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight``."""
    return name.removesuffix(".original").replace(".parametrizations.", ".")


# ---------------------------------------------------------------------------------- channels
def block_maps(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The map after each block's BatchNorm."""
    outs = []
    for block in net.features:
        outs.append(block[1](block[0](x)))
        x = block[3](block[2](outs[-1]))
    return outs


@pytest.mark.parametrize("loop", ["higher", "func"])
def test_a_removed_channel_is_exactly_zero_after_batchnorm_and_stays_zero_through_adaptation(loop):
    model = MAML(small_conv4(), inner_lr=0.5, inner_steps=3, inner_loop=loop)
    sparsity.prune_channels(model, "net.features.0.0", [1, 3])
    sparsity.prune_channels(model, "net.features.1.0", [0])
    bn0, bn1 = model.net.features[0][1], model.net.features[1][1]
    assert removed_channels(bn0).tolist() == [False, True, False, True]
    assert removed_channels(bn1).tolist() == [True, False, False, False]
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        maps = block_maps(model.net, x)
    assert torch.all(maps[0][:, [1, 3]] == 0) and maps[0][:, [0, 2]].abs().sum() > 0
    assert torch.all(maps[1][:, 0] == 0) and maps[1][:, 1:].abs().sum() > 0
    if loop == "higher":
        with model.adapt(x, y, 3, True) as fnet:
            adapted_maps = block_maps(fnet, x)
            moved = not torch.equal(fnet.features[0][1].bias, bn0.bias)
    else:
        weights = model.functional_loop().adapted_params(x, y, 3)
        moved = not torch.equal(weights["features.0.1.bias"], bn0.bias)
        adapted_maps = []  # each BatchNorm's output in a forward pass with the adapted weights
        handles = [
            block[1].register_forward_hook(lambda m, i, out: adapted_maps.append(out.detach()))
            for block in model.net.features
        ]
        torch.func.functional_call(model.net, weights, (x,))
        for handle in handles:
            handle.remove()
    assert moved  # the kept channels adapted
    assert torch.all(adapted_maps[0][:, [1, 3]] == 0) and torch.all(adapted_maps[1][:, 0] == 0)
    assert adapted_maps[0][:, [0, 2]].abs().sum() > 0
    # And through a meta-training step: the meta-gradient and the optimizer leave it removed.
    model.zero_grad()
    model.manual_backward = lambda loss: loss.backward()
    model.meta_train(TaskBatch(x[None], y[None], x[None], y[None]), 1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    sparsity.apply_masks(model, [optimizer])
    with torch.no_grad():
        maps = block_maps(model.net, x)
    assert torch.all(maps[0][:, [1, 3]] == 0) and torch.all(maps[1][:, 0] == 0)
    assert removed_channels(bn0).tolist() == [False, True, False, True]


def test_shrink_of_a_filter_pruned_conv4_gives_the_same_outputs_and_carries_the_masks():
    net = small_conv4(hidden=5)
    with torch.no_grad():
        for block in net.features:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
    sparsity.prune_by_magnitude(net, 0.3)
    sparsity.prune_channels(net, "features.0.0", [1, 3])
    sparsity.prune_channels(net, "features.1.0", [0, 4])
    masks = sparsity.masks_of(net)
    small, small_masks = shrink(net, masks)
    assert all(type(m) in STOCK for m in small.modules() if isinstance(m, STOCK))
    assert small.architecture["hidden_channels"] == [3, 3]
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    keep0, keep1 = torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3])
    # The kept weights' masks, cut to the new shapes; the BatchNorm masks pruned nothing left: gone.
    assert torch.equal(small_masks["features.0.0.weight"], masks["features.0.0.weight"][keep0])
    assert torch.equal(small_masks["features.1.0.weight"], masks["features.1.0.weight"][keep1][:, keep0])
    assert "features.0.1.weight" not in small_masks and "features.1.1.bias" not in small_masks
    assert int((small_masks["features.1.0.weight"] == 0).sum()) > 0
    assert int((small_masks["head.weight"] == 0).sum()) > 0
    for name, mask in small_masks.items():  # the shrunk weights are zero where the masks say
        assert mask.shape == sparsity.weight(small, name).shape
        assert torch.all(sparsity.weight(small, name)[mask == 0] == 0), name
    # Installed, they keep the unstructured zeros through MAML's inner loop, to the same outputs.
    sparsity.load_masks(small, small_masks)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    outs = []
    for model in (MAML(net, inner_lr=0.3), MAML(small, inner_lr=0.3)):
        sparsity.load_masks(model, {f"net.{n}": m for n, m in sparsity.masks_within(model.net).items()})
        with model.adapt(x, y, 2, False) as fnet:
            outs.append(fnet(x).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    # No masks given: none returned.
    assert shrink(net)[1] == {}


def test_shrink_keeps_a_powerprop_transform_and_refuses_a_forward_mask():
    net = small_conv4(hidden=5)
    sparsity.prune_by_magnitude(net, 0.3)
    sparsity.prune_channels(net, "features.0.0", [1, 3])
    layers = [name.removesuffix(".weight") for name in sparsity.prunable(net)]
    install_power(net, 2.0, layers)
    small, small_masks = shrink(net, sparsity.masks_of(net))
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    assert installed_alpha(small) == 2.0 and all(power_of(small.get_submodule(n)) for n in layers)
    keep0 = torch.tensor([0, 2, 4])
    phi = sparsity.stored(net, "features.0.0.weight")
    assert torch.equal(sparsity.stored(small, "features.0.0.weight"), phi[keep0])  # phi, not w
    assert torch.equal(
        small_masks["features.0.0.weight"], sparsity.masks_of(net)["features.0.0.weight"][keep0]
    )
    # The inner loop adapts phi in both to the same outputs.
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    outs = []
    for model, masks in ((net, sparsity.masks_of(net)), (small, small_masks)):
        learner = MAML(model, inner_lr=0.3)
        sparsity.load_masks(learner, {f"net.{n}": m for n, m in masks.items() if not bool(m.all())})
        with learner.adapt(x, y, 2, False) as fnet:
            outs.append(fnet(x).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    topkast = small_conv4()
    sparsity.prune_channels(topkast, "features.0.0", [1])
    mask = torch.ones_like(topkast.head.weight)
    mask[0] = 0
    parametrize.register_parametrization(topkast.head, "weight", sparsity.ForwardMask(mask))
    with pytest.raises(ConfigError, match="head.weight carries ForwardMask"):
        shrink(topkast)
