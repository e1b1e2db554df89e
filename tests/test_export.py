"""The compact artifact: exact round trips (unstructured, channel-shrunk, Powerprop, sinusoid MLP,
float16), the bytes it costs, its metadata, the console script on a real run, and wrong files."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_pruned_exactly, header_metadata, rewrite, stored
from safetensors.torch import save_file
from torch import Tensor, nn

from callbacks.powerprop import Powerprop
from lthmaml import sparsity
from lthmaml.edge import export
from lthmaml.edge.artifact import CLASSIFIER_DEFAULTS, FORMAT_VERSION, METADATA_KEY, dense_size, load_artifact
from lthmaml.edge.export import export_checkpoint, export_net
from lthmaml.edge.export import main as export_main
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP, Conv4
from lthmaml.nets.reparam import CHECKPOINT_KEY, PowerTransform, checkpoint_alpha, installed_alpha
from lthmaml.nets.shrink import shrink

REPO = Path(__file__).resolve().parents[1]
IMAGES = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
POINTS = torch.linspace(-5, 5, 11).unsqueeze(1)
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3}


def conv_net(hidden: int = 4, out_features: int = 3) -> Conv4:
    torch.manual_seed(0)
    return Conv4(out_features=out_features, hidden_channels=hidden, image_size=8, blocks=2)


def prune(model: nn.Module, fraction: float) -> None:
    """Global magnitude pruning of ``fraction`` of all prunable weights, through the engine."""
    masks = sparsity.prune_lowest(sparsity.masks_of(model), sparsity.magnitude_scores(model), fraction)
    sparsity.load_masks(model, masks)


def write_checkpoint(
    path: Path, module: nn.Module, callbacks: Optional[dict] = None, extra: Optional[dict] = None
) -> Path:
    """What LightningCLI's checkpoint holds for an export: hyperparameters with the net's
    class_path/init_args (and MAML's inner loop), the state_dict, the callbacks' states, and
    top-level entries callbacks add (``extra``: Powerprop's ``weight_transform``)."""
    cls = type(module)
    hparams = {
        "_class_path": f"{cls.__module__}.{cls.__qualname__}",
        "net": {
            "class_path": f"lthmaml.nets.models.{type(module.net).__name__}",
            "init_args": module.net.architecture,
        },
    }
    if isinstance(module, MAML):
        hparams.update(
            inner_lr=module.inner_lr,
            inner_steps=module.inner_steps,
            eval_inner_steps=module.eval_inner_steps,
            learn_inner_lr=module.inner_lrs is not None,
        )
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "callbacks": callbacks or {},
            **(extra or {}),
        },
        path,
    )
    return path


def outputs(net: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return net.eval()(x)


def masks_beside(model: nn.Module) -> dict[str, Tensor]:
    """The masks kept for a net, by its own parameter names: a learner's (``net.``) or a bare net's."""
    if isinstance(model, pl.LightningModule):
        return sparsity.masks_within(model, "net.")
    return sparsity.masks_within(model)


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_maml_conv4_with_unstructured_sparsity_round_trips_with_its_metadata(tmp_path, dtype):
    model = MAML(conv_net(), inner_lr=0.3, inner_steps=2, eval_inner_steps=5)
    prune(model, 0.6)
    ckpt = write_checkpoint(tmp_path / "model.ckpt", model)
    path = export_checkpoint(ckpt, tmp_path / "model.safetensors", dtype=dtype)
    artifact = load_artifact(path)

    assert (outputs(artifact.net, IMAGES) - outputs(model.net, IMAGES)).abs().max() <= TOLERANCE[dtype]
    assert not artifact.net.training
    assert_pruned_exactly(masks_beside(model), artifact.net)
    meta = artifact.metadata
    report = sparsity.sparsity_report(model.net)
    assert meta.architecture == {
        "class_path": "lthmaml.nets.models.Conv4",
        "init_args": model.net.architecture,
    }
    assert (meta.task, meta.ways) == ("classification", 3)
    assert (meta.inner_lr, meta.inner_steps, meta.eval_inner_steps) == (0.3, 2, 5)
    assert meta.sparsity == pytest.approx(0.6, abs=1e-3) and meta.sparsity == report.sparsity
    assert meta.source_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta.dtype == str(dtype).removeprefix("torch.") and meta.format_version == FORMAT_VERSION
    assert meta.source_module == "lthmaml.meta.maml.MAML" and meta.inner_lrs is None
    assert (meta.prunable_weights, meta.stored_weights) == (report.total, report.total - report.zeros)
    assert header_metadata(path)["source_sha256"] == meta.source_sha256  # it is in the file header


def test_pruned_layers_store_only_kept_values_and_packed_mask_bits(tmp_path):
    net = conv_net()
    prune(net, 0.7)
    tensors = stored(export_net(net, tmp_path / "a.safetensors", {}))
    masks = sparsity.masks_within(net)
    assert sorted(masks) == sorted(sparsity.prunable(net))  # every layer has pruned weights
    for name, mask in masks.items():
        keep = mask.flatten() != 0
        values, bits = tensors[f"{name}@values"], tensors[f"{name}@mask"]
        assert torch.equal(values, sparsity.weight(net, name).flatten()[keep])
        assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(keep.numel() / 8)
        unpacked = [(int(byte) >> (7 - i)) & 1 for byte in bits for i in range(8)][: keep.numel()]
        assert unpacked == keep.int().tolist()  # most significant bit first, like np.packbits
        assert name not in tensors
    assert torch.equal(tensors["features.0.1.weight"], net.features[0][1].weight)  # BatchNorm: dense
    assert torch.equal(tensors["features.0.0.bias"], net.features[0][0].bias)  # biases too
    assert not any(key.endswith((".mask", "channel_mask", "@maskz")) for key in tensors)
    assert not any(key.startswith("masks.") for key in tensors)  # masks only as bits
    masked = {key.rpartition("@")[0] for key in tensors if "@" in key}
    assert masked == set(masks)  # nothing unpruned carries a mask: all ones are implied


def test_channel_pruned_conv4_is_shrunk_and_computes_the_same(tmp_path):
    model = MAML(conv_net(hidden=8), inner_lr=0.4)
    sparsity.prune_channels(model, "net.features.0.0", [1, 3, 6])
    sparsity.prune_channels(model, "net.features.1.0", [0, 7])
    prune(model, 0.3)  # unstructured sparsity inside the kept channels too
    path = export_checkpoint(
        write_checkpoint(tmp_path / "taylor.ckpt", model), tmp_path / "taylor.safetensors"
    )
    artifact = load_artifact(path)

    assert artifact.net.architecture["hidden_channels"] == [5, 6]
    assert artifact.metadata.architecture["init_args"]["hidden_channels"] == [5, 6]
    assert artifact.metadata.source_architecture["init_args"]["hidden_channels"] == [8, 8]
    count = sum(p.numel() for p in artifact.net.parameters())
    assert count < sum(p.numel() for p in model.net.parameters())
    assert sum(t.numel() for t in stored(path).values() if t.is_floating_point()) < count
    torch.testing.assert_close(outputs(artifact.net, IMAGES), outputs(model.net, IMAGES), rtol=0, atol=1e-6)
    shrunk, shrunk_masks = shrink(model.net, masks_beside(model))
    assert_pruned_exactly(shrunk_masks, artifact.net)
    torch.testing.assert_close(outputs(artifact.net, IMAGES), outputs(shrunk, IMAGES), rtol=0, atol=1e-6)
    assert set(shrunk_masks) <= set(sparsity.prunable(shrunk))  # removed channels' bias and BN: gone
    assert artifact.metadata.sparsity == sparsity.sparsity_report(model.net).sparsity  # of the source
    unshrunk = export_net(conv_net(hidden=8), tmp_path / "dense.safetensors", {})
    assert path.stat().st_size < unshrunk.stat().st_size


def test_powerprop_checkpoint_exports_the_effective_weights(tmp_path):
    model = MAML(conv_net(), inner_lr=0.4)
    callback = Powerprop(alpha=2.0)
    callback.install(model)  # parameters are phi, layers compute phi * |phi|
    prune(model, 0.5)
    assert any(key.endswith("parametrizations.weight.original") for key in model.state_dict())
    ckpt = write_checkpoint(
        tmp_path / "pp.ckpt",
        model,
        {"Powerprop": callback.state_dict()},
        {CHECKPOINT_KEY: {"kind": "power", "alpha": 2.0}},  # what the callback's checkpoint hook writes
    )
    artifact = load_artifact(export_checkpoint(ckpt, tmp_path / "pp.safetensors"))

    assert_pruned_exactly(masks_beside(model), artifact.net)
    for name in sparsity.prunable(model.net):
        loaded = sparsity.weight(artifact.net, name)
        assert torch.equal(loaded, sparsity.weight(model.net, name).detach())  # phi * |phi| folded in
        assert not torch.allclose(loaded, sparsity.stored(model.net, name).detach())  # not the raw phi
    torch.testing.assert_close(outputs(artifact.net, IMAGES), outputs(model.net, IMAGES), rtol=0, atol=1e-6)
    assert artifact.metadata.weight_transform == repr(PowerTransform(2.0))


def test_sinusoid_mlp_round_trips_as_a_regression_artifact(tmp_path):
    torch.manual_seed(0)
    model = MAML(MLP(hidden=(8, 8)), inner_lr=0.01, inner_steps=1, eval_inner_steps=10)
    prune(model, 0.5)
    for dtype in (torch.float32, torch.float16):
        path = export_checkpoint(
            write_checkpoint(tmp_path / "sine.ckpt", model), tmp_path / f"sine_{dtype}.safetensors", dtype
        )
        artifact = load_artifact(path)
        assert isinstance(artifact.net, MLP) and artifact.net.architecture == model.net.architecture
        error = (outputs(artifact.net, POINTS) - outputs(model.net, POINTS)).abs().max()
        assert error <= TOLERANCE[dtype]
        assert_pruned_exactly(masks_beside(model), artifact.net)
        assert (artifact.metadata.task, artifact.metadata.ways) == ("regression", None)
        assert (artifact.metadata.inner_lr, artifact.metadata.eval_inner_steps) == (0.01, 10)


def test_learned_inner_lrs_are_kept_per_parameter_name(tmp_path):
    torch.manual_seed(0)
    model = MAML(MLP(hidden=(8, 8)), inner_lr=0.01, learn_inner_lr=True)
    with torch.no_grad():
        for i, rate in enumerate(model.inner_lrs):
            rate.fill_(0.01 * (i + 1))
    expected = {name: 0.01 * (i + 1) for i, (name, _) in enumerate(model.net.named_parameters())}
    from_ckpt = export_checkpoint(write_checkpoint(tmp_path / "m.ckpt", model), tmp_path / "a.safetensors")
    from_module = export_net(model, tmp_path / "b.safetensors")
    for path in (from_ckpt, from_module):
        rates = load_artifact(path).metadata.inner_lrs
        assert rates.keys() == expected.keys()
        assert all(rates[k] == pytest.approx(v, rel=1e-6) for k, v in expected.items())


def test_a_classifier_checkpoint_gets_the_documented_fine_tuning_defaults(tmp_path):
    model = Classifier(conv_net(out_features=7))
    prune(model, 0.5)
    artifact = load_artifact(
        export_checkpoint(write_checkpoint(tmp_path / "c.ckpt", model), tmp_path / "c.safetensors")
    )
    meta = artifact.metadata
    assert (meta.task, meta.ways, meta.source_module) == (
        "classification",
        7,
        "lthmaml.meta.classifier.Classifier",
    )
    assert (meta.inner_lr, meta.inner_steps, meta.eval_inner_steps) == tuple(CLASSIFIER_DEFAULTS.values())
    torch.testing.assert_close(outputs(artifact.net, IMAGES), outputs(model.net, IMAGES), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- bytes
def test_file_shrinks_with_sparsity_to_a_quarter_of_dense_at_80_percent(tmp_path):
    torch.manual_seed(0)
    net = Conv4(out_features=5, hidden_channels=64, image_size=28)  # the MAML paper's Omniglot net
    dense = dense_size(net)
    sizes = {}
    for fraction in (0.0, 0.5, 0.8, 0.9):  # level=1: pruned up to this fraction of *all* weights
        scores = sparsity.magnitude_scores(net)
        sparsity.load_masks(net, sparsity.prune_lowest(sparsity.masks_of(net), scores, fraction, level=1))
        sizes[fraction] = export_net(net, tmp_path / f"{fraction}.safetensors", {}).stat().st_size
        if fraction == 0.8:
            half = export_net(net, tmp_path / "half.safetensors", {}, torch.float16).stat().st_size
    assert sizes[0.0] < 1.01 * dense  # nothing pruned: dense tensors, no masks
    assert sizes[0.0] > sizes[0.5] > sizes[0.8] > sizes[0.9]
    assert sizes[0.8] <= 0.25 * dense
    assert half <= 0.14 * dense


def test_float16_halves_the_value_bytes_and_keeps_the_mask_bits(tmp_path):
    net = conv_net()
    prune(net, 0.5)
    full = stored(export_net(net, tmp_path / "f32.safetensors", {}))
    half = stored(export_net(net, tmp_path / "f16.safetensors", {}, torch.float16))
    assert full.keys() == half.keys()
    for key, value in full.items():
        if key.endswith("@mask"):
            assert torch.equal(half[key], value)
        else:
            assert half[key].dtype == torch.float16 and value.dtype == torch.float32
            assert half[key].nbytes * 2 == value.nbytes
            assert torch.equal(half[key], value.half())


# ---------------------------------------------------------------------------------- console script
def test_cli_exports_a_real_powerprop_run_and_prints_size_and_sparsity(tmp_path, monkeypatch, capsys):
    from lthmaml.cli import main as lthmaml_main

    monkeypatch.chdir(tmp_path)
    lthmaml_main(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "sinusoid.yaml"),
            "-c",
            str(REPO / "configs/prune/powerprop.yaml"),
        ]
        + ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
        + ["--data.init_args.tasks_per_epoch", "20", "--data.init_args.meta_batch_size", "10"]
        + ["--data.init_args.val_tasks", "10"]
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert export.main([str(last), "-o", "model.safetensors", "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "model.safetensors"
    assert f"{path.stat().st_size:,} bytes" in printed and "sparsity 80.0%" in printed

    source = MAML.load_from_checkpoint(last)  # installs the transform the checkpoint names
    assert installed_alpha(source) == checkpoint_alpha(last) is not None
    artifact = load_artifact(path)
    meta = artifact.metadata
    assert (meta.inner_lr, meta.inner_steps, meta.eval_inner_steps) == (0.01, 1, 10)
    assert meta.sparsity == pytest.approx(0.8, abs=1e-3) and meta.dtype == "float16"
    assert meta.source_sha256 == hashlib.sha256(last.read_bytes()).hexdigest()
    assert (outputs(artifact.net, POINTS) - outputs(source.net, POINTS)).abs().max() <= 1e-3
    assert_pruned_exactly(masks_beside(source), artifact.net)


def test_cli_errors_are_one_line_and_name_the_file(tmp_path, capsys):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint")
    assert export.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lthmaml-export: error:") and str(bad) in err

    model = MAML(conv_net())
    plain = tmp_path / "plain.ckpt"  # a checkpoint without the CLI's net config
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"inner_lr": 0.4}}, plain)
    with pytest.raises(DataError, match="export_net") as info:
        export_checkpoint(plain, tmp_path / "x.safetensors")
    assert str(plain) in str(info.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_export_net_rejects_foreign_nets_and_unknown_metadata(tmp_path):
    with pytest.raises(ConfigError, match="export supports"):
        export_net(nn.Linear(2, 2), tmp_path / "a.safetensors", {})
    with pytest.raises(ConfigError, match="inner_learning_rate"):
        export_net(conv_net(), tmp_path / "a.safetensors", {"inner_learning_rate": 0.1})
    model = MAML(conv_net())
    prune(model.net, 0.5)  # masks the engine keeps on the inner net, which the learner knows nothing of
    with pytest.raises(ConfigError, match="masks of its own"):
        export_net(model, tmp_path / "a.safetensors", {})
    assert not (tmp_path / "a.safetensors").exists()


def test_a_learner_takes_over_the_masks_of_a_net_pruned_before_it_was_wrapped(tmp_path):
    net = conv_net()
    prune(net, 0.5)
    masks = sparsity.masks_within(net)
    model = MAML(net)
    assert not hasattr(model.net, "masks")
    assert {name: mask for name, mask in sparsity.masks_within(model, "net.").items()}.keys() == masks.keys()
    artifact = load_artifact(export_net(model, tmp_path / "a.safetensors", {}))
    assert_pruned_exactly(masks, artifact.net)


# ---------------------------------------------------------------------------------- older files
OLDER = {
    "format_2": lambda meta: {**meta, "format_version": 2},
    "no_learner_field": lambda meta: {k: v for k, v in meta.items() if k != "learner"},
}


@pytest.mark.parametrize("case", sorted(OLDER))
def test_an_artifact_of_an_older_format_is_refused_in_one_line_saying_to_export_it_again(tmp_path, case):
    """Nothing migrates: a file of format 2, or one written before a field this version writes,
    gets one line that names it, says it predates the format and how to get a current one."""
    net = conv_net()
    prune(net, 0.6)
    good = export_net(net, tmp_path / "good.safetensors", {})
    old = rewrite(good, tmp_path / f"{case}.safetensors", metadata=OLDER[case])
    with pytest.raises(DataError) as info:
        load_artifact(old)
    message = str(info.value)
    assert message.startswith(f"{old}: artifact ") and len(message.splitlines()) == 1
    assert "predates this version's" in message
    assert message.endswith("export it again with this version's lthmaml-export")
    assert ("version 2" in message) if case == "format_2" else ("lacks ['learner']" in message)
    load_artifact(good)


@pytest.mark.parametrize("old", ["lthmaml.models.Conv4", "lthmaml.maml.MAML"])
def test_a_checkpoint_naming_a_class_this_version_does_not_have_is_refused_in_one_line(tmp_path, capsys, old):
    """The net and the module lived elsewhere before the package was split into rooms."""
    ckpt = write_checkpoint(tmp_path / "old.ckpt", MAML(conv_net(), inner_lr=0.4))
    data = torch.load(ckpt, weights_only=False)
    if old.endswith("Conv4"):
        data["hyper_parameters"]["net"]["class_path"] = old
    else:
        data["hyper_parameters"]["_class_path"] = old
    torch.save(data, ckpt)
    assert export_main([str(ckpt)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lthmaml-export: error: {ckpt} predates this version's checkpoint format (it names {old}): "
        "train it again with this version, then export it"
    ]
    assert not ckpt.with_suffix(".safetensors").exists()


def test_a_checkpoint_with_masks_inside_its_layers_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint from before masks lay beside the net (``net.<layer>.mask`` buffers, BatchNorm
    ``channel_mask``): lthmaml-export refuses it in one line saying it predates the format."""
    model = MAML(conv_net(), inner_lr=0.4)
    prune(model, 0.5)
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("masks.")}
    for name, mask in sparsity.masks_of(model).items():  # every prunable layer had a mask buffer
        state[name.removesuffix("weight") + "mask"] = mask
    for index in range(2):
        state[f"net.features.{index}.1.channel_mask"] = torch.ones(4)
    ckpt = write_checkpoint(tmp_path / "old.ckpt", model)
    torch.save({**torch.load(ckpt, weights_only=False), "state_dict": state}, ckpt)
    output = tmp_path / "old.safetensors"

    assert export_main([str(ckpt), "-o", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lthmaml-export: error:"), err
    assert f"{ckpt} predates this version's checkpoint format (masks inside its layers" in err
    assert err.endswith("train it again with this version, then export it")
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()


# ---------------------------------------------------------------------------------- wrong files
def _without(key: str) -> Callable[[dict], dict]:
    return lambda tensors: {k: v for k, v in tensors.items() if k != key}


def _with(key: str, value: Tensor) -> Callable[[dict], dict]:
    return lambda tensors: {**tensors, key: value}


def _set_last_bit(bits: Tensor) -> Tensor:
    bits = bits.clone()
    bits[-1] |= 1
    return bits


def _meta(**changes) -> Callable[[dict], dict]:
    return lambda meta: {**meta, **changes}


def _arch(**init_args) -> Callable[[dict], dict]:
    return lambda meta: {
        **meta,
        "architecture": {
            **meta["architecture"],
            "init_args": {**meta["architecture"]["init_args"], **init_args},
        },
    }


WRONG_FILES: dict[str, Callable[[Path, Path], Path]] = {
    "missing": lambda good, bad: bad,
    "not_safetensors": lambda good, bad: (bad.write_text("hello, I am a text file"), bad)[1],
    "empty": lambda good, bad: (bad.write_bytes(b""), bad)[1],
    "truncated": lambda good, bad: (bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2]), bad)[1],
    "no_metadata": lambda good, bad: rewrite(good, bad, metadata=lambda m: None),
    "metadata_not_json": lambda good, bad: (
        save_file(stored(good), str(bad), metadata={METADATA_KEY: "{not json"}),
        bad,
    )[1],
    "metadata_lacks_fields": lambda good, bad: rewrite(
        good, bad, metadata=lambda m: {k: v for k, v in m.items() if k != "inner_lr"}
    ),
    "unknown_format_version": lambda good, bad: rewrite(good, bad, metadata=_meta(format_version=99)),
    "foreign_architecture": lambda good, bad: rewrite(
        good, bad, metadata=_meta(architecture={"class_path": "os.system", "init_args": {}})
    ),
    "wider_architecture": lambda good, bad: rewrite(good, bad, metadata=_arch(hidden_channels=[5, 4])),
    "bad_init_args": lambda good, bad: rewrite(good, bad, metadata=_arch(kernel=3)),
    "missing_tensor": lambda good, bad: rewrite(good, bad, tensors=_without("features.1.1.bias")),
    "missing_mask": lambda good, bad: rewrite(good, bad, tensors=_without("head.weight@mask")),
    "extra_tensor": lambda good, bad: rewrite(good, bad, tensors=_with("features.9.weight", torch.ones(2))),
    "too_few_values": lambda good, bad: rewrite(
        good, bad, tensors=lambda t: {**t, "head.weight@values": t["head.weight@values"][:-1]}
    ),
    "mask_not_bits": lambda good, bad: rewrite(
        good, bad, tensors=lambda t: {**t, "head.weight@mask": t["head.weight@mask"].float()}
    ),
    "mask_pad_bits_set": lambda good, bad: rewrite(  # 36 weights: the last byte's low 4 bits are padding
        good,
        bad,
        tensors=lambda t: {**t, "features.0.0.weight@mask": _set_last_bit(t["features.0.0.weight@mask"])},
    ),
    "nan_values": lambda good, bad: rewrite(
        good, bad, tensors=lambda t: {**t, "head.weight@values": t["head.weight@values"] * float("nan")}
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_FILES))
def test_a_wrong_or_corrupt_artifact_is_a_one_line_data_error_naming_the_file(tmp_path, case):
    net = conv_net()
    prune(net, 0.5)
    good = export_net(net, tmp_path / "good.safetensors", {})
    bad = WRONG_FILES[case](good, tmp_path / f"{case}.safetensors")
    with pytest.raises(DataError) as info:
        load_artifact(bad)
    message = str(info.value)
    assert str(bad) in message and len(message.splitlines()) == 1
    assert "version 99" in message if case == "unknown_format_version" else True
    load_artifact(good)  # the untouched file still loads


def _flipped(good: Path, bad: Path, where: Callable[[bytes], int], count: int = 64) -> Path:
    """A copy of ``good`` with ``count`` bytes inverted from the offset ``where`` picks."""
    data = bytearray(good.read_bytes())
    start = where(bytes(data))
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    bad.write_bytes(bytes(data))
    return bad


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _metadata_digit(data: bytes) -> int:
    """The offset of a digit of the stored sparsity in the JSON header: valid JSON after a flip."""
    return data.index(b'\\"sparsity\\":0.') + len(b'\\"sparsity\\":0.')


@pytest.mark.parametrize(
    ("case", "part"),
    [
        ("weights", "its tensor data does not match the SHA-256 recorded at export"),
        ("metadata", "its metadata does not match the SHA-256 recorded at export"),
        ("no_checksums", "records no valid checksums"),
    ],
)
def test_a_flipped_byte_anywhere_is_refused_in_one_line(tmp_path, capsys, case, part):
    """Shapes and counts cannot tell flipped weight bytes (64 of them, inside the first tensor's
    data), nor a changed digit in the metadata: the checksums recorded at export do."""
    net = conv_net()
    prune(net, 0.5)
    good = export_net(net, tmp_path / "good.safetensors", {})
    bad = tmp_path / f"{case}.safetensors"
    if case == "weights":
        _flipped(good, bad, lambda data: _header_end(data) + 16)
    elif case == "metadata":
        data = good.read_bytes()
        digit = _metadata_digit(data)
        other = b"1" if data[digit : digit + 1] != b"1" else b"2"
        bad.write_bytes(data[:digit] + other + data[digit + 1 :])
    else:
        unsealed = {k: v for k, v in header_metadata(good).items() if k != "sha256"}
        save_file(stored(good), str(bad), metadata={METADATA_KEY: json.dumps(unsealed)})
    with pytest.raises(DataError) as info:
        load_artifact(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and part in message and len(message.splitlines()) == 1
    assert message.endswith("export it again with this version's lthmaml-export")
    load_artifact(good)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_mode_of_any_new_file_not_a_temporary_files_0600(tmp_path, umask, mode):
    """safetensors and Python's temporary files create 0600 files, which a rename keeps: the
    artifact, the predictions, a round's masks and the decode cache get ``0666 & ~umask``."""
    from lthmaml.data.imageset import _write_cache
    from lthmaml.edge.predictions import write_csv

    net = conv_net()
    prune(net, 0.5)
    old = os.umask(umask)
    try:
        export_net(net, tmp_path / "model.safetensors", {})
        write_csv(tmp_path / "predictions.csv", ["file", "label", "probability"], [["a.png", "cat", "0.9"]])
        sparsity.save_masks(tmp_path / "masks.safetensors", sparsity.masks_of(net))
        _write_cache(tmp_path / "cache.pt", "image", {"images": torch.zeros(1, dtype=torch.uint8)})
    finally:
        os.umask(old)
    written = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert written == dict.fromkeys(
        ["model.safetensors", "predictions.csv", "masks.safetensors", "cache.pt"], mode
    )
