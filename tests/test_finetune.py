"""Edge fine-tuning: masks kept, early stopping with the best weights restored, MAML's inner loop
without a validation split, test and predictions.csv, the ``lthmaml-edge`` CLI and the
``make pi-finetune`` driver. Tiny nets (Conv4 of 4 filters on 8x8 images, a 1-8-8-1 MLP)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping

from lthmaml.data.taskfolder import TaskFolderDataModule
from lthmaml.data.taskfolder_build import make_image_task, make_sinusoid_task
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.cli import FINETUNED
from lthmaml.edge.cli import main as edge_main
from lthmaml.edge.export import export_net
from lthmaml.edge.finetune import FineTuneModule
from lthmaml.edge.stopping import TaskEarlyStopping
from lthmaml.errors import ConfigError
from lthmaml.nets.models import MLP, Conv4
from lthmaml.sparsity import (
    load_masks,
    magnitude_scores,
    masks_of,
    masks_within,
    prune_lowest,
    sparsity_report,
    weight,
)

REPO = Path(__file__).resolve().parents[1]
PI = str(REPO / "configs" / "edge" / "pi.yaml")
SIZE = 8
LABELS = ["ant", "bee", "cat"]
INNER = {"inner_lr": 0.3, "inner_steps": 1, "eval_inner_steps": 4}


# ---------------------------------------------------------------------------------- helpers
def tiny_conv(ways: int = 3, seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(out_features=ways, hidden_channels=4, image_size=SIZE, blocks=2)


def pruned(net, fraction: float):
    load_masks(net, prune_lowest(masks_of(net), magnitude_scores(net), fraction))
    return net


def make_artifact(path: Path, net, **fields) -> Path:
    return export_net(net, path, {**INNER, **fields})


def class_images(ways: int = 3, examples: int = 12, seed: int = 0) -> torch.Tensor:
    """One random glyph per class plus noise: a task fine-tuning can learn in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(ways, 1, 1, SIZE, SIZE, generator=gen)
    noise = torch.rand(ways, examples, 1, SIZE, SIZE, generator=gen)
    return (0.7 * base + 0.3 * noise).clamp(0, 1)


def image_task(root: Path, shots=4, val_shots=4, query_shots=4, labelled=True, ways=3) -> Path:
    labels = (LABELS + ["dog", "eel"])[:ways]
    return make_image_task(
        root, class_images(ways), labels, shots, val_shots, query_shots, labelled_query=labelled
    )


def datamodule(root: Path, batch_size: int = 32, **options) -> TaskFolderDataModule:
    dm = TaskFolderDataModule(str(root), image_size=SIZE, batch_size=batch_size, **options)
    dm.setup()
    return dm


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def query_accuracy(net, dm: TaskFolderDataModule) -> float:
    query = dm.splits["query"]
    return float((net(query.x).argmax(-1) == query.y).float().mean())


class Drift(torch.optim.SGD):
    """SGD that also nudges every parameter: only re-masking keeps a pruned weight at zero."""

    def step(self, closure=None):
        loss = super().step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                for param in group["params"]:
                    param.add_(0.01)
        return loss


class Recorder(pl.Callback):
    """Each epoch's val/loss and weights, after that epoch's validation."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, dict]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        self.epochs.append((float(trainer.callback_metrics["val/loss"]), state))


# ---------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("optimizer", ["sgd", "drift"])
def test_pruned_weights_stay_exactly_zero(tmp_path, optimizer):
    net = pruned(tiny_conv(), 0.6)
    masks, zeros = masks_of(net), sparsity_report(net).zeros
    path = make_artifact(tmp_path / "a.safetensors", net)
    choice = "sgd" if optimizer == "sgd" else (lambda params: Drift(params, lr=0.1))
    module = FineTuneModule(artifact=str(path), optimizer=choice)
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer(max_epochs=3).fit(module, datamodule=datamodule(image_task(tmp_path / "task")))
    assert states_equal(masks_of(module.net), masks)  # the masks beside the net are the artifact's
    for name, mask in masks.items():
        tuned = weight(module.net, name)
        assert torch.count_nonzero(tuned[mask == 0]) == 0
        kept = mask == 1
        assert not torch.equal(tuned[kept], start[name][kept])  # it did fine-tune
    assert sparsity_report(module.net).zeros == zeros


# ---------------------------------------------------------------------------------- early stopping
def test_early_stopping_stops_and_restores_the_best_epochs_weights(tmp_path):
    """val/ holds the support's classes under rotated labels: the better the fit, the worse val."""
    task = image_task(tmp_path / "task")
    for i, label in enumerate(LABELS):
        (task / "val" / label).rename(task / "val" / f"tmp{i}")
    for i in range(len(LABELS)):
        (task / "val" / f"tmp{i}").rename(task / "val" / LABELS[(i + 1) % len(LABELS)])
    module = FineTuneModule(artifact=str(make_artifact(tmp_path / "a.safetensors", tiny_conv())), lr=0.5)
    recorder = Recorder()
    stopper = EarlyStopping(monitor="val/loss", patience=2, min_delta=0.0)
    trainer(max_epochs=20, callbacks=[recorder, stopper]).fit(module, datamodule=datamodule(task))

    losses = [loss for loss, _ in recorder.epochs]
    best = losses.index(min(losses))
    assert module.epochs_run == len(losses) < 20
    assert len(losses) == best + 1 + 2  # stopped after `patience` epochs without improvement
    assert module.best_epoch == best + 1 and module.best_score == pytest.approx(losses[best], rel=1e-6)
    assert losses[-1] > losses[best]
    final = module.net.state_dict()
    assert states_equal(final, recorder.epochs[best][1])
    assert not states_equal(final, recorder.epochs[-1][1])


def test_without_restore_best_the_last_epoch_stays(tmp_path):
    module = FineTuneModule(
        artifact=str(make_artifact(tmp_path / "a.safetensors", tiny_conv())), restore_best=False
    )
    recorder = Recorder()
    trainer(max_epochs=3, callbacks=[recorder]).fit(module, datamodule=datamodule(image_task(tmp_path / "t")))
    assert states_equal(module.net.state_dict(), recorder.epochs[-1][1])


# ---------------------------------------------------------------------------------- no validation split
@pytest.mark.parametrize("task_kind", ["classification", "regression"])
def test_without_val_runs_the_meta_learned_inner_loop(tmp_path, task_kind, caplog):
    if task_kind == "classification":
        net, task = tiny_conv(), image_task(tmp_path / "task", shots=2, val_shots=0, query_shots=2)
        lr = 0.3
    else:
        torch.manual_seed(0)
        net, task = MLP(hidden=(8, 8)), make_sinusoid_task(tmp_path / "task", shots=5, query_shots=3)
        lr = 0.02
    path = make_artifact(tmp_path / "a.safetensors", net, task=task_kind, inner_lr=lr)
    module = FineTuneModule(artifact=str(path))
    dm = datamodule(task, batch_size=2, validation="none")  # smaller than the support: one full batch
    stopper = TaskEarlyStopping(patience=1)
    fit = trainer(max_epochs=10, callbacks=[stopper])  # the module ends the fit, max_epochs only caps it
    fit.fit(module, datamodule=dm)

    steps = INNER["eval_inner_steps"]
    assert steps != INNER["inner_steps"] and fit.global_step == steps == module.epochs_run
    assert module.best_epoch is None and module.lr == lr
    assert stopper in fit.callbacks and stopper.stopper.wait_count == 0  # there, and never asked
    assert f"eval_inner_steps={steps} full-batch steps of SGD at lr={lr} (the inner lr)" in caplog.text
    assert "; EarlyStopping off" in caplog.text
    assert dm.batch_size == len(dm.splits["support"]) and fit.num_training_batches == 1
    hand = load_artifact(path).net.train()
    x, y = dm.splits["support"].x, dm.splits["support"].y
    for _ in range(steps):
        out = hand(x)
        loss = F.mse_loss(out, y) if task_kind == "regression" else F.cross_entropy(out, y)
        grads = torch.autograd.grad(loss, list(hand.parameters()))
        with torch.no_grad():
            for param, grad in zip(hand.parameters(), grads):
                param -= lr * grad
    for (name, tuned), expected in zip(module.net.named_parameters(), hand.parameters()):
        assert torch.allclose(tuned, expected, rtol=1e-5, atol=1e-6), name
    start = load_artifact(path).net.state_dict()
    assert not states_equal(module.net.state_dict(), start)


def test_without_val_the_inner_loop_takes_exactly_its_steps_whatever_the_cap_allows(tmp_path):
    path = make_artifact(tmp_path / "a.safetensors", tiny_conv())
    task = image_task(tmp_path / "task", shots=2, val_shots=0, query_shots=2)
    steps = INNER["eval_inner_steps"]
    for limits in ({"max_epochs": -1}, {"max_steps": steps + 3}, {"max_epochs": steps}):
        fit = trainer(**limits)
        fit.fit(FineTuneModule(artifact=str(path)), datamodule=datamodule(task))
        assert fit.global_step == steps == fit.current_epoch, limits


@pytest.mark.parametrize(
    ("limits", "option"),
    [
        ({"max_epochs": 3}, "trainer.max_epochs=3 ends it sooner: set trainer.max_epochs to 4 or more"),
        ({"max_steps": 2}, "trainer.max_steps=2 ends it sooner: set trainer.max_steps to 4 or more"),
        ({"min_epochs": 6}, "trainer.min_epochs=6 makes it longer: set trainer.min_epochs to 4 or less"),
        ({"callbacks": [EarlyStopping("val/loss")]}, "trainer.callbacks: EarlyStopping on 'val/loss'"),
    ],
)
def test_without_val_limits_and_a_stopper_that_cannot_work_are_one_line_config_errors(
    tmp_path, limits, option
):
    path = make_artifact(tmp_path / "a.safetensors", tiny_conv())
    task = image_task(tmp_path / "task", shots=2, val_shots=0, query_shots=2)
    module = FineTuneModule(artifact=str(path))
    fit = trainer(**{"max_epochs": 10, **limits})
    with pytest.raises(ConfigError) as info:
        fit.fit(module, datamodule=datamodule(task))
    message = str(info.value)
    assert option in message and len(message.splitlines()) == 1 and fit.global_step == 0
    assert "eval_inner_steps=4" in message or "TaskEarlyStopping" in message


# ---------------------------------------------------------------------------------- test and predict
def test_test_prints_query_accuracy(tmp_path, capsys):
    module = FineTuneModule(artifact=str(make_artifact(tmp_path / "a.safetensors", tiny_conv())))
    dm = datamodule(image_task(tmp_path / "task"))
    trainer().test(module, datamodule=dm, verbose=False)
    accuracy = query_accuracy(module.net, dm)
    assert f"Query accuracy {accuracy:.4f} ({round(accuracy * 12)}/12)" in capsys.readouterr().out
    assert module.test_results["acc"] == pytest.approx(accuracy)


def test_test_prints_query_mse_for_regression(tmp_path, capsys):
    torch.manual_seed(0)
    net = MLP(hidden=(8, 8))
    module = FineTuneModule(artifact=str(make_artifact(tmp_path / "a.safetensors", net)))
    dm = datamodule(make_sinusoid_task(tmp_path / "task", shots=5, query_shots=7))
    trainer().test(module, datamodule=dm, verbose=False)
    with torch.no_grad():
        mse = float(F.mse_loss(net(dm.splits["query"].x), dm.splits["query"].y))
    assert f"Query MSE {mse:.4f} on 7 points" in capsys.readouterr().out


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_predictions_csv_rows_columns_and_labels(tmp_path, labelled):
    net = pruned(tiny_conv(), 0.5)
    module = FineTuneModule(artifact=str(make_artifact(tmp_path / "a.safetensors", net)))
    dm = datamodule(image_task(tmp_path / "task", labelled=labelled))
    module.predictions_path = tmp_path / "out" / "preds.csv"
    trainer().predict(module, datamodule=dm)

    rows = read_rows(module.predictions_path)
    assert list(rows[0]) == ["file", "label", "probability"]
    assert [row["file"] for row in rows] == dm.query_files and len(rows) == 12
    if not labelled:
        assert all(re.fullmatch(r"q\d+\.png", row["file"]) for row in rows)
    with torch.no_grad():
        probabilities = module.net(dm.splits["query"].x).softmax(-1)
    best, index = probabilities.max(-1)
    assert [row["label"] for row in rows] == [LABELS[i] for i in index]
    assert [float(row["probability"]) for row in rows] == pytest.approx(best.tolist(), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["preds.csv"]  # no temp file left


def test_regression_predictions_csv_goes_into_an_output_folder(tmp_path):
    torch.manual_seed(0)
    net = MLP(hidden=(8, 8))
    module = FineTuneModule(artifact=str(make_artifact(tmp_path / "a.safetensors", net)))
    dm = datamodule(make_sinusoid_task(tmp_path / "task", shots=5, query_shots=4, labelled_query=False))
    module.predictions_path = tmp_path / "out"
    trainer().predict(module, datamodule=dm)

    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert list(rows[0]) == ["file", "x", "prediction"]
    assert [row["file"] for row in rows] == ["row_1", "row_2", "row_3", "row_4"]
    x = dm.splits["query"].x
    assert [float(row["x"]) for row in rows] == pytest.approx(x[:, 0].tolist(), rel=1e-5)
    with torch.no_grad():
        expected = net(x)[:, 0].tolist()
    assert [float(row["prediction"]) for row in rows] == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------- sources and errors
def test_ways_mismatch_is_a_config_error_naming_both(in_tmp, capsys):
    tmp_path = in_tmp
    artifact = make_artifact(tmp_path / "a.safetensors", tiny_conv(ways=3))
    task = image_task(tmp_path / "task", ways=4)
    with pytest.raises(ConfigError, match=r"3-way.*4 labels"):
        trainer(max_epochs=1).fit(FineTuneModule(artifact=str(artifact)), datamodule=datamodule(task))
    with pytest.raises(SystemExit) as exit_info:
        edge_main(
            ["fit", "-c", PI, "--threads", "1", "--model.artifact", str(artifact)]
            + ["--data.root", str(task), "--data.image_size", str(SIZE), "--trainer.logger", "false"]
        )
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]
    assert err.startswith("lthmaml-edge: error:") and "Traceback" not in stderr
    assert "3-way" in err and "4 labels" in err and str(artifact) in err


def test_exactly_one_source_is_required(tmp_path):
    artifact = str(make_artifact(tmp_path / "a.safetensors", tiny_conv()))
    with pytest.raises(ConfigError, match="exactly one"):
        FineTuneModule()
    with pytest.raises(ConfigError, match="exactly one"):
        FineTuneModule(artifact=artifact, checkpoint=artifact)
    with pytest.raises(ConfigError, match="'adam'"):
        FineTuneModule(artifact=artifact, optimizer="adam")


def test_starts_from_a_maml_checkpoint_through_the_export_path(tmp_path):
    """A checkpoint as the lthmaml CLI writes it (net as class_path/init_args, inner loop hparams)."""
    torch.manual_seed(0)
    net = pruned(MLP(hidden=(8, 8)), 0.5)
    checkpoint = tmp_path / "last.ckpt"
    hparams = {
        "net": {"class_path": "lthmaml.nets.models.MLP", "init_args": {"in_features": 1, "hidden": [8, 8]}},
        "inner_lr": 0.02,
        "inner_steps": 1,
        "eval_inner_steps": 5,
        "_class_path": "lthmaml.meta.maml.MAML",
    }
    weights = {f"net.{k}": v for k, v in net.state_dict().items() if not k.startswith("masks.")}
    masks = {f"masks.net.{k}": v for k, v in masks_within(net).items()}  # a learner's masks, beside its net
    assert masks and all(key.endswith(".weight") for key in masks)
    state = {**weights, **masks}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, checkpoint)
    module = FineTuneModule(checkpoint=str(checkpoint))
    assert module.lr == 0.02 and module.metadata.eval_inner_steps == 5
    assert module.metadata.task == "regression"
    assert states_equal(module.net.state_dict(), net.state_dict())


# ---------------------------------------------------------------------------------- the CLI
def edge_args(sub: str, artifact, task, *extra: str) -> list[str]:
    return [sub, "-c", PI, "--threads", "1", "--model.artifact", str(artifact), "--data.root", str(task)] + [
        "--data.image_size",
        str(SIZE),
        *extra,
    ]


def test_edge_cli_fit_test_predict_end_to_end(in_tmp, capsys):
    source = pruned(tiny_conv(), 0.5)
    artifact = make_artifact(in_tmp / "a.safetensors", source)
    task = image_task(in_tmp / "task")
    edge_main(edge_args("fit", artifact, task, "--trainer.max_epochs", "3", "--test_after_fit", "true"))
    assert torch.get_num_threads() == 1
    run = in_tmp / "runs" / "edge" / "task"
    finetuned = run / FINETUNED
    assert finetuned.is_file() and not list((in_tmp / "runs").rglob("*.ckpt"))
    with (run / "metrics.csv").open() as handle:
        assert {"val/loss", "val/acc", "train/loss"} <= set(next(csv.reader(handle)))
    tuned = load_artifact(finetuned)
    assert tuned.metadata.inner_lr == INNER["inner_lr"] and tuned.metadata.ways == 3
    assert states_equal(masks_of(tuned.net), masks_of(source))
    dm = datamodule(task)
    accuracy = query_accuracy(tuned.net, dm)
    assert f"Query accuracy {accuracy:.4f}" in capsys.readouterr().out  # --test_after_fit, in memory

    edge_main(edge_args("test", finetuned, task))
    assert f"Query accuracy {accuracy:.4f} ({round(accuracy * 12)}/12)" in capsys.readouterr().out

    edge_main(edge_args("predict", finetuned, task, "--output", str(in_tmp / "p" / "out.csv")))
    rows = read_rows(in_tmp / "p" / "out.csv")
    assert [row["file"] for row in rows] == dm.query_files
    with torch.no_grad():
        labels = [LABELS[i] for i in tuned.net(dm.splits["query"].x).argmax(-1)]
    assert [row["label"] for row in rows] == labels

    edge_main(edge_args("predict", finetuned, task))  # default: the task folder's, as fit's
    assert read_rows(in_tmp / "runs" / "edge" / "task" / "predictions.csv") == rows


@pytest.mark.parametrize(("extra", "lr"), [([], 0.01), (["--model.lr", "0.05"], 0.05)])
def test_edge_cli_takes_an_optimizer_class_path(in_tmp, extra, lr):
    from lthmaml.edge.cli import run_cli

    artifact = make_artifact(in_tmp / "a.safetensors", tiny_conv())
    adam = ["--model.optimizer", "torch.optim.Adam", "--model.optimizer.lr", "0.01", *extra]
    cli = run_cli(edge_args("fit", artifact, image_task(in_tmp / "task"), "--trainer.max_epochs", "1", *adam))
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == lr


def test_edge_cli_test_on_an_unlabelled_query_is_a_one_line_error(in_tmp, capsys):
    artifact = make_artifact(in_tmp / "a.safetensors", tiny_conv())
    task = image_task(in_tmp / "task", labelled=False)
    with pytest.raises(SystemExit) as exit_info:
        edge_main(edge_args("test", artifact, task))
    assert exit_info.value.code == 2
    assert "unlabelled" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- make pi-finetune
def figures(out: str) -> dict[str, str]:
    found = dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", out, flags=re.M))
    assert {"epochs run", "best epoch", "wall time", "peak resident memory"} <= set(found)
    return found


PI_CONFIG = ["--config", str(REPO / "configs" / "edge" / "pi.yaml")]


def test_pi_finetune_prints_the_five_figures(in_tmp, capsys):
    from lthmaml.edge.pi import main

    artifact = make_artifact(in_tmp / "a.safetensors", pruned(tiny_conv(), 0.5))
    task = image_task(in_tmp / "task")
    assert main(["--artifact", str(artifact), "--task", str(task), "--threads", "1", *PI_CONFIG]) == 0
    found = figures(capsys.readouterr().out)
    epochs = int(found["epochs run"].split()[0])
    best = int(found["best epoch"].split()[0])
    assert 1 <= best <= epochs <= 10
    assert float(found["wall time"].split()[0]) > 0
    assert 100 < float(found["peak resident memory"].split()[0]) < 100_000  # MiB, torch included
    dm = datamodule(task)
    before = query_accuracy(load_artifact(artifact).net, dm)
    after = query_accuracy(load_artifact(in_tmp / "runs" / "edge" / "task" / FINETUNED).net, dm)
    assert found["accuracy before"] == f"{before:.4f}" and found["accuracy after"] == f"{after:.4f}"


def test_pi_finetune_without_a_run_says_what_to_run_first(in_tmp, capsys):
    from lthmaml.edge.pi import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--artifact", "", "--task", ""])
    assert exit_info.value.code == 2
    assert "make run" in capsys.readouterr().err


def test_pi_finetune_defaults_to_the_latest_run(in_tmp, capsys):
    """A tiny sinusoid meta-training run, then the driver with no arguments: it exports the run's
    last.ckpt beside it, builds a sinusoid task in the run folder, and fine-tunes on it."""
    from lthmaml.cli import main as lthmaml_main
    from lthmaml.edge.pi import main

    tiny = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--threads", "1"]
    tiny += ["--data.init_args.tasks_per_epoch", "20", "--data.init_args.meta_batch_size", "10"]
    tiny += ["--data.init_args.val_tasks", "10", "--data.init_args.test_tasks", "10"]
    lthmaml_main(["fit", "-c", str(REPO / "configs" / "sinusoid.yaml"), *tiny])
    run = in_tmp / "runs" / "sinusoid" / "version_0"
    assert main(["--artifact", "", "--task", "", "--threads", "1", *PI_CONFIG]) == 0
    assert (run / "checkpoints" / "last.safetensors").is_file()
    assert (run / "edge_task" / "support.csv").is_file() and (run / "edge_task" / "val.csv").is_file()
    found = figures(capsys.readouterr().out)
    assert re.fullmatch(r"\d+\.\d{4}", found["MSE before"]) and re.fullmatch(
        r"\d+\.\d{4}", found["MSE after"]
    )


@pytest.mark.slow
def test_pi_finetune_builds_an_omniglot_task_of_meta_test_classes(
    in_tmp, shared_omniglot, lthmaml_cache, capsys
):
    """A Conv4 run's checkpoint and config.yaml as the lthmaml CLI writes them: the driver builds a
    5-way task of the run's meta-test classes (5 support, 5 val, 10 query images each)."""
    import yaml

    from lthmaml.data.omniglot import load_omniglot, split_classes
    from lthmaml.edge.pi import main

    run = in_tmp / "runs" / "omniglot" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    init_args = {"out_features": 5, "hidden_channels": 4}
    state = {f"net.{k}": v for k, v in Conv4(**init_args).state_dict().items()}
    hparams = {"net": {"class_path": "lthmaml.nets.models.Conv4", "init_args": init_args}, **INNER}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, run / "checkpoints" / "last.ckpt")
    split = {"root": str(shared_omniglot), "class_split": [0.6, 0.2, 0.2], "split_seed": 0}
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": split}}))

    assert main(["--threads", "1", "--trainer.max_epochs", "2", *PI_CONFIG]) == 0
    found = figures(capsys.readouterr().out)
    assert re.fullmatch(r"0\.\d{4}|1\.0000", found["accuracy after"])
    task = run / "edge_task"
    omniglot = load_omniglot(shared_omniglot, 28)
    test = {
        omniglot.classes[i].replace("/", "-")
        for i in split_classes(omniglot.classes, (0.6, 0.2, 0.2), 0)["test"]
    }
    labels = sorted(p.name for p in (task / "support").iterdir())
    assert len(labels) == 5 and set(labels) <= test
    for folder, count in (("support", 5), ("val", 5), ("query", 10)):
        assert all(len(list((task / folder / label).glob("*.png"))) == count for label in labels)
