"""Deflated masks (``@maskz``): lossless for every dtype, written only where they pay, a corrupt
stream a one-line error; a file of another format version is refused in one line."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_pruned_exactly, rewrite, stored
from torch import Tensor

from lthmaml import sparsity
from lthmaml.edge.artifact import FORMAT_VERSION, load_artifact
from lthmaml.edge.export import export_net
from lthmaml.edge.maskbits import MASK, MASKZ, pack_mask
from lthmaml.errors import DataError
from lthmaml.nets.models import Conv4

DTYPES = ("float32", "float16", "int8")
LAYER = "features.1.0.weight"
"""30 * 30 * 9 = 8,100 weights: the last packed byte has 4 padding bits; deflated at 85% sparsity."""


def pruned_net(fraction: float = 0.85) -> Conv4:
    """A 2-block Conv4 of 30 filters a block, ``fraction`` of its weights pruned by magnitude."""
    torch.manual_seed(0)
    net = Conv4(out_features=3, hidden_channels=30, image_size=8, blocks=2)
    sparsity.prune_by_magnitude(net, fraction)
    return net


def masks_in(path: Path) -> dict[str, str]:
    """Weight name -> the mask suffix the file stores it under."""
    return {key.split("@")[0]: "@" + key.split("@")[1] for key in stored(path) if "@mask" in key}


def plain(keep: Tensor) -> tuple[str, Tensor]:
    """A writer that never deflates: every mask bit-packed."""
    return MASK, torch.from_numpy(np.packbits(keep.flatten().numpy()))


def inflated(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same tensors with every ``@maskz`` inflated back to ``@mask``."""
    return {
        key.removesuffix("z") if key.endswith(MASKZ) else key: (
            torch.from_numpy(np.frombuffer(zlib.decompress(value.numpy().tobytes()), np.uint8).copy())
            if key.endswith(MASKZ)
            else value
        )
        for key, value in tensors.items()
    }


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", DTYPES)
def test_deflated_masks_round_trip_exactly_for_every_dtype(tmp_path, monkeypatch, dtype):
    net = pruned_net()
    path = export_net(net, tmp_path / "z.safetensors", {}, dtype)
    raw, suffixes = stored(path), masks_in(path)
    assert suffixes[LAYER] == MASKZ and MASK in suffixes.values()  # chosen per layer: small ones stay
    bits = np.packbits((sparsity.masks_of(net)[LAYER].flatten() != 0).numpy())
    assert raw[LAYER + MASKZ].dtype == torch.uint8
    assert raw[LAYER + MASKZ].numpy().tobytes() == zlib.compress(bits.tobytes(), 9)
    monkeypatch.setattr("lthmaml.edge.packing.pack_mask", plain)
    packed = export_net(net, tmp_path / "plain.safetensors", {}, dtype)
    assert set(masks_in(packed).values()) == {MASK}
    assert path.stat().st_size < packed.stat().st_size

    artifact, reference = load_artifact(path), load_artifact(packed)
    assert_pruned_exactly(sparsity.masks_within(net), artifact.net)
    for key, value in reference.net.state_dict().items():
        assert torch.equal(artifact.net.state_dict()[key], value), key
    if dtype == "float32":
        for name in sparsity.prunable(net):
            assert torch.equal(sparsity.weight(artifact.net, name), sparsity.weight(net, name).detach())


def test_masks_that_deflate_does_not_shrink_stay_bit_packed(tmp_path):
    net = pruned_net()
    generator = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(mask.shape, generator=generator) < 0.5
        for name, mask in sparsity.masks_of(net).items()
    }
    sparsity.load_masks(net, {name: mask.float() for name, mask in masks.items()})
    for dtype in DTYPES:
        path = export_net(net, tmp_path / f"{dtype}.safetensors", {}, dtype)
        assert set(masks_in(path)) == set(masks) == set(sparsity.prunable(net))
        assert set(masks_in(path).values()) == {MASK}  # a random half: nothing to gain
        assert_pruned_exactly(sparsity.masks_within(net), load_artifact(path).net)
    assert pack_mask(torch.ones(8, dtype=torch.bool))[0] == MASK  # 1 byte: deflate's overhead loses
    assert pack_mask(torch.zeros(4096, dtype=torch.bool))[0] == MASKZ


# ---------------------------------------------------------------------------------- corrupt streams
def _maskz(change: Callable[[bytes], bytes]) -> Callable[[dict], dict]:
    def edit(tensors: dict) -> dict:
        data = change(tensors[LAYER + MASKZ].numpy().tobytes())
        return {**tensors, LAYER + MASKZ: torch.from_numpy(np.frombuffer(data, np.uint8).copy())}

    return edit


def _bits(change: Callable[[bytes], bytes]) -> Callable[[dict], dict]:
    """A well-formed stream of changed packed bits."""
    return _maskz(lambda data: zlib.compress(change(zlib.decompress(data)), 9))


BAD_MASKZ: dict[str, Callable[[dict], dict]] = {
    "not_zlib": _maskz(lambda data: b"not a zlib stream at all"),
    "cut": _maskz(lambda data: data[:-5]),
    "padded": _maskz(lambda data: data + b"\x00"),
    "one_byte_short": _bits(lambda bits: bits[:-1]),
    "far_too_long": _bits(lambda bits: bits + bytes(10**7)),  # inflation stops one byte past the mask
    "pad_bits_set": _bits(lambda bits: bits[:-1] + bytes([bits[-1] | 1])),
    "not_uint8": lambda t: {**t, LAYER + MASKZ: t[LAYER + MASKZ].float()},
    "beside_a_mask": lambda t: {**t, LAYER + MASK: inflated(t)[LAYER + MASK]},
}


@pytest.mark.parametrize("case", sorted(BAD_MASKZ))
def test_a_corrupt_deflated_mask_is_a_one_line_data_error_naming_file_and_tensor(tmp_path, case):
    good = export_net(pruned_net(), tmp_path / "good.safetensors", {}, "int8")
    bad = rewrite(good, tmp_path / f"{case}.safetensors", tensors=BAD_MASKZ[case])
    with pytest.raises(DataError) as info:
        load_artifact(bad)
    message = str(info.value)
    assert str(bad) in message and LAYER + MASK in message and len(message.splitlines()) == 1
    load_artifact(good)


# ---------------------------------------------------------------------------------- format versions
def test_only_this_format_version_loads_and_others_are_refused_in_one_line(tmp_path):
    """An older file (version 1 held only ``@mask``, version 2 masks only weights, version 3 no
    checksums) is refused
    saying to export it again, a newer one saying to update lthmaml: nothing is read in a format
    this reader was not written for."""
    assert FORMAT_VERSION == 4
    good = export_net(pruned_net(), tmp_path / "good.safetensors", {})
    assert load_artifact(good).metadata.format_version == FORMAT_VERSION
    newer = rewrite(good, tmp_path / "v5.safetensors", metadata=lambda m: {**m, "format_version": 5})
    with pytest.raises(DataError) as info:
        load_artifact(newer)
    message = str(info.value)
    assert str(newer) in message and "version 5 is newer" in message and "update lthmaml" in message
    assert len(message.splitlines()) == 1
    for version in (1, 2, 3, 0, "4", True, 4.0, None):
        bad = rewrite(
            good, tmp_path / "bad.safetensors", metadata=lambda m, v=version: {**m, "format_version": v}
        )
        with pytest.raises(DataError) as info:
            load_artifact(bad)
        message = str(info.value)
        assert message == (
            f"{bad}: artifact format version {version!r} predates this version's artifact format (4): "
            "export it again with this version's lthmaml-export"
        )
