"""The int8 artifact: per-output-channel symmetric codes and scales, dequantised on load to float32
with pruned weights exactly zero; the bytes it costs; float32/float16 untouched; bad scales; the CLI."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from lthmaml import sparsity
from lthmaml.edge.artifact import dense_size, load_artifact
from lthmaml.edge.export import export_checkpoint, export_net, main
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import Conv4
from tests.test_export import (
    IMAGES,
    assert_pruned_exactly,
    conv_net,
    masks_beside,
    outputs,
    prune,
    rewrite,
    stored,
    write_checkpoint,
)

OUTPUT_TOLERANCE = 0.05
"""Largest |logit| change of the small test Conv4 from int8 weights (measured: about 0.01)."""


def int8_artifact(tmp_path: Path, fraction: float, name: str = "int8.safetensors") -> tuple[Conv4, Path]:
    """A small Conv4 pruned by magnitude, one of its filters wholly pruned (a row with scale 0)."""
    net = conv_net(hidden=8)
    prune(net, fraction)
    if fraction:
        masks = sparsity.masks_of(net)
        masks["features.1.0.weight"][0] = 0
        sparsity.load_masks(net, masks)
    return net, export_net(net, tmp_path / name, {}, "int8")


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fraction", [0.0, 0.6], ids=["dense", "pruned"])
def test_int8_round_trip_is_within_half_a_step_of_each_output_channel(tmp_path, fraction):
    net, path = int8_artifact(tmp_path, fraction)
    raw = stored(path)
    artifact = load_artifact(path)
    prunable = sparsity.prunable(net)
    assert artifact.metadata.dtype == "int8"
    for name, mask in sparsity.masks_of(net).items():
        source, keep = sparsity.weight(net, name).detach(), mask != 0
        got = sparsity.weight(artifact.net, name).detach()
        scale = raw[f"{name}@scale"]
        assert scale.dtype == torch.float32 and scale.shape == (source.shape[0],)
        torch.testing.assert_close(scale, source.flatten(1).abs().amax(1) / 127, rtol=0, atol=0)
        assert got.shape == source.shape and got.dtype == torch.float32
        assert torch.all((got - source).abs().flatten(1).amax(1) <= scale / 2 * (1 + 1e-6)), name
        assert torch.all(got[~keep] == 0), name
        codes = raw[name if fraction == 0 else f"{name}@values"]
        assert codes.dtype == torch.int8 and codes.numel() == int(keep.sum())
        assert int(codes.abs().max()) == 127  # the channel maximum maps to the full code range
    if fraction:  # the filter with nothing kept: scale 0, loaded as zeros
        assert float(raw["features.1.0.weight@scale"][0]) == 0.0
        assert torch.all(artifact.net.features[1][0].weight[0] == 0)
    assert_pruned_exactly(masks_beside(net), artifact.net)
    others = {k: v for k, v in raw.items() if "@" not in k and k not in prunable}
    assert others and all(v.dtype == torch.float16 for v in others.values())
    assert (outputs(artifact.net, IMAGES) - outputs(net, IMAGES)).abs().max() <= OUTPUT_TOLERANCE


def test_int8_via_checkpoint_keeps_the_metadata_and_torch_int8_means_the_same(tmp_path):
    model = MAML(conv_net(), inner_lr=0.3, inner_steps=2, eval_inner_steps=5)
    prune(model, 0.6)
    ckpt = write_checkpoint(tmp_path / "model.ckpt", model)
    by_name = export_checkpoint(ckpt, tmp_path / "name.safetensors", "int8")
    by_dtype = export_checkpoint(ckpt, tmp_path / "dtype.safetensors", torch.int8)
    assert by_name.read_bytes() == by_dtype.read_bytes()
    meta = load_artifact(by_name).metadata
    assert (meta.dtype, meta.inner_lr, meta.inner_steps, meta.eval_inner_steps) == ("int8", 0.3, 2, 5)


# ---------------------------------------------------------------------------------- bytes
def test_int8_at_80_percent_costs_a_byte_a_kept_weight_plus_deflated_mask_scales_and_header(tmp_path):
    torch.manual_seed(0)
    net = Conv4(out_features=5, hidden_channels=64, image_size=28)  # the MAML paper's Omniglot net
    masks = sparsity.prune_lowest(sparsity.masks_of(net), sparsity.magnitude_scores(net), 0.8, level=1)
    sparsity.load_masks(net, masks)
    dense = dense_size(net)
    path = export_net(net, tmp_path / "int8.safetensors", {}, "int8")
    half = export_net(net, tmp_path / "f16.safetensors", {}, "float16").stat().st_size
    size = path.stat().st_size

    layers = sparsity.prunable(net)
    keeps = [mask.flatten() != 0 for mask in sparsity.masks_of(net, layers).values()]
    packed = [np.packbits(keep.numpy()) for keep in keeps]
    kept = sum(int(keep.sum()) for keep in keeps)
    bits = sum(p.size for p in packed)
    masks = sum(min(p.size, len(zlib.compress(p.tobytes(), 9))) for p in packed)  # per layer, the smaller
    entropy = sum(keep.numel() * _entropy(keep.float().mean().item()) / 8 for keep in keeps)
    rows = sum(sparsity.weight(net, name).shape[0] for name in layers)
    small = sum(p.numel() for n, p in net.named_parameters() if n not in layers)
    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert (kept, bits, rows, small) == (22298, 13936, 261, 773)
    assert masks == sum(t.numel() for k, t in stored(path).items() if "@mask" in k)
    assert size == header + kept + masks + 4 * rows + 2 * small  # nothing else is stored
    assert entropy <= masks <= 0.78 * bits  # deflate: 10,785 bytes, the masks' entropy 9,900
    assert (kept + entropy) / dense <= 0.2 / 4 + _entropy(0.2) / 32 + 1e-3  # the physical limit, 0.072x
    assert header <= 3130 and size / dense <= 0.09  # 0.0855x: the header (3,080 B, look, checksums) 0.006x
    assert size <= 0.67 * half


def _entropy(p: float) -> float:
    """The fewest bits per weight a mask keeping a fraction ``p`` can take (binary entropy)."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def test_float32_and_float16_artifacts_are_unchanged(tmp_path):
    net = conv_net()
    prune(net, 0.5)
    for dtype in (torch.float32, torch.float16):
        name = str(dtype).removeprefix("torch.")
        path = export_net(net, tmp_path / f"{name}.safetensors", {}, dtype)
        assert export_net(net, tmp_path / "by_name.safetensors", {}, name).read_bytes() == path.read_bytes()
        raw = stored(path)
        assert not [key for key in raw if key.endswith("@scale")]
        assert all(v.dtype == dtype for k, v in raw.items() if "@mask" not in k)
        for weight_name, mask in sparsity.masks_within(net).items():
            kept = sparsity.weight(net, weight_name).detach()[mask != 0].to(dtype)
            assert torch.equal(raw[f"{weight_name}@values"], kept)
        assert load_artifact(path).metadata.dtype == name


def test_an_unknown_dtype_or_a_non_finite_weight_is_a_config_error(tmp_path):
    net = conv_net()
    for dtype in ("int4", torch.bfloat16):
        with pytest.raises(ConfigError, match=r"one of \['float16', 'float32', 'int8'\]"):
            export_net(net, tmp_path / "bad.safetensors", {}, dtype)
    with torch.no_grad():
        net.head.weight[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="'head.weight' has non-finite weights"):
        export_net(net, tmp_path / "inf.safetensors", {}, "int8")
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------- wrong scales
def _scale(change: Callable[[Tensor], Tensor]) -> Callable[[dict], dict]:
    return lambda t: {**t, "head.weight@scale": change(t["head.weight@scale"])}


BAD_SCALES = {
    "missing": lambda t: {k: v for k, v in t.items() if k != "head.weight@scale"},
    "negative": _scale(lambda s: -s),
    "nan": _scale(lambda s: s * float("nan")),
    "inf": _scale(lambda s: s / 0),
    "one_short": _scale(lambda s: s[:-1]),
    "integers": _scale(lambda s: s.to(torch.int32)),
}


@pytest.mark.parametrize("case", sorted(BAD_SCALES))
def test_a_missing_or_bad_scale_is_a_one_line_data_error_naming_it(tmp_path, case):
    _, good = int8_artifact(tmp_path, 0.6)
    bad = rewrite(good, tmp_path / f"{case}.safetensors", tensors=BAD_SCALES[case])
    with pytest.raises(DataError) as info:
        load_artifact(bad)
    message = str(info.value)
    assert str(bad) in message and "head.weight@scale" in message and len(message.splitlines()) == 1
    load_artifact(good)


def test_a_scale_beside_float_values_is_a_data_error(tmp_path):
    net = conv_net()
    prune(net, 0.6)
    good = export_net(net, tmp_path / "f32.safetensors", {})
    extra = {"head.weight@scale": torch.ones(net.head.weight.shape[0])}
    bad = rewrite(good, tmp_path / "bad.safetensors", tensors=lambda t: {**t, **extra})
    with pytest.raises(DataError, match=r"\['head.weight@scale'\] are not part of the Conv4"):
        load_artifact(bad)


# ---------------------------------------------------------------------------------- console script
def test_cli_dtype_int8_writes_a_smaller_artifact_that_loads(tmp_path, capsys):
    model = MAML(conv_net(hidden=8), inner_lr=0.3, inner_steps=2, eval_inner_steps=5)
    prune(model, 0.8)
    ckpt = write_checkpoint(tmp_path / "model.ckpt", model)
    paths = {dtype: tmp_path / f"{dtype}.safetensors" for dtype in ("int8", "float16")}
    for dtype, path in paths.items():
        capsys.readouterr()
        assert main([str(ckpt), "-o", str(path), "--dtype", dtype]) == 0
        printed = capsys.readouterr().out
        assert f"{path.stat().st_size:,} bytes" in printed and f", {dtype}, Conv4" in printed
    int8, half = stored(paths["int8"]), stored(paths["float16"])
    values = [key for key in int8 if key.endswith("@values")]
    assert values and all(int8[key].nbytes * 2 == half[key].nbytes for key in values)
    artifact = load_artifact(paths["int8"])
    assert artifact.metadata.dtype == "int8" and artifact.metadata.sparsity == pytest.approx(0.8, abs=0.01)
    error: Tensor = (outputs(artifact.net, IMAGES) - outputs(model.net, IMAGES)).abs().max()
    assert error <= OUTPUT_TOLERANCE
    assert_pruned_exactly(masks_beside(model), artifact.net)
