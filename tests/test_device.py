"""The device path without torch: ``lthmaml-export --format onnx`` writes the graph each learner runs
on the device, ``lthmaml-device`` adapts it to a task folder with onnxruntime, numpy and Pillow,
and its predictions.csv is lthmaml-edge's (same labels, probabilities within 1e-4; int8 within
its measured tolerance), distorted support copies included; an altered file is a one-line error.
Tiny nets: a 2-block Conv4 of 4 filters on 8x8 images, a CNPNet and an MLP of width 8."""

from __future__ import annotations

import csv
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install 'lthmaml[onnx]'")
pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript: pip install 'lthmaml[onnx]'")
pytest.importorskip("onnxruntime", reason="lthmaml-device needs onnxruntime: pip install 'lthmaml[device]'")
from onnx import numpy_helper  # noqa: E402

from lthmaml.data.taskfolder import TaskFolderDataModule  # noqa: E402
from lthmaml.data.taskfolder_build import make_image_task, make_sinusoid_task  # noqa: E402
from lthmaml.device.cli import main as device_main  # noqa: E402
from lthmaml.device.runtime import DeviceModel  # noqa: E402
from lthmaml.device.task import read_task, with_support_copies  # noqa: E402
from lthmaml.edge.artifact import load_artifact  # noqa: E402
from lthmaml.edge.cli import main as edge_main  # noqa: E402
from lthmaml.edge.export import export_net  # noqa: E402
from lthmaml.edge.export import main as export_main  # noqa: E402
from lthmaml.edge.onnx_export import export_onnx  # noqa: E402
from lthmaml.edge.onnx_format import adaptation_path, read_model, top_level_fields  # noqa: E402
from lthmaml.errors import DataError  # noqa: E402
from lthmaml.masks import masks_within  # noqa: E402
from lthmaml.meta import CNP, MatchingNet, ProtoNet  # noqa: E402
from lthmaml.meta.classifier import Classifier  # noqa: E402
from lthmaml.nets.models import MLP, CNPNet, Conv4  # noqa: E402
from lthmaml.sparsity import load_masks, magnitude_scores, masks_of, prune_channels, prune_lowest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PI = str(REPO / "configs" / "edge" / "pi.yaml")
SIZE = 8
LABELS = ["ant", "bee", "cat"]
INT8_TOLERANCE = 0.01
"""The largest difference of a query probability between the int8 graph and the float32 torch
path allowed on this test's task: measured 0.0011 at 80% sparsity (0.021 on 20-way Omniglot
tasks of a meta-trained ProtoNet, docs/edge.md); the int8 torch path is matched within 1e-4."""


# ---------------------------------------------------------------------------------- helpers
def conv(out_features, seed: int = 0, fraction: float = 0.0, channels: bool = False) -> Conv4:
    torch.manual_seed(seed)
    net = Conv4(out_features=out_features, hidden_channels=4, image_size=SIZE, blocks=2)
    if fraction:
        load_masks(net, prune_lowest(masks_of(net), magnitude_scores(net), fraction))
    if channels:  # Taylor-style filter pruning: the export shrinks these away
        prune_channels(net, "features.0.0", [1])
        prune_channels(net, "features.1.0", [0, 2])
    return net


def image_task(root: Path, query_shots: int = 4, labelled: bool = True) -> Path:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 1, SIZE, SIZE, generator=gen)
    images = (0.7 * base + 0.3 * torch.rand(3, 10, 1, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return make_image_task(root, images, LABELS, 2, 0, query_shots, labelled_query=labelled)


def cnp_net(fraction: float = 0.0) -> CNP:
    torch.manual_seed(0)
    net = CNPNet(representation=8, encoder_hidden=(8,), decoder_hidden=(8,))
    if fraction:
        load_masks(net, prune_lowest(masks_of(net), magnitude_scores(net), fraction))
    return CNP(net)


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def edge_predictions(artifact: Path, task: Path, out: Path, *options: str) -> list[dict]:
    args = [
        "predict",
        "-c",
        PI,
        "--threads",
        "1",
        "--model.artifact",
        str(artifact),
        "--data.root",
        str(task),
    ]
    edge_main([*args, *options, "--output", str(out)])
    return rows(out)


def device_predictions(onnx: Path, task: Path, out: Path, command: str = "fit", *options: str) -> list[dict]:
    device_main([command, "--artifact", str(onnx), "--task", str(task), "--output", str(out), *options])
    return rows(out)


def assert_same_predictions(edge: list[dict], device: list[dict], tolerance: float = 1e-4) -> None:
    assert [row["file"] for row in device] == [row["file"] for row in edge] and edge
    if "label" in edge[0]:
        assert [row["label"] for row in device] == [row["label"] for row in edge]
        column = "probability"
    else:
        assert [row["x"] for row in device] == [row["x"] for row in edge]
        column = "prediction"
    for a, b in zip(edge, device):
        assert abs(float(a[column]) - float(b[column])) <= tolerance + 5e-6 * abs(float(a[column])), (a, b)


def one_line(capsys, exit_info, prog: str = "lthmaml-device") -> str:
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ")
    return err


# ---------------------------------------------------------------------------------- equivalence
CASES = {
    "protonet_dense": lambda: ProtoNet(conv(None), optimizer=partial(torch.optim.Adam, lr=0.01)),
    "protonet_euclidean": lambda: ProtoNet(conv(None, fraction=0.8), distance="euclidean"),
    "protonet_80_pruned": lambda: ProtoNet(
        conv(None, fraction=0.8), optimizer=partial(torch.optim.Adam, lr=0.01)
    ),
    "protonet_shrunk": lambda: ProtoNet(
        conv(None, channels=True), optimizer=partial(torch.optim.Adam, lr=0.01)
    ),
    "matching_80_pruned": lambda: MatchingNet(conv(None, fraction=0.8), scale=7.3),
    "classifier_80_pruned": lambda: Classifier(conv(3, fraction=0.8)),
}
AUGMENTED = {
    "protonet_80_pruned_augmented": (
        ["--data.support_augmentation", "2", "--data.val_seed", "3"],
        ["--support_augmentation", "2", "--seed", "3"],
    ),
    "matching_80_pruned_augmented": (["--data.support_augmentation", "2"], ["--support_augmentation", "2"]),
}
"""Cases adapting on 2 distorted copies of each support image besides it: lthmaml-edge's options, then
lthmaml-device's (the default seeds, 0, agree)."""
CASES.update({name: CASES[name.removesuffix("_augmented")] for name in AUGMENTED})


@pytest.mark.parametrize("case", sorted(CASES))
def test_device_predictions_are_lthmaml_edges(tmp_path, case):
    """Same task folder (and distorted support copies), same labels, probabilities within 1e-4; pruned
    weights stay exactly zero in the graph and a shrunk net's graph is physically smaller."""
    artifact = export_net(CASES[case](), tmp_path / "a.safetensors")
    loaded = load_artifact(artifact)
    onnx_path = export_onnx(loaded, tmp_path / "a.onnx", adaptation=False)[0]  # the classifier predicts
    task = image_task(tmp_path / "task")
    edge_options, device_options = AUGMENTED.get(case, ([], []))
    edge = edge_predictions(artifact, task, tmp_path / "edge.csv", *edge_options)
    command = (
        "predict" if case.startswith("classifier") else "fit"
    )  # the classifier's steps: the adaptation graph
    device = device_predictions(onnx_path, task, tmp_path / "device.csv", command, *device_options)
    assert_same_predictions(edge, device)
    stored = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(onnx_path)).graph.initializer}
    masks = masks_within(loaded.net)
    assert masks or case in ("protonet_dense", "protonet_shrunk")
    for name, mask in masks.items():
        assert np.all(stored[name][mask.numpy() == 0] == 0), name
    if case == "protonet_shrunk":
        assert loaded.metadata.source_architecture is not None
        assert stored["features.0.0.weight"].shape[0] == 3 and stored["features.1.0.weight"].shape[:2] == (
            2,
            3,
        )


def test_support_augmentation_moves_the_probabilities_and_leaves_regression_alone(tmp_path, capsys):
    """The copies change what ProtoNet's prototypes average (and differ by seed); a regression task
    ignores the option, as lthmaml-edge's support_split does; a negative count is one line."""
    artifact = export_net(CASES["protonet_80_pruned"](), tmp_path / "p.safetensors")
    onnx_path = export_onnx(load_artifact(artifact), tmp_path / "p.onnx")[0]
    task = image_task(tmp_path / "task")

    def probabilities(*options: str) -> np.ndarray:
        predicted = device_predictions(onnx_path, task, tmp_path / "device.csv", "fit", *options)
        return np.array([float(row["probability"]) for row in predicted])

    plain, copied = probabilities(), probabilities("--support_augmentation", "2")
    assert np.abs(copied - plain).max() > 1e-3
    assert np.abs(probabilities("--support_augmentation", "2", "--seed", "1") - copied).max() > 1e-3
    np.testing.assert_array_equal(probabilities("--support_augmentation", "0", "--seed", "1"), plain)

    cnp = export_net(cnp_net(), tmp_path / "c.safetensors")
    [cnp_onnx] = export_onnx(load_artifact(cnp), tmp_path / "c.onnx")
    points = make_sinusoid_task(tmp_path / "points", shots=5, query_shots=10, seed=0)
    with_copies = device_predictions(
        cnp_onnx, points, tmp_path / "c2.csv", "fit", "--support_augmentation", "2"
    )
    assert with_copies == device_predictions(cnp_onnx, points, tmp_path / "c0.csv")
    with pytest.raises(SystemExit) as exit_info:
        device_predictions(onnx_path, task, tmp_path / "bad.csv", "fit", "--support_augmentation", "-1")
    assert "--support_augmentation must be >= 0 copies (0: none), got -1" in one_line(capsys, exit_info)


@pytest.mark.parametrize("fraction", [0.0, 0.8])
def test_a_cnp_on_the_device_predicts_what_lthmaml_edge_predicts(tmp_path, fraction):
    artifact = export_net(cnp_net(fraction), tmp_path / "c.safetensors")
    onnx_path = export_onnx(load_artifact(artifact), tmp_path / "c.onnx")[0]
    assert read_model(onnx_path).graph["graph"] == "cnp"
    task = make_sinusoid_task(tmp_path / "task", shots=5, query_shots=10, seed=0)
    edge = edge_predictions(artifact, task, tmp_path / "edge.csv")
    assert_same_predictions(edge, device_predictions(onnx_path, task, tmp_path / "device.csv"))


def test_int8_graph_is_the_int8_artifact_and_within_its_measured_tolerance_of_float(tmp_path):
    """The int8 graph holds the int8 artifact's codes and scales: the device gives the int8 torch
    path's predictions within 1e-4, and the float32 torch path's within INT8_TOLERANCE."""
    model = ProtoNet(conv(None, fraction=0.8), optimizer=partial(torch.optim.Adam, lr=0.01))
    float32 = export_net(model, tmp_path / "f.safetensors")
    int8 = export_net(model, tmp_path / "q.safetensors", dtype="int8")
    onnx_path = export_onnx(load_artifact(float32), tmp_path / "q.onnx", int8=True)[0]
    assert read_model(onnx_path).graph["weights"] == "int8"
    graph = onnx.load(str(onnx_path)).graph
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 2  # both conv weights
    assert {init.data_type for init in graph.initializer if init.name.endswith("@codes")} == {
        onnx.TensorProto.INT8
    }
    task = image_task(tmp_path / "task", query_shots=8)
    device = device_predictions(onnx_path, task, tmp_path / "device.csv")
    assert_same_predictions(edge_predictions(int8, task, tmp_path / "edge8.csv"), device)
    exact = edge_predictions(float32, task, tmp_path / "edge32.csv")
    assert [r["label"] for r in device] == [r["label"] for r in exact]
    worst = max(abs(float(a["probability"]) - float(b["probability"])) for a, b in zip(exact, device))
    assert worst <= INT8_TOLERANCE


def adapt_calls(monkeypatch) -> list[int]:
    """A list that counts the device's runs of the adaptation graph."""
    calls: list[int] = []
    adapt = DeviceModel.adapt

    def counted(self, *inputs):
        calls.append(len(inputs[2]))
        return adapt(self, *inputs)

    monkeypatch.setattr(DeviceModel, "adapt", counted)
    return calls


def test_maml_adapts_once_through_its_adaptation_graph(in_tmp, monkeypatch):
    """A query of three batches (6, 6, 3; BatchNorm on each batch's statistics): one adaptation,
    the net graph fed the adapted weights for the other batches, and lthmaml-edge's predictions."""
    pytest.importorskip(
        "lthmaml.edge.onnx_adapt", reason="MAML's adaptation graph exporter is not in this tree"
    )
    from lthmaml.meta.maml import MAML

    model = MAML(conv(3, fraction=0.5), inner_lr=0.1, inner_steps=2, eval_inner_steps=3)
    artifact = export_net(model, in_tmp / "m.safetensors")
    written = export_onnx(load_artifact(artifact), in_tmp / "m.onnx")
    assert written == [in_tmp / "m.onnx", adaptation_path(in_tmp / "m.onnx")]
    task = image_task(in_tmp / "task", query_shots=5)
    args = ["fit", "-c", PI, "--threads", "1", "--model.artifact", str(artifact), "--data.root", str(task)]
    edge_main([*args, "--data.batch_size", "6", "--predict_after_fit", "true"])  # no val/: 3 SGD steps
    edge = rows(in_tmp / "runs" / "edge" / "task" / "predictions.csv")
    calls = adapt_calls(monkeypatch)
    device = device_predictions(written[0], task, in_tmp / "device.csv", "fit", "--batch_size", "6")
    assert calls == [6] and len(device) == 15
    assert_same_predictions(edge, device)
    # the fit's adapted weights, written beside its predictions: predict with them, no steps
    later = device_predictions(
        written[0], task, in_tmp / "later.csv", "predict", "--batch_size", "6", "--adapted", "adapted.npz"
    )
    assert calls == [6]
    assert_same_predictions(device, later, tolerance=1e-5)
    assert [r["label"] for r in device_predictions(written[0], task, in_tmp / "raw.csv", "predict")] != [
        r["label"] for r in device
    ]

    device_model = DeviceModel(written[0])
    support, query = (read_task(task, device_model.metadata, "m").splits[s] for s in ("support", "query"))
    outputs, weights = device_model.adapt(support.x, support.y, query.x[:6])
    stored = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(written[0])).graph.initializer}
    assert set(weights) == {name for name, _ in model.net.named_parameters()}
    for name, mask in masks_within(load_artifact(artifact).net).items():
        assert np.all(weights[name][mask.numpy() == 0] == 0) and not np.allclose(weights[name], stored[name])
    fed = device_model.run(device_model.session, query.x[:6], weights=weights)
    np.testing.assert_allclose(fed, outputs, atol=1e-5)
    assert np.abs(device_model.run(device_model.session, query.x[:6]) - outputs).max() > 1e-3


@pytest.fixture(scope="module")
def maml_fit(tmp_path_factory) -> SimpleNamespace:
    """A small MAML's ONNX export, a task, and the adapted weights a device fit wrote."""
    from lthmaml.meta.maml import MAML

    folder = tmp_path_factory.mktemp("maml_fit")
    model = MAML(conv(3, fraction=0.5), inner_lr=0.1, inner_steps=1, eval_inner_steps=1)
    [onnx_path, _] = export_onnx(
        load_artifact(export_net(model, folder / "m.safetensors")), folder / "m.onnx"
    )
    task = image_task(folder / "task")
    device_predictions(onnx_path, task, folder / "fit" / "predictions.csv")
    return SimpleNamespace(onnx=onnx_path, task=task, adapted=folder / "fit" / "adapted.npz", folder=folder)


@pytest.mark.parametrize("case", ["missing", "damaged", "another_model", "protonet"])
def test_adapted_weights_that_do_not_fit_are_one_line(maml_fit, tmp_path, capsys, case):
    """A missing or damaged file, another model's weights, or a learner without adapted weights."""
    from lthmaml.meta.maml import MAML

    onnx_path, adapted = maml_fit.onnx, maml_fit.adapted
    assert set(np.load(adapted).files) > {"head.weight"}
    if case == "missing":
        adapted = tmp_path / "none.npz"
    elif case == "damaged":
        adapted = tmp_path / "cut.npz"
        adapted.write_bytes(maml_fit.adapted.read_bytes()[:200])
    elif case == "another_model":
        other = MAML(conv(3, seed=1), inner_lr=0.1, inner_steps=1, eval_inner_steps=1)
        onnx_path = export_onnx(
            load_artifact(export_net(other, tmp_path / "o.safetensors")), tmp_path / "o.onnx"
        )[0]
    else:
        onnx_path = export_onnx(
            load_artifact(export_net(ProtoNet(conv(None)), tmp_path / "p.safetensors")), tmp_path / "p.onnx"
        )[0]
    with pytest.raises(SystemExit) as exit_info:
        device_main(
            ["predict", "--artifact", str(onnx_path), "--task", str(maml_fit.task), "--adapted", str(adapted)]
        )
    expected = {
        "missing": "no such file; `lthmaml-device fit` writes adapted.npz beside its predictions",
        "damaged": "not readable adapted weights",
        "another_model": f"adapted weights of another model than {onnx_path}",
        "protonet": "it adapts to the support set in each launch",
    }[case]
    assert expected in one_line(capsys, exit_info)


def test_a_regression_maml_adapts_through_its_adaptation_graph(in_tmp, monkeypatch):
    """The sinusoid MLP: float targets into the adaptation graph, rows ``file,x,prediction``, a
    query of two batches after one adaptation."""
    from lthmaml.meta.maml import MAML

    torch.manual_seed(0)
    model = MAML(MLP(hidden=(8, 8)), inner_lr=0.01, inner_steps=1, eval_inner_steps=4)
    artifact = export_net(model, in_tmp / "s.safetensors")
    [onnx_path, _] = export_onnx(load_artifact(artifact), in_tmp / "s.onnx")
    task = make_sinusoid_task(in_tmp / "task", shots=5, query_shots=10, seed=0)
    args = ["fit", "-c", PI, "--threads", "1", "--model.artifact", str(artifact), "--data.root", str(task)]
    edge_main([*args, "--data.batch_size", "5", "--predict_after_fit", "true"])
    edge = rows(in_tmp / "runs" / "edge" / "task" / "predictions.csv")
    calls = adapt_calls(monkeypatch)
    device = device_predictions(onnx_path, task, in_tmp / "device.csv", "fit", "--batch_size", "5")
    assert calls == [5] and len(device) == 10
    assert_same_predictions(edge, device)


def test_an_int8_graph_of_a_learner_that_adapts_by_steps_is_refused(tmp_path, capsys):
    """MAML and the classifier adapt float32 weights on the device: one line, and no graph written."""
    net = conv(3, fraction=0.5)
    weights = {f"net.{k}": v for k, v in net.state_dict().items() if not k.startswith("masks.")}
    masks = {f"masks.net.{k}": v for k, v in masks_within(net).items()}
    init_args = {"out_features": 3, "hidden_channels": 4, "image_size": SIZE, "blocks": 2}
    hparams = {
        "_class_path": "lthmaml.meta.maml.MAML",
        "net": {"class_path": "lthmaml.nets.models.Conv4", "init_args": init_args},
    }
    torch.save({"state_dict": {**weights, **masks}, "hyper_parameters": hparams}, tmp_path / "m.ckpt")
    assert export_main([str(tmp_path / "m.ckpt"), "--format", "onnx", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export them without --dtype int8" in err
    assert not list(tmp_path.glob("*.onnx"))


def test_maml_without_its_adaptation_graph_is_a_one_line_error(tmp_path, capsys):
    artifact = export_net(Classifier(conv(3)), tmp_path / "c.safetensors")
    [model] = export_onnx(load_artifact(artifact), tmp_path / "c.onnx", adaptation=False)
    adapt = adaptation_path(model)
    with pytest.raises(SystemExit) as exit_info:
        device_main(["fit", "--artifact", str(model), "--task", str(image_task(tmp_path / "task"))])
    err = one_line(capsys, exit_info)
    assert str(adapt) in err and "lthmaml-export CHECKPOINT --format onnx" in err


# ---------------------------------------------------------------------------------- the export command
def test_lthmaml_export_format_onnx_writes_both_artifacts_from_a_checkpoint(tmp_path, capsys):
    net = conv(None, fraction=0.5)
    weights = {f"net.{k}": v for k, v in net.state_dict().items() if not k.startswith("masks.")}
    masks = {f"masks.net.{k}": v for k, v in masks_within(net).items()}
    init_args = {"out_features": None, "hidden_channels": 4, "image_size": SIZE, "blocks": 2}
    hparams = {
        "_class_path": "lthmaml.meta.protonet.ProtoNet",
        "net": {"class_path": "lthmaml.nets.models.Conv4", "init_args": init_args},
    }
    torch.save({"state_dict": {**weights, **masks}, "hyper_parameters": hparams}, tmp_path / "p.ckpt")
    assert export_main([str(tmp_path / "p.ckpt"), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'p.safetensors'}" in out and f"wrote {tmp_path / 'p.onnx'}" in out
    metadata = read_model(tmp_path / "p.onnx").metadata
    assert metadata["learner"] == "protonet" and metadata["look"] == "ink"
    assert metadata["source_sha256"] == load_artifact(tmp_path / "p.safetensors").metadata.source_sha256


# ---------------------------------------------------------------------------------- decoding
def test_the_device_decodes_as_the_torch_path_bit_for_bit(tmp_path):
    """One numpy implementation of the look, the normalisation and the distorted support copies:
    the same float32 input."""
    metadata = SimpleNamespace(
        task="classification",
        ways=None,
        look="gray",
        normalization={"mean": [0.31], "std": [0.27]},
        architecture={"init_args": {"image_size": SIZE, "in_channels": 1}},
    )
    task = image_task(tmp_path / "task")
    device = read_task(task, metadata, "model")
    dm = TaskFolderDataModule(str(task), support_augmentation=2, val_seed=5)
    dm.follow(metadata)
    dm.setup()
    copied = with_support_copies(device, 2, seed=5).splits["support"]
    pairs = [(device.splits[name], split) for name, split in dm.splits.items()]
    for ours, theirs in [*pairs, (copied, dm.support_split())]:
        assert np.array_equal(ours.x, theirs.x.numpy())
        assert ours.files == theirs.files
        assert np.array_equal(ours.y, theirs.y.numpy())
    assert len(copied) == 18 and not np.array_equal(copied.x[6:12], copied.x[:6])


# ---------------------------------------------------------------------------------- integrity and errors
def _initializer_offset(data: bytes) -> int:
    """The offset of the first conv weight's raw data inside the serialised model."""
    graph = next(payload for number, _, payload in top_level_fields(data) if number == 7)
    init = next(payload for number, _, payload in top_level_fields(graph) if number == 5)
    raw = next(payload for number, _, payload in top_level_fields(init) if number == 9)
    return data.index(raw)


@pytest.mark.parametrize("case", ["weights", "metadata", "not_onnx", "missing", "cut"])
def test_an_altered_or_wrong_onnx_artifact_is_one_line_naming_it(tmp_path, capsys, case):
    artifact = export_net(ProtoNet(conv(None)), tmp_path / "p.safetensors")
    good = export_onnx(load_artifact(artifact), tmp_path / "p.onnx")[0]
    bad = tmp_path / "bad.onnx"
    data = good.read_bytes()
    if case == "weights":
        start = _initializer_offset(data) + 8
        bad.write_bytes(data[:start] + bytes(b ^ 0xFF for b in data[start : start + 64]) + data[start + 64 :])
    elif case == "metadata":
        bad.write_bytes(data.replace(b'"look":"ink"', b'"look":"rgb"'))
    elif case == "not_onnx":
        bad = artifact
    elif case == "cut":
        bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        read_model(bad)
    message = str(info.value)
    assert message.startswith(str(bad)) and len(message.splitlines()) == 1
    expected = {
        "weights": "its graph and weights do not match the SHA-256 recorded at export",
        "metadata": "its metadata does not match the SHA-256 recorded at export",
        "not_onnx": "not an ONNX model",
        "missing": "no such ONNX artifact file",
        "cut": "not a readable ONNX model",
    }[case]
    assert expected in message
    with pytest.raises(SystemExit) as exit_info:
        device_main(["fit", "--artifact", str(bad), "--task", str(image_task(tmp_path / "task"))])
    assert expected in one_line(capsys, exit_info)


def test_a_task_of_the_wrong_kind_is_one_line(tmp_path, capsys):
    artifact = export_net(cnp_net(), tmp_path / "c.safetensors")
    onnx_path = export_onnx(load_artifact(artifact), tmp_path / "c.onnx")[0]
    with pytest.raises(SystemExit) as exit_info:
        device_main(["fit", "--artifact", str(onnx_path), "--task", str(image_task(tmp_path / "task"))])
    assert "does regression but task folder" in one_line(capsys, exit_info)


# ---------------------------------------------------------------------------------- no torch
BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "lightning", "safetensors", "onnx", "onnxscript", "jsonargparse"):
            raise ImportError(f"{name} is blocked: the device path must not import it")
sys.meta_path.insert(0, NoTorch())
from lthmaml.device.cli import main
main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning"))
assert not loaded, loaded
"""


@pytest.mark.parametrize("copies", [0, 2])
def test_lthmaml_device_runs_with_torch_unimportable(tmp_path, copies):
    """With distorted support copies too: their warp is numpy's."""
    model = MatchingNet(conv(None, fraction=0.8), scale=7.3)
    artifact = export_net(model, tmp_path / "m.safetensors")
    onnx_path = export_onnx(load_artifact(artifact), tmp_path / "m.onnx")[0]
    task = image_task(tmp_path / "task", labelled=False)
    edge = edge_predictions(artifact, task, tmp_path / "edge.csv", "--data.support_augmentation", str(copies))
    out = tmp_path / "device.csv"
    args = ["fit", "--artifact", str(onnx_path), "--task", str(task), "--output", str(out), "--threads", "1"]
    args += ["--support_augmentation", str(copies)]
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"Wrote 12 predictions to {out}" in done.stdout and "Timings: start-up" in done.stdout
    assert_same_predictions(edge, rows(out))
