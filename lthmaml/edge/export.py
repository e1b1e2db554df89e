"""Exporting a (pruned) net as the compact artifact a device adapts: ``lthmaml-export``.

Export builds the file from a net in memory (:func:`export_net`) or a ``lthmaml`` checkpoint
(:func:`export_checkpoint`) in the format of :mod:`lthmaml.edge.artifact`. It hands the device
plain weights and as few of them as it can:

* the weights the layers compute with are stored (Powerprop's ``phi * |phi| ** (alpha - 1)``
  folded in, :func:`lthmaml.masks.folded`), so the device computes and fine-tunes plain weights;
* a net with removed channels (BatchNorm scale and shift zero) is physically shrunk first
  (:func:`lthmaml.nets.shrink.shrink`): removed filters cost nothing, not even mask bits. A Conv4's
  shrunk shape is a constructor argument (``hidden_channels``); a residual net's is not, so its
  architecture keeps the source's ``init_args`` and adds the width of each channel group, to
  which the loader cuts the net it builds (:func:`lthmaml.edge.artifact.build_net`);
* the rest is packed by :mod:`lthmaml.edge.packing`: kept values and mask bits, in the dtype asked.

Which nets: the safetensors artifact holds the nets of :data:`~lthmaml.edge.artifact.NETS`, which
the device rebuilds by name (Conv4, MLP, CNPNet, ResNet12, ResNet18). A checkpoint of a net of the
user's own exports with ``--format onnx`` only: its class is imported here, on the server, by the
class path the checkpoint names (as Lightning's ``load_from_checkpoint`` would), and the ONNX
graph traced from that net carries it to the device, which needs no Python class for it
(:func:`lthmaml.edge.onnx_export.export_onnx`); the safetensors format refuses it in one line.

The file records the SHA-256 of its tensor data and of its metadata, which every load checks
(:func:`lthmaml.edge.artifact.sealed`). ``--format onnx`` also writes, from the artifact as loaded,
the graphs ``lthmaml-device`` runs without torch (:mod:`lthmaml.edge.onnx_export`).

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
``normalization``, so the device decodes its photos as meta-training did; an image net without
them gets ``rgb`` for 3 input channels, else ``ink`` (Omniglot's pen strokes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import pickle
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lthmaml.data.images import IMAGE_LOOK, model_look
from lthmaml.edge.artifact import (
    AMORTIZED_LEARNERS,
    CHECKPOINT,
    CLASSIFIER_DEFAULTS,
    DTYPES,
    EXPORTER,
    FORMAT_VERSION,
    METRIC_LEARNERS,
    NETS,
    Artifact,
    ArtifactMetadata,
    PathLike,
    build_net,
    channel_widths,
    checked_metadata,
    dense_size,
    first_line,
    image_input,
    learner_of,
    load_artifact,
    sealed,
    sha256_of,
    sniffed,
)
from lthmaml.edge.packing import pack_tensors, unpack_tensors
from lthmaml.errors import ConfigError, DataError, LthmamlError
from lthmaml.files import replacing
from lthmaml.masks import folded, load_masks, masks_within, prunable, weight
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
    """Write ``net`` (a net of :data:`~lthmaml.edge.artifact.NETS` with the masks it keeps, or a
    LightningModule holding one as ``.net`` beside its masks) as a compact artifact at ``output``.

    ``metadata`` gives the :class:`ArtifactMetadata` fields the net cannot tell (``inner_lr``,
    ``source_sha256``, ...); missing fine-tuning settings come from a MAML module's attributes,
    else :data:`CLASSIFIER_DEFAULTS`; ``task`` defaults to classification for an image net and
    regression for an MLP. The fields in :data:`COMPUTED_FIELDS` are always derived from the net;
    a residual net already shrunk (a loaded artifact's) needs the ``source_architecture`` it was
    cut from (its metadata's). ``dtype`` is a :data:`~lthmaml.edge.artifact.DTYPES` name or value
    (``"int8"`` / ``torch.int8``).
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
    exported. A net not of :data:`~lthmaml.edge.artifact.NETS` is a one-line DataError saying to
    export it with ``--format onnx``.
    The checkpoint is read with ``torch.load(weights_only=True)``; one that needs full unpickling
    (objects in its hyperparameters) is read as Lightning's own ``load_from_checkpoint`` reads it.
    """
    path = Path(checkpoint)
    source = _checkpoint_source(path, own_nets=False)
    return _write(source.net, source.masks, Path(output), source.fields, dtype)


def graph_artifact(checkpoint: PathLike, dtype: Union[torch.dtype, str] = torch.float32) -> Artifact:
    """The checkpoint of a net of the user's own (any ``nn.Module`` class its ``hyper_parameters['net']``
    names, imported here) as an in-memory :class:`~lthmaml.edge.artifact.Artifact` for
    :func:`lthmaml.edge.onnx_export.export_onnx`: its own net with the values a safetensors
    artifact of ``dtype`` would hold, folded, shrunk where channels were removed, masks beside it,
    pruned weights exactly 0, and the metadata such an artifact would carry (its ``architecture``
    the checkpoint's class path and init_args, which the device never builds). A net of
    :data:`~lthmaml.edge.artifact.NETS` comes out as its artifact would load.

    The device feeds it images: the net must say which (an ``image_size`` attribute, and
    ``in_channels`` unless its first conv tells), else a ConfigError.
    """
    path = Path(checkpoint)
    source = _checkpoint_source(path, own_nets=True)
    return _graph_artifact(source, path, dtype)


@dataclass
class _Source:
    """A checkpoint's net, as it computes (Powerprop installed), its masks by parameter name, the
    metadata fields the checkpoint tells, and for a net of the user's own its class path and
    init_args (None for a net of :data:`~lthmaml.edge.artifact.NETS`)."""

    net: nn.Module
    masks: dict[str, Tensor]
    fields: dict[str, Any]
    own: Optional[dict[str, Any]]


def _checkpoint_source(path: Path, own_nets: bool) -> _Source:
    """Read the checkpoint at ``path``; a net of the user's own is imported only if ``own_nets``
    (the ONNX export), else it is a one-line DataError naming ``--format onnx``."""
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
    own: Optional[dict[str, Any]] = None
    if net_config["class_path"] in NETS:
        try:
            net = build_net(dict(net_config))
        except (DataError, TypeError, ValueError) as error:
            raise DataError(f"{path}: cannot rebuild the net {dict(net_config)}: {error}") from None
    elif own_nets:
        net = _own_net(path, net_config)
        init_args = dict(net_config.get("init_args") or {})
        own = {"class_path": str(net_config["class_path"]), "init_args": init_args}
    else:
        names = ", ".join(sorted(name.rsplit(".", 1)[-1] for name in NETS))
        raise DataError(
            f"{path}: its net {net_config['class_path']} is not one of lthmaml's nets ({names}), which "
            f"the safetensors artifact rebuilds on the device: export it as an ONNX graph, "
            f"`{EXPORTER} {path} --format onnx`, and run it with lthmaml-device"
        )
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
    if learner == "protonet":
        fields["distance"] = hparams.get("distance", "squared")
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
    return _Source(net, masks, fields, own)


def _own_net(path: Path, config: Mapping[str, Any]) -> nn.Module:
    """The net of the user's own a checkpoint names, imported by its class path and built from its
    init_args (fresh weights, RNG untouched); a one-line DataError if that fails."""
    class_path = str(config["class_path"])
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise DataError(
            f"{path}: cannot import its net {class_path} ({first_line(error)}): export it where the code "
            "that trained it is importable"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DataError(f"{path}: its net {class_path} is not an nn.Module class")
    init_args = config.get("init_args") or {}
    try:
        with torch.random.fork_rng(devices=[]):
            return cls(**init_args)
    except Exception as error:  # the user's constructor: whatever it raises, one line
        raise DataError(
            f"{path}: cannot build its net {class_path}({init_args}): {first_line(error)}"
        ) from None


def _graph_artifact(source: _Source, path: Path, dtype: Union[torch.dtype, str]) -> Artifact:
    """:func:`graph_artifact` of a checkpoint read (``path``: its file)."""
    net, fields = source.net, source.fields
    what = f"{path}: its net {source.own['class_path'] if source.own else type(net).__name__}"
    image = image_input(net)
    if image is None:
        raise ConfigError(
            f"{what} must say the images lthmaml-device feeds it: give it an `image_size` attribute "
            "(and `in_channels` unless its first layer is a conv)"
        )
    if fields.get("learner") == "cnp":
        raise ConfigError(f"{what}: a CNP travels with lthmaml's CNPNet, not a net of its own")
    try:
        model_look(fields.get("look"), fields.get("normalization"), image[0])
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    stored = _stored(net, source.masks, fields, dtype, str(path), source.own)
    unpack_tensors(stored.net, stored.tensors, path)  # the values a device reads back, masks beside
    return Artifact(stored.net.eval(), stored.metadata, path)


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
    if fields["learner"] == "protonet":
        fields["distance"] = module.distance
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


@dataclass
class _Stored:
    """What an export stores: the net (folded, shrunk where it can be), its packed tensors, the
    metadata."""

    net: nn.Module
    tensors: dict[str, Tensor]
    metadata: ArtifactMetadata


def _write(
    net: nn.Module,
    masks: Mapping[str, Tensor],
    output: Path,
    fields: dict[str, Any],
    dtype: Union[torch.dtype, str],
) -> Path:
    stored = _stored(net, masks, fields, dtype, f"export to {output}")
    data = sealed(stored.tensors, dataclasses.asdict(stored.metadata))
    with replacing(output, "the artifact") as partial:  # never half an artifact under the final name
        partial.write_bytes(data)
    return output


@torch.no_grad()
def _stored(
    net: nn.Module,
    masks: Mapping[str, Tensor],
    fields: dict[str, Any],
    dtype: Union[torch.dtype, str],
    where: str,
    own: Optional[dict[str, Any]] = None,
) -> _Stored:
    """The tensors and metadata of ``net`` (a net of NETS; or, with ``own``, its class path and
    init_args, a net of the user's own, which is not rebuilt from them)."""
    dtype_name = dtype if dtype in DTYPES else next((k for k, v in DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise ConfigError(f"export dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dtype = DTYPES[dtype_name]
    fields = dict(fields)
    carried = fields.pop("source_architecture", None)
    class_path = own["class_path"] if own else _class_path(net)
    if carried is not None and (not isinstance(carried, Mapping) or carried.get("class_path") != class_path):
        raise ConfigError(f"{where}: metadata source_architecture must be a {class_path}'s, got {carried!r}")
    source = own or _source_architecture(net, class_path, carried, where)
    transforms = {repr(m) for m in net.modules() if isinstance(m, PowerTransform)}
    image = image_input(net)
    net = folded(net)
    report = sparsity_report(net)
    shrunk = False
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if any(bool(removed_channels(m).any()) for m in norms):
        cut, cut_masks = shrink(net, masks)  # removed channels cost nothing, not even mask bits
        if _weights(cut) < _weights(net):
            net, masks, shrunk = cut, cut_masks, True
    if not own and hasattr(net, "architecture"):  # its constructor gives its shape
        architecture = {"class_path": class_path, "init_args": dict(net.architecture)}
    elif shrunk or not own:  # cut narrower than any constructor argument gives: the widths too
        architecture = {**source, "channels": channel_widths(net)}
    else:
        architecture = dict(source)
    if not own:
        _check_rebuilds(net, architecture, where)
    tensors = pack_tensors(net, masks, dtype)
    stored = sum(
        int(masks[name].count_nonzero()) if name in masks else weight(net, name).numel()
        for name in prunable(net)
    )
    names = {name for name, _ in net.named_parameters()}
    if fields.get("inner_lrs") is not None and set(fields["inner_lrs"]) != names:
        raise ConfigError(f"inner_lrs names {sorted(fields['inner_lrs'])} but the net has {sorted(names)}")
    task = fields.pop("task", "classification" if image else "regression")
    defaults = {
        "task": task,
        "ways": _ways(net, task, fields.get("learner", "maml"), image, own is not None),
        **CLASSIFIER_DEFAULTS,
        "look": ("rgb" if image[0] == 3 else "ink") if image else None,
    }
    values = {
        **defaults,
        **fields,
        "architecture": architecture,
        "sparsity": report.sparsity,
        "dtype": dtype_name,
        "format_version": FORMAT_VERSION,
        "source_architecture": source if shrunk else carried,
        "weight_transform": "; ".join(sorted(transforms)) or None,
        "prunable_weights": report.total,
        "stored_weights": stored,
    }
    return _Stored(net, tensors, checked_metadata(values, where))


def _source_architecture(net: nn.Module, class_path: str, carried: Any, where: str) -> dict[str, Any]:
    """The architecture ``net`` (a net of NETS) is, or was shrunk from: its ``architecture``
    attribute, else (a residual net :func:`~lthmaml.nets.shrink.shrink` cut, which has none) the
    ``source_architecture`` carried with it, as a loaded artifact's metadata gives it."""
    if hasattr(net, "architecture"):
        return {"class_path": class_path, "init_args": dict(net.architecture)}
    if carried is None:
        raise ConfigError(
            f"{where}: the {type(net).__name__} was shrunk (lthmaml.nets.shrink), and its narrower layers "
            "are no constructor arguments: export the net before shrinking (its masks mark the removed "
            f"channels), or give metadata source_architecture, the {class_path} it was shrunk from"
        )
    return {"class_path": class_path, "init_args": dict(carried.get("init_args") or {})}


def _check_rebuilds(net: nn.Module, architecture: Mapping[str, Any], where: str) -> None:
    """The device's :func:`~lthmaml.edge.artifact.build_net` gives ``net``'s shape: the same tensor
    names and shapes (a ConfigError naming the first that differs otherwise)."""
    try:
        rebuilt = build_net(architecture).state_dict()
    except (LthmamlError, TypeError, ValueError) as error:
        raise ConfigError(f"{where}: the architecture {dict(architecture)} does not build: {error}") from None
    shapes = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    differ = sorted(set(shapes) ^ set(rebuilt)) or [k for k in shapes if tuple(rebuilt[k].shape) != shapes[k]]
    if differ:
        raise ConfigError(
            f"{where}: the architecture {dict(architecture)} does not rebuild the net ({differ[0]} differs)"
        )


def _weights(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _ways(
    net: nn.Module, task: str, learner: str, image: Optional[tuple[int, int]], own: bool
) -> Optional[int]:
    """The classes the net's head predicts: its ``out_features`` (lthmaml's nets), a net of the
    user's own's output width on an image batch; None for regression and the metric learners."""
    if task != "classification" or (own and learner in METRIC_LEARNERS):
        return None
    if not own:
        return net.out_features
    if image is None:
        return None
    channels, side = image
    training = net.training
    try:
        return int(net.eval()(torch.zeros(2, channels, side, side)).flatten(1).shape[1])
    finally:
        net.train(training)


def _class_path(net: nn.Module) -> str:
    for path, cls in NETS.items():
        if type(net) is cls:
            return path
    raise ConfigError(
        f"export supports the nets {sorted(NETS)}, got {type(net).__module__}.{type(net).__qualname__}: "
        f"a net of your own travels as an ONNX graph, `{EXPORTER} CHECKPOINT --format onnx`"
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
        "--format",
        choices=["safetensors", "onnx"],
        default="safetensors",
        help="safetensors: the compact artifact for lthmaml-edge (torch); onnx: also the graphs "
        "lthmaml-device runs (onnxruntime, no torch), beside it as OUTPUT with .onnx (MAML and classifier: "
        "and .adapt.onnx); with --dtype int8 the graph of ProtoNet, MatchingNet or CNP stores int8 "
        "weights. A net of your own (not one of lthmaml's) exports as onnx only, the graph alone "
        "(default: %(default)s)",
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
    if output.suffix == ".onnx":  # -o model.onnx: the safetensors artifact goes beside it
        output = output.with_suffix(".safetensors")
    graphs: list[Path] = []
    int8 = args.dtype == "int8"
    try:
        source = _checkpoint_source(args.checkpoint, own_nets=args.format == "onnx")
        if source.own is None:
            path = _write(source.net, source.masks, output, source.fields, args.dtype)
            artifact = load_artifact(path)  # proves the file reads back, and gives the dense baseline
            if args.format == "onnx":
                graphs = _onnx(artifact, path.with_suffix(".onnx"), int8)
        else:  # a net of the user's own: the graph alone carries it
            artifact = _graph_artifact(source, args.checkpoint, args.dtype)
            graphs = _onnx(artifact, output.with_suffix(".onnx"), int8)
    except LthmamlError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    meta = artifact.metadata
    kept = f"sparsity {meta.sparsity:.1%} ({meta.stored_weights:,} of {meta.prunable_weights:,} weights kept)"
    name = meta.architecture["class_path"].rsplit(".", 1)[-1]
    if source.own is None:
        size = path.stat().st_size
        dense = dense_size(build_net(meta.source_architecture or meta.architecture))
        print(
            f"wrote {path}: {size:,} bytes ({size / dense:.3f}x the {dense:,}-byte dense float32 file), "
            f"{kept}, {meta.dtype}, {name} {meta.architecture['init_args']}"
        )
    else:
        print(f"exported {name}, a net of your own, as an ONNX graph only: {kept}, {meta.dtype}")
    for graph in graphs:
        print(f"wrote {graph}: {graph.stat().st_size:,} bytes (lthmaml-device fit --artifact {graphs[0]})")
    return 0


def _onnx(artifact: Artifact, output: Path, int8: bool) -> list[Path]:
    """The device graphs (:mod:`lthmaml.edge.onnx_export`); a ConfigError naming the extra to install
    when the ONNX exporter's packages are missing."""
    try:
        from lthmaml.edge.onnx_export import export_onnx
    except ImportError as error:
        raise ConfigError(
            f"--format onnx needs onnx and onnxscript ({error}): pip install 'lthmaml[onnx]'"
        ) from None
    return export_onnx(artifact, output, int8)


if __name__ == "__main__":
    sys.exit(main())
