"""Colour from meta-training to the device: the look and normalisation a run stores travel through
the checkpoint and the exported artifact, and ``lthmaml-edge`` decodes a task folder's photos with
them, converting (and saying so) what disagrees. Tiny generated photos and nets."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from helpers import COLOURS, colour_photo, quiet_trainer, rewrite_metadata, write_photos
from PIL import Image

from lthmaml.data import ImageFolderDataModule, Normalization, TaskFolderDataModule, decode_image
from lthmaml.edge import export
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.cli import FINETUNED
from lthmaml.edge.cli import main as edge_main
from lthmaml.edge.export import export_net
from lthmaml.edge.finetune import FineTuneModule
from lthmaml.errors import ConfigError, DataError
from lthmaml.nets.models import Conv4

pytestmark = pytest.mark.usefixtures("lthmaml_cache")

REPO = Path(__file__).resolve().parents[1]
PI = str(REPO / "configs" / "edge" / "pi.yaml")
SIZE = 16
INNER = {"inner_lr": 0.3, "inner_steps": 1, "eval_inner_steps": 3}
RUN = """
seed_everything: 0
trainer: {{max_epochs: 1, logger: false, enable_progress_bar: false, enable_model_summary: false}}
model:
  class_path: lthmaml.meta.maml.MAML
  init_args:
    net:
      class_path: lthmaml.nets.models.Conv4
      init_args: {{out_features: 2, in_channels: 3, hidden_channels: 4, image_size: {size}, blocks: 2}}
    inner_lr: 0.3
    inner_steps: 1
    eval_inner_steps: 3
    first_order: true
data:
  class_path: lthmaml.data.ImageFolderDataModule
  init_args:
    root: {root}
    layout: classes
    image_size: {size}
    ways: 2
    shots: 1
    query_shots: 2
    eval_query_shots: 2
    class_split: [2, 2, 2]
    meta_batch_size: 2
    tasks_per_epoch: 4
    val_tasks: 2
    test_tasks: 2
"""


def tiny_conv(in_channels: int) -> Conv4:
    torch.manual_seed(0)
    return Conv4(out_features=2, in_channels=in_channels, hidden_channels=4, image_size=SIZE, blocks=2)


def photo_task(root: Path, query: int = 2, **kw) -> Path:
    """support/ and val/ of a red and a blue class, and an unlabelled query, as a phone takes them."""
    for c, colour in enumerate(("red", "blue")):
        write_photos(root / "support" / colour, colour, 3, seed=10 + c, **kw)
        write_photos(root / "val" / colour, colour, 2, seed=20 + c, **kw)
        for i in range(query):
            (root / "query").mkdir(exist_ok=True)
            colour_photo(COLOURS[colour], 30 + 10 * c + i, **kw).save(root / "query" / f"{colour}{i}.jpg")
    return root


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------- end to end
def test_an_rgb_run_exports_its_normalisation_and_fine_tunes_and_predicts_on_photos(
    in_tmp, monkeypatch, caplog
):
    from lthmaml.cli import main as lthmaml_main

    monkeypatch.setattr("sys.argv", ["lthmaml"])
    data = in_tmp / "photos"
    for c, colour in enumerate(list(COLOURS)[:6]):
        write_photos(data / colour, colour, 5, seed=c)
    (in_tmp / "run.yaml").write_text(RUN.format(root=data, size=SIZE))
    lthmaml_main(["fit", "-c", str(in_tmp / "run.yaml")])
    assert export.main([str(in_tmp / "checkpoints" / "last.ckpt"), "-o", "rgb.safetensors"]) == 0
    metadata = load_artifact(in_tmp / "rgb.safetensors").metadata
    shape = dict(ways=2, shots=1, query_shots=2, eval_query_shots=2, class_split=[2, 2, 2])
    meta_train = ImageFolderDataModule(str(data), layout="classes", image_size=SIZE, **shape)
    meta_train.setup()
    assert metadata.look == "rgb" and metadata.normalization == meta_train.normalization.to_dict()
    assert not meta_train.normalization.is_identity

    task = photo_task(in_tmp / "task", size=(24, 20))  # not square: centre-cropped as in meta-training
    caplog.set_level(logging.INFO)
    args = [
        "fit",
        "-c",
        PI,
        "--threads",
        "1",
        "--model.artifact",
        "rgb.safetensors",
        "--data.root",
        str(task),
    ]
    edge_main(
        [*args, "--data.image_size", str(SIZE), "--trainer.max_epochs", "2", "--predict_after_fit", "true"]
    )
    assert "each decoded as rgb 16x16 (centre-cropped square)" in caplog.text
    run = in_tmp / "runs" / "edge" / "task"  # one folder per task folder, named after it
    predicted = rows(run / "predictions.csv")
    assert sorted(row["file"] for row in predicted) == ["blue0.jpg", "blue1.jpg", "red0.jpg", "red1.jpg"]
    assert {row["label"] for row in predicted} <= {"blue", "red"}
    tuned = load_artifact(run / FINETUNED).metadata
    assert (tuned.look, tuned.normalization) == (metadata.look, metadata.normalization)

    device = TaskFolderDataModule(str(task), image_size=SIZE)
    device.follow(metadata)  # what FineTuneModule.setup does through check_compatible
    device.setup()
    used = Normalization.parse(metadata.normalization, "rgb")
    assert device.normalization == used == meta_train.normalization
    first = task / "support" / "blue" / "blue_000.jpg"
    pixels = torch.from_numpy(decode_image(first.read_bytes(), SIZE, "rgb").pixels)
    assert torch.equal(device.splits["support"].x[0], meta_train.to_input(pixels))  # bit for bit

    edge_main(["predict", "-c", PI, "--model.artifact", str(run / FINETUNED), "--data.root", str(task)]
              + ["--data.image_size", str(SIZE), "--output", str(in_tmp / "again.csv")])  # fmt: skip
    assert rows(in_tmp / "again.csv") == predicted


# ---------------------------------------------------------------------------------- conversions
def test_a_gray_artifact_given_colour_photos_converts_them_and_says_so(tmp_path, caplog):
    normalization = {"mean": [0.4], "std": [0.2]}
    path = export_net(
        tiny_conv(1), tmp_path / "gray.safetensors", {**INNER, "look": "gray", "normalization": normalization}
    )
    task = photo_task(tmp_path / "task", query=0)
    module = FineTuneModule(artifact=str(path))
    dm = TaskFolderDataModule(str(task), image_size=SIZE, batch_size=8)
    caplog.set_level(logging.INFO)
    quiet_trainer(max_epochs=1, limit_val_batches=None).fit(module, datamodule=dm)
    assert caplog.text.count("converts them to grayscale") == 1  # read once, in the model's look
    assert "10 of 10 images are in colour" in caplog.text and "look 'gray' converts" in caplog.text
    first = task / "support" / "blue" / "blue_000.jpg"
    gray = torch.from_numpy(decode_image(first.read_bytes(), SIZE, "gray").pixels)
    assert dm.splits["support"].x.shape == (6, 1, SIZE, SIZE)
    assert torch.equal(dm.splits["support"].x[0], Normalization((0.4,), (0.2,)).apply(gray))


def test_an_rgb_artifact_given_gray_photos_repeats_the_gray_and_says_so(tmp_path, caplog):
    path = export_net(tiny_conv(3), tmp_path / "rgb.safetensors", INNER)
    assert load_artifact(path).metadata.look == "rgb"  # a 3-channel Conv4 without a look is rgb
    task = tmp_path / "task"
    for colour in ("red", "blue"):
        for i in range(2):
            (task / "support" / colour).mkdir(parents=True, exist_ok=True)
            colour_photo(COLOURS[colour], i).convert("L").save(task / "support" / colour / f"{i}.png")
    dm = TaskFolderDataModule(str(task), image_size=SIZE)
    caplog.set_level(logging.INFO)
    dm.follow(load_artifact(path).metadata)
    dm.setup()
    x = dm.splits["support"].x
    assert x.shape == (4, 3, SIZE, SIZE) and torch.equal(x[:, 0], x[:, 2])
    assert "4 of 4 images are gray" in caplog.text and "three channels" in caplog.text


def test_omniglot_artifacts_keep_the_ink_look(tmp_path):
    path = export_net(tiny_conv(1), tmp_path / "ink.safetensors", INNER)
    metadata = load_artifact(path).metadata
    assert (metadata.look, metadata.normalization) == ("ink", None)
    dm = TaskFolderDataModule(str(tmp_path), image_size=SIZE)
    dm.follow(metadata)
    assert dm.look == "ink" and dm.normalization.is_identity


def test_a_look_that_does_not_fit_the_net_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="look 'rgb' gives 3 channels but the net takes in_channels=1"):
        export_net(tiny_conv(1), tmp_path / "a.safetensors", {**INNER, "look": "rgb"})
    path = export_net(tiny_conv(3), tmp_path / "b.safetensors", INNER)
    rewrite_metadata(path, normalization={"mean": [0.5], "std": [0.2]})
    with pytest.raises(DataError, match="normalization mean must hold 3 numbers for look 'rgb'") as error:
        load_artifact(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_the_task_folder_follows_the_models_image_size_unless_given(tmp_path):
    """Without data.image_size the device reads images at the artifact's size (an 84x84
    mini-ImageNet net needs no option); a size given and different stays a one-line error."""
    from types import SimpleNamespace

    from lthmaml.data.taskfolder import check_compatible

    root = tmp_path / "task"
    for label in ("a", "b"):
        (root / "support" / label).mkdir(parents=True)
        Image.new("RGB", (30, 20), (200, 10, 10) if label == "a" else (10, 200, 10)).save(
            root / "support" / label / "1.png"
        )
    model = SimpleNamespace(
        task="classification",
        ways=2,
        look="rgb",
        normalization=None,
        architecture={"init_args": {"in_channels": 3, "image_size": 12, "out_features": 2}},
    )
    following = TaskFolderDataModule(str(root))
    check_compatible(following, model)
    assert following.image_size == 12 and tuple(following.splits["support"].x.shape[1:]) == (3, 12, 12)
    given = TaskFolderDataModule(str(root), image_size=16)
    with pytest.raises(ConfigError, match="takes 12x12 images .*data.image_size=16"):
        check_compatible(given, model)
