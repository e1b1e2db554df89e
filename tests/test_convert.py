"""Checkpoints and mask files from when masks lived inside the layers convert once, exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lthmaml import sparsity
from lthmaml.convert import main
from lthmaml.errors import ConfigError
from lthmaml.meta.maml import MAML
from lthmaml.nets import Conv4
from lthmaml.nets.reparam import CHECKPOINT_KEY, install_power


def pruned_maml(powerprop: bool = False) -> MAML:
    torch.manual_seed(0)
    model = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2))
    if powerprop:
        install_power(model, 2.0, ["net.features.0.0", "net.features.1.0", "net.head"])
    sparsity.prune_by_magnitude(model, 0.5)
    sparsity.prune_channels(model, "net.features.0.0", [1, 3])
    return model


def old_layout(model: MAML) -> dict[str, torch.Tensor]:
    """``model``'s state as the mask-aware layers wrote it: ``<layer>.mask`` beside each prunable
    weight, ``channel_mask`` in each BatchNorm, Powerprop's phi under ``<layer>.weight``."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("masks.")}
    old = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original", ".weight")
        old[key] = value
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and value.dim() > 1:
            old[f"{layer}.mask"] = sparsity.masks_of(model, [key])[key]
        if key.endswith(".bias") and layer.endswith(".1"):  # a BatchNorm of the Conv4
            old[f"{layer}.channel_mask"] = sparsity.masks_of(model, [f"{layer}.bias"])[f"{layer}.bias"]
    return old


@pytest.mark.parametrize("powerprop", [False, True])
def test_an_old_checkpoint_converts_to_the_same_masks_and_weights(tmp_path, powerprop):
    model = pruned_maml(powerprop)
    path = tmp_path / "old.ckpt"
    checkpoint = {"state_dict": old_layout(model), "callbacks": {"SET": {"best": {"mask:net.head": 1}}}}
    if powerprop:
        checkpoint[CHECKPOINT_KEY] = {"kind": "power", "alpha": 2.0}
    torch.save(checkpoint, path)

    fresh = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2))
    with pytest.raises(ConfigError, match=r"python -m lthmaml.convert"):
        fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])

    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "old.ckpt.orig").is_file()
    converted = torch.load(path, weights_only=False)
    assert converted["callbacks"]["SET"]["best"] == {"mask:net.head.weight": 1}
    fresh.on_load_checkpoint(converted)
    fresh.load_state_dict(converted["state_dict"])
    assert sorted(fresh.masks) == sorted(model.masks)
    for name in model.masks:
        assert torch.equal(fresh.masks[name], model.masks[name])
    expected, actual = model.state_dict(), fresh.state_dict()
    assert sorted(expected) == sorted(actual)
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    assert main([str(path)]) == 0  # a converted file is left alone
    assert torch.equal(
        torch.load(path, weights_only=False)["state_dict"]["net.head.bias"], model.net.head.bias
    )


def test_an_old_mask_file_is_rekeyed_by_parameter_name(tmp_path):
    path = tmp_path / "mask.safetensors"
    save_file({"net.head": torch.ones(3, 4, dtype=torch.bool)}, str(path), metadata={"lthmaml": "{}"})
    assert main([str(path)]) == 0
    assert list(load_file(str(path))) == ["net.head.weight"]
    model = MAML(Conv4(3, hidden_channels=4, image_size=8, blocks=2))
    with pytest.raises(ConfigError, match=r"keyed by parameter name.*python -m lthmaml.convert"):
        sparsity.load_masks(model, {"net.head": torch.ones(3, 4)})
