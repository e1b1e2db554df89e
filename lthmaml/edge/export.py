"""Exporting a (pruned) net as the compact artifact a device adapts: ``lthmaml-export``.

Export builds the file from a net in memory (:func:`export_net`) or a ``lthmaml`` checkpoint
(:func:`export_checkpoint`) in the format of :mod:`lthmaml.edge.artifact`. It hands the device
plain weights and as few of them as it can:

* the weights the layers compute with are stored (Powerprop's ``phi * |phi| ** (alpha - 1)``
  folded in, :func:`lthmaml.masks.folded`), so the device computes and fine-tunes plain weights;
* a Conv4 with removed channels (BatchNorm scale and shift zero) is physically shrunk first
  (:func:`lthmaml.nets.shrink.shrink`): removed filters cost nothing, not even mask bits;
* the rest is packed by :mod:`lthmaml.edge.packing`: kept values and mask bits, in the dtype asked.

Fine-tuning settings. From a :class:`~lthmaml.meta.maml.MAML` checkpoint: its ``inner_lr``,
``inner_steps`` and ``eval_inner_steps``; learned per-parameter inner learning rates
(``learn_inner_lr``, Meta-SGD) go into ``inner_lrs``, one float per parameter of the *artifact's*
net by name (``features.0.0.weight``), so the device can step each tensor at its own rate. A
:class:`~lthmaml.meta.classifier.Classifier` learned no step size: it gets :data:`CLASSIFIER_DEFAULTS`
(plain SGD at 0.01 for 10 steps, a conservative start to override on the device), and its
``ways`` is its training class count (a new task of another width needs a new head).

``learner`` records which learner the net comes from (the checkpoint's ``_class_path``, or the
module's class): a ProtoNet or MatchingNet artifact is a headless embedding (``ways`` None, one
net for any N) that the device adapts by embedding the support set, no inner loop; MatchingNet's
attention scale (a parameter outside ``net``) goes into ``metric_scale``; a CNP artifact is its
CNPNet (encoder and decoder).

Images: the meta-training DataModule's look and per-channel normalisation (its checkpoint state
under ``image_look``, :class:`~lthmaml.data.datamodule.ImageTasksDataModule`) go into ``look`` and
``normalization``, so the device decodes its photos as meta-training did; a Conv4 without them
gets ``rgb`` for 3 input channels, else ``ink`` (Omniglot's pen strokes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pickle
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import save
from torch import Tensor, nn

from lthmaml.data.images import IMAGE_LOOK
from lthmaml.edge.artifact import (
    AMORTIZED_LEARNERS,
    CHECKPOINT,
    CLASSIFIER_DEFAULTS,
    DTYPES,
    EXPORTER,
    FORMAT_VERSION,
    METADATA_KEY,
    NETS,
    Artifact,
    ArtifactMetadata,
    PathLike,
    build_net,
    checked_metadata,
    dense_size,
    first_line,
    learner_of,
    load_artifact,
    sha256_of,
    sniffed,
)
from lthmaml.edge.packing import pack_tensors
from lthmaml.errors import ConfigError, DataError, LthmamlError
from lthmaml.files import replacing
from lthmaml.masks import folded, load_masks, masks_within, prunable, weight
from lthmaml.nets.models import Conv4
from lthmaml.nets.reparam import PowerTransform, checkpoint_alpha, install_power, reparametrized_layers
from lthmaml.nets.shrink import removed_channels, shrink
from lthmaml.sparsity import sparsity_report

PROG = EXPORTER


# ---------------------------------------------------------------------------- export
PREDATES = "predates this version's checkpoint format"
TRAIN_AGAIN = "train it again with this version, then export it"


def export_net(
    net: nn.Module,
    output: PathLike,
    metadata: Optional[Mapping[str, Any]] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
) -> Path:
    """Write ``net`` (a Conv4, MLP or CNPNet with the masks it keeps, or a LightningModule holding
    one as ``.net`` beside its masks) as a compact artifact at ``output``.

    ``metadata`` gives the :class:`ArtifactMetadata` fields the net cannot tell (``inner_lr``,
    ``source_sha256``, ...); missing fine-tuning settings come from a MAML module's attributes,
    else :data:`CLASSIFIER_DEFAULTS`; ``task`` defaults to classification for a Conv4 and
    regression for an MLP. The fields in :data:`COMPUTED_FIELDS` are always derived from the net.
    ``dtype`` is a :data:`~lthmaml.edge.artifact.DTYPES` name or value (``"int8"`` / ``torch.int8``).
    """
    given = dict(metadata or {})
    unknown = set(given) - {field.name for field in dataclasses.fields(ArtifactMetadata)}
    if unknown:
        raise ConfigError(f"export metadata has unknown fields {sorted(unknown)}")
    module_fields: dict[str, Any] = {}
    masks = masks_within(net)
    if not isinstance(net, tuple(NETS.values())) and isinstance(getattr(net, "net", None), nn.Module):
        module_fields = _module_fields(net)
        masks, own = masks_within(net, "net."), masks_within(net.net)
        if own and (masks.keys() != own.keys() or any(not torch.equal(m, masks[n]) for n, m in own.items())):
            raise ConfigError(
                f"the net keeps masks of its own besides {type(net).__name__}'s (pruned before it was "
                "wrapped?): install them on the learner, "
                "lthmaml.masks.load_masks(model, {'net.' + name: mask})"
            )
        net = net.net
    return _write(net, masks, Path(output), {**module_fields, **given}, dtype)


def export_checkpoint(
    checkpoint: PathLike, output: PathLike, dtype: Union[torch.dtype, str] = torch.float32
) -> Path:
    """Write the net of a LightningCLI checkpoint of :class:`~lthmaml.meta.maml.MAML`,
    :class:`~lthmaml.meta.classifier.Classifier` or a learner of :data:`~lthmaml.edge.artifact.LEARNERS`
    (ProtoNet, MatchingNet, CNP) as a compact artifact at ``output``.

    The net is rebuilt from the checkpoint's ``hyper_parameters['net']`` (class_path/init_args),
    its weights and masks loaded from ``state_dict``; a Powerprop run's transform (alpha from the
    checkpoint's ``weight_transform``) is installed first, so the weights it computes with are
    exported.
    The checkpoint is read with ``torch.load(weights_only=True)``; one that needs full unpickling
    (objects in its hyperparameters) is read as Lightning's own ``load_from_checkpoint`` reads it.
    """
    path = Path(checkpoint)
    data = _read_checkpoint(path)
    hparams = data.get("hyper_parameters") or {}
    state = data.get("state_dict")
    if not isinstance(state, Mapping):
        raise DataError(f"{path}: no state_dict; is it a Lightning checkpoint?")
    net_config = hparams.get("net")
    if not isinstance(net_config, Mapping) or "class_path" not in net_config:
        raise DataError(
            f"{path}: the checkpoint does not record its net's class_path/init_args (it was not written "
            "by the lthmaml CLI); rebuild the net and call lthmaml.edge.export.export_net"
        )
    module = hparams.get("_class_path")
    gone = next((name for name in (module, net_config["class_path"]) if _gone(name)), None)
    if gone is not None:
        raise DataError(f"{path} {PREDATES} (it names {gone}): {TRAIN_AGAIN}")
    try:
        net = build_net(dict(net_config))
    except (DataError, TypeError, ValueError) as error:
        raise DataError(f"{path}: cannot rebuild the net {dict(net_config)}: {error}") from None
    net_state = {key[len("net.") :]: value for key, value in state.items() if key.startswith("net.")}
    masks = {key[len("masks.net.") :]: value for key, value in state.items() if key.startswith("masks.net.")}
    if any(key.endswith((".mask", ".channel_mask")) for key in net_state):
        raise DataError(
            f"{path} {PREDATES} (masks inside its layers; they now ride beside the net): {TRAIN_AGAIN}"
        )
    alpha = checkpoint_alpha(data)
    if alpha is not None:
        install_power(net, alpha, reparametrized_layers(net_state))
    try:
        net.load_state_dict(net_state)
        load_masks(net, masks)
    except (RuntimeError, ConfigError) as error:
        raise DataError(
            f"{path}: state_dict does not fit {net_config['class_path']}: {_first_problem(error)}"
        ) from None
    masks = masks_within(net)
    fields: dict[str, Any] = {"source_sha256": sha256_of(path), "source_module": module}
    fields.update(_image_look(data.values()))
    learner = learner_of(module) or ("maml" if "inner_lr" in hparams else "classifier")
    fields["learner"] = learner
    if learner == "matching":
        if "log_scale" not in state:
            raise DataError(f"{path}: a MatchingNet checkpoint without its log_scale in state_dict")
        fields["metric_scale"] = float(state["log_scale"].detach().exp())
    if learner in AMORTIZED_LEARNERS:
        pass  # adapts in a forward pass: no inner loop to carry, CLASSIFIER_DEFAULTS if fine-tuned
    elif "inner_lr" in hparams:  # meta-trained: its own inner loop is the fine-tuning recipe
        fields.update({key: hparams[key] for key in CLASSIFIER_DEFAULTS if key in hparams})
        rates = [
            state[f"inner_lrs.{i}"] for i in range(len(list(net.parameters()))) if f"inner_lrs.{i}" in state
        ]
        if rates:
            names = [name for name, _ in net.named_parameters()]
            fields["inner_lrs"] = {name: float(rate.detach()) for name, rate in zip(names, rates)}
    else:
        fields["task"] = "classification"  # a supervised Classifier
    return _write(net, masks, Path(output), fields, dtype)


def artifact_from_checkpoint(checkpoint: PathLike) -> Artifact:
    """A ``lthmaml`` checkpoint as an :class:`~lthmaml.edge.artifact.Artifact`, through the export path.

    The checkpoint is exported to a temporary file and loaded back, so the device runs exactly
    what it would run from a shipped artifact (shrunk channels, folded weight transforms).
    """
    with tempfile.TemporaryDirectory(prefix="lthmaml-edge-") as tmp:
        path = export_checkpoint(checkpoint, Path(tmp) / "artifact.safetensors")
        return load_artifact(path)


def _gone(class_path: Any) -> bool:
    """A ``lthmaml`` class path whose module this version does not have: an older checkpoint's."""
    module = str(class_path).rpartition(".")[0]
    if not module.startswith("lthmaml."):
        return False
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # a parent package is gone too
        return True


def _image_look(states: Any) -> dict[str, Any]:
    """The ``look`` and ``normalization`` an image DataModule saved (its checkpoint state under
    :data:`~lthmaml.data.images.IMAGE_LOOK`), or nothing: the net's channels then decide."""
    saved = next((v[IMAGE_LOOK] for v in states if isinstance(v, Mapping) and IMAGE_LOOK in v), None)
    if not isinstance(saved, Mapping):
        return {}
    return {key: saved[key] for key in ("look", "normalization") if saved.get(key) is not None}


def _first_problem(error: BaseException) -> str:
    """The first line of ``error`` that says what is wrong: ``load_state_dict``'s first line is
    only a heading ("Error(s) in loading state_dict for Conv4:"), the missing keys follow it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return first_line(error)


def _module_fields(module: nn.Module) -> dict[str, Any]:
    """Fine-tuning settings of an in-memory LightningModule: its learner (by its class or a base
    class, see :data:`~lthmaml.edge.artifact.LEARNERS`), MAML's inner loop, MatchingNet's scale."""
    cls = type(module)
    fields: dict[str, Any] = {"source_module": f"{cls.__module__}.{cls.__qualname__}"}
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    if callable(getattr(datamodule, "state_dict", None)):
        fields.update(_image_look([datamodule.state_dict()]))
    learner = next(filter(None, (learner_of(kind.__name__) for kind in cls.__mro__)), None)  # subclasses too
    fields["learner"] = learner or ("maml" if hasattr(module, "inner_lr") else "classifier")
    if fields["learner"] == "matching":
        fields["metric_scale"] = float(module.scale.detach())
    if fields["learner"] in AMORTIZED_LEARNERS:
        pass  # adapts in a forward pass: no inner loop to carry
    elif hasattr(module, "inner_lr"):
        fields.update({key: getattr(module, key) for key in CLASSIFIER_DEFAULTS})
        rates = getattr(module, "inner_lrs", None)
        if rates is not None:
            names = [name for name, _ in module.net.named_parameters()]
            fields["inner_lrs"] = {name: float(rate.detach()) for name, rate in zip(names, rates)}
    else:
        fields["task"] = "classification"
    return fields


@torch.no_grad()
def _write(
    net: nn.Module,
    masks: Mapping[str, Tensor],
    output: Path,
    fields: dict[str, Any],
    dtype: Union[torch.dtype, str],
) -> Path:
    dtype_name = dtype if dtype in DTYPES else next((k for k, v in DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise ConfigError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dtype = DTYPES[dtype_name]
    class_path = _class_path(net)
    source_architecture = {"class_path": class_path, "init_args": dict(net.architecture)}
    transforms = {repr(m) for m in net.modules() if isinstance(m, PowerTransform)}
    net = folded(net)
    report = sparsity_report(net)
    shrunk = isinstance(net, Conv4) and any(
        bool(removed_channels(block[1]).any()) for block in net.features if len(block) > 1
    )
    if shrunk:
        net, masks = shrink(net, masks)  # removed channels cost nothing, not even mask bits
    tensors = pack_tensors(net, masks, dtype)
    stored = sum(
        int(masks[name].count_nonzero()) if name in masks else weight(net, name).numel()
        for name in prunable(net)
    )
    names = {name for name, _ in net.named_parameters()}
    if fields.get("inner_lrs") is not None and set(fields["inner_lrs"]) != names:
        raise ConfigError(f"inner_lrs names {sorted(fields['inner_lrs'])} but the net has {sorted(names)}")
    is_conv = isinstance(net, Conv4)
    task = fields.pop("task", "classification" if is_conv else "regression")
    defaults = {
        "task": task,
        "ways": net.out_features if task == "classification" else None,
        **CLASSIFIER_DEFAULTS,
        "look": ("rgb" if net.in_channels == 3 else "ink") if is_conv else None,
    }
    values = {
        **defaults,
        **fields,
        "architecture": {"class_path": class_path, "init_args": dict(net.architecture)},
        "sparsity": report.sparsity,
        "dtype": dtype_name,
        "format_version": FORMAT_VERSION,
        "source_architecture": source_architecture if shrunk else None,
        "weight_transform": "; ".join(sorted(transforms)) or None,
        "prunable_weights": report.total,
        "stored_weights": stored,
    }
    metadata = checked_metadata(values, f"export to {output}")
    data = save(
        tensors, metadata={METADATA_KEY: json.dumps(dataclasses.asdict(metadata), separators=(",", ":"))}
    )
    with replacing(output, "the artifact") as partial:  # never half an artifact under the final name
        partial.write_bytes(data)
    return output


def _class_path(net: nn.Module) -> str:
    for path, cls in NETS.items():
        if type(net) is cls:
            return path
    raise ConfigError(
        f"export supports the nets {sorted(NETS)}, got {type(net).__module__}.{type(net).__qualname__}"
    )


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    kind = sniffed(path)
    if kind != CHECKPOINT:
        artifact = (
            " (an artifact? lthmaml-edge reads it as --model.artifact)" if "safetensors" in kind else ""
        )
        raise DataError(
            f"{path}: not a PyTorch checkpoint but {kind}{artifact}; give the .ckpt that `lthmaml fit` "
            "wrote (runs/<name>/version_N/checkpoints/last.ckpt)"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:  # objects in the hyperparameters: read it as load_from_checkpoint would
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise DataError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from None
    except Exception as error:
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a {type(data).__name__}, not a Lightning checkpoint")
    return data


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write a pruned checkpoint as a compact safetensors artifact for on-device fine-tuning: "
        "kept values plus a bit-packed mask (deflated where smaller), removed channels shrunk away.",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a Lightning checkpoint (.ckpt) written by `lthmaml fit`"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="artifact path (default: CHECKPOINT with .safetensors)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="how values are stored: float16 halves them, int8 quantises the pruned layers' weights per "
        "output channel, the rest float16 (always loaded as float32; default: %(default)s)",
    )
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry: prints the artifact's size and sparsity; 2 with a one-line error."""
    args = build_parser().parse_args(argv)
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    try:
        path = export_checkpoint(args.checkpoint, output, DTYPES[args.dtype])
        artifact = load_artifact(path)  # proves the file reads back, and gives the dense baseline
    except LthmamlError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    meta = artifact.metadata
    size = path.stat().st_size
    dense = dense_size(build_net(meta.source_architecture or meta.architecture))
    print(
        f"wrote {path}: {size:,} bytes ({size / dense:.3f}x the {dense:,}-byte dense float32 file), "
        f"sparsity {meta.sparsity:.1%} ({meta.stored_weights:,} of {meta.prunable_weights:,} weights kept), "
        f"{meta.dtype}, {meta.architecture['class_path'].rsplit('.', 1)[-1]} {meta.architecture['init_args']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
