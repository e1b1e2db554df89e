"""The robustness matrix rows no other test file covers (see docs/robustness.md for the whole table):
wrong types on the command line, a diverging fit, a checkpoint write killed half-way, checkpoints
read with ``weights_only=True``, bit-identical reruns, and generated Omniglot trees."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import fsspec.implementations.local as fsspec_local
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import FakeOmniglot
from helpers import quiet_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from lthmaml import sparsity
from lthmaml.checkpointing import LastCheckpoint
from lthmaml.cli import main
from lthmaml.data.omniglot import clear_memory_cache, load_omniglot
from lthmaml.errors import DataError, TrainingError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP

REPO = Path(__file__).resolve().parents[1]
SINUSOID = str(REPO / "configs" / "sinusoid.yaml")
LOTTERY = str(REPO / "configs" / "prune" / "lottery.yaml")
# Two meta-steps an epoch on an 8-8 MLP: a CLI fit in about a second.
TINY = [
    *("--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"),
    *("--model.init_args.net.init_args.hidden", "[8, 8]", "--model.init_args.eval_inner_steps", "2"),
    *("--data.init_args.tasks_per_epoch", "20", "--data.init_args.meta_batch_size", "10"),
    *("--data.init_args.val_tasks", "10"),
]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_error_line(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "option, value, name",
    [
        ("--model.init_args.inner_lr", "abc", "inner_lr"),
        ("--data.init_args.meta_batch_size", "ten", "meta_batch_size"),
        ("--trainer.max_epochs", "1.5", "max_epochs"),
    ],
)
def test_a_wrong_type_on_the_command_line_exits_2_naming_the_option(option, value, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", SINUSOID, option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert name in err and value in err


# ---------------------------------------------------------------------------------- training
class InfiniteInnerLrAtEpoch1(pl.Callback):
    """A crafted divergence from epoch 1 on. (An absurd but finite inner lr need not overflow: it
    can merely kill every ReLU; and a resumed CLI fit takes its hparams from the checkpoint.)"""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.inner_lr = float("inf")


def test_a_diverging_maml_fit_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """Epoch 0 trains normally (2 meta-steps); the first meta-step of epoch 1, global step 2, has a
    NaN meta-loss: one error line naming it, exit 2, and last.ckpt still epoch 0's, finite."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "-c", SINUSOID, *TINY, "--trainer.logger", "false", "--trainer.max_epochs", "2"]
            + ["--trainer.default_root_dir", str(tmp_path)]
            + ["--trainer.callbacks+=test_robustness.InfiniteInnerLrAtEpoch1"]
        )
    assert exit_info.value.code == 2
    line = last_error_line(capsys)
    assert line.startswith("lthmaml: error: non-finite meta-loss at global step 2 (epoch 1)")
    assert "model.init_args.inner_lr" in line and "gradient_clip_val" in line and "last.ckpt" in line
    assert not list(tmp_path.glob("checkpoints/.*.partial"))
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    model = MAML.load_from_checkpoint(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Poisonable(Dataset):
    """24 random 4-feature examples of 3 classes; NaN features once ``poisoned``."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(24, 4, generator=generator)
        self.y = torch.randint(0, 3, (24,), generator=generator)
        self.poisoned = False

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return (self.x[i] * float("nan") if self.poisoned else self.x[i]), self.y[i]


class PoisonAtEpoch1(pl.Callback):
    """Records last.ckpt and the weights as epoch 1 starts, then poisons the data."""

    def __init__(self, data: Poisonable, last: Path) -> None:
        self.data, self.last = data, last
        self.weights: dict[str, torch.Tensor] = {}
        self.last_digest = ""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.last_digest = digest(self.last)
            self.data.poisoned = True


def test_a_nan_classifier_loss_stops_before_the_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = Classifier(MLP(in_features=4, hidden=(8,), out_features=3))
    data = Poisonable()
    poison = PoisonAtEpoch1(data, tmp_path / "last.ckpt")
    trainer = quiet_trainer(
        max_epochs=3, enable_checkpointing=True, callbacks=[LastCheckpoint(str(tmp_path)), poison]
    )
    with pytest.raises(TrainingError, match=r"non-finite loss at global step 3 \(epoch 1\)") as error:
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=8))
    assert "\n" not in str(error.value) and "optimizer lr" in str(error.value)
    assert all(torch.equal(v, poison.weights[k]) for k, v in model.state_dict().items())
    assert digest(tmp_path / "last.ckpt") == poison.last_digest
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, poison.weights[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------- faults
def test_a_last_checkpoint_write_killed_half_way_never_replaces_last_ckpt(tmp_path, monkeypatch):
    """Lightning's local save writes a temp file in the system temp folder and ``shutil.move``s it;
    across file systems that move is a copy straight onto the target. Here the copy dies half-way:
    last.ckpt must still be the previous, complete checkpoint, and Lightning must not take the
    partial file for a ``last`` checkpoint."""
    torch.manual_seed(0)
    model = Classifier(MLP(in_features=4, hidden=(8,), out_features=3))
    callback = LastCheckpoint(str(tmp_path))
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[callback])
    trainer.fit(model, train_dataloaders=DataLoader(Poisonable(), batch_size=8))
    last = tmp_path / "last.ckpt"
    before = last.read_bytes()
    with torch.no_grad():
        model.net.net[0].weight.add_(1.0)  # the next checkpoint differs

    def killed_copy(source: str, target: str) -> None:
        data = Path(source).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        raise OSError("killed during the copy")

    move = shutil.move
    monkeypatch.setattr(fsspec_local.shutil, "move", killed_copy)
    with pytest.raises(OSError, match="killed during the copy"):
        callback.save(trainer)
    assert last.read_bytes() == before
    torch.load(last, weights_only=True)  # complete
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]  # nothing else to resume

    monkeypatch.setattr(fsspec_local.shutil, "move", move)
    callback.save(trainer)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert torch.equal(state["net.net.0.weight"], model.net.net[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---------------------------------------------------------------------------------- loading and determinism
def lottery_fit(root: Path) -> Path:
    """A 3-round lottery-ticket fit of the sinusoid MAML (CSV metrics); returns its run folder."""
    main(
        ["fit", "-c", SINUSOID, "-c", LOTTERY, *TINY]
        + ["--trainer.callbacks.init_args.layer_rates", "{net.net.4: 0.5}"]
        + ["--trainer.callbacks.init_args.rounds", "2", "--trainer.callbacks.init_args.epochs_per_round", "1"]
        + ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"]
        + ["--trainer.logger.init_args.save_dir", str(root)]
    )
    return root / "sinusoid" / "version_0"


@pytest.fixture(scope="module")
def lottery_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lottery_fit(tmp_path_factory.mktemp("lottery"))


def test_every_checkpoint_of_a_pruning_run_loads_with_weights_only(lottery_run):
    """MAML with CLI hparams (a net class path, an optimizer callable) and LotteryTicket's state
    (mask and init tensors, the round history) are plain tensors and builtins: no pickle needed."""
    paths = sorted(lottery_run.glob("**/*.ckpt"))
    assert len(paths) >= 5  # last, best, and one per round (3)
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["hyper_parameters"]["inner_lr"] == 0.01
        state = checkpoint["callbacks"]["LotteryTicket"]
        assert [entry["round"] for entry in state["history"]][:1] == [0]
    end = torch.load(lottery_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(end["callbacks"]["LotteryTicket"]["history"]) == 3
    assert MAML.load_from_checkpoint(lottery_run / "checkpoints" / "last.ckpt").net.out_features == 1


def test_two_identical_fits_give_bit_identical_masks_weights_and_metrics(lottery_run, tmp_path):
    """Same seed: the same tasks, so the same masks, weights and every logged number (CPU)."""
    runs = [lottery_run, lottery_fit(tmp_path)]
    for r in range(3):
        masks = [sparsity.read_masks(run / "rounds" / f"round_{r:02d}" / "mask.safetensors") for run in runs]
        assert masks[0].keys() == masks[1].keys()
        assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
        metrics = [
            json.loads((run / "rounds" / f"round_{r:02d}" / "metrics.json").read_text()) for run in runs
        ]
        assert metrics[0] == metrics[1]
    assert float(masks[0]["net.net.2.weight"].float().mean()) < 1.0  # the rounds did prune
    ends = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in runs]
    assert all(torch.equal(v, ends[1]["state_dict"][k]) for k, v in ends[0]["state_dict"].items())
    assert (
        ends[0]["callbacks"]["LotteryTicket"]["history"] == ends[1]["callbacks"]["LotteryTicket"]["history"]
    )
    logged = [(run / "metrics.csv").read_text() for run in runs]
    assert logged[0] == logged[1] and "val/loss_post" in logged[0]


# ---------------------------------------------------------------------------------- Omniglot trees
NAMES = st.text("abcdefgh", min_size=1, max_size=3)


@st.composite
def omniglot_trees(draw) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Alphabets of characters, each with its own drawer count."""
    alphabets = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    classes = {a: draw(st.lists(NAMES, min_size=1, max_size=3, unique=True)) for a in alphabets}
    drawers = {f"{a}/{c}": draw(st.integers(1, 3)) for a, cs in classes.items() for c in cs}
    return classes, drawers


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=omniglot_trees(),
    image_size=st.sampled_from([6, 10]),
    zip_name=st.sampled_from(["images_background", "images_evaluation_small2"]),
)
def test_random_omniglot_trees_read_back_the_same_from_folders_and_zips(tree, image_size, zip_name):
    classes, drawers = tree
    names = sorted(drawers)
    examples = min(drawers.values())
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation to the smallest drawer count is warned about
        base = Path(tmp)
        fake = FakeOmniglot(base, size=image_size)
        folder = load_omniglot(fake.folder(classes, drawers), image_size, cache_dir=base / "cache")
        zipped = load_omniglot(
            fake.zip(classes, drawers, name=zip_name), image_size, cache_dir=base / "cache"
        )
        clear_memory_cache()
        cached = load_omniglot(base / "zips", image_size, cache_dir=base / "cache")  # from the disk cache
        clear_memory_cache()
    for result in (folder, zipped, cached):
        assert result.classes == names
        assert result.alphabets == [name.split("/")[0] for name in names]
        assert result.images.shape == (len(names), examples, 1, image_size, image_size)
        assert result.images.dtype == torch.float32
        assert 0.0 <= float(result.images.min()) and float(result.images.max()) <= 1.0
    assert torch.equal(folder.images, zipped.images) and torch.equal(zipped.images, cached.images)
    for i, name in enumerate(names):  # at their own size, glyphs come back as ink exactly
        alphabet, character = name.split("/")
        for drawer in range(examples):
            glyph = fake.glyph(alphabet, character, drawer)
            ink = torch.from_numpy((255 - glyph).astype(np.float32)) / 255
            assert torch.equal(folder.images[i, drawer, 0], ink)


# ---------------------------------------------------------------------------------- data
def test_truncated_png_and_stray_non_image_files_in_an_omniglot_folder(fake_omniglot, lthmaml_cache):
    classes = {"Alpha": ["character01", "character02"]}
    root = fake_omniglot.folder(classes, drawers=2)
    (root / "Alpha" / "character01" / "notes.txt").write_text("not an image")  # ignored: not .png
    (root / "Alpha" / "README").write_text("hello")
    assert load_omniglot(root, image_size=12).images.shape == (2, 2, 1, 12, 12)
    clear_memory_cache()
    png = root / "Alpha" / "character02" / "02.png"
    png.write_bytes(png.read_bytes()[:40])  # cut inside the image data
    with pytest.raises(DataError, match="cannot read Omniglot image") as error:
        load_omniglot(root, image_size=12)
    assert str(png) in str(error.value) and "\n" not in str(error.value)
