"""Early stopping that fires where the task is decided: a validation split for tasks that bring
none (held out, or camera-jittered 1-shot copies), and ``TaskEarlyStopping`` on ``val/acc`` for
classification and ``val/loss`` for regression."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from test_finetune import SIZE, datamodule, image_task, make_artifact, tiny_conv, trainer

from lthmaml.data.taskfolder_build import make_sinusoid_task
from lthmaml.data.validation import camera_jitter, holdout_per_class
from lthmaml.edge.finetune import FineTuneModule
from lthmaml.edge.stopping import TaskEarlyStopping, deciding_metric
from lthmaml.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------- the splits
def test_holdout_takes_per_class_examples_of_every_class_and_keeps_one():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    kept, held = holdout_per_class(y, per_class=2, seed=3)
    assert sorted(y[held].tolist()) == [0, 0, 1]  # 2 of class 0, 1 of class 1 (one kept), none of 2
    assert sorted(y[kept].tolist()) == [0, 1, 2]
    assert set(kept.tolist()).isdisjoint(held.tolist()) and len(kept) + len(held) == len(y)
    again = holdout_per_class(y, per_class=2, seed=3)
    assert torch.equal(again[0], kept) and torch.equal(again[1], held)  # seeded


def test_camera_jitter_moves_the_images_a_little_and_zero_bounds_leave_them():
    x = torch.zeros(2, 1, 16, 16)
    x[:, :, 5:11, 6:10] = 1.0
    same = camera_jitter(x, copies=3, seed=0, max_shift=0.0, max_degrees=0.0, max_scale=0.0)
    assert torch.allclose(same, x.repeat(3, 1, 1, 1), atol=1e-6)
    moved = camera_jitter(x, copies=3, seed=0)
    assert moved.shape == (6, 1, 16, 16) and not torch.allclose(moved, x.repeat(3, 1, 1, 1))
    ink = moved.sum((1, 2, 3)) / x[0].sum()
    assert torch.all((ink > 0.7) & (ink < 1.3))  # scale within 10%: the glyph is all still there
    assert torch.equal(moved, camera_jitter(x, copies=3, seed=0))


def test_auto_uses_the_folders_val_split_when_there_is_one(tmp_path):
    dm = datamodule(image_task(tmp_path / "t", shots=4, val_shots=2))
    assert dm.prepare_validation() == "the task's own val split (6 examples)"
    assert len(dm.splits["support"]) == 12 and len(dm.splits["val"]) == 6


def test_auto_without_val_has_none_so_the_inner_loop_runs(tmp_path):
    dm = datamodule(image_task(tmp_path / "t", shots=4, val_shots=0))
    assert dm.prepare_validation() == "none" and not dm.has_val


def test_holdout_takes_one_per_class_and_trains_on_the_rest(tmp_path):
    dm = datamodule(image_task(tmp_path / "t", shots=4, val_shots=0), validation="holdout")
    assert not dm.has_val
    assert dm.prepare_validation().startswith("3 support examples held out (1 per class, seed 0), 9 left")
    assert sorted(dm.splits["val"].y.tolist()) == [0, 1, 2]
    trained = torch.cat([y for _, y in dm.train_dataloader()])
    assert sorted(trained.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(dm.splits["support"]) == 12  # the folder's support set as read (adaptation uses it)
    val_files = set(dm.splits["val"].files)
    assert all(name.startswith("support:") for name in val_files)


def test_augment_jitters_a_one_shot_support_set_into_a_val_split(tmp_path):
    dm = datamodule(image_task(tmp_path / "t", shots=1, val_shots=0), validation="augment", val_copies=5)
    assert "15 camera-jittered copies of the 3 support images" in dm.prepare_validation()
    val = dm.splits["val"]
    assert val.y.tolist() == [0, 1, 2] * 5 and val.x.shape == (15, 1, SIZE, SIZE)
    assert len(dm.train_dataloader().dataset) == 3  # the support set, untouched


def test_regression_without_val_has_none_and_explicit_choices_fail_in_one_line(tmp_path):
    sinusoid = make_sinusoid_task(tmp_path / "s", shots=5, query_shots=3)
    dm = datamodule(sinusoid)
    assert dm.prepare_validation() == "none" and not dm.has_val
    with pytest.raises(ConfigError, match="data.validation augment transforms images"):
        datamodule(sinusoid, validation="augment").prepare_validation()
    with pytest.raises(DataError, match="data.validation holdout needs 2 or more support examples"):
        datamodule(
            image_task(tmp_path / "t1", shots=1, val_shots=0), validation="holdout"
        ).prepare_validation()
    with pytest.raises(DataError, match="data.validation is folder but the task has no val/"):
        datamodule(
            image_task(tmp_path / "t2", shots=2, val_shots=0), validation="folder"
        ).prepare_validation()
    with pytest.raises(ConfigError, match="data.val_copies must be >= 1, got 0"):
        datamodule(sinusoid, val_copies=0)


# ---------------------------------------------------------------------------------- the stopping
class Scripted(pl.LightningModule):
    """Logs ``val/acc`` and ``val/loss`` from scripts by epoch."""

    def __init__(self, acc, loss, regression=False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.acc, self.val_loss, self.regression = acc, loss, regression

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum() * 0

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/acc", self.acc[self.current_epoch])
        self.log("val/loss", self.val_loss[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1)))

    val_dataloader = train_dataloader


ACC = [0.4, 0.8, 0.8, 0.7, 0.9, 0.9, 0.9, 0.9]  # peaks at epoch 2 (1-based), a higher peak at 5
LOSS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]  # keeps falling: stopping on it saves nothing


@pytest.mark.parametrize(("regression", "stopped_after"), [(False, 4), (True, 8)])
def test_task_early_stopping_watches_accuracy_for_classification_and_loss_for_regression(
    regression, stopped_after
):
    stopper = TaskEarlyStopping(patience=2)
    module = Scripted(ACC, LOSS, regression)
    fit = trainer(max_epochs=8, callbacks=[stopper])
    fit.fit(module)
    assert (stopper.monitor, stopper.mode) == deciding_metric(module)
    assert stopper.monitor == ("val/loss" if regression else "val/acc")
    assert fit.current_epoch == stopped_after  # val/acc: best at 2, no gain at 3 and 4: stop


def test_a_given_monitor_is_kept_and_min_delta_counts_in_its_direction():
    stopper = TaskEarlyStopping(monitor="val/loss", mode="min", patience=1, min_delta=0.15)
    fit = trainer(max_epochs=8, callbacks=[stopper])
    fit.fit(Scripted(ACC, LOSS))
    assert stopper.monitor == "val/loss" and fit.current_epoch == 2  # 0.9 is not 0.15 below 1.0


def test_the_fine_tune_says_which_validation_it_stopped_on(tmp_path, caplog):
    artifact = make_artifact(tmp_path / "a.safetensors", tiny_conv())
    dm = datamodule(image_task(tmp_path / "t", shots=1, val_shots=0), validation="augment")
    module = FineTuneModule(artifact=str(artifact))
    trainer(max_epochs=4, callbacks=[TaskEarlyStopping(patience=1)]).fit(module, datamodule=dm)
    assert "Validation for early stopping: 12 camera-jittered copies of the 3 support images" in caplog.text
    assert module.fixed_steps is None and module.best.monitor == "val/acc" and module.best_epoch is not None


# ---------------------------------------------------------------------------------- one launch
def test_one_launch_fits_and_writes_the_same_predictions_as_a_second_launch(in_tmp, caplog):
    """``fit --predict_after_fit true`` writes predictions.csv from the fine-tuned weights in
    memory: the rows a separate ``predict`` launch on the exported artifact writes."""
    from lthmaml.edge.cli import FINETUNED
    from lthmaml.edge.cli import main as edge_main

    artifact = make_artifact(in_tmp / "a.safetensors", tiny_conv())
    task = image_task(in_tmp / "task", shots=2, val_shots=2)
    common = [
        "--data.root",
        str(task),
        "--data.image_size",
        str(SIZE),
        "--trainer.enable_progress_bar",
        "false",
    ]
    edge_main(["fit", "--model.artifact", str(artifact), *common, "--trainer.max_epochs", "3",
               "--predict_after_fit", "true"])  # fmt: skip
    run = in_tmp / "runs" / "edge" / "task"
    one_launch = (run / "predictions.csv").read_text()
    assert one_launch.count("\n") == 1 + 12  # the header and the 12 query images
    assert re.search(r"Timings: start-up \d+\.\d\d s \(Python, imports, parsing\), fit \d+\.\d\d s, "
                     r"predict \d+\.\d\d s", caplog.text)  # fmt: skip
    edge_main(
        ["predict", "--model.artifact", str(run / FINETUNED), *common, "--output", str(in_tmp / "p.csv")]
    )
    assert (in_tmp / "p.csv").read_text() == one_launch
