"""The device artifact's format: an ONNX model that carries its artifact metadata and verifies itself.

``lthmaml-export --format onnx`` writes ``<name>.onnx``, the graph ``lthmaml-device`` runs
(:mod:`lthmaml.edge.onnx_export`), and for a learner that adapts by gradient steps the adaptation
graph ``<name>.adapt.onnx`` beside it. Each file's ``metadata_props`` hold three JSON strings:

* :data:`ARTIFACT_PROP`: the :class:`~lthmaml.edge.artifact.ArtifactMetadata` of the artifact it
  was exported from (learner, look, normalisation, inner lr and steps, ...), as the safetensors
  artifact holds it;
* :data:`GRAPH_PROP`: what the graph computes, :data:`GRAPHS` (its inputs and output), the
  weights' storage (``float32``, or ``int8`` codes that ``DequantizeLinear`` scales per output
  channel) and, for the forward graph, the adaptation graph's file name or null;
* :data:`CHECKSUM_PROP`: ``{"graph": ..., "metadata": ...}``, the SHA-256 of every field of the
  serialised ``ModelProto`` except its ``metadata_props`` (the graph: nodes and initializers, the
  opsets) and of the two JSON strings above.

Reading (:func:`read_model`) needs neither torch nor the ``onnx`` package: it walks the protobuf
wire format of the file's top level, so a device with onnxruntime, numpy and Pillow checks a file
before onnxruntime parses it, and any flipped byte is a one-line DataError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lthmaml.errors import DataError
from lthmaml.files import read_bytes

ARTIFACT_PROP = "lthmaml_artifact"
GRAPH_PROP = "lthmaml_graph"
CHECKSUM_PROP = "lthmaml_sha256"
GRAPHS: dict[str, dict[str, Any]] = {
    "embedding": {"inputs": ["x"], "output": "embedding"},
    "logits": {"inputs": ["x"], "output": "logits"},
    "cnp": {"inputs": ["context_x", "context_y", "target_x"], "output": "predictive_mean"},
    "adaptation": {"inputs": ["support_x", "support_y", "query_x"], "output": "logits"},
}
"""What each graph kind takes and gives: a metric learner's embedding (``[B, features]``), MAML's
or a classifier's net (``logits`` ``[B, N]``, or ``[B, 1]`` for regression), a CNP's encoder and
decoder (the predictive mean of the targets given the context), and the adaptation graph
(:mod:`lthmaml.edge.onnx_adapt`: the query logits, or predictions for regression, after the
artifact's ``eval_inner_steps`` SGD steps on the support set, then the adapted weights,
:data:`ADAPTED`). The device takes a graph's first output as its result, whatever its name."""
GRADIENT_LEARNERS = ("maml", "classifier")
"""Learners that adapt by gradient steps on the support set: their export adds the adaptation
graph (the others adapt in one forward pass)."""
ADAPTED = "adapted."
"""Prefix of the adaptation graph's outputs after the first: the adapted parameters by name
(``adapted.head.weight``), which the net graph of the same export takes as optional inputs."""
ADAPTATION_SUFFIX = ".adapt.onnx"
EXPORT_AGAIN = "export it again with `lthmaml-export CHECKPOINT --format onnx`"
_METADATA_PROPS = 14  # ModelProto.metadata_props: StringStringEntryProto {key = 1, value = 2}


@dataclass
class OnnxArtifact:
    """A verified ONNX artifact: the file's bytes (for ``onnxruntime.InferenceSession``), the
    artifact metadata and the graph description, as JSON objects."""

    path: Path
    data: bytes
    metadata: dict[str, Any]
    graph: dict[str, Any]


def adaptation_path(model: Union[str, Path]) -> Path:
    """``model.onnx`` -> ``model.adapt.onnx`` (``model.int8.onnx`` -> ``model.int8.adapt.onnx``)."""
    model = Path(model)
    return model.with_name(model.name.removesuffix(".onnx") + ADAPTATION_SUFFIX)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def top_level_fields(data: bytes | memoryview) -> list[tuple[int, memoryview, memoryview]]:
    """The fields of a serialised message, in file order: ``(number, encoding, payload)``, where
    ``encoding`` is the field's bytes in the file (key and value) and ``payload`` a length-delimited
    field's content (else the value's bytes). ValueError for bytes that are not a message."""
    data = memoryview(data)  # slices share the file's bytes: a large model is not copied
    fields, pos, end = [], 0, len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = data[start:pos]
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            payload, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire} at byte {start}")
        if number == 0 or pos > end:
            raise ValueError(f"a field cut or invalid at byte {start}")
        fields.append((number, data[start:pos], payload))
    return fields


def _props(fields: list[tuple[int, memoryview, memoryview]]) -> dict[str, str]:
    props: dict[str, str] = {}
    for number, _, payload in fields:
        if number != _METADATA_PROPS:
            continue
        entry = {n: value for n, _, value in top_level_fields(payload)}
        props[bytes(entry.get(1, b"")).decode("utf-8")] = bytes(entry.get(2, b"")).decode("utf-8")
    return props


def graph_digest(data: bytes) -> str:
    """SHA-256 of every top-level field of the serialised ``ModelProto`` but its ``metadata_props``."""
    digest = hashlib.sha256()
    for number, encoding, _ in top_level_fields(data):
        if number != _METADATA_PROPS:
            digest.update(encoding)
    return digest.hexdigest()


def metadata_digest(artifact_json: str, graph_json: str) -> str:
    """SHA-256 of the two metadata strings, in this order, joined by a newline."""
    return hashlib.sha256(f"{artifact_json}\n{graph_json}".encode()).hexdigest()


def checksums(data: bytes, artifact_json: str, graph_json: str) -> str:
    """The :data:`CHECKSUM_PROP` value of a model serialised as ``data`` (without the props)."""
    values = {"graph": graph_digest(data), "metadata": metadata_digest(artifact_json, graph_json)}
    return json.dumps(values, separators=(",", ":"))


def read_model(path: Union[str, Path]) -> OnnxArtifact:
    """The ONNX artifact at ``path``, checked against its recorded checksums before anything parses
    its graph; a missing, foreign, cut or altered file is a one-line DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such ONNX artifact file; write one with `lthmaml-export CHECKPOINT --format onnx`"
        )
    data = read_bytes(path)
    try:
        fields = top_level_fields(data)
        props = _props(fields)
    except (ValueError, IndexError, UnicodeDecodeError):
        if path.suffix != ".onnx":
            raise DataError(
                f"{path}: not an ONNX model; give the .onnx that `lthmaml-export --format onnx` wrote"
            ) from None
        raise DataError(
            f"{path}: not a readable ONNX model (cut or damaged): copy it again or {EXPORT_AGAIN}"
        ) from None
    missing = [key for key in (ARTIFACT_PROP, GRAPH_PROP, CHECKSUM_PROP) if key not in props]
    if missing:
        raise DataError(
            f"{path}: an ONNX model without lthmaml's {', '.join(missing)} metadata: {EXPORT_AGAIN}"
        )
    try:
        recorded = json.loads(props[CHECKSUM_PROP])
        graph_sha, metadata_sha = recorded["graph"], recorded["metadata"]
    except (ValueError, TypeError, KeyError):
        raise DataError(
            f"{path}: its {CHECKSUM_PROP} metadata is damaged: copy it again or {EXPORT_AGAIN}"
        ) from None
    damaged = "the file is damaged or was altered since export: copy it again from its source, or"
    if metadata_digest(props[ARTIFACT_PROP], props[GRAPH_PROP]) != metadata_sha:
        raise DataError(
            f"{path}: its metadata does not match the SHA-256 recorded at export; {damaged} {EXPORT_AGAIN}"
        )
    if graph_digest(data) != graph_sha:
        raise DataError(
            f"{path}: its graph and weights do not match the SHA-256 recorded at export; {damaged} "
            f"{EXPORT_AGAIN}"
        )
    metadata, graph = json.loads(props[ARTIFACT_PROP]), json.loads(props[GRAPH_PROP])
    if not isinstance(metadata, dict) or not isinstance(graph, dict) or graph.get("graph") not in GRAPHS:
        raise DataError(f"{path}: its lthmaml metadata is not what this version writes: {EXPORT_AGAIN}")
    return OnnxArtifact(path, data, metadata, graph)
