"""The device graphs of an artifact as ONNX, for ``lthmaml-device`` (onnxruntime, no torch).

:func:`export_onnx` writes the graph the device runs for the artifact's learner (see
:data:`~lthmaml.edge.onnx_format.GRAPHS`): a ProtoNet's or MatchingNet's embedding (the device
computes the prototypes or the attention over the support embeddings in numpy, as
:mod:`lthmaml.edge.amortized` does in torch), a MAML or classifier net's logits, a CNP's encoder
and decoder in one graph. For MAML and the classifier, which adapt by gradient steps, it also
writes the adaptation graph (:func:`lthmaml.edge.onnx_adapt.export_adaptation`) beside it as
``<name>.adapt.onnx``.

It exports the net of a *loaded* artifact, so the graph holds what the torch path computes with:
pruned weights exactly zero, removed channels shrunk away, weight transforms folded. For a net of
the user's own, which no safetensors artifact rebuilds, that artifact is the checkpoint's own net
prepared the same way in memory (:func:`lthmaml.edge.export.graph_artifact`): the graph is then
the only thing that carries the net, and the device needs no Python class for it. BatchNorm on the
batch's own statistics (Conv4's, ResNet-12's by default) makes the scores depend on the batch, so
the device must batch a query as ``lthmaml-edge`` does (its ``data.batch_size``) to give the same
scores; BatchNorm with running statistics (ResNet-18's default) uses the stored ones.

``int8``: each prunable weight is stored as int8 codes and a float32 scale per output channel,
with a ``DequantizeLinear`` before its layer (weight-only QDQ, which onnxruntime runs on any CPU):
the codes and scales of :func:`lthmaml.edge.packing.quantise`, so the ONNX weights are the int8
safetensors artifact's, and a pruned weight stays exactly 0. Activations stay float32: the
device's scores differ from the float net's only by the weights' rounding (docs/edge.md gives the
measured differences). Only for the learners that adapt without gradient steps: MAML and the
classifier adapt float32 weights, so their graphs stay float32.

The net graph of MAML or the classifier takes each parameter as an optional input, its own
weights the defaults (ONNX's initializer that is also a graph input): the device adapts once,
with the adaptation graph, which returns the adapted weights beside the first query batch's
logits, and feeds those weights to the net graph for every other batch, instead of adapting
again for each batch of the query.

Every file carries the artifact metadata and its checksums (:mod:`lthmaml.edge.onnx_format`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lthmaml.edge.artifact import Artifact, first_line, input_shape
from lthmaml.edge.onnx_format import (
    ARTIFACT_PROP,
    CHECKSUM_PROP,
    GRADIENT_LEARNERS,
    GRAPH_PROP,
    GRAPHS,
    adaptation_path,
    checksums,
    read_model,
)
from lthmaml.edge.packing import quantise
from lthmaml.errors import ConfigError
from lthmaml.files import replacing
from lthmaml.masks import masks_within, prunable, weight
from lthmaml.nets.models import CNPNet

GRAPH_OF = {
    "protonet": "embedding",
    "matching": "embedding",
    "maml": "logits",
    "classifier": "logits",
    "cnp": "cnp",
}
"""The graph the device runs for each learner."""


class _CNPMean(nn.Module):
    """A CNPNet's predictive mean of the targets given the context: encoder and decoder in one graph."""

    def __init__(self, net: CNPNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, context_x: Tensor, context_y: Tensor, target_x: Tensor) -> Tensor:
        return self.net(context_x, context_y, target_x)[0]


def _traced(module: nn.Module, kind: str, source: Path, own_weights: bool = False) -> Any:
    """The ONNX ``ModelProto`` of ``module`` for a graph of ``kind``, every leading dimension dynamic;
    a ConfigError naming ``source`` (the artifact or checkpoint) where torch cannot export it.
    ``own_weights``: each parameter stays its own initializer, under its name (the exporter's
    optimiser merges equal ones, such as fresh BatchNorm scales, which then cannot be fed apart)."""
    spec = GRAPHS[kind]
    if kind == "cnp":
        x, y = module.net.x_features, module.net.y_features
        context, targets = torch.export.Dim("context"), torch.export.Dim("targets")
        args = (torch.randn(3, x), torch.randn(3, y), torch.randn(4, x))
        dynamic = {"context_x": {0: context}, "context_y": {0: context}, "target_x": {0: targets}}
    else:
        args = (torch.randn(2, *input_shape(module)),)
        dynamic = {"x": {0: torch.export.Dim("batch")}}
    noisy = ("torch.onnx", "torch.export", "torch.fx.experimental.symbolic_shapes", "onnxscript")
    quiet = [logging.getLogger(name) for name in noisy]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        # torch.export prints a failed trace's whole graph to stderr: the one line below says why
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                args,
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=spec["inputs"],
                output_names=[spec["output"]],
                verbose=False,
                optimize=not own_weights,
            )
    except Exception as error:  # torch.export's and the translator's own types, on a net of the user's
        while error.__cause__ is not None:  # the exporter's step that failed wraps why
            error = error.__cause__
        reason = re.sub(r"\x1b\[[0-9;]*m", "", first_line(error))  # its colours
        raise ConfigError(
            f"{source}: torch.onnx cannot export its {type(module).__name__} as a graph ({reason}): its "
            "forward must be traceable by torch.export (no Python branch on a tensor's values)"
        ) from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return program.model_proto


def _quantised_weights(net: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The int8 codes and per-output-channel scales of ``net``'s prunable weights (pruned: code 0)."""
    masks = masks_within(net)
    found = {}
    for name in prunable(net):
        value = weight(net, name).detach().float()
        keep = masks[name] != 0 if name in masks else torch.ones_like(value, dtype=torch.bool)
        found[name] = quantise(value, keep, name)
    return found


def _dequantise_in_graph(model: Any, quantised: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Store each quantised weight's initializer as int8 codes, a scale and a ``DequantizeLinear``."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    nodes = []
    for name, (codes, scale) in quantised.items():
        init = initializers.get(name)
        if init is None or list(init.dims) != list(codes.shape):
            continue  # the exporter folded or merged it: it stays float32, as exact as before
        model.graph.initializer.remove(init)
        rows = codes.shape[0]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(codes.numpy(), f"{name}@codes"),
                numpy_helper.from_array(scale.numpy(), f"{name}@scale"),
                numpy_helper.from_array(torch.zeros(rows, dtype=torch.int8).numpy(), f"{name}@zero"),
            ]
        )
        inputs = [f"{name}@codes", f"{name}@scale", f"{name}@zero"]
        nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=f"{name}@dequantize", axis=0))
    for node in reversed(nodes):
        model.graph.node.insert(0, node)


def _seal_and_write(model: Any, output: Path, artifact_json: str, graph: dict[str, Any]) -> Path:
    """Write ``model`` with the lthmaml metadata and its checksums (any earlier ones replaced)."""
    for prop in [p for p in model.metadata_props if p.key in (ARTIFACT_PROP, GRAPH_PROP, CHECKSUM_PROP)]:
        model.metadata_props.remove(prop)
    graph_json = json.dumps(graph, separators=(",", ":"))
    sums = checksums(model.SerializeToString(), artifact_json, graph_json)
    for key, value in ((ARTIFACT_PROP, artifact_json), (GRAPH_PROP, graph_json), (CHECKSUM_PROP, sums)):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    with replacing(output, "the ONNX artifact") as partial:
        partial.write_bytes(model.SerializeToString())
    read_model(output)  # it verifies as the device will verify it
    return output


def export_onnx(artifact: Artifact, output: Path, int8: bool = False, adaptation: bool = True) -> list[Path]:
    """Write the device graph of a loaded ``artifact`` at ``output`` (a ``.onnx`` path) and, for
    MAML and the classifier, its adaptation graph beside it (``adaptation`` false: not, the device
    then only predicts with the net as exported); returns the paths written."""
    metadata = artifact.metadata
    learner = metadata.learner
    if learner not in GRAPH_OF:
        raise ConfigError(f"{artifact.path}: no device graph for learner {learner!r}")
    kind = GRAPH_OF[learner]
    adapts = adaptation and learner in GRADIENT_LEARNERS
    if int8 and learner in GRADIENT_LEARNERS:
        raise ConfigError(
            f"{artifact.path}: int8 device graphs are for ProtoNet, MatchingNet and CNP; {learner} adapts "
            "float32 weights on the device, so its graphs stay float32: export them without --dtype int8"
        )
    net = artifact.net.eval()
    quantised = _quantised_weights(net) if int8 else {}
    module = _CNPMean(net) if kind == "cnp" else net
    model = _traced(module, kind, artifact.path, own_weights=adapts)
    if int8:
        _dequantise_in_graph(model, quantised)
    if adapts:
        _weights_as_inputs(model, net, artifact.path)
    values = dataclasses.asdict(metadata)
    artifact_json = json.dumps(values, separators=(",", ":"))
    weights = "int8" if int8 else "float32"
    adapt: Optional[Path] = adaptation_path(output) if adapts else None
    graph = {"graph": kind, "weights": weights, "adaptation": adapt.name if adapt else None}
    written = [_seal_and_write(model, Path(output), artifact_json, graph)]
    if adapt is not None:
        written.append(_export_adaptation(net, metadata, adapt, artifact_json, Path(output)))
    return written


def _weights_as_inputs(model: Any, net: nn.Module, source: Path) -> None:
    """List each parameter's initializer among the graph's inputs too: an input the device may feed
    (the adapted weights) and that otherwise holds the net's own weights."""
    from onnx import helper

    initializers = {init.name: init for init in model.graph.initializer}
    for name, parameter in net.named_parameters():
        init = initializers.get(name)
        if init is None or list(init.dims) != list(parameter.shape):
            raise ConfigError(
                f"{source}: the exported graph does not hold parameter {name!r} as itself, so the device "
                "could not feed it the adapted weights: export with --format safetensors for lthmaml-edge"
            )
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))


def _export_adaptation(
    net: nn.Module, metadata: Any, path: Path, artifact_json: str, model_path: Path
) -> Path:
    """The adaptation graph, from the weights the forward graph holds, the adapted weights among
    its outputs (the forward graph takes them for the query batches after the first)."""
    import onnx

    from lthmaml.edge.onnx_adapt import export_adaptation

    with tempfile.TemporaryDirectory(prefix="lthmaml-onnx-") as tmp:
        raw = Path(tmp) / "adapt.onnx"
        export_adaptation(net, metadata, raw)
        model = onnx.load(str(raw))
    graph = {"graph": "adaptation", "weights": "float32", "of": model_path.name}
    return _seal_and_write(model, path, artifact_json, graph)
