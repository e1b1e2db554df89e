"""The few-shot task folder a device fine-tunes on: layout, preprocessing, CSV tasks, builders, errors."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lthmaml.data import (
    SinusoidTasks,
    TaskFolderDataModule,
    check_compatible,
    load_omniglot,
    make_image_task,
    make_sinusoid_task,
    read_image,
)
from lthmaml.data.images import decode_image
from lthmaml.data.taskfolder_build import omniglot_task
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta.classifier import Classifier
from lthmaml.nets.models import Conv4

SIZE = 8  # image_size of most tests: tiny, and != the written sizes so resizing is exercised


# ---------------------------------------------------------------------------------- helpers
def glyph(seed: int, height: int = 12, width: int | None = None) -> np.ndarray:
    """Black strokes and some grey on white, like an Omniglot PNG."""
    rng = np.random.default_rng(seed)
    shape = (height, width or height)
    values = np.where(rng.random(shape) < 0.35, rng.integers(0, 200, shape), 255)
    return values.astype(np.uint8)


def in_mode(gray: np.ndarray, mode: str) -> Image.Image:
    """``gray`` as an image of ``mode`` whose correct grayscale reading is exactly ``gray``."""
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "RGB":
        return Image.fromarray(gray).convert("RGB")
    if mode == "RGBA":  # black ink whose opacity is the darkness, on transparent paper (a drawing app)
        pixels = np.zeros((*gray.shape, 4), dtype=np.uint8)
        pixels[..., 3] = 255 - gray
        return Image.fromarray(pixels, mode="RGBA")
    if mode == "LA":  # the same in gray + alpha
        return Image.fromarray(np.stack([np.zeros_like(gray), 255 - gray], -1), mode="LA")
    if mode == "P":
        image = Image.frombytes("P", gray.shape[::-1], gray.tobytes())
        image.putpalette([v for i in range(256) for v in (i, i, i)])
        return image
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257)
    raise AssertionError(mode)


MODES = ["L", "RGB", "RGBA", "LA", "P", "I;16"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save(path: Path, image: Image.Image | np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path)
    return path


def expected(gray: np.ndarray, image_size: int = SIZE) -> torch.Tensor:
    """The meta-training preprocessing of a square grayscale glyph: ink 1.0, float [1, S, S]."""
    return torch.from_numpy(decode_image(png_bytes(Image.fromarray(gray)), image_size).pixels).float() / 255


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def loaded(root: Path, **kwargs) -> TaskFolderDataModule:
    datamodule = TaskFolderDataModule(str(root), **{"image_size": SIZE, **kwargs})
    datamodule.setup()
    return datamodule


def only_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    assert len(batches) == 1 and isinstance(batches[0], tuple) and len(batches[0]) == 2
    return batches[0]


def trainer(**kwargs) -> pl.Trainer:
    options = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return pl.Trainer(**{**options, **kwargs})


# ---------------------------------------------------------------------------------- images
@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """support: dog 1, ant 2, cat 3 images (folder order != label order); labelled query."""
    root = tmp_path / "task"
    for label, count, base in (("dog", 1, 0), ("ant", 2, 10), ("cat", 3, 20)):
        for i in range(count):
            save(root / "support" / label / f"{i}.png", glyph(base + i))
    save(root / "query" / "cat" / "q1.png", glyph(30))
    save(root / "query" / "ant" / "q2.png", glyph(31))
    return root


def test_labelled_task_labels_counts_targets_and_batches(labelled):
    dm = loaded(labelled)
    assert dm.task == "classification" and dm.labels == ["ant", "cat", "dog"] and dm.ways == 3
    assert not dm.has_val and dm.val_dataloader() == [] and dm.has_query and dm.query_labelled
    assert dm.splits["support"].files == [
        "ant/0.png",
        "ant/1.png",
        "cat/0.png",
        "cat/1.png",
        "cat/2.png",
        "dog/0.png",
    ]
    assert dm.splits["support"].y.tolist() == [0, 0, 1, 1, 1, 2]
    assert dm.query_files == ["ant/q2.png", "cat/q1.png"]

    x, y = only_batch(dm.train_dataloader())  # 6 <= batch_size: one full, shuffled batch
    assert x.shape == (6, 1, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    pairs = sorted((int(label), image.sum().item()) for image, label in zip(x, y))
    support = dm.splits["support"]
    assert pairs == sorted((int(label), image.sum().item()) for image, label in zip(support.x, support.y))
    assert torch.equal(support.x[5], expected(glyph(0)))  # dog/0.png

    x, y = only_batch(dm.test_dataloader())
    assert y.tolist() == [0, 1] and torch.equal(x[0], expected(glyph(31)))
    x, y = only_batch(dm.predict_dataloader())
    assert y.tolist() == [0, 1] and torch.equal(x[1], expected(glyph(30)))

    two = TaskFolderDataModule(str(labelled), image_size=SIZE, batch_size=4)
    assert [len(b[1]) for b in two.train_dataloader()] == [4, 2]  # loaders set the module up
    assert "3-way classification (ant, cat, dog); 6 support, 2 query (labelled)" in two.summary()


def test_val_split_and_unlabelled_query(tmp_path):
    root = tmp_path / "task"
    for label in ("b", "a"):
        save(root / "support" / label / "0.png", glyph(ord(label)))
    save(root / "val" / "b" / "v.png", glyph(5))
    for name, seed in (("z.png", 7), ("m.png", 8), ("notes.txt", None)):
        if seed is None:
            (root / "query" / name).write_text("ignored")
        else:
            save(root / "query" / name, glyph(seed))
    dm = loaded(root)
    assert dm.has_val and dm.labels == ["a", "b"]
    x, y = only_batch(dm.val_dataloader())
    assert y.tolist() == [1] and torch.equal(x[0], expected(glyph(5)))
    assert dm.has_query and not dm.query_labelled and dm.query_files == ["m.png", "z.png"]
    x, y = only_batch(dm.predict_dataloader())
    assert (
        y.tolist() == [-1, -1]
        and torch.equal(x[0], expected(glyph(8)))
        and torch.equal(x[1], expected(glyph(7)))
    )
    with pytest.raises(DataError, match="unlabelled"):
        dm.test_dataloader()


def test_no_query_is_allowed_but_cannot_be_predicted(tmp_path):
    save(tmp_path / "support" / "a" / "0.png", glyph(0))
    dm = loaded(tmp_path)
    assert not dm.has_query and not dm.query_labelled and dm.query_files == []
    with pytest.raises(DataError, match="no query"):
        dm.predict_dataloader()


@pytest.mark.usefixtures("lthmaml_cache")
@pytest.mark.parametrize("side", [28, 40])
def test_preprocessing_is_the_omniglot_readers(tmp_path, side):
    """The same PNG gives the same 28x28 tensor as meta-training's reader, ink exactly 1.0."""
    gray = glyph(3, side)
    gray[2, :] = 0  # a full black stroke
    save(tmp_path / "omniglot" / "Alpha" / "character01" / "01.png", gray)
    save(tmp_path / "task" / "support" / "a" / "01.png", gray)
    omniglot = load_omniglot(tmp_path / "omniglot", image_size=28).images[0, 0]
    ours = loaded(tmp_path / "task", image_size=28).splits["support"].x[0]
    assert ours.shape == (1, 28, 28) and torch.equal(ours, omniglot)
    if side == 28:
        assert torch.equal(ours[0, 2], torch.ones(28))
        assert torch.equal(ours[0], torch.from_numpy(255 - gray).float() / 255)


@pytest.mark.parametrize("mode", MODES[1:])
def test_other_modes_read_as_their_grayscale(tmp_path, mode):
    gray = glyph(11, 12)
    path = save(tmp_path / f"{mode}.png", in_mode(gray, mode))
    assert Image.open(path).mode == mode  # the file really is in that mode
    assert torch.equal(read_image(path, SIZE), expected(gray))


def test_sizes_rotation_and_jpeg(tmp_path):
    gray = glyph(12, 10, 14)  # 10 high, 14 wide: padded with paper to 14x14, centred, then resized
    square = np.full((14, 14), 255, dtype=np.uint8)
    square[2:12] = gray
    assert torch.equal(read_image(save(tmp_path / "wide.png", gray), SIZE), expected(square))
    # A phone stores pixels sideways with EXIF orientation 6 ("rotate 90 clockwise to view").
    sideways = Image.fromarray(np.rot90(square, k=1).copy())
    exif = sideways.getexif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    sideways.save(path, exif=exif)
    assert torch.equal(read_image(path, SIZE), expected(square))
    jpeg = save(tmp_path / "photo.JPG", Image.fromarray(square).convert("RGB"))
    assert (read_image(jpeg, SIZE) - expected(square)).abs().max() < 0.1  # lossy, but read


# ---------------------------------------------------------------------------------- CSV tasks
def test_regression_task_with_labelled_and_unlabelled_query(tmp_path):
    write_csv(tmp_path / "support.csv", "\ufeffX , y,note\n1.5,2,a\n\n-3e-1, 0.25 ,b\n")
    write_csv(tmp_path / "val.csv", "y,x\n7,8\n")
    write_csv(tmp_path / "query.csv", "x\n0.5\n-1\n4\n")
    dm = loaded(tmp_path)
    assert dm.task == "regression" and dm.ways is None and dm.labels == [] and dm.has_val
    x, y = only_batch(dm.train_dataloader())
    order = x[:, 0].argsort()
    assert x.shape == (2, 1) and y.shape == (2, 1) and y.dtype == torch.float32
    assert x[order, 0].tolist() == pytest.approx([-0.3, 1.5]) and y[order, 0].tolist() == [0.25, 2.0]
    assert [t.tolist() for t in only_batch(dm.val_dataloader())] == [[[8.0]], [[7.0]]]
    assert not dm.query_labelled and dm.query_files == ["row_1", "row_2", "row_3"]
    x, y = only_batch(dm.predict_dataloader())
    assert x[:, 0].tolist() == [0.5, -1.0, 4.0] and torch.isnan(y).all() and y.shape == (3, 1)
    with pytest.raises(DataError, match="unlabelled"):
        dm.test_dataloader()

    write_csv(tmp_path / "query.csv", "x,y\n0.5,1\n")
    (tmp_path / "val.csv").unlink()
    dm = loaded(tmp_path)
    assert dm.query_labelled and not dm.has_val and dm.val_dataloader() == []
    assert [t.tolist() for t in only_batch(dm.test_dataloader())] == [[[0.5]], [[1.0]]]


# ---------------------------------------------------------------------------------- bad input
def _image_task(root: Path) -> None:
    save(root / "support" / "cat" / "0.png", glyph(0))


def _corrupt(root: Path) -> None:
    _image_task(root)
    (root / "support" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")


def _truncated(root: Path) -> None:
    _image_task(root)
    data = png_bytes(Image.fromarray(glyph(1, 40)))
    (root / "query").mkdir()
    (root / "query" / "cut.png").write_bytes(data[: len(data) // 2])


def _tree(*paths: str) -> Callable[[Path], None]:
    """Images at ``paths`` (``x.csv=TEXT`` writes a CSV; a trailing / makes an empty folder)."""

    def build(root: Path) -> None:
        for path in paths:
            if "=" in path:
                name, text = path.split("=", 1)
                write_csv(root / name, text)
            elif path.endswith("/"):
                (root / path).mkdir(parents=True)
            else:
                save(root / path, glyph(len(path)))

    return build


BAD_INPUTS = {
    "no support": (_tree("query/a.png"), "", "no support/ folder or support.csv"),
    "images and csv": (_tree("support/cat/0.png", "support.csv=x,y\n1,2\n"), "", "keep one"),
    "empty label folder": (
        _tree("support/cat/0.png", "support/dog/notes.txt=hi"),
        "support/dog",
        "no images",
    ),
    "loose support image": (_tree("support/cat/0.png", "support/x.png"), "support/x.png", "label folder"),
    "unknown val label": (_tree("support/cat/0.png", "val/zebra/0.png"), "val/zebra", "(cat)"),
    "empty val": (_tree("support/cat/0.png", "val/"), "val", "no label folders"),
    "unknown query label": (_tree("support/cat/0.png", "query/zebra/0.png"), "query/zebra", "(cat)"),
    "mixed query": (_tree("support/cat/0.png", "query/cat/0.png", "query/1.png"), "query", "mixes"),
    "images and query.csv": (_tree("support/cat/0.png", "query.csv=x\n1\n"), "query.csv", "mixes"),
    "csv and query folder": (_tree("support.csv=x,y\n1,2\n", "query/a.png"), "query", "mixes"),
    "corrupt png": (_corrupt, "support/cat/bad.png", "cannot read image"),
    "truncated png": (_truncated, "query/cut.png", "cannot read image"),
    "csv without y": (_tree("support.csv=x\n1\n"), "support.csv", "no column y"),
    "csv without x": (_tree("support.csv=a,y\n1,2\n", "query.csv=x\n1\n"), "support.csv", "no column x"),
    "query without x": (_tree("support.csv=x,y\n1,2\n", "query.csv=y\n1\n"), "query.csv", "no column x"),
    "non-numeric": (_tree("support.csv=x,y\n1,2\n\n3,abc\n"), "support.csv", "row 2 (line 4): y = 'abc'"),
    "nan": (_tree("support.csv=x,y\nnan,2\n"), "support.csv", "row 1 (line 2): x = 'nan'"),
    "short row": (_tree("support.csv=x,y\n1,2\n3\n"), "support.csv", "row 2 (line 3): y = ''"),
    "empty csv": (_tree("support.csv=\n\n"), "support.csv", "is empty"),
    "header only": (_tree("support.csv=x,y\n"), "support.csv", "no rows"),
    "empty val.csv": (_tree("support.csv=x,y\n1,2\n", "val.csv="), "val.csv", "is empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_data_error_naming_the_file(tmp_path, case):
    build, where, reason = BAD_INPUTS[case]
    root = tmp_path / "task"
    root.mkdir()
    build(root)
    with pytest.raises(DataError) as error:
        TaskFolderDataModule(str(root), image_size=SIZE).setup()
    message = str(error.value)
    assert "\n" not in message and reason in message and str(root / where) in message


def test_missing_root_non_utf8_csv_and_bad_options(tmp_path):
    with pytest.raises(DataError, match=f"task folder {tmp_path / 'nowhere'} does not exist"):
        loaded(tmp_path / "nowhere")
    (tmp_path / "support.csv").write_bytes(b"x,y\n\xff\xfe,1\n")
    with pytest.raises(DataError, match=f"cannot read {tmp_path / 'support.csv'}"):
        loaded(tmp_path)
    for option in ({"image_size": 0}, {"batch_size": 0}, {"num_workers": -1}):
        with pytest.raises(ConfigError, match=next(iter(option))):
            TaskFolderDataModule(str(tmp_path), **option)


# ---------------------------------------------------------------------------------- compatibility
def test_check_compatible_names_both_numbers(labelled):
    dm = loaded(labelled)
    arch = {"class_path": "lthmaml.nets.models.Conv4", "init_args": {"out_features": 3, "image_size": SIZE}}
    check_compatible(dm, SimpleNamespace(task="classification", ways=3, architecture=arch))
    with pytest.raises(ConfigError, match=r"model m\.safetensors is 5-way but task folder .* has 3 labels"):
        check_compatible(
            dm, SimpleNamespace(task="classification", ways=5, architecture=arch), "m.safetensors"
        )
    with pytest.raises(ConfigError, match="does regression but task folder .* is classification"):
        check_compatible(dm, SimpleNamespace(task="regression", ways=None, architecture={}))
    big = {"init_args": {"image_size": 28}}
    with pytest.raises(ConfigError, match="takes 28x28 images .*data.image_size=8"):
        check_compatible(dm, SimpleNamespace(task="classification", ways=3, architecture=big))


# ---------------------------------------------------------------------------------- builders
def test_make_image_task_round_trips_images_and_labels(tmp_path):
    images = torch.rand(3, 6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = ["zeta", "alpha", "mid"]
    root = make_image_task(tmp_path / "t", images, labels, shots=2, val_shots=1, query_shots=3, seed=4)
    dm = loaded(root)
    assert dm.labels == sorted(labels) and dm.has_val and dm.query_labelled
    seen: dict[str, set[str]] = {}
    for name, count in (("support", 2), ("val", 1), ("query", 3)):
        split = dm.splits[name]
        assert len(split) == 3 * count
        for file, x, y in zip(split.files, split.x, split.y):
            label, example = file.split("/")[0], int(file.split("/")[1][:-4])
            assert dm.labels[int(y)] == label
            original = images[labels.index(label), example]
            assert (x - original).abs().max() <= 0.5 / 255 + 1e-6  # only the 8-bit quantisation
            seen.setdefault(label, set()).add(file.split("/")[1])
    assert all(len(files) == 6 for files in seen.values())  # every example dealt once, none twice
    again = make_image_task(tmp_path / "u", images, labels, shots=2, val_shots=1, query_shots=3, seed=4)
    assert loaded(again).splits["query"].files == dm.splits["query"].files
    other = make_image_task(tmp_path / "v", images, labels, shots=2, val_shots=1, query_shots=3, seed=5)
    assert loaded(other).splits["query"].files != dm.splits["query"].files


def test_make_image_task_unlabelled_query_has_an_answer_key(tmp_path):
    images = torch.rand(2, 4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    root = make_image_task(tmp_path / "t", images, ["a", "b"], 1, 0, 3, seed=0, labelled_query=False)
    dm = loaded(root)
    assert not dm.has_val and not dm.query_labelled and len(dm.query_files) == 6
    with (root / "answers.csv").open() as handle:
        answers = {row["file"]: row["label"] for row in csv.DictReader(handle)}
    assert sorted(answers) == dm.query_files and sorted(answers.values()) == ["a"] * 3 + ["b"] * 3
    for file, x in zip(dm.query_files, dm.splits["query"].x):
        distances = (images[["a", "b"].index(answers[file])] - x).abs().flatten(1).max(1).values
        assert distances.min() <= 0.5 / 255 + 1e-6  # the image is one of its class's


def test_omniglot_task_picks_ways_classes(tmp_path):
    images = torch.rand(5, 3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    classes = [f"Alpha/character0{i}" for i in range(5)]
    dm = loaded(omniglot_task(tmp_path / "t", images, classes, ways=3, seed=1, shots=1, query_shots=2))
    assert dm.ways == 3 and set(dm.labels) <= {c.replace("/", "-") for c in classes}
    assert len(dm.splits["support"]) == 3 and len(dm.query_files) == 6


def test_make_sinusoid_task_round_trips_exactly(tmp_path):
    truth = SinusoidTasks(shots=9, query_shots=0).sample(np.random.default_rng(3))
    dm = loaded(make_sinusoid_task(tmp_path / "s", shots=4, val_shots=2, query_shots=3, seed=3))
    assert dm.task == "regression" and dm.query_labelled
    got = {name: dm.splits[name] for name in ("support", "val", "query")}
    assert torch.equal(torch.cat([s.x for s in got.values()]), truth.support_x)
    assert torch.equal(torch.cat([s.y for s in got.values()]), truth.support_y)
    root = make_sinusoid_task(
        tmp_path / "u", shots=4, val_shots=2, query_shots=3, seed=3, labelled_query=False
    )
    dm = loaded(root)
    assert not dm.query_labelled and torch.equal(dm.splits["query"].x, truth.support_x[6:])
    with (root / "answers.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == dm.query_files
    assert torch.equal(torch.tensor([float(r["y"]) for r in rows]), truth.support_y[6:, 0])


def test_builders_refuse_bad_requests(tmp_path):
    images = torch.rand(2, 3, 1, SIZE, SIZE)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    cases = [
        (lambda: make_image_task(tmp_path / "full", images, ["a", "b"], 1), "not an empty folder"),
        (lambda: make_image_task(tmp_path / "t", images, ["a", "b"], 2, 1, 1), "only 3 examples per class"),
        (lambda: make_image_task(tmp_path / "t", images, ["a"], 1), "1 labels for 2 classes"),
        (lambda: make_image_task(tmp_path / "t", images, ["a", "a"], 1), "distinct"),
        (lambda: make_image_task(tmp_path / "t", images, ["a", "x/y"], 1), "folder name"),
        (lambda: make_image_task(tmp_path / "t", images[:, :, 0], ["a", "b"], 1), "examples, 1, H, W"),
        (lambda: make_sinusoid_task(tmp_path / "t", shots=0), "shots must be >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message):
            call()
    assert not (tmp_path / "t").exists()  # nothing half-written


# ---------------------------------------------------------------------------------- Lightning
class Predicting(Classifier):
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return self.net(x).argmax(-1)


def test_fits_tests_and_predicts_with_lightning_without_val(tmp_path):
    """val_dataloader() == [] makes Lightning skip validation (with a warning that the length is
    zero); test accuracy is the labelled query's."""
    images = torch.zeros(3, 4, 1, SIZE, SIZE)
    for c in range(3):  # class c: a bright band in rows 2c..2c+1, easy to learn
        images[c, :, 0, 2 * c : 2 * c + 2] = 1.0
    root = make_image_task(tmp_path / "t", images, ["a", "b", "c"], shots=2, query_shots=2, seed=0)
    dm = TaskFolderDataModule(str(root), image_size=SIZE)
    torch.manual_seed(0)
    model = Predicting(Conv4(out_features=3, hidden_channels=4, image_size=SIZE, blocks=2))
    fit = trainer(max_epochs=30)
    fit.fit(model, datamodule=dm)
    assert sum(fit.num_val_batches) == 0 and "val/loss" not in fit.callback_metrics
    assert fit.global_step == 30  # one full support batch per epoch
    metrics = fit.test(model, datamodule=dm, verbose=False)[0]
    x, y = dm.splits["query"].x, dm.splits["query"].y
    with torch.no_grad():
        accuracy = (model.net.eval()(x).argmax(-1) == y).float().mean().item()
    assert metrics["test/acc"] == pytest.approx(accuracy) and accuracy == 1.0
    predictions = fit.predict(model, datamodule=dm)
    assert torch.cat(predictions).tolist() == y.tolist()  # in query_files order


# ---------------------------------------------------------------------------------- property
NAMES = st.text(alphabet="abAB01_-", min_size=1, max_size=4)
IMAGE = st.tuples(st.integers(0, 2**16), st.integers(4, 12), st.sampled_from(MODES))  # seed, side, mode


@st.composite
def task_trees(draw):
    labels = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    support = {label: draw(st.lists(IMAGE, min_size=1, max_size=3)) for label in labels}
    val_labels = draw(st.lists(st.sampled_from(labels), unique=True, max_size=len(labels)))
    val = {label: draw(st.lists(IMAGE, min_size=1, max_size=2)) for label in val_labels}
    kind = draw(st.sampled_from(["none", "labelled", "unlabelled"]))
    if kind == "labelled":
        query = {label: draw(st.lists(IMAGE, min_size=1, max_size=2)) for label in labels[:2]}
    elif kind == "unlabelled":
        query = {"": draw(st.lists(IMAGE, min_size=1, max_size=3))}
    else:
        query = {}
    return {"support": support, "val": val, "query": query}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=task_trees())
def test_random_task_trees_read_back(tree):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for split, folders in tree.items():
            for label, images in folders.items():
                for i, (seed, side, mode) in enumerate(images):
                    gray = glyph(seed, side)
                    name = f"{label}/{i}.png" if label else f"{i}_{label}.png"
                    save(root / split / name, in_mode(gray, mode))
                    truth.setdefault(split, []).append((name, expected(gray)))
        dm = loaded(root)
        labels = sorted(tree["support"])
        assert dm.labels == labels and dm.ways == len(labels)
        assert dm.has_val == bool(tree["val"]) and dm.has_query == bool(tree["query"])
        assert dm.query_labelled == (dm.has_query and "" not in tree["query"])
        for split, expect in truth.items():
            got = dm.splits[split]
            expect = sorted(expect, key=lambda item: tuple(item[0].split("/")))
            assert got.files == [name for name, _ in expect]
            assert all(torch.equal(x, image) for x, (_, image) in zip(got.x, expect))
            targets = [labels.index(f.split("/")[0]) if "/" in f else -1 for f in got.files]
            assert got.y.tolist() == targets
        assert dm.query_files == (dm.splits["query"].files if dm.has_query else [])
