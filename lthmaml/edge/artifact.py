"""The compact artifact's format: what a device needs to rebuild and adapt a pruned net, and its reader.

An artifact is one safetensors file, no pickle: its tensors are the net's weights and masks
(:mod:`lthmaml.edge.packing`), its header's ``__metadata__`` holds one JSON string under
:data:`METADATA_KEY`: :class:`ArtifactMetadata`, which says how to rebuild the net (only the
nets of :data:`NETS`; nothing is imported by name from a file) and how to adapt it, with the
file's checksums under its key :data:`CHECKSUM_KEY` (:func:`sealed`). Reading checks the checksums, then
every field, name, shape and count, so a wrong, cut or tampered file is a one-line DataError
naming it, never a half-built net: a flipped byte in the weights changes no shape or count, only
the checksum tells it. :mod:`lthmaml.edge.export` writes artifacts.

Only the nets of :data:`NETS` travel this way: the device rebuilds them from their constructor
arguments. A net of the user's own travels as an ONNX graph instead (:mod:`lthmaml.edge.onnx_export`),
which needs no Python class on the device; its metadata is this module's :class:`ArtifactMetadata`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from lthmaml.data.images import model_look
from lthmaml.edge.packing import unpack_tensors
from lthmaml.errors import ConfigError, DataError, LthmamlError
from lthmaml.files import read_bytes
from lthmaml.masks import folded
from lthmaml.meta.distances import DISTANCES
from lthmaml.nets.models import MLP, CNPNet, Conv4
from lthmaml.nets.resnet import ResNet12, ResNet18

EXPORTER = "lthmaml-export"
"""The command that writes artifacts, named where a file must be exported (again)."""
FORMAT_VERSION = 4
"""Bumped whenever a reader of another version would misread the file. A reader loads its own
version only: an older file, or one that lacks a field this version writes, is refused in one
line saying to export it again, a newer one saying to update lthmaml. Nothing migrates files
(no one used an older format outside this project before its first release)."""
METADATA_KEY = "lthmaml_artifact"
CHECKSUM_KEY = "sha256"
"""The key of the artifact's checksums in its metadata JSON object (beside the
:class:`ArtifactMetadata` fields, not one of them): ``tensors``, the SHA-256 of the tensor data
(the file's bytes after its header), and ``metadata``, the SHA-256 of the metadata without this
key (:func:`metadata_json`). Written at export, checked on every load. One header key, not two:
safetensors writes a header's keys in no fixed order, and an export must give the same bytes."""
NETS: dict[str, type[nn.Module]] = {
    "lthmaml.nets.models.Conv4": Conv4,
    "lthmaml.nets.models.MLP": MLP,
    "lthmaml.nets.models.CNPNet": CNPNet,
    "lthmaml.nets.resnet.ResNet12": ResNet12,
    "lthmaml.nets.resnet.ResNet18": ResNet18,
}
"""The architectures an artifact may name: only these are built, nothing is imported by name."""
EMBEDDING_NETS = ("lthmaml.nets.models.Conv4", "lthmaml.nets.resnet.ResNet12", "lthmaml.nets.resnet.ResNet18")
"""The nets of :data:`NETS` that are an embedding without their head (``out_features`` null): the
metric learners' nets."""
LEARNERS: dict[str, str] = {
    "MAML": "maml",
    "Classifier": "classifier",
    "ProtoNet": "protonet",
    "MatchingNet": "matching",
    "CNP": "cnp",
}
"""Learner class name (the last part of its class path, so moved and re-exported paths such as
``lthmaml.meta.ProtoNet`` match too) -> the ``learner`` an artifact records."""
METRIC_LEARNERS = ("protonet", "matching")
"""Learners that adapt by embedding the support set: their net is a headless embedding."""
AMORTIZED_LEARNERS = (*METRIC_LEARNERS, "cnp")
"""Learners that adapt in one forward pass over the support set (no backward, no optimizer)."""
CLASSIFIER_DEFAULTS: dict[str, Any] = {"inner_lr": 0.01, "inner_steps": 10, "eval_inner_steps": 10}
"""Fine-tuning settings for a net that was not meta-trained (no learned step size to carry)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
"""Export dtypes by name (:mod:`lthmaml.edge.packing`: ``int8`` quantises the prunable weights per
output channel and stores the other float tensors as float16). Every artifact loads as float32."""

PathLike = Union[str, Path]


@dataclass
class ArtifactMetadata:
    """What the device needs besides the tensors (stored as JSON in the safetensors header).

    Attributes:
        architecture: ``{"class_path": "lthmaml.nets.models.Conv4", "init_args": {...}}`` of the
            stored (shrunk) net: ``init_args`` rebuilds its exact shape. A shrunk net whose
            narrower layers are no constructor arguments (a ResNet-12 or ResNet-18 after filter
            pruning) has the ``init_args`` of its source and ``"channels"``: the width shrinking
            left to each channel group (by the group's name, :func:`lthmaml.channels.channel_groups`),
            to which :func:`build_net` cuts the net it builds. An ONNX artifact's net of the user's
            own: its class path and init_args as the checkpoint names them, never built.
        task: ``"classification"`` (integer labels, cross-entropy) or ``"regression"`` (MSE).
        ways: the classes the head predicts (classification), else None.
        inner_lr, inner_steps, eval_inner_steps: the fine-tuning SGD step size and step counts
            (MAML's training and evaluation inner loops).
        sparsity: fraction of the source net's prunable weights that are zero (as
            :func:`lthmaml.sparsity.sparsity_report` counts it, before shrinking).
        source_sha256: SHA-256 of the checkpoint file exported ("" for an in-memory net).
        dtype: ``"float32"``, ``"float16"`` or ``"int8"`` (see :data:`DTYPES`): how the values
            are stored; always loaded as float32.
        format_version: :data:`FORMAT_VERSION` of the writer.
        inner_lrs: learned per-parameter inner learning rates by the artifact net's parameter
            names, or None (use ``inner_lr`` for all).
        source_module: class path of the LightningModule the weights come from, if known.
        source_architecture: the source net's architecture before shrinking (None: not shrunk);
            a net exported again (after fine-tuning) keeps the one it was shrunk from.
        weight_transform: ``repr`` of the reparametrisation baked into the stored weights
            (e.g. ``PowerTransform(alpha=2.0)``), None if there was none.
        prunable_weights: prunable weights of the source net (the dense count).
        stored_weights: prunable weights the artifact stores values for (mask ones).
        learner: how the net adapts to a task: ``"maml"`` or ``"classifier"`` (gradient steps on
            the support set), ``"protonet"`` / ``"matching"`` (class prototypes / attention over
            the support embeddings of a headless net), ``"cnp"`` (the mean encoding of the support
            pairs).
        metric_scale: MatchingNet's (learned) inverse temperature of the attention softmax; None
            for every other learner. It lies outside the net, so it travels here.
        distance: ProtoNet's distance to the prototypes, ``squared`` or ``euclidean``; None for
            every other learner.
        look, normalization: how the device decodes images, ``ink``/``gray``/``rgb`` and the meta-train
            ``{mean, std}`` per channel, so it sees its photos as meta-training saw its images
            (None for a net that takes no images).
    """

    architecture: dict
    task: str
    ways: Optional[int]
    inner_lr: float
    inner_steps: int
    eval_inner_steps: int
    sparsity: float
    source_sha256: str = ""
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    inner_lrs: Optional[dict[str, float]] = None
    source_module: Optional[str] = None
    source_architecture: Optional[dict] = None
    weight_transform: Optional[str] = None
    prunable_weights: int = 0
    stored_weights: int = 0
    learner: str = "maml"
    metric_scale: Optional[float] = None
    distance: Optional[str] = None
    look: Optional[str] = None
    normalization: Optional[dict[str, list[float]]] = None


def learner_of(class_path: Optional[str]) -> Optional[str]:
    """The ``learner`` a LightningModule class path names (see :data:`LEARNERS`), None if none."""
    return LEARNERS.get(str(class_path).rsplit(".", 1)[-1]) if class_path else None


COMPUTED_FIELDS = (
    "architecture",
    "sparsity",
    "dtype",
    "format_version",
    "weight_transform",
    "prunable_weights",
    "stored_weights",
)
"""Fields :func:`export_net` derives from the net itself (given values are ignored).
``source_architecture`` is derived where the export shrinks the net, else carried: a shrunk net
exported again after fine-tuning keeps the architecture it was cut from (a shrunk residual net
cannot be rebuilt without it)."""


@dataclass
class Artifact:
    """A loaded artifact: ``net`` holds the weights it computes with as plain float32 parameters
    (no reparametrisation), its masks beside it (``net.masks``) and pruned weights exactly zero,
    in eval mode."""

    net: nn.Module
    metadata: ArtifactMetadata
    path: Path


def build_net(architecture: Mapping[str, Any]) -> nn.Module:
    """The net an architecture dict names (only :data:`NETS`), with fresh weights, cut to its
    ``channels`` where it has them; RNG untouched."""
    class_path = architecture.get("class_path")
    if class_path not in NETS:
        raise DataError(
            f"architecture {class_path!r} is not one of {sorted(NETS)}; a net of your own travels as "
            f"an ONNX graph: `{EXPORTER} CHECKPOINT --format onnx`, run by lthmaml-device"
        )
    init_args = architecture.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise DataError(f"architecture init_args must be a mapping, got {init_args!r}")
    with torch.random.fork_rng(devices=[]):
        net = NETS[class_path](**init_args)
    widths = architecture.get("channels")
    return net if widths is None else _cut_to(net, widths)


def image_input(net: nn.Module) -> Optional[tuple[int, int]]:
    """``(channels, side)`` of the square images ``net`` takes, where it says so by an
    ``image_size`` attribute (lthmaml's image nets do; its channels: ``in_channels``, else its
    first conv's); None for a net of points (MLP, CNPNet) or one that does not say."""
    side = getattr(net, "image_size", None)
    if side is None:
        return None
    channels = getattr(net, "in_channels", None)
    if channels is None:
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first.in_channels if first is not None else None
    return None if channels is None else (int(channels), int(side))


def input_shape(net: nn.Module) -> tuple[int, ...]:
    """The shape of one example ``net`` takes, for tracing it into a device graph: an image net's
    ``[channels, side, side]`` (:func:`image_input`), an MLP's ``[in_features]``."""
    image = image_input(net)
    if image is not None:
        channels, side = image
        return (channels, side, side)
    if isinstance(net, MLP):
        return (net.architecture["in_features"],)
    raise ConfigError(
        f"the device graph of a {type(net).__name__} needs the images it takes: give it an `image_size` "
        "attribute (and `in_channels` unless its first layer is a conv)"
    )


def channel_widths(net: nn.Module) -> dict[str, int]:
    """The width of each channel group of ``net`` by its name: what a shrunk net's architecture
    records as ``channels``."""
    from lthmaml.channels import channel_groups

    return {name: group.width for name, group in channel_groups(net).items()}


def _cut_to(net: nn.Module, widths: Any) -> nn.Module:
    """``net`` shrunk to ``widths`` channels in each channel group (every group named): its last
    channels removed, so the shape is the shrunk net's (the values are the artifact's to fill)."""
    from lthmaml.channels import channel_groups
    from lthmaml.nets.shrink import shrink
    from lthmaml.sparsity import prune_channels

    groups = channel_groups(net)
    if not isinstance(widths, Mapping):
        raise DataError(f"architecture channels must map channel groups to widths, got {widths!r}")
    wrong = sorted(set(groups) ^ set(widths))
    if wrong:
        why = "is missing" if wrong[0] in groups else "is no channel group"
        raise DataError(
            f"architecture channels must give the width of every channel group of the "
            f"{type(net).__name__} and no other: {wrong[0]!r} {why}"
        )
    for name, group in groups.items():
        width = widths[name]
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= group.width:
            raise DataError(
                f"architecture channels[{name!r}] must be a width from 1 to {group.width}, got {width!r}"
            )
        if width < group.width:
            prune_channels(net, group.convs[0], range(width, group.width))
    return shrink(net)[0]


def dense_tensors(net: nn.Module) -> dict[str, Tensor]:
    """The net as a dense float32 ``state_dict`` without masks (the weights it computes with): the
    baseline a compact artifact is compared with."""
    return {key: value.detach().float().cpu().contiguous() for key, value in folded(net).state_dict().items()}


def dense_size(net: nn.Module) -> int:
    """Bytes of the dense float32 safetensors file of ``net`` (see :func:`dense_tensors`)."""
    return len(save(dense_tensors(net)))


CHECKPOINT = "a PyTorch checkpoint"


def sniffed(path: Path) -> str:
    """What ``path`` holds, told by its first bytes, for the files a user may give in place of an
    artifact or a checkpoint: :data:`CHECKPOINT` (the zip ``torch.save`` writes, or its older
    pickle), ``"a safetensors file"``, an image, ``"an empty file"``, else ``"a file of another kind"``;
    a DataError if it cannot be read."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(9)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read it ({error.strerror or error}); check its permissions"
        ) from None
    if not head:
        return "an empty file"
    if len(head) == 9 and head[8:9] == b"{":  # first: a header length may begin with a pickle's 0x80
        return "a safetensors file"  # an 8-byte header length, then the JSON header
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return CHECKPOINT
    images = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP"}
    return next(
        (f"a {kind} image" for magic, kind in images.items() if head.startswith(magic)),
        "a file of another kind",
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metadata_json(values: Mapping[str, Any]) -> str:
    """The metadata object as the file stores it (compact JSON, in the given key order), less any
    checksums: the string the ``metadata`` checksum is of."""
    return json.dumps({k: v for k, v in values.items() if k != CHECKSUM_KEY}, separators=(",", ":"))


def sealed(tensors: Mapping[str, Tensor], values: Mapping[str, Any]) -> bytes:
    """The safetensors file of ``tensors`` with the metadata ``values`` (JSON-able; any checksums
    in it are replaced) under :data:`METADATA_KEY`, its checksums added: an artifact's bytes."""
    plain = metadata_json(values)
    data_sha = _sha256(_tensor_data(save(dict(tensors), metadata={METADATA_KEY: plain})))
    digests = {"tensors": data_sha, "metadata": _sha256(plain.encode())}
    stored = json.dumps({**json.loads(plain), CHECKSUM_KEY: digests}, separators=(",", ":"))
    return save(dict(tensors), metadata={METADATA_KEY: stored})  # the data's bytes do not depend on it


def _tensor_data(data: bytes) -> bytes:
    """A safetensors file's tensor data: what follows its 8-byte header length and its header."""
    return data[8 + int.from_bytes(data[:8], "little") :]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_checksums(path: Path, values: Mapping[str, Any], again: str) -> None:
    """The artifact at ``path`` (its metadata ``values``, as read) holds the bytes it was exported
    with: a DataError saying which part differs (tensor data or metadata) otherwise."""
    recorded = values.get(CHECKSUM_KEY)
    if not isinstance(recorded, Mapping) or not all(
        isinstance(recorded.get(k), str) for k in ("tensors", "metadata")
    ):
        raise DataError(f"{path}: the artifact records no valid checksums ({CHECKSUM_KEY!r}): {again}")
    damaged = "the file is damaged or was altered since export: copy it again from its source, or"
    if _sha256(metadata_json(values).encode()) != recorded["metadata"]:
        raise DataError(
            f"{path}: its metadata does not match the SHA-256 recorded at export; {damaged} {again}"
        )
    data = read_bytes(path)
    if _sha256(_tensor_data(data)) != recorded["tensors"]:
        raise DataError(
            f"{path}: its tensor data does not match the SHA-256 recorded at export; {damaged} {again}"
        )


# ---------------------------------------------------------------------------- load
def load_artifact(path: PathLike) -> Artifact:
    """Rebuild the net and its masks from an artifact; a wrong file is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such artifact file")
    if sniffed(path) == CHECKPOINT:
        raise DataError(
            f"{path}: a PyTorch checkpoint, not an artifact: export it first, `{EXPORTER} {path} -o "
            "model.safetensors`, and give that (lthmaml-edge also reads a checkpoint as --model.checkpoint)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DataError(f"{path}: not a safetensors file ({first_line(error)})") from None
    if METADATA_KEY not in header:
        raise DataError(
            f"{path}: a safetensors file without lthmaml artifact metadata; export it with {EXPORTER}"
        )
    try:
        values = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: corrupt artifact metadata ({error})") from None
    if not isinstance(values, dict):
        raise DataError(f"{path}: corrupt artifact metadata (not a JSON object)")
    version = values.get("format_version")
    again = f"export it again with this version's {EXPORTER}"
    if type(version) is int and version > FORMAT_VERSION:
        raise DataError(
            f"{path}: artifact format version {version} is newer than this lthmaml reads "
            f"({FORMAT_VERSION}); update lthmaml to load it"
        )
    if type(version) is not int or version != FORMAT_VERSION:
        raise DataError(
            f"{path}: artifact format version {version!r} predates this version's artifact format "
            f"({FORMAT_VERSION}): {again}"
        )
    check_checksums(path, values, again)
    values = {k: v for k, v in values.items() if k != CHECKSUM_KEY}
    missing = [field.name for field in dataclasses.fields(ArtifactMetadata) if field.name not in values]
    if missing:
        raise DataError(
            f"{path}: artifact metadata lacks {missing}: it predates this version's format; {again}"
        )
    metadata = checked_metadata(values, str(path), DataError)
    try:
        net = build_net(metadata.architecture)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"{path}: cannot build {metadata.architecture}: {first_line(error)}; {again}"
        ) from None
    unpack_tensors(net, tensors, path)
    if metadata.inner_lrs is not None and set(metadata.inner_lrs) != {n for n, _ in net.named_parameters()}:
        raise DataError(f"{path}: inner_lrs do not name this net's parameters")
    return Artifact(net.eval(), metadata, path)


def checked_metadata(
    values: Mapping[str, Any], where: str, error: type[LthmamlError] = ConfigError
) -> ArtifactMetadata:
    """An :class:`ArtifactMetadata` from a dict, with each field of the right kind."""
    fields = {field.name: field for field in dataclasses.fields(ArtifactMetadata)}
    required = [name for name, field in fields.items() if field.default is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise error(f"{where}: artifact metadata lacks {missing}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise error(f"{where}: artifact metadata has unknown fields {unknown}")

    def number(name: str, kind: type) -> Any:
        value = values[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and value != int(value))
        ):
            raise error(f"{where}: artifact metadata '{name}' must be {kind.__name__}, got {value!r}")
        return kind(value)

    checked = dict(values)
    for name in ("inner_lr", "sparsity"):
        checked[name] = number(name, float)
    for name in ("inner_steps", "eval_inner_steps"):
        checked[name] = number(name, int)
    if checked["task"] not in ("classification", "regression"):
        raise error(
            f"{where}: artifact task must be 'classification' or 'regression', got {checked['task']!r}"
        )
    if checked["task"] == "classification" and checked.get("ways") is not None:
        checked["ways"] = number("ways", int)
    if checked.get("dtype", "float32") not in DTYPES:
        raise error(f"{where}: artifact dtype must be one of {sorted(DTYPES)}, got {checked['dtype']!r}")
    if not (math.isfinite(checked["inner_lr"]) and checked["inner_lr"] > 0):
        raise error(
            f"{where}: artifact metadata 'inner_lr' must be a finite rate > 0, got {checked['inner_lr']}"
        )
    for name in ("inner_steps", "eval_inner_steps"):
        if checked[name] < 0:
            raise error(f"{where}: artifact metadata '{name}' must be >= 0, got {checked[name]}")
    architecture = checked["architecture"]
    if not isinstance(architecture, Mapping) or "class_path" not in architecture:
        raise error(f"{where}: artifact architecture must be {{class_path, init_args}}, got {architecture!r}")
    widths = architecture.get("channels")
    if widths is not None and (
        not isinstance(widths, Mapping)
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths.values())
    ):
        raise error(f"{where}: artifact architecture channels must map channel groups to widths >= 1")
    init_args = architecture.get("init_args")
    out_features = init_args.get("out_features") if isinstance(init_args, Mapping) else None
    if out_features is not None and (
        isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 1
    ):
        raise error(f"{where}: artifact architecture out_features must be an int >= 1, got {out_features!r}")
    if checked["task"] == "classification" and checked.get("ways") not in (None, out_features):
        raise error(
            f"{where}: artifact metadata says ways={checked['ways']} but its head predicts "
            f"out_features={out_features} classes: export it again"
        )
    _check_learner(checked, out_features, where, error)
    if checked.get("look") is not None or checked.get("normalization") is not None:
        in_channels = init_args.get("in_channels") if isinstance(init_args, Mapping) else None
        try:
            model_look(checked.get("look"), checked.get("normalization"), in_channels)
        except ValueError as problem:
            raise error(f"{where}: artifact metadata {problem}") from None
    rates = checked.get("inner_lrs")
    if rates is not None:
        if not isinstance(rates, Mapping):
            raise error(f"{where}: artifact inner_lrs must map parameter names to rates")
        checked["inner_lrs"] = {str(k): float(v) for k, v in rates.items()}
    return ArtifactMetadata(**checked)


def _check_learner(checked: dict[str, Any], out_features: Any, where: str, error: type[LthmamlError]) -> None:
    """``learner`` (``maml`` unless given) and ``metric_scale`` fit each other, the net and the task:
    a headless image net (:data:`EMBEDDING_NETS`) only for the metric learners, the CNPNet only
    for the CNP. A net of the user's own (an ONNX artifact's) says nothing about its head."""
    learner = checked.setdefault("learner", "maml")
    known = sorted(set(LEARNERS.values()))
    if learner not in known:
        raise error(f"{where}: artifact metadata 'learner' must be one of {known}, got {learner!r}")
    scale = checked.get("metric_scale")
    if learner == "matching":
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise error(
                f"{where}: artifact metadata 'metric_scale' must be MatchingNet's finite attention "
                f"scale > 0, got {scale!r}"
            )
        checked["metric_scale"] = float(scale)
    elif scale is not None:
        raise error(f"{where}: artifact metadata 'metric_scale' is for learner 'matching', not {learner!r}")
    distance = checked.setdefault("distance", "squared" if learner == "protonet" else None)
    if learner == "protonet":
        if distance not in DISTANCES:
            raise error(
                f"{where}: artifact metadata 'distance' must be one of {list(DISTANCES)}, got {distance!r}"
            )
    elif distance is not None:
        raise error(f"{where}: artifact metadata 'distance' is for learner 'protonet', not {learner!r}")
    class_path = checked["architecture"]["class_path"]
    own = class_path not in NETS
    headless = class_path in EMBEDDING_NETS and out_features is None
    is_cnp = class_path == "lthmaml.nets.models.CNPNet"
    if learner in METRIC_LEARNERS and not (headless or own):
        raise error(
            f"{where}: artifact learner {learner!r} compares embeddings: its net must be a Conv4 or a "
            f"ResNet with out_features null, got {class_path} out_features={out_features!r}"
        )
    if learner not in METRIC_LEARNERS and headless:
        name = class_path.rsplit(".", 1)[-1]
        raise error(
            f"{where}: artifact net is a headless {name} (out_features null), which learner {learner!r} "
            "cannot classify with: its learner must be 'protonet' or 'matching'"
        )
    if (learner == "cnp") != is_cnp:
        raise error(
            f"{where}: artifact learner 'cnp' goes with a CNPNet, got learner {learner!r} with {class_path}"
        )
    task = "regression" if is_cnp else "classification" if learner in METRIC_LEARNERS else None
    if task is not None and checked["task"] != task:
        raise error(f"{where}: artifact learner {learner!r} does {task}, but its task is {checked['task']!r}")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
