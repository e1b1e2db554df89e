"""Channel groups (torch-pruning's dependency graph) and the physical shrink on any graph: which
output channels go together in residual nets, channels pruned as whole groups and held at zero,
shrunk nets computing what the masked ones do, and the Conv4 shrink unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lthmaml import sparsity
from lthmaml.errors import ConfigError
from lthmaml.meta import MAML
from lthmaml.nets.models import MLP, Conv4
from lthmaml.nets.resnet import ResNet12, ResNet18
from lthmaml.nets.shrink import removed_channels, shrink

STOCK = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


# ---------------------------------------------------------------------------------- nets
def pruned_conv4(out_features=3) -> Conv4:
    """5 filters a block; channels pruned in both blocks, unstructured zeros everywhere, BatchNorm
    parameters away from their defaults (so a wrongly kept shift would show)."""
    torch.manual_seed(0)
    net = Conv4(out_features=out_features, hidden_channels=5, image_size=8, blocks=2)
    with torch.no_grad():
        for block in net.features:
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.5, 0.5)
    sparsity.prune_by_magnitude(net, 0.3)
    sparsity.prune_channels(net, "features.0.0", [1, 3])
    sparsity.prune_channels(net, "features.1.0", [0, 4])
    return net


def conv4_shrink_by_hand(net: Conv4, masks: dict) -> tuple[Conv4, dict]:
    """The Conv4-only shrink this library had before channel groups, as the reference: a fresh
    Conv4 of the kept widths, each kept slice copied in (the head by flattened positions)."""
    keeps = [(~removed_channels(block[1])).nonzero().flatten() for block in net.features]
    small = Conv4(**{**net.architecture, "hidden_channels": [len(k) for k in keeps]}).train(net.training)
    source = dict(net.named_parameters())
    state, cut = {}, {}

    def take(name, select):
        state[name] = select(source[name].detach())
        if name in masks:
            cut[name] = select(masks[name])

    keep_in = torch.arange(net.in_channels)
    for index, keep in enumerate(keeps):
        take(f"features.{index}.0.weight", lambda t, keep=keep, keep_in=keep_in: t[keep][:, keep_in])
        for name in (f"features.{index}.0.bias", f"features.{index}.1.weight", f"features.{index}.1.bias"):
            take(name, lambda t, keep=keep: t[keep])
        keep_in = keep
    if net.head is not None:
        positions = net.head.in_features // net.features[-1][0].out_channels
        columns = (keep_in[:, None] * positions + torch.arange(positions)).flatten()
        take("head.weight", lambda t: t[:, columns])
        take("head.bias", lambda t: t)
    small.load_state_dict(state)
    return small, {name: mask for name, mask in cut.items() if not bool(mask.all())}


# ---------------------------------------------------------------------------------- Conv4
@pytest.mark.parametrize("out_features", [3, None])
def test_conv4_shrinks_exactly_as_before(out_features):
    net = pruned_conv4(out_features)
    masks = sparsity.masks_of(net)
    expected, expected_masks = conv4_shrink_by_hand(net, masks)
    small, small_masks = shrink(net, masks)
    assert type(small) is Conv4 and repr(small) == repr(expected)
    assert small.architecture == expected.architecture and small.architecture["hidden_channels"] == [3, 3]
    assert small.embedding_features == expected.embedding_features
    assert small.training == expected.training and not hasattr(small, "masks")
    assert small.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(small.state_dict()[name], tensor), name
    assert small_masks.keys() == expected_masks.keys() and small_masks
    for name, mask in expected_masks.items():
        assert torch.equal(small_masks[name], mask), name
    x = torch.rand(7, 1, 8, 8)
    assert torch.equal(small(x), expected(x))
    if out_features is None:  # an embedding loses coordinates that are always 0: distances stay
        torch.testing.assert_close(
            torch.cdist(small(x), small(x)), torch.cdist(net(x), net(x)), rtol=0, atol=1e-5
        )
    else:
        torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)


def test_conv4_channel_groups_are_its_convs_and_the_engine_masks_what_it_did_before():
    net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    groups = sparsity.channel_groups(net)
    assert list(groups) == ["features.0.0", "features.1.0"]
    assert groups["features.0.0"] == sparsity.ChannelGroup(
        name="features.0.0",
        width=4,
        convs=("features.0.0",),
        batchnorms=("features.0.1",),
        bare=(),
        parameters=("features.0.0.weight", "features.0.0.bias", "features.0.1.weight", "features.0.1.bias"),
    )
    sparsity.prune_channels(net, "features.0.0", [1, 3])  # the conv's filters and bias, its BatchNorm's
    assert sorted(net.masks) == sorted(groups["features.0.0"].parameters)
    assert sparsity.alive_channels(net, "features.0.0").tolist() == [True, False, True, False]


# ---------------------------------------------------------------------------------- residual nets
def resnet12(out_features=5, widths=(4, 6, 8, 10)) -> ResNet12:
    torch.manual_seed(0)
    return ResNet12(out_features, in_channels=1, widths=widths, image_size=16)


def resnet18(out_features=5) -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(out_features, in_channels=3, width=4, image_size=8)


def test_resnet12_groups_couple_each_stage_output_with_its_skip_path():
    groups = sparsity.channel_groups(resnet12())
    assert len(groups) == 12  # conv1, conv2 and (conv3 + projection) in each of four stages
    for index, width in enumerate((4, 6, 8, 10)):
        stage = f"stages.{index}"
        for conv in ("conv1", "conv2"):
            assert groups[f"{stage}.{conv}"].convs == (f"{stage}.{conv}",)
            assert groups[f"{stage}.{conv}"].batchnorms == (f"{stage}.bn{conv[-1]}",)
        out = groups[f"{stage}.conv3"]  # the sum of the main path and the skip path
        assert out.width == width and out.bare == ()
        assert out.convs == (f"{stage}.conv3", f"{stage}.shortcut.0")
        assert out.batchnorms == (f"{stage}.bn3", f"{stage}.shortcut.1")
    # Found from either conv, named as in the learner holding the net.
    learner = MAML(resnet12())
    assert sparsity.group_of(learner, "net.stages.1.shortcut.0").name == "net.stages.1.conv3"
    assert "net.stages.1.conv3" not in sparsity.channel_groups(learner, exclude=["net.stages.1.shortcut.0"])
    with pytest.raises(ConfigError, match="'net.stages.1.bn3' is not a conv layer"):
        sparsity.group_of(learner, "net.stages.1.bn3")


def test_resnet18_groups_carry_each_stage_through_its_identity_shortcuts():
    groups = sparsity.channel_groups(resnet18())
    assert len(groups) == 12  # the stem's, 8 first convs, and one per stage after the first
    # The stem's map is added back by both identity shortcuts of the first stage.
    assert groups["stem.0"].convs == ("stem.0", "layers.0.conv2", "layers.1.conv2")
    assert groups["stem.0"].batchnorms == ("stem.1", "layers.0.bn2", "layers.1.bn2")
    for first, second, width in ((2, 3, 8), (4, 5, 16), (6, 7, 32)):
        group = groups[f"layers.{first}.conv2"]
        assert group.width == width
        assert group.convs == (
            f"layers.{first}.conv2",
            f"layers.{first}.shortcut.0",
            f"layers.{second}.conv2",
        )
    assert all(groups[f"layers.{i}.conv1"].convs == (f"layers.{i}.conv1",) for i in range(8))


def stage_outputs(net: ResNet12, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    handles = [stage.register_forward_hook(lambda m, i, out: outs.append(out)) for stage in net.stages]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return outs


def test_pruning_a_channel_zeroes_it_on_the_main_and_the_skip_path():
    net = resnet12()
    sparsity.prune_channels(net, "stages.1.shortcut.0", [0, 4])
    group = sparsity.group_of(net, "stages.1.conv3")
    assert sorted(net.masks) == sorted(group.parameters)
    for name in group.parameters:
        mask = net.masks[name]
        assert torch.all(mask[[0, 4]] == 0) and torch.all(mask[[1, 2, 3, 5]] == 1), name
    assert sparsity.alive_channels(net, "stages.1.conv3").tolist() == [False, True, True, True, False, True]
    for train in (True, False):
        outs = stage_outputs(net.train(train), torch.rand(4, 1, 16, 16))
        assert torch.all(outs[1][:, [0, 4]] == 0) and outs[1][:, [1, 2, 3, 5]].abs().sum() > 0


def prune_some(net: nn.Module, channels: dict[str, list[int]]) -> dict:
    """Channels of several groups, unstructured zeros everywhere, BatchNorms away from defaults."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    sparsity.prune_by_magnitude(net, 0.3)
    for conv, removed in channels.items():
        sparsity.prune_channels(net, conv, removed)
    return sparsity.masks_of(net)


RESNET12_CUTS = {
    "stages.0.conv1": [1],
    "stages.0.conv3": [0, 2],
    "stages.2.conv2": [3],
    "stages.3.conv3": [1, 9],
}
RESNET18_CUTS = {"stem.0": [1], "layers.3.conv1": [0, 5], "layers.4.conv2": [2, 3, 7], "layers.6.conv2": [0]}


@pytest.mark.parametrize(
    ("make", "cuts", "shape"),
    [(resnet12, RESNET12_CUTS, (6, 1, 16, 16)), (resnet18, RESNET18_CUTS, (6, 3, 8, 8))],
)
def test_a_shrunk_residual_net_computes_what_the_masked_one_does(make, cuts, shape):
    net = make()
    masks = prune_some(net, cuts)
    x = torch.rand(*shape)
    with torch.no_grad():  # running statistics (ResNet-18 keeps them) away from their start
        for _ in range(3):
            net.train()(torch.rand(*shape))
    small, small_masks = shrink(net, masks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
    widths = {name: group.width for name, group in sparsity.channel_groups(net).items()}
    small_widths = {name: group.width for name, group in sparsity.channel_groups(small).items()}
    assert small_widths == {name: width - len(cuts.get(name, [])) for name, width in widths.items()}
    assert all(
        type(m) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear) for m in small.modules() if isinstance(m, STOCK)
    )
    for train in (True, False):  # BatchNorm on the batch's statistics, and on the running ones
        torch.testing.assert_close(small.train(train)(x), net.train(train)(x), rtol=0, atol=1e-5)
    assert small.embedding_features == small.head.in_features and not hasattr(small, "architecture")
    # The unstructured zeros survive beside the kept weights, stored as zero where the masks say.
    assert small_masks and all(int((mask == 0).sum()) > 0 for mask in small_masks.values())
    for name, mask in small_masks.items():
        assert mask.shape == sparsity.weight(small, name).shape
        assert torch.all(sparsity.weight(small, name)[mask == 0] == 0), name


def test_a_shrunk_residual_embedding_keeps_every_distance_and_adapts_the_same():
    net = resnet12(out_features=None)
    masks = prune_some(net, RESNET12_CUTS)
    small, small_masks = shrink(net, masks)
    x = torch.rand(6, 1, 16, 16)
    assert small.embedding_features == 8 == small(x).shape[1]  # 10 channels, 2 always 0 removed
    torch.testing.assert_close(
        torch.cdist(small(x), small(x)), torch.cdist(net(x), net(x)), rtol=0, atol=1e-5
    )
    # A head on top, adapted by MAML's inner loop with the masks beside: the same outputs.
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    outs = []
    for body, body_masks in ((net, masks), (small, small_masks)):
        learner = MAML(nn.Sequential(body, nn.Linear(body.embedding_features, 3)), inner_lr=0.3)
        nn.init.zeros_(learner.net[1].weight), nn.init.zeros_(learner.net[1].bias)  # the same head
        sparsity.load_masks(learner, {f"net.0.{n}": m for n, m in body_masks.items() if not bool(m.all())})
        with learner.adapt(x, y, 2, False) as adapted:
            outs.append(adapted(x).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


class UserResidual(nn.Module):
    """A user's net: no `in_channels` or `image_size` to read, a stem, one identity residual
    block, a global average and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_a_users_residual_net_is_traced_at_a_default_size_and_shrinks():
    torch.manual_seed(0)
    net = UserResidual()
    assert sparsity.channel_groups(net)["stem.0"].convs == ("stem.0", "conv2")
    prune_some(net, {"conv2": [0, 5], "conv1": [2]})
    small, _ = shrink(net)
    assert small.stem[0].out_channels == small.conv2.out_channels == small.head.in_features == 4
    assert small.conv1.out_channels == 5
    x = torch.rand(5, 1, 12, 12)
    torch.testing.assert_close(small.eval()(x), net.eval()(x), rtol=0, atol=1e-5)


class Flattening(nn.Module):
    """A net whose head reads a flattened map of one size only, and which does not say which."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv, self.bn, self.head = (
            nn.Conv2d(1, 2, 3, padding=1),
            nn.BatchNorm2d(2),
            nn.Linear(features, 3),
        )

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).flatten(1))


def test_a_net_that_does_not_say_its_input_is_traced_at_the_side_it_takes():
    net = Flattening(2 * 16 * 16)
    assert sparsity.channel_groups(net)["conv"].batchnorms == ("bn",)
    assert net.training  # the sides tried leave it as it was
    with pytest.raises(
        ConfigError,
        match=r"Flattening, which takes no \[2, 1, side, side\] input for side in \(8, 16, .*image_size",
    ):
        sparsity.channel_groups(Flattening(301))
    declared = Flattening(2 * 16 * 16)
    declared.in_channels, declared.image_size = 1, 13
    with pytest.raises(ConfigError, match=r"Flattening on a \[2, 1, 13, 13\] input, which failed"):
        sparsity.channel_groups(declared)


def test_shrink_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="shrink removes conv channels, and MLP has no conv layer"):
        shrink(MLP())
    with pytest.raises(ConfigError, match=r"got the learner MAML: pass its \.net"):
        shrink(MAML(resnet12()))
    empty = resnet12()
    sparsity.prune_channels(empty, "stages.2.conv3", list(range(8)))
    with pytest.raises(ConfigError, match="channel group stages.2.conv3 has no channel left"):
        shrink(empty)
