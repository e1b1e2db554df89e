"""Adapting an ONNX artifact to a task and scoring its query, with onnxruntime and numpy.

Each learner adapts as ``lthmaml-edge`` adapts it when the task has no validation split:

* ProtoNet, MatchingNet: the support set goes through the embedding graph in one batch, the
  query in batches of ``batch_size`` (BatchNorm uses the batch's statistics, so the batches must
  be the torch path's), and each query is scored by the learner's rule, written here in numpy as
  :mod:`lthmaml.meta.protonet` and :mod:`lthmaml.meta.matching` write it in torch: negative
  squared distances to the class prototypes, or the log of the attention-weighted support labels;
* CNP: the encoder and decoder graph gives the predictive mean of the query points given the
  support pairs;
* MAML, classifier: the adaptation graph runs the artifact's ``eval_inner_steps`` SGD steps on the
  whole support set once, giving the first query batch's logits and the adapted weights, which
  the net graph then takes for the other batches (the torch path batches at least the support
  set's size: it raises ``data.batch_size`` to it); ``adapt=False`` scores with the net as exported,
  ``weights`` with a fit's adapted weights (:func:`write_adapted`, :func:`read_adapted`).

A validation split is not used: the device runs forward graphs only, so there are no epochs to
stop early; the torch path's fixed inner loop (no ``val/``) is what it reproduces.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from lthmaml.device.task import Split, Task
from lthmaml.edge.onnx_format import (
    ADAPTED,
    EXPORT_AGAIN,
    OnnxArtifact,
    adaptation_path,
    graph_digest,
    read_model,
)
from lthmaml.errors import ConfigError, DataError
from lthmaml.files import replacing
from lthmaml.meta.distances import EUCLIDEAN_EPS

try:
    import onnxruntime as ort
except ImportError:  # the device extra was not installed
    ort = None

INSTALL = "pip install 'lthmaml[device]'"
COSINE_EPS = 1e-8
"""``torch.nn.functional.cosine_similarity``'s floor of a vector's norm."""
ADAPTED_FILE = "adapted.npz"
"""What ``lthmaml-device fit`` writes beside the predictions for MAML and the classifier."""
MODEL_KEY = "__model_graph_sha256__"
"""The entry of an adapted-weights file that binds it to its model's graph."""


def _session(artifact: OnnxArtifact, threads: int) -> Any:
    if ort is None:
        raise ConfigError(f"lthmaml-device needs onnxruntime to run {artifact.path}: {INSTALL}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the graph's notes are not the user's business
    # No arena: one launch runs a graph a few times, and an arena that keeps every batch's growth
    # costs a device more memory (a 20-way 1-shot Conv4 task: 118 MiB peak against 98) than the
    # reuse saves time.
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(artifact.data, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types
        raise DataError(
            f"{artifact.path}: onnxruntime cannot load it ({_first_line(error)}): {EXPORT_AGAIN}"
        ) from None


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


class DeviceModel:
    """A verified ONNX artifact ready to run: ``metadata`` (the artifact metadata's fields as
    attributes), ``graph`` (what the file computes), ``image_size`` (the side of the images its
    graph takes, None for points), and its adaptation graph, loaded on first use."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        artifact = read_model(self.path)
        if artifact.graph["graph"] == "adaptation":
            raise ConfigError(
                f"{self.path} is an adaptation graph: give the model it belongs to, "
                f"{artifact.graph.get('of')}"
            )
        self._metadata_json = json.dumps(artifact.metadata, sort_keys=True)
        self.graph_sha256 = graph_digest(artifact.data)
        self.metadata = SimpleNamespace(**artifact.metadata)
        self.graph = artifact.graph
        self.session = _session(artifact, threads)
        self._adaptation: Optional[Any] = None

    @property
    def image_size(self) -> Optional[int]:
        """The side of the square images the graph takes, as its first input says (a net of the
        user's own need not name it among its init_args); None for a graph of points."""
        shape = self.session.get_inputs()[0].shape
        side = shape[-1] if len(shape) == 4 else None
        return side if isinstance(side, int) else None

    @property
    def learner(self) -> str:
        return self.metadata.learner

    @property
    def regression(self) -> bool:
        return self.metadata.task == "regression"

    def adaptation(self) -> Any:
        """The session of the adaptation graph beside the model (MAML, classifier)."""
        if self._adaptation is None:
            name = self.graph.get("adaptation")
            path = self.path.with_name(name) if name else None
            if path is None or not path.is_file():
                missing = path or adaptation_path(self.path)
                raise DataError(
                    f"{self.path}: learner {self.learner!r} adapts through its adaptation graph {missing}, "
                    "which is missing: export the checkpoint with `lthmaml-export CHECKPOINT --format onnx` "
                    "and copy both .onnx files (or run `lthmaml-device predict` to score without adapting)"
                )
            artifact = read_model(path)
            if (
                artifact.graph["graph"] != "adaptation"
                or json.dumps(artifact.metadata, sort_keys=True) != self._metadata_json
            ):
                raise DataError(
                    f"{path}: not the adaptation graph of {self.path} (another export's?): {EXPORT_AGAIN}"
                )
            session = _session(artifact, self.threads)
            adapted = [spec.name.removeprefix(ADAPTED) for spec in session.get_outputs()[1:]]
            feedable = {spec.name for spec in self.session.get_overridable_initializers()}
            if not adapted or not feedable.issuperset(adapted):
                raise DataError(
                    f"{path}: its adapted weights are not what {self.path} takes (an older export?): "
                    f"{EXPORT_AGAIN}"
                )
            self._adaptation = session
        return self._adaptation

    def adapt(
        self, support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The adaptation graph on the support set: the query batch's outputs after adapting, and
        the adapted weights by name, which :meth:`run` feeds the net graph for other batches."""
        session = self.adaptation()
        outputs, *weights = self._run(session, (support_x, support_y, query_x), {})
        names = [spec.name.removeprefix(ADAPTED) for spec in session.get_outputs()[1:]]
        return outputs, dict(zip(names, weights))

    def run(
        self, session: Any, *inputs: np.ndarray, weights: Optional[dict[str, np.ndarray]] = None
    ) -> np.ndarray:
        """The graph's first output for ``inputs`` (in the graph's input order), with ``weights``
        (:meth:`adapt`'s) in place of the net graph's own."""
        return self._run(session, inputs, weights or {})[0]

    def _run(self, session: Any, inputs: tuple, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = dict(weights)
        for spec, value in zip(session.get_inputs(), inputs):
            feeds[spec.name] = value.astype(np.int64 if "int64" in spec.type else np.float32, copy=False)
        try:
            return session.run(None, feeds)
        except Exception as error:  # onnxruntime's own exception types
            raise DataError(
                f"{self.path}: onnxruntime could not run it on this task ({_first_line(error)})"
            ) from None


# ---------------------------------------------------------------------------------- the rules
def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    return (np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top).squeeze(axis)


def prototype_logits(
    support: np.ndarray, labels: np.ndarray, query: np.ndarray, ways: int, distance: str = "squared"
) -> np.ndarray:
    """``[queries, ways]``: ``-||q - c_k||^2`` (``-||q - c_k||`` for ``euclidean``) to each class's
    mean support embedding ``c_k``, as :func:`lthmaml.meta.protonet.distance_logits`."""
    onehot = np.eye(ways, dtype=support.dtype)[labels]
    centres = (onehot.T @ support) / onehot.sum(0)[:, None]
    squared = np.square(query[:, None, :] - centres[None, :, :]).sum(-1)
    return -squared if distance == "squared" else -np.sqrt(squared + np.float32(EUCLIDEAN_EPS))


def matching_log_probabilities(
    support: np.ndarray, labels: np.ndarray, query: np.ndarray, ways: int, scale: float
) -> np.ndarray:
    """``[queries, ways]``: the log of the attention-weighted support labels, the attention a softmax
    over the support examples of ``scale`` times the cosine similarities."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), COSINE_EPS)

    logits = np.float32(scale) * (unit(query) @ unit(support).T)
    log_attention = logits - _logsumexp(logits, 1)[:, None]
    return np.stack([_logsumexp(log_attention[:, labels == k], 1) for k in range(ways)], 1)


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[start : start + size] for start in range(0, len(x), size)]


def scores(
    model: DeviceModel,
    task: Task,
    batch_size: int,
    adapt: bool = True,
    weights: Optional[dict[str, np.ndarray]] = None,
) -> tuple[np.ndarray, Optional[dict[str, np.ndarray]]]:
    """The query's class scores ``[queries, ways]`` (logits or log-probabilities), or its
    predictions ``[queries, 1]`` for regression, after adapting to the support set; and MAML's or
    the classifier's adapted weights (None for the learners that adapt in a forward pass, or
    without adapting). ``weights``: a fit's adapted weights (:func:`read_adapted`), scored with
    instead of adapting again."""
    support, query = task.splits["support"], task.splits["query"]
    learner, kind = model.learner, model.graph["graph"]
    if kind == "embedding":
        ways = len(task.labels)
        embedded = model.run(model.session, support.x)
        parts = []
        for batch in _batches(query.x, batch_size):
            embedding = model.run(model.session, batch)
            if learner == "protonet":
                parts.append(prototype_logits(embedded, support.y, embedding, ways, model.metadata.distance))
            else:
                parts.append(
                    matching_log_probabilities(
                        embedded, support.y, embedding, ways, model.metadata.metric_scale
                    )
                )
        return np.concatenate(parts), None
    if kind == "cnp":
        return model.run(model.session, support.x, support.y, query.x), None
    if weights is not None or not adapt:
        batches = _batches(query.x, batch_size)
        return np.concatenate([model.run(model.session, batch, weights=weights) for batch in batches]), None
    size = max(batch_size, len(support))  # lthmaml-edge's inner loop takes the support set as one batch
    first, *others = _batches(query.x, size)
    outputs, weights = model.adapt(support.x, _support_targets(support, model.adaptation()), first)
    rest = [model.run(model.session, batch, weights=weights) for batch in others]
    return np.concatenate([outputs, *rest]), weights


def write_adapted(path: Path, model: DeviceModel, weights: dict[str, np.ndarray]) -> Path:
    """``weights`` (a fit's adapted weights) as a numpy ``.npz`` at ``path``, bound to ``model``'s
    graph by its SHA-256, for ``lthmaml-device predict --adapted`` (the device's counterpart of
    ``lthmaml-edge``'s ``finetuned.safetensors``)."""
    with replacing(path, "the adapted weights") as partial, open(partial, "wb") as handle:
        np.savez(handle, **{MODEL_KEY: np.array(model.graph_sha256)}, **weights)
    return path


def read_adapted(path: Path, model: DeviceModel) -> dict[str, np.ndarray]:
    """The adapted weights :func:`write_adapted` wrote at ``path`` for ``model``; a missing, damaged
    or foreign file is a one-line DataError naming it."""
    if model.graph["graph"] != "logits" or model.graph.get("adaptation") is None:
        raise ConfigError(
            f"--adapted: {model.path} ({model.learner}) has no adapted weights: "
            + (
                "it adapts to the support set in each launch"
                if model.graph["graph"] != "logits"
                else "it was exported without its adaptation graph"
            )
        )
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such file; `lthmaml-device fit` writes {ADAPTED_FILE} beside its predictions"
        ) from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # cut, or not numpy's
        raise DataError(
            f"{path}: not readable adapted weights ({_first_line(error)}): run the fit again"
        ) from None
    bound = arrays.pop(MODEL_KEY, None)
    if bound is None or str(bound) != model.graph_sha256:
        raise DataError(
            f"{path}: adapted weights of another model than {model.path}: run the fit again with it"
        )
    return arrays


def _support_targets(support: Split, session: Any) -> np.ndarray:
    """The support targets as the adaptation graph takes them: class indices ``[S]``, or the
    regression targets in the shape of its ``support_y`` input."""
    spec = session.get_inputs()[1]
    if "int64" in spec.type:
        return support.y.reshape(-1)
    return support.y.reshape(len(support), -1) if len(spec.shape) == 2 else support.y.reshape(-1)
