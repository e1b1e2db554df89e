"""Omniglot reading, caching, class splits and the DataModule, on tiny PNGs written by conftest."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lthmaml.data import OmniglotDataModule, SinusoidDataModule, imageset, load_omniglot, split_classes
from lthmaml.data import omniglot as og
from lthmaml.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("lthmaml_cache")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = {"Alpha": ["character01", "character02", "character03"], "Beta": ["character01", "character02"]}


def ink(glyph: np.ndarray) -> torch.Tensor:
    """What the loader must return for a glyph at its own size: ink 1.0, paper 0.0."""
    return torch.from_numpy(255 - glyph).float() / 255


def module(root: Path, **kwargs) -> OmniglotDataModule:
    args = dict(ways=2, shots=1, query_shots=2, eval_query_shots=2, image_size=12, class_split=[3, 1, 1])
    args.update(meta_batch_size=2)
    args.update(tasks_per_epoch=4, val_tasks=4, test_tasks=4)
    return OmniglotDataModule(str(root), **{**args, **kwargs})


# ---------------------------------------------------------------------------------- reading
def test_folder_and_zip_give_identical_tensors(fake_omniglot):
    folder = load_omniglot(fake_omniglot.folder(CLASSES), image_size=8)
    zipped = load_omniglot(fake_omniglot.zip(CLASSES), image_size=8)
    assert folder.classes == zipped.classes == [f"{a}/{c}" for a, cs in CLASSES.items() for c in cs]
    assert folder.images.shape == (5, 4, 1, 8, 8) and folder.images.dtype == torch.float32
    assert torch.equal(folder.images, zipped.images)
    assert 0.0 <= float(folder.images.min()) and float(folder.images.max()) <= 1.0


def test_unpacked_official_folder_and_its_zip_are_read_once(fake_omniglot, tmp_path):
    """``lthmaml-data`` leaves ``images_background.zip`` beside ``images_background/``."""
    root = fake_omniglot.zip(CLASSES, root=tmp_path / "dl", name="images_background")
    fake_omniglot.folder(CLASSES, root=root / "images_background", variant=1)
    files = og.find_images(root)
    assert len(files) == 5 and all(
        f.zip_path == root / "images_background.zip" for f in files["Alpha/character01"]
    )
    fake_omniglot.folder({"Gamma": ["character01"]}, root=root / "images_evaluation")
    assert "Gamma/character01" in og.find_images(root)


def test_ink_is_one_on_a_crafted_image(tmp_path):
    glyph = np.full((6, 6), 255, dtype=np.uint8)
    glyph[1, :] = 0  # a black stroke
    glyph[4, 2] = 64  # a grey pixel
    path = tmp_path / "root" / "Alpha" / "character01" / "01.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(glyph).save(path)
    image = load_omniglot(tmp_path / "root", image_size=6).images[0, 0, 0]
    assert torch.equal(image[1], torch.ones(6))
    assert float(image[4, 2]) == pytest.approx(191 / 255)
    assert float(image.sum()) == pytest.approx(6 + 191 / 255)


def test_same_class_in_two_zips_is_counted_once_from_the_first(fake_omniglot):
    root = fake_omniglot.zip({"Greek": ["character01", "character02"], "Alpha": ["character01"]})
    fake_omniglot.zip(
        {"Greek": ["character01", "character02"], "Beta": ["character01"]},
        root=root,
        name="images_background_small2",
        variant=1,
    )
    data = load_omniglot(root, image_size=12)
    assert data.classes == ["Alpha/character01", "Beta/character01", "Greek/character01", "Greek/character02"]
    greek = data.images[data.classes.index("Greek/character01"), 0, 0]
    assert torch.equal(greek, ink(fake_omniglot.glyph("Greek", "character01", 0, variant=0)))


def test_shared_subset_has_242_classes_of_8_alphabets(shared_omniglot):
    data = load_omniglot(shared_omniglot)
    assert data.images.shape == (242, 20, 1, 28, 28)
    assert len(set(data.alphabets)) == 8 and data.alphabets.count("Greek") == 24
    assert 0.02 < float(data.images.mean()) < 0.3  # sparse ink on a blank page
    assert float(data.images[..., 0, :].mean()) < 0.05  # the top row is paper


def test_classes_are_truncated_to_the_smallest_count(fake_omniglot):
    root = fake_omniglot.folder(CLASSES, drawers={"Alpha/character02": 3, "Alpha/character01": 5})
    with pytest.warns(UserWarning, match="truncated to 3, the count of Alpha/character02"):
        data = load_omniglot(root, image_size=12)
    assert data.images.shape[:2] == (5, 3)


# ---------------------------------------------------------------------------------- caching
def test_disk_cache_is_used_and_invalidated_when_a_file_changes(fake_omniglot, lthmaml_cache, monkeypatch):
    root = fake_omniglot.folder(CLASSES)
    first = load_omniglot(root, image_size=12)
    assert load_omniglot(root, image_size=12) is first  # in-memory
    cached = list(lthmaml_cache.glob("omniglot-*.pt"))
    assert len(cached) == 1 and not list(lthmaml_cache.glob(".*"))  # no temporary left behind
    payload = torch.load(cached[0], weights_only=True)
    assert payload["images"].dtype == torch.uint8 and payload["classes"] == first.classes

    og.clear_memory_cache()
    decode = imageset.decode_image  # where every reader decodes

    def refuse(*args):
        raise AssertionError("decoded although the disk cache is valid")

    monkeypatch.setattr(imageset, "decode_image", refuse)
    second = load_omniglot(root, image_size=12)
    assert second is not first and torch.equal(second.images, first.images)

    changed = root / "Beta" / "character02" / "02.png"
    changed.write_bytes(fake_omniglot.png(fake_omniglot.glyph("Beta", "character02", 1, variant=7)))
    os.utime(changed, ns=(1, 1))  # a new mtime even on coarse clocks
    with pytest.raises(AssertionError, match="decoded"):
        load_omniglot(root, image_size=12)  # the memory cache is checked against the files too
    monkeypatch.setattr(imageset, "decode_image", decode)
    third = load_omniglot(root, image_size=12)
    assert len(list(lthmaml_cache.glob("omniglot-*.pt"))) == 2
    assert torch.equal(third.images[4, 1, 0], ink(fake_omniglot.glyph("Beta", "character02", 1, variant=7)))
    assert torch.equal(third.images[:4], first.images[:4])


def test_cache_dir_argument_and_a_corrupt_cache_file(fake_omniglot, tmp_path):
    root = fake_omniglot.folder(CLASSES)
    first = load_omniglot(root, image_size=12, cache_dir=tmp_path / "mine")
    (cached,) = (tmp_path / "mine").glob("omniglot-*.pt")
    cached.write_bytes(b"not a torch file")
    og.clear_memory_cache()
    with pytest.warns(UserWarning, match="ignoring unreadable Omniglot cache"):
        again = load_omniglot(root, image_size=12, cache_dir=tmp_path / "mine")
    assert torch.equal(again.images, first.images)
    assert cached.stat().st_size > 1000  # rewritten


# ---------------------------------------------------------------------------------- splits
NAMES = [f"A{a}/c{c:02d}" for a in range(5) for c in range(6)]


def test_class_split_is_a_disjoint_seeded_partition():
    splits = split_classes(NAMES, (0.6, 0.2, 0.2), seed=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert sorted(sum(splits.values(), [])) == list(range(30))
    assert split_classes(NAMES, (0.6, 0.2, 0.2), seed=3) == splits
    assert split_classes(NAMES, (0.6, 0.2, 0.2), seed=4) != splits
    counts = split_classes(NAMES, [10, 5, 2], seed=3)
    assert [len(counts[s]) for s in ("train", "val", "test")] == [10, 5, 2]
    assert len(set(sum(counts.values(), []))) == 17


def test_split_by_alphabet_keeps_alphabets_whole():
    splits = split_classes(NAMES, (0.6, 0.2, 0.2), seed=0, by_alphabet=True)
    alphabets = {s: {NAMES[i].split("/")[0] for i in idx} for s, idx in splits.items()}
    assert [len(alphabets[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert sorted(sum(splits.values(), [])) == list(range(30))
    assert all(len(idx) == 6 * len(alphabets[s]) for s, idx in splits.items())


@pytest.mark.parametrize(
    "split, match",
    [
        ((0.5, 0.5), "three positive"),
        ((0.6, 0.0, 0.4), "three positive"),
        ((0.8, 0.3, 0.2), "sum to 1.3"),
        ((0.99, 0.005, 0.005), "leaves the val split no classes"),
        ([20, 10, 5], "asks for 35 classes but there are 30"),
    ],
)
def test_bad_class_split_names_the_option(split, match):
    with pytest.raises(ConfigError, match=match) as error:
        split_classes(NAMES, split)
    assert "data.class_split=" in str(error.value)


def test_bad_class_split_fails_when_the_module_is_built(tmp_path):
    with pytest.raises(ConfigError, match="data.class_split"):
        OmniglotDataModule(str(tmp_path), class_split=[0.7, 0.7, 0.1])


# ---------------------------------------------------------------------------------- the DataModule
@pytest.mark.parametrize("train_sampling", ["across", "within_alphabet"])
def test_train_task_sampling_draws_meta_training_tasks_within_one_alphabet_on_request(
    fake_omniglot, train_sampling
):
    """Meta-training tasks follow ``train_task_sampling`` (an alphabet's characters and their
    rotations form one pool), evaluation tasks ``task_sampling``."""
    classes = {alphabet: [f"character{i:02d}" for i in range(1, 5)] for alphabet in ("Alpha", "Beta")}
    root = fake_omniglot.folder(classes)
    dm = module(root, class_split=[4, 2, 2], train_task_sampling=train_sampling)
    dm.setup()
    train = dm.task_source("train")
    assert dm.task_source("val").members is None  # task_sampling: across
    if train_sampling == "across":
        assert train.members is None
    else:
        alphabets = np.repeat([dm.data.classes[i].split("/")[0] for i in dm.class_indices["train"]], 4)
        assert sorted(len(set(alphabets[m])) for m in train.members) == [1] * len(set(alphabets))
        assert sorted(np.concatenate(train.members).tolist()) == list(range(train.num_classes))
    with pytest.raises(ConfigError, match="train_task_sampling must be 'across' or 'within_alphabet'"):
        module(root, train_task_sampling="within")


def test_rotations_are_distinct_classes_on_meta_train_only(fake_omniglot):
    dm = module(fake_omniglot.folder(CLASSES), ways=4, shots=1, query_shots=1, class_split=[1, 2, 2])
    train = dm.task_source("train")
    assert train.num_classes == 4
    with pytest.raises(ConfigError, match="the val split has only 2 classes: lower"):  # not rotated
        dm.task_source("val")
    originals = dm.data.images[dm.class_indices["train"][0]]  # [drawers, 1, H, W]
    for seed in range(3):
        task = train.sample(np.random.default_rng(seed))
        turns = {}
        for image, label in zip(task.support_x, task.support_y.tolist()):
            matches = [
                k
                for k in range(4)
                for d in range(4)
                if torch.equal(image, torch.rot90(originals[d], k, (-2, -1)))
            ]
            assert len(matches) == 1
            turns[label] = matches[0]
        assert sorted(turns.values()) == [0, 1, 2, 3]  # one label per rotation


def test_batches_have_labels_0_to_n_minus_1_shots_times_each(fake_omniglot):
    dm = module(
        fake_omniglot.folder(CLASSES, drawers=6), ways=3, shots=2, query_shots=3, class_split=[3, 1, 1]
    )
    dm.setup()  # not "fit": its val and test splits hold one class, which a fit refuses at setup
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 6, 1, 12, 12) and batch.query_x.shape == (2, 9, 1, 12, 12)
    for support_y, query_y in zip(batch.support_y, batch.query_y):
        assert torch.bincount(support_y, minlength=3).tolist() == [2, 2, 2]
        assert torch.bincount(query_y, minlength=3).tolist() == [3, 3, 3]
    assert dm.ways == 3


def test_fixed_val_and_test_tasks_are_identical_across_constructions(fake_omniglot):
    root = fake_omniglot.folder(CLASSES)
    for split in ("val", "test"):
        first, second = (
            list(getattr(module(root, seed=5, class_split=[1, 2, 2]), f"{split}_dataloader")())
            for _ in range(2)
        )
        assert len(first) == 2
        for a, b in zip(first, second):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = next(iter(module(root, seed=6, class_split=[1, 2, 2]).test_dataloader()))
    assert not torch.equal(other.query_x, first[0].query_x)


def test_data_is_read_in_setup_not_in_init(tmp_path):
    dm = OmniglotDataModule(str(tmp_path / "absent"))  # no error yet: --print_config stays fast
    assert dm.data is None and dm.ways == 5
    with pytest.raises(DataError):
        dm.setup("fit")


# ---------------------------------------------------------------------------------- bad input
def test_missing_root_names_it_and_the_download_command(tmp_path):
    with pytest.raises(DataError, match="lthmaml-data omniglot --root DIR") as error:
        load_omniglot(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_root_without_the_layout(tmp_path):
    (tmp_path / "root" / "notes").mkdir(parents=True)
    (tmp_path / "root" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="neither images_background") as error:
        load_omniglot(tmp_path / "root")
    assert str(tmp_path / "root") in str(error.value)


def test_empty_class_folder(fake_omniglot):
    root = fake_omniglot.folder(CLASSES)
    (root / "Beta" / "character03").mkdir()
    with pytest.raises(DataError, match="holds no .png images") as error:
        load_omniglot(root)
    assert str(root / "Beta" / "character03") in str(error.value)


def test_empty_class_folder_in_a_zip(fake_omniglot):
    root = fake_omniglot.zip(CLASSES)
    with zipfile.ZipFile(root / "images_background_small1.zip", "a") as archive:
        archive.writestr("images_background_small1/Beta/character09/", b"")
    with pytest.raises(DataError, match="images_background_small1/Beta/character09/ holds no .png"):
        load_omniglot(root)


def test_corrupt_image_in_a_folder(fake_omniglot):
    root = fake_omniglot.folder(CLASSES)
    bad = root / "Alpha" / "character02" / "03.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read Omniglot image") as error:
        load_omniglot(root)
    assert str(bad) in str(error.value)


def test_corrupt_image_in_a_zip_names_zip_and_member(fake_omniglot):
    root = fake_omniglot.zip(CLASSES)
    with zipfile.ZipFile(root / "images_background_small1.zip", "a") as archive:
        for drawer in range(1, 5):
            archive.writestr(f"images_background_small1/Gamma/character01/0{drawer}.png", b"not a png")
    zipped = root / "images_background_small1.zip"
    with pytest.raises(DataError, match="cannot read Omniglot image") as error:
        load_omniglot(root)
    assert f"{zipped}:images_background_small1/Gamma/character01/01.png" in str(error.value)


def test_corrupt_zip(tmp_path):
    (tmp_path / "images_evaluation.zip").write_bytes(b"PK truncated")
    with pytest.raises(DataError, match="cannot open Omniglot zip") as error:
        load_omniglot(tmp_path)
    assert str(tmp_path / "images_evaluation.zip") in str(error.value)


def test_too_many_ways_or_shots_name_the_option(fake_omniglot):
    root = fake_omniglot.folder(CLASSES)
    with pytest.raises(ConfigError, match=r"data.init_args.ways=3 but the val split has only 1 classes"):
        module(root, ways=3).val_dataloader()
    with pytest.raises(ConfigError, match=r"shots \+ data.init_args.query_shots = 5 .* only 4 examples"):
        module(root, shots=2, query_shots=3).train_dataloader()


def test_cli_prints_data_errors_as_one_line(fake_omniglot, tmp_path, monkeypatch, capsys):
    from lthmaml.cli import main

    root = fake_omniglot.folder(CLASSES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lthmaml"])
    base = ["fit", "-c", str(CONFIGS / "omniglot_5way1shot.yaml"), "--trainer.logger", "false"]
    for extra, expected in [
        (
            ["--data.init_args.root", str(tmp_path / "absent")],
            f"Omniglot root {tmp_path / 'absent'} does not",
        ),
        (
            [
                "--data.init_args.root",
                str(root),
                "--data.init_args.query_shots",
                "2",
                "--data.init_args.class_split",
                "[3, 1, 1]",
            ],
            "data.init_args.ways=5",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("lthmaml: error: ") and expected in err


@pytest.mark.parametrize("name, ways", [("omniglot_5way1shot", 5), ("omniglot_20way1shot", 20)])
def test_configs_parse_with_ways_matching_the_net(name, ways, resolved_config):
    config = resolved_config(
        "-c", CONFIGS / f"{name}.yaml", "--data.init_args.class_split", "[1200, 100, 323]"
    )
    assert config["data"]["class_path"] == "lthmaml.data.OmniglotDataModule"
    assert (
        config["data"]["init_args"]["ways"]
        == config["model"]["init_args"]["net"]["init_args"]["out_features"]
        == ways
    )
    assert config["data"]["init_args"]["class_split"] == [1200, 100, 323]
    assert config["checkpoint"]["monitor"] == "val/acc_post" and config["checkpoint"]["mode"] == "max"


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.ci
def test_maml_learns_5way_1shot_on_the_shared_subset(shared_omniglot):
    """About a minute: 1200 second-order tasks of a 32-filter Conv4, then 200 test tasks."""
    import lightning.pytorch as pl

    from lthmaml.meta.maml import MAML
    from lthmaml.nets.models import Conv4

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster on two shared cores
    try:
        pl.seed_everything(0, verbose=False)
        dm = OmniglotDataModule(
            str(shared_omniglot), ways=5, shots=1, query_shots=5, meta_batch_size=8,
            tasks_per_epoch=1200, val_tasks=8, test_tasks=200, seed=0,
        )  # fmt: skip
        model = MAML(
            Conv4(out_features=5, hidden_channels=32),
            inner_lr=0.4,
            inner_steps=1,
            eval_inner_steps=3,
            optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        )
        trainer = pl.Trainer(
            max_epochs=1, limit_val_batches=0, inference_mode=False, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model, dm)
        trainer.test(model, dm, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert model.test_results["acc_post"] > 0.6, model.test_results  # chance is 0.2


def test_training_and_evaluation_episodes_have_their_own_query_sizes(fake_omniglot):
    """query_shots shapes meta-training's episodes, eval_query_shots validation's and test's; an
    old config without eval_query_shots keeps its training size where the data cannot hold 15."""
    data = module(fake_omniglot.folder(CLASSES), query_shots=1, eval_query_shots=3, class_split=[1, 2, 2])
    train, val, test = (next(iter(getattr(data, f"{s}_dataloader")())) for s in ("train", "val", "test"))
    assert train.query_x.shape[1] == 2 * 1 and val.query_x.shape[1] == test.query_x.shape[1] == 2 * 3
    assert train.support_x.shape[1] == val.support_x.shape[1] == 2
    with pytest.raises(ConfigError, match="eval_query_shots"):
        module(
            fake_omniglot.folder(CLASSES, root=fake_omniglot.base / "b"),
            eval_query_shots=4,
            class_split=[1, 2, 2],
        ).val_dataloader()
    sinusoid = SinusoidDataModule(shots=2, query_shots=3, eval_query_shots=9, meta_batch_size=2)
    assert sinusoid.task_source("train").query_shots == 3 and sinusoid.task_source("test").query_shots == 9
    assert SinusoidDataModule(query_shots=4).task_source("val").query_shots == 4
