"""One's own images for meta-training: looks and colour, normalisation, the class-folder, split-folder
and mini-ImageNet layouts, the cache, augmentation and bad input; on tiny generated photos."""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import COLOURS, colour_photo, mini_imagenet, quiet_trainer, write_photos
from PIL import Image, ImageOps

from lthmaml.data import FewShotTasks, ImageFolderDataModule, Normalization, decode_image, imageset
from lthmaml.data.folders import READER, detect_layout, find_classes
from lthmaml.data.images import IMAGE_LOOK
from lthmaml.data.imageset import load_pixels
from lthmaml.data.omniglot import load_omniglot
from lthmaml.data.taskfolder import TaskFolderDataModule
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta.protonet import ProtoNet
from lthmaml.nets.models import Conv4

pytestmark = pytest.mark.usefixtures("lthmaml_cache")

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
NAMES = list(COLOURS)


def classes_root(root: Path, colours: list[str], count: int = 6, **kw) -> Path:
    for c, colour in enumerate(colours):
        write_photos(root / colour, colour, count, seed=c, **kw)
    return root


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    args = dict(image_size=SIZE, ways=2, shots=1, query_shots=2, eval_query_shots=2, meta_batch_size=2)
    args.update(tasks_per_epoch=4, val_tasks=4, test_tasks=4)
    return ImageFolderDataModule(str(root), **{**args, **kwargs})


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Least squares on +-1 targets, fitted on even rows and scored on odd ones."""
    x = torch.cat([features.flatten(1).double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    y = labels.double() * 2 - 1
    weights = torch.linalg.lstsq(x[::2], y[::2, None], driver="gelsd").solution
    return float(((x[1::2] @ weights)[:, 0].sign() == y[1::2]).double().mean())


# ---------------------------------------------------------------------------------- looks
def test_colours_survive_decoding_and_a_linear_probe_separates_red_from_green(tmp_path):
    """Red and green of the same luma: told apart in rgb, the same in gray."""
    root = classes_root(tmp_path / "photos", ["red", "green"], count=12)
    files = find_classes(root, "classes")[1]
    rgb = load_pixels(root, files, SIZE, "rgb", READER)
    with pytest.warns(UserWarning, match="24 of 24 images are in colour .* look 'gray' converts them"):
        gray = load_pixels(root, files, SIZE, "gray", READER)
    assert rgb.pixels.shape == (24, 3, SIZE, SIZE) and gray.pixels.shape == (24, 1, SIZE, SIZE)
    labels = torch.tensor([0] * 12 + [1] * 12)  # green sorts before red
    means = rgb.pixels.double().mean((2, 3))
    assert (means[:12, 1] > means[:12, 0] + 50).all() and (means[12:, 0] > means[12:, 1] + 100).all()
    assert linear_probe_accuracy(rgb.pixels, labels) == 1.0
    gray_means = gray.pixels.double().mean((1, 2, 3))
    assert abs(float(gray_means[:12].mean() - gray_means[12:].mean())) < 6  # gray keeps no colour


def test_decode_looks_alpha_exif_and_square(tmp_path):
    photo = colour_photo(COLOURS["blue"], 0, size=(24, 16))  # wide: centre-cropped to 16x16
    rgb = decode_image(_png(photo), 16, "rgb")
    assert rgb.pixels.shape == (3, 16, 16) and rgb.colour and rgb.size == (24, 16)
    assert np.array_equal(rgb.pixels, np.asarray(photo.crop((4, 0, 20, 16))).transpose(2, 0, 1))
    gray = decode_image(_png(photo), 16, "gray")
    assert gray.pixels.shape == (1, 16, 16) and gray.colour
    assert np.array_equal(gray.pixels[0], np.asarray(photo.convert("L").crop((4, 0, 20, 16))))
    ink = decode_image(_png(photo.convert("L")), 16, "ink")  # padded with paper, inverted
    padded = Image.new("L", (24, 24), 255)
    padded.paste(photo.convert("L"), (0, 4))
    expected = 255 - np.asarray(padded.resize((16, 16), Image.Resampling.LANCZOS))
    assert not ink.colour and np.array_equal(ink.pixels, expected[None])
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent red: white paper
    assert (decode_image(_png(clear), 8, "rgb").pixels == 255).all()
    gray_rgb = decode_image(_png(photo.convert("L").convert("RGB")), 16, "rgb")
    assert not gray_rgb.colour and np.array_equal(gray_rgb.pixels[0], gray_rgb.pixels[2])


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- the module
def test_class_folders_split_normalise_and_draw_tasks(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:6], count=5)
    dm = module(root, class_split=[2, 2, 2], split_seed=1)
    dm.setup()
    assert detect_layout(root) == "classes" and dm.pixels.classes == sorted(NAMES[:6])
    assert sorted(sum(dm.class_indices.values(), [])) == list(range(6))
    train = dm.pixels.subset(dm.class_indices["train"]).pixels
    assert dm.normalization == Normalization.of(train) and len(dm.normalization.mean) == 3
    x = dm.normalization.apply(train).double()
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-2
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 2, 3, SIZE, SIZE) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (2, 4, 3, SIZE, SIZE)
    first = [b.query_x for b in dm.test_dataloader()]
    again = [b.query_x for b in module(root, class_split=[2, 2, 2], split_seed=1).test_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # fixed evaluation tasks
    state = dm.state_dict()[IMAGE_LOOK]
    assert state == {"look": "rgb", "normalization": dm.normalization.to_dict()}


def test_uneven_classes_are_drawn_from_all_their_images(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=3)
    write_photos(root / NAMES[0], "pink", 5, seed=9)  # red now holds 8 images
    dm = module(root, class_split=[1, 1, 1], eval_query_shots=1)
    dm.setup()
    counts = dict(zip(dm.pixels.classes, dm.pixels.counts))
    assert counts == {"blue": 3, "green": 3, "red": 8}
    tasks = FewShotTasks(dm.pixels.pixels, 3, 1, 2, counts=dm.pixels.counts)
    red, seen = dm.pixels.pixels[6:], set()  # red's rows follow blue's and green's
    for seed in range(20):
        task = tasks.sample(np.random.default_rng(seed))
        for image in torch.cat([task.support_x, task.query_x]):
            seen.update(r for r in range(8) if torch.equal(image, red[r]))
    assert len(seen) > 3  # not truncated to the smallest class's 3


def test_split_folders_and_state_restores_the_checkpoints_normalisation(tmp_path):
    root = tmp_path / "split"
    for s, split in enumerate(("train", "val", "test")):
        classes_root(root / split, NAMES[3 * s : 3 * s + 3], count=4)
    dm = module(root, look="gray")
    with pytest.warns(UserWarning, match="36 of 36 images are in colour"):
        dm.setup()
    assert detect_layout(root) == "split_folders"
    assert [dm.pixels.classes[i] for i in dm.class_indices["val"]] == [f"val/{n}" for n in sorted(NAMES[3:6])]
    saved = dm.state_dict()
    other = module(root, look="gray")
    other.setup()
    with pytest.warns(UserWarning, match=r"differs from the checkpoint's mean \[0.5\], std \[0.25\]"):
        other.load_state_dict({IMAGE_LOOK: {"look": "gray", "normalization": {"mean": [0.5], "std": [0.25]}}})
    assert other.normalization == Normalization((0.5,), (0.25,))
    with pytest.raises(ConfigError, match="look 'gray' but data.init_args.look is 'rgb'"):
        module(root).load_state_dict(saved)
    with pytest.raises(ConfigError, match="fixes the class split"):
        module(root, class_split=[1, 1, 1]).setup()


def test_augment_flips_mirrors_training_images_only(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:6], count=3)
    dm = module(root, class_split=[2, 2, 2], augment="flips", query_shots=1)
    dm.setup()
    originals = dm.to_input(dm.pixels.subset(dm.class_indices["train"]).pixels)
    tasks = dm.split_tasks("train")
    assert tasks.flips and not dm.split_tasks("val").flips
    mirrored = 0
    for seed in range(6):
        task = tasks.sample(np.random.default_rng(seed))
        for image in torch.cat([task.support_x, task.query_x]):
            plain = any(torch.equal(image, o) for o in originals)
            flipped = any(torch.equal(image, o.flip(-1)) for o in originals)
            assert plain or flipped
            mirrored += flipped and not plain
    assert mirrored > 0
    rotated = module(root, class_split=[2, 2, 2], augment="rotations").task_source("train")
    assert rotated.num_classes == 8


# ---------------------------------------------------------------------------------- the cache
def test_cache_is_reused_and_invalidated_when_the_file_list_changes(tmp_path, lthmaml_cache, monkeypatch):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=3)
    first = module(root, class_split=[1, 1, 1])
    first.setup()
    assert module(root, class_split=[1, 1, 1]).pixels is None  # read in setup, not in __init__
    (cached,) = lthmaml_cache.glob("images-*.pt")
    payload = torch.load(cached, weights_only=True)
    assert payload["images"].dtype == torch.uint8 and payload["counts"] == [3, 3, 3]

    imageset.clear_memory_cache()
    decode = imageset.decode_image

    def refuse(*args):
        raise AssertionError("decoded although the disk cache is valid")

    monkeypatch.setattr(imageset, "decode_image", refuse)
    second = module(root, class_split=[1, 1, 1])
    second.setup()
    assert torch.equal(second.pixels.pixels, first.pixels.pixels)
    write_photos(root / "olive", "olive", 3, seed=7)  # a new class: another file list
    with pytest.raises(AssertionError, match="decoded"):
        module(root, class_split=[1, 1, 1]).setup()
    os.utime(root / "red" / "red_000.jpg", ns=(1, 1))  # a changed file invalidates too
    monkeypatch.setattr(imageset, "decode_image", decode)
    third = module(root, class_split=[1, 1, 1])
    third.setup()
    assert len(third.pixels.classes) == 4 and len(list(lthmaml_cache.glob("images-*.pt"))) == 2


def test_a_progress_bar_while_decoding_thousands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(imageset, "PROGRESS_MIN", 4)
    module(classes_root(tmp_path / "photos", NAMES[:3], count=3), class_split=[1, 1, 1]).setup()
    assert "decoding" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- mini-ImageNet
def test_mini_imagenet_layout_meta_trains_and_beats_chance_on_its_test_split(tmp_path):
    root = mini_imagenet(tmp_path / "mini", {"train": NAMES[:6], "val": NAMES[6:9], "test": NAMES[9:]})
    dm = module(
        root, ways=3, query_shots=3, eval_query_shots=5, meta_batch_size=4, tasks_per_epoch=40, test_tasks=40
    )
    torch.manual_seed(0)
    model = ProtoNet(Conv4(out_features=None, in_channels=3, hidden_channels=8, image_size=SIZE, blocks=2))
    trainer = quiet_trainer(max_steps=10, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert detect_layout(root) == "miniimagenet" and len(dm.class_indices["test"]) == 3
    assert {dm.pixels.classes[i].split("/")[0] for i in dm.class_indices["train"]} == {"train"}
    (results,) = trainer.test(model, datamodule=dm, verbose=False)
    assert results["test/acc_post"] > 0.6  # chance is 1/3


def test_the_config_parses(resolved_config):
    config = resolved_config("-c", REPO / "configs" / "miniimagenet_5way1shot.yaml")
    data, net = config["data"]["init_args"], config["model"]["init_args"]["net"]["init_args"]
    assert (data["layout"], data["look"]) == ("miniimagenet", "rgb")  # Ravi & Larochelle's 84 px colour
    assert (net["in_channels"], net["image_size"]) == (3, data["image_size"]) == (3, 84)
    assert net["out_features"] == data["ways"] == 5


# ---------------------------------------------------------------------------------- bad input
def test_mixed_sizes_and_modes_are_converted_and_said(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=3)
    colour_photo(COLOURS["red"], 5, size=(30, 20)).convert("L").save(root / "red" / "gray.png")
    with pytest.warns(UserWarning) as caught:
        module(root, class_split=[1, 1, 1]).setup()
        module(root, class_split=[1, 1, 1], look="gray").setup()
    said = [str(w.message) for w in caught]
    assert (
        len(said) == 4 and "1 of 10 images are gray" in said[1] and "9 of 10 images are in colour" in said[3]
    )
    assert "2 size(s) (20x20 to 30x20) and mode(s) L, RGB are each decoded as rgb 16x16" in said[0]
    assert "centre-cropped square" in said[0] and said[2].startswith(f"image root {root}: images of 2")


def test_a_class_with_too_few_images_names_its_folder(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=4)
    (root / "blue" / "blue_003.jpg").unlink()
    with pytest.raises(DataError, match=r"shots \+ (eval_)?query_shots = 4 of each class") as error:
        module(root, class_split=[1, 1, 1], query_shots=3, eval_query_shots=3).setup()
    assert str(error.value).startswith(f"class folder {root / 'blue'} holds 3 images")
    assert "add images to it, remove it, or lower" in str(error.value)


def test_bad_inputs_are_one_line_errors_naming_the_file_and_the_fix(tmp_path, monkeypatch, capsys):
    """A CSV naming a missing file, an unreadable JPEG (through the CLI), half a fixed split,
    an image outside a class folder, an empty root, an unknown look."""
    from lthmaml.cli import main

    monkeypatch.setattr("sys.argv", ["lthmaml"])
    mini = mini_imagenet(tmp_path / "mini", {"train": NAMES[:2], "val": NAMES[2:4], "test": NAMES[4:6]}, 4)
    published = (mini / "val.csv").read_text()
    (mini / "val.csv").write_text(published + "n0000000900000000.jpg,n00000009\n")
    with pytest.raises(
        DataError, match=r"val.csv line 10 names .*n0000000900000000.jpg, which does not exist"
    ):
        module(mini).setup()
    (mini / "val.csv").write_text(published)
    (mini / "images" / "n0000000300000002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    monkeypatch.chdir(tmp_path)
    config = ["fit", "-c", str(REPO / "configs" / "miniimagenet_5way1shot.yaml"), "--trainer.logger", "false"]
    overrides = ["--data.init_args.root", str(mini), "--data.init_args.query_shots", "2"]
    overrides += ["--data.init_args.eval_query_shots", "2", "--data.init_args.ways", "2"]
    overrides += ["--model.init_args.net.init_args.out_features", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(config + overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lthmaml: error: cannot read image ") and "n0000000300000002.jpg" in err
    assert err.endswith("replace or delete the file")

    half = classes_root(tmp_path / "half" / "train", NAMES[:2]).parent
    with pytest.raises(DataError, match=r"has train/ but no val/, test/"):
        module(half).setup()
    loose = classes_root(tmp_path / "loose", NAMES[:3])
    write_photos(loose, "red", 1, seed=3)
    with pytest.raises(DataError, match="is not inside a class folder"):
        module(loose).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no <class>/ folders of images"):
        module(tmp_path / "empty").setup()
    with pytest.raises(ConfigError, match="data.init_args.look must be one of ink, gray, rgb"):
        module(loose, look="colour")


def test_the_nets_channels_must_fit_the_look(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:6], count=3)
    model = ProtoNet(Conv4(out_features=None, in_channels=1, hidden_channels=4, image_size=SIZE, blocks=2))
    with pytest.raises(ConfigError, match="in_channels=1 but data.init_args.look='rgb' gives 3"):
        quiet_trainer(max_steps=1).fit(model, datamodule=module(root, class_split=[2, 2, 2]))


def test_every_split_a_stage_draws_is_checked_at_setup_naming_the_option_and_the_fix(tmp_path):
    """7 classes split 60/20/20 give train 4, val 2, test 1: a 2-way fit (which tests after it) and
    a test are refused at setup; validate and tasks drawn outside a Trainer (no stage) are not."""
    root = classes_root(tmp_path / "photos", NAMES[:7], count=3)
    module(root).setup()
    module(root).setup("validate")
    for stage in ("fit", "test", "predict"):
        with pytest.raises(ConfigError) as error:
            module(root).setup(stage)
        assert str(error.value) == (
            "data.init_args.ways=2 but the test split has only 1 classes: lower data.init_args.ways, or "
            "give the test split more classes: data.init_args.class_split [3, 2, 2] (class counts)"
        )
    module(root, class_split=[3, 2, 2]).setup("fit")
    with pytest.raises(ConfigError) as error:
        module(root, class_split=[3, 2, 2], train_ways=4).setup("fit")
    assert str(error.value) == (
        "data.init_args.train_ways=4 but the train split has only 3 classes: lower "
        "data.init_args.train_ways, or add classes: 7 cannot give each split the classes of an episode"
    )
    module(root, class_split=[3, 2, 2], train_ways=4, augment="rotations").setup("fit")  # 12 with turns
    mini = mini_imagenet(tmp_path / "mini", {"train": NAMES[:2], "val": NAMES[2:4], "test": NAMES[4:5]}, 3)
    with pytest.raises(ConfigError) as error:
        module(mini).setup("test")
    assert str(error.value).endswith(f"or add classes to {mini / 'test.csv'}")


def test_an_unreadable_image_names_the_file_or_zip_member_not_pillows_buffer(tmp_path, fake_omniglot):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=3)
    (root / "red" / "zz.jpg").write_bytes(b"garbage, not a JPEG")
    with pytest.raises(DataError) as error:
        module(root, class_split=[1, 1, 1]).setup()
    assert str(error.value) == (
        f"cannot read image {root / 'red' / 'zz.jpg'} (not an image format Pillow can read): replace or "
        "delete the file"
    )
    drawers = {"Alpha/character01": 2, "Alpha/character02": 3}  # the garbage makes them even
    zips = fake_omniglot.zip({"Alpha": ["character01", "character02"]}, drawers=drawers)
    member = "images_background_small1/Alpha/character01/03.png"
    with zipfile.ZipFile(zips / "images_background_small1.zip", "a") as archive:
        archive.writestr(member, b"garbage, not a PNG")
    with pytest.raises(DataError) as error:
        load_omniglot(zips, image_size=12)
    message = str(error.value)
    zip_path = zips / "images_background_small1.zip"
    assert message.startswith(
        f"cannot read Omniglot image {zip_path}:{member} (not an image format Pillow can"
    )
    task = tmp_path / "task"
    write_photos(task / "support" / "red", "red", 1)
    (task / "query").mkdir()
    (task / "query" / "zz.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"query/zz.jpg \(not an image format Pillow can read\)"):
        TaskFolderDataModule(str(task), image_size=SIZE).setup()
    for error_text in (message, str(error.value)):
        assert "BytesIO" not in error_text


def test_an_empty_class_folder_is_named_in_plain_words(tmp_path):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=3)
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no photos yet")
    with pytest.raises(DataError) as error:
        module(root).setup()
    assert str(error.value) == (
        f"class folder {root / 'empty'} holds no images: restore its images or remove it"
    )


def _broken_exif() -> bytes:
    """An EXIF block that turns the photo (orientation 6) and names a tag whose data lies past its
    end: Pillow warns "Tag data larger than file" twice for each such file."""
    entries = struct.pack("<HHI4s", 0x0112, 3, 1, b"\x06\x00\x00\x00") + struct.pack(
        "<HHII", 0x010F, 2, 100, 38
    )
    return b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 2) + entries + struct.pack("<I", 0) + b"abc"


def test_pillows_metadata_warnings_are_silenced_and_others_said_once(tmp_path, monkeypatch, caplog):
    root = classes_root(tmp_path / "photos", NAMES[:3], count=3)
    for path in (root / "red").iterdir():
        colour_photo(COLOURS["red"], 1).save(path, quality=95, exif=_broken_exif())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one raw UserWarning with its source line
        dm = module(root, class_split=[1, 1, 1])
        dm.setup()
    assert dm.pixels.pixels.shape == (9, 3, SIZE, SIZE)
    assert decode_image((root / "red" / "red_000.jpg").read_bytes(), SIZE).warning == ""

    original = ImageOps.exif_transpose

    def warns(image):
        warnings.warn("a warning Pillow may add one day", UserWarning, stacklevel=1)
        return original(image)

    monkeypatch.setattr("lthmaml.data.decode.ImageOps.exif_transpose", warns)
    imageset.clear_memory_cache()
    with pytest.warns(UserWarning) as caught:
        module(root, class_split=[1, 1, 1], cache_dir=str(tmp_path / "other")).setup()
    assert [str(w.message) for w in caught] == [
        f"image root {root}: Pillow warned while decoding 9 of 9 images (first "
        f"{root / 'blue' / 'blue_000.jpg'}: a warning Pillow may add one day): check that they show what "
        "they should"
    ]
    task = tmp_path / "task"
    write_photos(task / "support" / "red", "red", 1)
    caplog.set_level(logging.INFO)
    TaskFolderDataModule(str(task), image_size=SIZE).setup()
    said = [r.getMessage() for r in caplog.records if "Pillow warned" in r.getMessage()]
    assert said == [
        f"task folder {task}: Pillow warned while decoding 1 of 1 images (first "
        f"{task / 'support' / 'red' / 'red_000.jpg'}: a warning Pillow may add one day): check that they "
        "show what they should"
    ]
