"""The edge path for the amortized learners (#13): the artifact records its learner (and
MatchingNet's scale), ``lthmaml-edge`` adapts a ProtoNet / MatchingNet / CNP artifact with one
forward pass over the support set and scores the query exactly as the learner does, optional
embedding fine-tuning keeps the masks, and ``make pi-finetune`` reports a ProtoNet artifact.
Tiny nets: a headless 2-block Conv4 of 4 filters on 8x8 images, a CNPNet of width 8."""

from __future__ import annotations

import csv
import math
import re
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import rewrite

from lthmaml.data.taskfolder import TaskFolderDataModule
from lthmaml.data.taskfolder_build import make_image_task, make_sinusoid_task
from lthmaml.data.tasks import TaskBatch
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.cli import FINETUNED, run_cli
from lthmaml.edge.cli import main as edge_main
from lthmaml.edge.export import export_checkpoint, export_net
from lthmaml.edge.finetune import FineTuneModule
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta import CNP, MatchingNet, ProtoNet
from lthmaml.nets.models import CNPNet, Conv4
from lthmaml.sparsity import (
    load_masks,
    magnitude_scores,
    masks_of,
    masks_within,
    prunable,
    prune_lowest,
    weight,
)

REPO = Path(__file__).resolve().parents[1]
PI = str(REPO / "configs" / "edge" / "pi.yaml")
SIZE = 8
LABELS = ["ant", "bee", "cat"]


# ---------------------------------------------------------------------------------- helpers
def embedding(seed: int = 0, fraction: float = 0.5) -> Conv4:
    """A headless Conv4 (16-dimensional embeddings), half its weights pruned by magnitude."""
    torch.manual_seed(seed)
    net = Conv4(out_features=None, hidden_channels=4, image_size=SIZE, blocks=2)
    load_masks(net, prune_lowest(masks_of(net), magnitude_scores(net), fraction))
    return net


def learner_state(net) -> dict:
    """``net`` as a learner's ``state_dict`` holds it: ``net.<param>``, its masks ``masks.net.<param>``."""
    weights = {f"net.{k}": v for k, v in net.state_dict().items() if not k.startswith("masks.")}
    return {**weights, **{f"masks.net.{k}": v for k, v in masks_within(net).items()}}


def protonet() -> ProtoNet:
    return ProtoNet(embedding(), optimizer=partial(torch.optim.Adam, lr=0.01))  # takes over the masks


def matching(scale: float = 7.3) -> MatchingNet:
    return MatchingNet(embedding(), scale=scale, optimizer=partial(torch.optim.Adam, lr=0.01))


def image_task(root: Path, shots: int = 2, val_shots: int = 0, query_shots: int = 4) -> Path:
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 1, SIZE, SIZE, generator=gen)
    images = (0.7 * base + 0.3 * torch.rand(3, 10, 1, SIZE, SIZE, generator=gen)).clamp(0, 1)
    return make_image_task(root, images, LABELS, shots, val_shots, query_shots)


def datamodule(root: Path) -> TaskFolderDataModule:
    dm = TaskFolderDataModule(str(root), image_size=SIZE)
    dm.setup()
    return dm


def task_batch(dm: TaskFolderDataModule) -> TaskBatch:
    support, query = dm.splits["support"], dm.splits["query"]
    return TaskBatch(support.x, support.y, query.x, query.y)


def edge_args(sub: str, artifact, task, *extra: str) -> list[str]:
    common = ["-c", PI, "--threads", "1", "--model.artifact", str(artifact), "--data.root", str(task)]
    return [sub, *common, "--data.image_size", str(SIZE), *extra]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------- the metadata
def test_export_net_records_the_learner_and_matchings_scale(tmp_path):
    proto = load_artifact(export_net(protonet(), tmp_path / "p.safetensors")).metadata
    assert (proto.learner, proto.ways, proto.metric_scale, proto.distance) == (
        "protonet",
        None,
        None,
        "squared",
    )
    assert proto.architecture["init_args"]["out_features"] is None
    match = load_artifact(export_net(matching(7.3), tmp_path / "m.safetensors")).metadata
    assert match.learner == "matching" and match.metric_scale == pytest.approx(7.3) and match.distance is None
    torch.manual_seed(0)
    net = CNPNet(representation=8, encoder_hidden=(8,), decoder_hidden=(8,))
    cnp = load_artifact(export_net(CNP(net), tmp_path / "c.safetensors"))
    assert (cnp.metadata.learner, cnp.metadata.task) == ("cnp", "regression")
    assert isinstance(cnp.net, CNPNet)


@pytest.mark.parametrize(
    ("class_path", "learner"),
    [("lthmaml.meta.protonet.ProtoNet", "protonet"), ("lthmaml.meta.MatchingNet", "matching")],
)
def test_export_checkpoint_reads_the_learner_from_its_class_path(tmp_path, class_path, learner):
    init_args = {"out_features": None, "hidden_channels": 4, "image_size": SIZE, "blocks": 2}
    net = embedding()
    state = learner_state(net)
    state["log_scale"] = torch.tensor(math.log(4.0))
    hparams = {
        "_class_path": class_path,
        "net": {"class_path": "lthmaml.nets.models.Conv4", "init_args": init_args},
    }
    if learner == "protonet":
        hparams["distance"] = "euclidean"
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "m.ckpt")
    artifact = load_artifact(export_checkpoint(tmp_path / "m.ckpt", tmp_path / "m.safetensors"))
    metadata = artifact.metadata
    assert metadata.learner == learner and metadata.source_module == class_path
    assert masks_within(artifact.net).keys() == masks_within(net).keys() and masks_within(net)
    assert metadata.metric_scale == (pytest.approx(4.0) if learner == "matching" else None)
    assert metadata.distance == ("euclidean" if learner == "protonet" else None)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"learner": "lstm"}, "'learner'"),
        ({"learner": "maml", "metric_scale": None}, "headless"),
        ({"metric_scale": None}, "'metric_scale'"),
        ({"metric_scale": -1.0}, "'metric_scale'"),
        ({"distance": "squared"}, "'distance' is for learner 'protonet'"),
    ],
)
def test_bad_learner_metadata_is_a_one_line_error(in_tmp, capsys, changes, field):
    good = export_net(matching(), in_tmp / "m.safetensors")  # a change to None writes null
    artifact = rewrite(good, in_tmp / "bad.safetensors", metadata=lambda meta: {**meta, **changes})
    with pytest.raises(DataError, match=re.escape(field)):
        load_artifact(artifact)
    with pytest.raises(SystemExit) as exit_info:
        edge_main(edge_args("test", artifact, image_task(in_tmp / "task")))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and field in err


# ---------------------------------------------------------------------------------- test and predict
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_edge_test_is_the_protonets_own_evaluation(in_tmp, capsys, distance):
    """The artifact carries the distance: lthmaml-edge scores as the module it came from."""
    model = ProtoNet(embedding(), distance=distance)
    artifact = export_net(model, in_tmp / "p.safetensors")
    task = image_task(in_tmp / "task")
    edge_main(edge_args("test", artifact, task))
    with torch.no_grad():
        result = model.task_result(task_batch(datamodule(task)))
    acc, loss = float(result.acc_post), float(result.loss_post)
    assert f"Query accuracy {acc:.4f} ({round(acc * 12)}/12), loss {loss:.4f}" in capsys.readouterr().out


def test_edge_predict_writes_the_tasks_labels(in_tmp):
    model = protonet()
    artifact = export_net(model, in_tmp / "p.safetensors")
    task = image_task(in_tmp / "task")
    edge_main(edge_args("predict", artifact, task, "--output", str(in_tmp / "out.csv")))
    rows = read_rows(in_tmp / "out.csv")
    dm = datamodule(task)
    with torch.no_grad():
        probabilities = model.task_log_probabilities(task_batch(dm)).exp()
    best, index = probabilities.max(-1)
    assert [row["file"] for row in rows] == dm.query_files
    assert [row["label"] for row in rows] == [LABELS[i] for i in index]
    assert [float(row["probability"]) for row in rows] == pytest.approx(best.tolist(), abs=1e-6)


def test_a_matching_artifact_gives_the_modules_probabilities(tmp_path):
    model = matching(7.3)
    artifact = export_net(model, tmp_path / "m.safetensors")
    dm = datamodule(image_task(tmp_path / "task"))
    trainer = pl.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    edge = torch.cat(trainer.predict(FineTuneModule(artifact=str(artifact)), datamodule=dm))
    assert (tmp_path / "predictions.csv").is_file()
    batch = task_batch(dm)
    with torch.no_grad():
        expected = model.probabilities(
            model.embed(batch.support_x), batch.support_y, model.embed(batch.query_x), 3
        )
    assert torch.allclose(edge, expected, atol=1e-6)


def test_a_cnp_artifact_gives_the_cnps_query_mse(in_tmp, capsys):
    torch.manual_seed(0)
    model = CNP(CNPNet(representation=8, encoder_hidden=(8,), decoder_hidden=(8,)))
    artifact = export_net(model, in_tmp / "c.safetensors")
    task = make_sinusoid_task(in_tmp / "task", shots=5, query_shots=10, seed=0)
    edge_main(
        ["test", "-c", PI, "--threads", "1", "--model.artifact", str(artifact), "--data.root", str(task)]
    )
    dm = TaskFolderDataModule(str(task))
    dm.setup()
    with torch.no_grad():
        mse = float(model.task_result(task_batch(dm)).loss_post)
    assert f"Query MSE {mse:.4f} on 10 points" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- fit
def test_fit_only_computes_the_prototypes(in_tmp, caplog):
    artifact = export_net(protonet(), in_tmp / "p.safetensors")
    cli = run_cli(edge_args("fit", artifact, image_task(in_tmp / "task")))
    assert cli.model.epochs_run == 0 and cli.trainer.global_step == 0 and cli.trainer.current_epoch == 0
    assert cli.model.configure_optimizers() is None  # no optimizer state
    assert cli.model.adapter.context is not None  # the prototypes the fit computed stay for test/predict
    assert "class prototypes of the 6 support examples" in caplog.text and "0 epochs" in caplog.text
    tuned = load_artifact(in_tmp / "runs" / "edge" / "task" / FINETUNED)
    assert tuned.metadata.learner == "protonet"
    source = load_artifact(artifact).net.state_dict()
    assert all(torch.equal(value, source[key]) for key, value in tuned.net.state_dict().items())


def test_support_augmentation_adds_distorted_copies_to_the_prototypes(in_tmp, caplog):
    """``--data.support_augmentation 2``: each of the 6 support images counts three times (itself
    and two distorted copies), so the prototypes move; without it they are the plain means."""
    artifact = export_net(protonet(), in_tmp / "p.safetensors")
    task = image_task(in_tmp / "task")
    plain = run_cli(edge_args("fit", artifact, task)).model.adapter.context
    cli = run_cli(edge_args("fit", artifact, task, "--data.support_augmentation", "2"))
    assert "class prototypes of the 18 support examples" in caplog.text
    support = cli.datamodule.support_split()
    assert len(support) == 18 and support.y.tolist() == cli.datamodule.splits["support"].y.tolist() * 3
    assert torch.equal(support.x[:6], cli.datamodule.splits["support"].x)
    assert not torch.allclose(cli.model.adapter.context, plain)
    with pytest.raises(ConfigError, match="data.support_augmentation must be >= 0, got -1"):
        run_cli(edge_args("fit", artifact, task, "--data.support_augmentation", "-1"))


@pytest.mark.parametrize(("learner", "val_shots"), [(protonet, 0), (protonet, 2), (matching, 0)])
def test_fine_tune_embedding_keeps_pruned_weights_at_zero(in_tmp, learner, val_shots):
    source = learner()
    masks = masks_within(source, "net.")
    assert sorted(masks) == sorted(prunable(source.net))  # every layer of the embedding pruned
    artifact = export_net(learner(), in_tmp / "p.safetensors")
    task = image_task(in_tmp / "task", val_shots=val_shots)
    epochs = "3" if val_shots else "10"  # no val/: the artifact's eval_inner_steps=10 steps, one an epoch
    extra = ["--model.fine_tune_embedding", "true", "--model.lr", "0.1", "--trainer.max_epochs", epochs]
    cli = run_cli(edge_args("fit", artifact, task, *extra))
    assert cli.model.epochs_run >= 1 and cli.model.fixed_steps == (None if val_shots else 10)
    assert cli.trainer.global_step == (cli.model.epochs_run if val_shots else 10)
    tuned = load_artifact(in_tmp / "runs" / "edge" / "task" / FINETUNED)
    changed = False
    assert masks_within(tuned.net).keys() == masks.keys()
    for name, mask in masks.items():
        assert torch.equal(masks_within(tuned.net)[name], mask)
        assert torch.count_nonzero(weight(tuned.net, name)[mask == 0]) == 0
        changed |= not torch.equal(weight(tuned.net, name), weight(source.net, name))
    assert changed  # it did fine-tune


def test_fine_tune_embedding_is_only_for_metric_learners(tmp_path):
    torch.manual_seed(0)
    maml = export_net(
        Conv4(out_features=3, hidden_channels=4, image_size=SIZE, blocks=2), tmp_path / "a.safetensors"
    )
    with pytest.raises(ConfigError, match="model.fine_tune_embedding"):
        FineTuneModule(artifact=str(maml), fine_tune_embedding=True)


# ---------------------------------------------------------------------------------- make pi-finetune
def test_pi_finetune_with_a_protonet_artifact_prints_the_figures(in_tmp, capsys):
    from lthmaml.edge.pi import main

    model = protonet()
    artifact = export_net(model, in_tmp / "p.safetensors")
    task = image_task(in_tmp / "task", val_shots=2)
    assert main(["--artifact", str(artifact), "--task", str(task), "--threads", "1", "--config", PI]) == 0
    found = dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", capsys.readouterr().out, flags=re.M))
    assert found["epochs run"].startswith("0 (adapted: the class prototypes of the 6 support examples")
    assert found["best epoch"].startswith("n/a")
    assert float(found["wall time"].split()[0]) > 0
    assert 100 < float(found["peak resident memory"].split()[0]) < 100_000  # MiB, torch included
    with torch.no_grad():
        accuracy = float(model.task_result(task_batch(datamodule(task))).acc_post)
    assert found["accuracy before"].startswith(f"{accuracy:.4f} (the artifact, adapted")
    assert found["accuracy after"] == f"{accuracy:.4f}"
