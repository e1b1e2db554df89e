"""An artifact for any architecture. ResNet-12 and ResNet-18 travel in the compact safetensors
format, rebuilt from their architecture with their BatchNorm mode; a Taylor-pruned (shrunk)
ResNet-12 too, stored shrunk and cut back to its channel widths as it loads; a net of the user's
own travels as an ONNX graph that ``lthmaml-device`` runs without its class. Each predicts on a
task folder what its checkpoint's learner predicts (same labels, probabilities within 1e-4).
Tiny nets on 16x16 images (ResNet-12 halves them in four stages)."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import rewrite, stored
from torch import nn

from lthmaml.data.taskfolder import TaskFolderDataModule
from lthmaml.data.taskfolder_build import make_image_task
from lthmaml.data.tasks import TaskBatch
from lthmaml.edge.artifact import COMPUTED_FIELDS, load_artifact
from lthmaml.edge.cli import FINETUNED
from lthmaml.edge.cli import main as edge_main
from lthmaml.edge.export import export_checkpoint, export_net, graph_artifact
from lthmaml.edge.export import main as export_main
from lthmaml.errors import ConfigError, DataError
from lthmaml.masks import folded
from lthmaml.meta import ProtoNet
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.nets import ResNet12, ResNet18
from lthmaml.nets.shrink import shrink
from lthmaml.sparsity import (
    load_masks,
    magnitude_scores,
    masks_of,
    masks_within,
    prune_channels,
    prune_lowest,
)

REPO = Path(__file__).resolve().parents[1]
PI = str(REPO / "configs" / "edge" / "pi.yaml")
SIZE = 16
LABELS = ["ant", "bee", "cat"]
RESNET12 = "lthmaml.nets.resnet.ResNet12"
RESNET18 = "lthmaml.nets.resnet.ResNet18"


# ---------------------------------------------------------------------------------- helpers
def pruned(net: nn.Module, fraction: float = 0.5) -> nn.Module:
    load_masks(net, prune_lowest(masks_of(net), magnitude_scores(net), fraction))
    return net


def with_running_stats(net: nn.Module) -> nn.Module:
    """BatchNorm's running statistics moved away from 0 and 1 by a few training batches, so a
    path that dropped them, or used the batch's instead, would predict otherwise."""
    generator = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(6, 1, SIZE, SIZE, generator=generator) * 2 + 0.5)
    return net.eval()


def taylor_pruned(net: nn.Module) -> nn.Module:
    """Filters removed as Taylor pruning removes them (every filter and BatchNorm channel of a
    channel group masked), in a chain group, a residual group and a later chain group."""
    prune_channels(net, "stages.0.conv1", [1])
    prune_channels(net, "stages.0.conv3", [0, 3])  # with the skip path's projection
    prune_channels(net, "stages.2.conv2", [2, 5, 6])
    return pruned(net, 0.3)


def resnet12(out_features, running_stats: bool = False) -> ResNet12:
    torch.manual_seed(0)
    return ResNet12(out_features, 1, widths=(4, 4, 8, 8), image_size=SIZE, running_stats=running_stats)


def resnet18(out_features) -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(out_features, in_channels=1, width=2, image_size=SIZE, running_stats=True)


def write_checkpoint(path: Path, model: nn.Module, net_class_path: str, init_args: dict) -> Path:
    """What a LightningCLI checkpoint holds for an export: the learner's and the net's class paths,
    the net's init_args, MAML's inner loop, the state_dict (masks beside the net)."""
    cls = type(model)
    hparams: dict = {
        "_class_path": f"{cls.__module__}.{cls.__qualname__}",
        "net": {"class_path": net_class_path, "init_args": init_args},
    }
    if isinstance(model, MAML):
        hparams.update(
            inner_lr=model.inner_lr, inner_steps=model.inner_steps, eval_inner_steps=model.eval_inner_steps
        )
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams}, path)
    return path


def image_task(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 1, SIZE, SIZE, generator=gen)
    images = (0.7 * base + 0.3 * torch.rand(3, 10, 1, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return make_image_task(root, images, LABELS, 2, 0, 4)


def task_of(root: Path, metadata, image_size: int = SIZE) -> tuple[TaskBatch, list[str]]:
    """The task folder as the model's meta-training decoded images (its look), one task."""
    dm = TaskFolderDataModule(str(root), image_size=image_size)
    dm.follow(metadata)
    dm.setup()
    support, query = dm.splits["support"], dm.splits["query"]
    return TaskBatch(support.x, support.y, query.x, query.y), list(dm.query_files)


def learner_probabilities(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """``[queries, ways]``: what the learner itself predicts for the task, in evaluation mode."""
    model.eval()
    if isinstance(model, MAML):
        one = TaskBatch(*(field.unsqueeze(0) for field in batch))
        with torch.enable_grad():
            return model.query_logits(one)[0].softmax(-1)
    with torch.no_grad():
        if isinstance(model, ProtoNet):
            return model.task_log_probabilities(batch).exp()
        return model.net(batch.query_x).softmax(-1)


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_predicts(got: list[dict], files: list[str], probabilities: torch.Tensor) -> None:
    """The CSV's rows are the query files with the learner's labels, probabilities within 1e-4."""
    best, index = probabilities.max(-1)
    assert [row["file"] for row in got] == files and got
    assert [row["label"] for row in got] == [LABELS[i] for i in index]
    assert [float(row["probability"]) for row in got] == pytest.approx(best.tolist(), abs=1e-4)


def edge(command: str, artifact: Path, task: Path, *extra: str) -> None:
    edge_main(
        [
            command,
            "-c",
            PI,
            "--threads",
            "1",
            "--model.artifact",
            str(artifact),
            "--data.root",
            str(task),
            *extra,
        ]
    )


# ---------------------------------------------------------------------------------- the residual nets
def _protonet(running_stats: bool, prune: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, str, dict]:
    net = prune(resnet12(None, running_stats))
    net = with_running_stats(net) if running_stats else net
    return ProtoNet(net, optimizer=partial(torch.optim.Adam, lr=0.01)), RESNET12, net.architecture


CASES: dict[str, Callable[[], tuple[nn.Module, str, dict]]] = {
    "protonet_resnet12_running_stats": lambda: _protonet(True, pruned),
    "protonet_resnet12_taylor": lambda: _protonet(False, taylor_pruned),
    "classifier_resnet12": lambda: (Classifier(pruned(resnet12(3))), RESNET12, resnet12(3).architecture),
    "classifier_resnet18_running_stats": lambda: (
        Classifier(with_running_stats(pruned(resnet18(3)))),
        RESNET18,
        resnet18(3).architecture,
    ),
    "maml_resnet12": lambda: (
        MAML(taylor_pruned(resnet12(3)), inner_lr=0.1, inner_steps=1, eval_inner_steps=3),
        RESNET12,
        resnet12(3).architecture,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resnet_checkpoint_exports_and_lthmaml_edge_predicts_what_its_learner_does(in_tmp, case):
    """``lthmaml-export`` writes the compact artifact of the checkpoint; ``lthmaml-edge`` adapts it to
    the task folder as the learner does (ProtoNet: the prototypes; MAML: eval_inner_steps SGD
    steps; the classifier predicts as it is) and writes the learner's predictions."""
    model, class_path, init_args = CASES[case]()
    ckpt = write_checkpoint(in_tmp / "model.ckpt", model, class_path, init_args)
    assert export_main([str(ckpt)]) == 0
    artifact = load_artifact(in_tmp / "model.safetensors")
    assert artifact.metadata.architecture["class_path"] == class_path
    assert artifact.metadata.architecture["init_args"] == init_args  # running_stats among them
    task = image_task(in_tmp / "task")
    batch, files = task_of(task, artifact.metadata)
    expected = learner_probabilities(model, batch)
    if case.startswith("classifier"):
        edge("predict", in_tmp / "model.safetensors", task, "--output", str(in_tmp / "edge.csv"))
        got = rows(in_tmp / "edge.csv")
    else:  # adapting and predicting in one launch; fit writes the adapted net as an artifact too
        edge("fit", in_tmp / "model.safetensors", task, "--predict_after_fit", "true")
        got = rows(in_tmp / "runs" / "edge" / "task" / "predictions.csv")
        tuned = load_artifact(in_tmp / "runs" / "edge" / "task" / FINETUNED).metadata
        assert tuned.architecture == artifact.metadata.architecture
        assert tuned.source_architecture == artifact.metadata.source_architecture
    assert_predicts(got, files, expected)


def test_a_taylor_pruned_resnet12_is_stored_shrunk_and_loads_as_the_shrunk_net(tmp_path):
    """The file holds the shrunk net's kept values only (removed filters cost nothing, not even
    mask bits); its architecture is the source's plus the channel widths shrinking left, to which
    the loader cuts the ResNet-12 it builds; the loaded net is the shrunk net, masks and all."""
    net = taylor_pruned(resnet12(None))
    full_masks = masks_within(net)
    path = export_net(ProtoNet(net), tmp_path / "p.safetensors")
    expected, expected_masks = shrink(folded(net), full_masks)
    loaded = load_artifact(path)

    architecture = loaded.metadata.architecture
    assert loaded.metadata.source_architecture == {"class_path": RESNET12, "init_args": net.architecture}
    assert architecture["init_args"] == net.architecture
    widths = architecture["channels"]
    assert (widths["stages.0.conv1"], widths["stages.0.conv3"], widths["stages.2.conv2"]) == (3, 2, 5)
    assert widths["stages.1.conv1"] == 4 and widths["stages.3.conv3"] == 8  # untouched groups
    got = {k: v for k, v in loaded.net.state_dict().items() if not k.startswith("masks.")}
    want = expected.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert masks_within(loaded.net).keys() == expected_masks.keys() and expected_masks
    for name, mask in expected_masks.items():
        assert torch.equal(masks_within(loaded.net)[name], mask), name

    values = sum(t.numel() for k, t in stored(path).items() if not k.endswith(("@mask", "@maskz")))
    kept = sum(
        int(expected_masks[k].count_nonzero()) if k in expected_masks else t.numel() for k, t in want.items()
    )
    assert values == kept < sum(t.numel() for t in net.state_dict().values())


def test_a_shrunk_resnet_exported_again_keeps_its_tensors_and_architecture(tmp_path):
    """What lthmaml-edge's fit does with the net it adapted: the loaded, shrunk ResNet-12 has no
    constructor arguments for its narrower layers, so it goes out with the source architecture its
    metadata carries, and the same tensors."""
    first = export_net(ProtoNet(taylor_pruned(resnet12(None))), tmp_path / "a.safetensors")
    loaded = load_artifact(first)
    carried = {k: v for k, v in dataclasses.asdict(loaded.metadata).items() if k not in COMPUTED_FIELDS}
    again = load_artifact(export_net(loaded.net, tmp_path / "b.safetensors", carried))
    assert again.metadata.architecture == loaded.metadata.architecture
    assert again.metadata.source_architecture == loaded.metadata.source_architecture
    assert stored(tmp_path / "b.safetensors").keys() == stored(first).keys()
    for name, value in stored(first).items():
        assert torch.equal(stored(tmp_path / "b.safetensors")[name], value), name
    with pytest.raises(ConfigError, match="source_architecture"):
        export_net(loaded.net, tmp_path / "c.safetensors", {"learner": "protonet"})


@pytest.mark.parametrize(
    ("channels", "problem"),
    [
        ({"stages.0.conv1": 9}, "every channel group"),
        (lambda widths: {**widths, "stages.0.conv1": 9}, "from 1 to 4"),
        (lambda widths: {**widths, "stages.0.conv1": 0}, "widths >= 1"),
    ],
)
def test_bad_channel_widths_are_a_one_line_data_error(tmp_path, channels, problem):
    good = export_net(ProtoNet(taylor_pruned(resnet12(None))), tmp_path / "p.safetensors")

    def change(meta: dict) -> dict:
        widths = channels(meta["architecture"]["channels"]) if callable(channels) else channels
        return {**meta, "architecture": {**meta["architecture"], "channels": widths}}

    bad = rewrite(good, tmp_path / "bad.safetensors", metadata=change)
    with pytest.raises(DataError) as info:
        load_artifact(bad)
    message = str(info.value)
    assert message.startswith(str(bad)) and problem in message and len(message.splitlines()) == 1


DEVICE_CASES: dict[str, Callable[[], tuple[nn.Module, str, dict]]] = {
    "protonet_resnet12_taylor": CASES["protonet_resnet12_taylor"],
    "maml_resnet12_taylor": lambda: (
        MAML(taylor_pruned(resnet12(3)), inner_lr=0.1, inner_steps=1, eval_inner_steps=1),
        RESNET12,
        resnet12(3).architecture,
    ),
}
"""One adaptation step: tracing a ResNet-12's steps into the graph takes about 20 s each here."""


@pytest.mark.parametrize(
    "case",
    [
        "protonet_resnet12_taylor",
        pytest.param("maml_resnet12_taylor", marks=[pytest.mark.slow, pytest.mark.ci]),  # ~30 s of tracing
    ],
)
def test_a_resnet12_onnx_graph_predicts_on_the_device_what_its_checkpoint_does(tmp_path, case):
    """Taylor-pruned, shrunk in the graph; MAML through its adaptation graph."""
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript: pip install 'lthmaml[onnx]'")
    pytest.importorskip(
        "onnxruntime", reason="lthmaml-device needs onnxruntime: pip install 'lthmaml[device]'"
    )
    from lthmaml.device.cli import main as device_main

    model, class_path, init_args = DEVICE_CASES[case]()
    ckpt = write_checkpoint(tmp_path / "p.ckpt", model, class_path, init_args)
    if case.startswith("maml"):  # the slow trace in a process of its own, so that a hang fails
        export = [sys.executable, "-m", "lthmaml.edge.export", str(ckpt), "--format", "onnx"]
        done = subprocess.run(export, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    else:
        assert export_main([str(ckpt), "--format", "onnx"]) == 0
    task = image_task(tmp_path / "task")
    batch, files = task_of(task, load_artifact(tmp_path / "p.safetensors").metadata)
    device_main(
        [
            "fit",
            "--artifact",
            str(tmp_path / "p.onnx"),
            "--task",
            str(task),
            "--output",
            str(tmp_path / "d.csv"),
        ]
    )
    assert_predicts(rows(tmp_path / "d.csv"), files, learner_probabilities(model, batch))


def test_a_maml_net_with_running_statistics_has_no_adaptation_graph_in_one_line(tmp_path, capsys):
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript: pip install 'lthmaml[onnx]'")
    model = MAML(pruned(resnet12(3, running_stats=True)), inner_lr=0.1, inner_steps=1, eval_inner_steps=1)
    ckpt = write_checkpoint(
        tmp_path / "m.ckpt", model, RESNET12, resnet12(3, running_stats=True).architecture
    )
    assert export_main([str(ckpt), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "BatchNorm 'stages.0.bn1' keeps running statistics" in err and "running_stats: false" in err


# ---------------------------------------------------------------------------------- a net of your own
class TinyEmbedding(nn.Module):
    """A user's embedding net: no lthmaml class, and its image size is no constructor argument."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.in_channels, self.image_size = 1, 12
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


OWN = f"{TinyEmbedding.__module__}.{TinyEmbedding.__qualname__}"


def own_checkpoint(path: Path) -> tuple[ProtoNet, Path]:
    torch.manual_seed(0)
    net = pruned(TinyEmbedding(width=4), 0.5)
    prune_channels(net, "body.4", [1, 6])  # a removed filter: the graph is shrunk too
    model = ProtoNet(net, optimizer=partial(torch.optim.Adam, lr=0.01))
    return model, write_checkpoint(path, model, OWN, {"width": 4})


def test_a_net_of_your_own_is_refused_by_the_safetensors_format_in_one_line_naming_onnx(tmp_path, capsys):
    _, ckpt = own_checkpoint(tmp_path / "own.ckpt")
    assert export_main([str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lthmaml-export: error: {ckpt}: its net {OWN}")
    assert f"lthmaml-export {ckpt} --format onnx" in err
    assert not list(tmp_path.glob("own.*.partial")) and not (tmp_path / "own.safetensors").exists()
    with pytest.raises(DataError, match="--format onnx"):
        export_checkpoint(ckpt, tmp_path / "own.safetensors")


def test_a_net_of_your_own_travels_as_an_onnx_graph_the_device_runs_without_its_class(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx: pip install 'lthmaml[onnx]'")
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript: pip install 'lthmaml[onnx]'")
    pytest.importorskip(
        "onnxruntime", reason="lthmaml-device needs onnxruntime: pip install 'lthmaml[device]'"
    )
    from onnx import numpy_helper
    from test_device import BLOCK_TORCH

    from lthmaml.edge.onnx_format import read_model

    model, ckpt = own_checkpoint(tmp_path / "own.ckpt")
    assert export_main([str(ckpt), "--format", "onnx"]) == 0
    graph = tmp_path / "own.onnx"
    assert graph.is_file() and not (tmp_path / "own.safetensors").exists()
    metadata = read_model(graph).metadata
    source = {"class_path": OWN, "init_args": {"width": 4}}
    assert metadata["source_architecture"] == source
    assert metadata["architecture"] == {**source, "channels": {"body.0": 4, "body.4": 6}}
    assert (metadata["learner"], metadata["look"], metadata["ways"]) == ("protonet", "ink", None)

    # The masks: every weight they prune is 0 in the graph, which holds the shrunk net.
    prepared = graph_artifact(ckpt).net
    weights = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(graph)).graph.initializer}
    assert weights["body.4.weight"].shape[0] == 6  # two of its eight filters removed
    masks = masks_within(prepared)
    assert masks and masks.keys() <= weights.keys()
    for name, mask in masks.items():
        assert (weights[name][mask.numpy() == 0] == 0).all(), name

    # The device: no torch, no class of the net (the graph's input says the image size, 12).
    task = image_task(tmp_path / "task")
    out = tmp_path / "device.csv"
    args = ["fit", "--artifact", str(graph), "--task", str(task), "--output", str(out), "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    batch, files = task_of(task, SimpleNamespace(**metadata), image_size=12)
    assert_predicts(rows(out), files, learner_probabilities(model, batch))


class Untraceable(TinyEmbedding):
    """A forward that branches in Python on a tensor's values: no graph can hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if bool(out.sum() > 0) else -out


class Unsized(nn.Module):
    """A net that does not say the images it takes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


@pytest.mark.parametrize(
    ("net", "problem"),
    [
        (
            Untraceable,
            "torch.onnx cannot export its Untraceable as a graph (Could not guard on data-dependent",
        ),
        (Unsized, "must say the images lthmaml-device feeds it: give it an `image_size` attribute"),
    ],
)
def test_a_net_of_your_own_the_device_cannot_take_is_one_line(tmp_path, capsys, net, problem):
    pytest.importorskip("onnxscript", reason="the ONNX export needs onnxscript: pip install 'lthmaml[onnx]'")
    ckpt = write_checkpoint(
        tmp_path / "own.ckpt", ProtoNet(net()), f"{net.__module__}.{net.__qualname__}", {}
    )
    assert export_main([str(ckpt), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and err.startswith(f"lthmaml-export: error: {ckpt}: ") and problem in err
    )
    assert not list(tmp_path.glob("own.*onnx*"))
