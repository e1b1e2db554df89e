"""What many test files need: a quiet CPU Trainer, tiny few-shot image tasks and classification
data, the comparisons of the pruning tests, every strategy at a tiny setting with the checks that
its pruned weights stay zero, and generated colour photo datasets (class folders, the
mini-ImageNet layout)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import callbacks
from lthmaml.data import EpisodicDataModule, FewShotTasks
from lthmaml.edge.artifact import METADATA_KEY, sealed

QUIET = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    inference_mode=False,  # MAML adapts with gradients in validation and test
    num_sanity_val_steps=0,
    limit_val_batches=0,
    accelerator="cpu",
)


TINY_FIT = [
    *("--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"),
    *("--data.init_args.tasks_per_epoch", "50", "--data.init_args.meta_batch_size", "10"),
    *("--data.init_args.val_tasks", "20", "--data.init_args.test_tasks", "20"),
]
"""CLI overrides that shrink an episodic config's fit to 5 meta-steps and 20-task evaluations."""


def sgd_lr1(params):
    """With SGD at lr 1, one meta-step moves each parameter by exactly minus its meta-gradient."""
    return torch.optim.SGD(params, lr=1.0)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A Trainer that writes nothing and skips validation unless ``kwargs`` say otherwise."""
    return pl.Trainer(**{**QUIET, **kwargs})


class TinyImageTasks(EpisodicDataModule):
    """3-way 1-shot tasks (2 query images a class) on 8x8 random images: exact checks stay cheap.
    ``image_size`` makes them larger for nets that pool more often (ResNet-12's four stages)."""

    ways = 3

    def __init__(self, image_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 4, 1, image_size, image_size, generator=generator)

    def task_source(self, split):
        return FewShotTasks(self.images, ways=3, shots=1, query_shots=2, name=split)


class TinyClassification(pl.LightningDataModule):
    """Fixed random 4-feature, 3-class data: 24 training examples in 3 batches, 12 val, 12 test;
    ``shape`` gives the examples another shape (``(1, 8, 8)``: one-channel images)."""

    def __init__(self, shape: tuple[int, ...] = (4,)) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = {
            split: TensorDataset(
                torch.randn(n, *shape, generator=generator), torch.randint(0, 3, (n,), generator=generator)
            )
            for split, n in (("train", 24), ("val", 12), ("test", 12))
        }

    def train_dataloader(self):
        return DataLoader(self.data["train"], batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.data["val"], batch_size=12)

    def test_dataloader(self):
        return DataLoader(self.data["test"], batch_size=12)


def fit(model, datamodule, callbacks, root: Path, ckpt_path=None, **kwargs) -> pl.Trainer:
    """Fit quietly under ``root`` with validation on, as long as the callbacks' schedule says."""
    options = {"default_root_dir": root, "max_epochs": -1, "limit_val_batches": None, **kwargs}
    trainer = quiet_trainer(callbacks=callbacks, **options)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def assert_same(actual: dict, expected: dict) -> None:
    """Two state dicts (weights, masks) with the same names and bit-equal tensors."""
    assert actual.keys() == expected.keys()
    for name in actual:
        assert torch.equal(actual[name], expected[name]), name


def round_folder(root: Path, index: int) -> Path:
    return root / "rounds" / f"round_{index:02d}"


# ------------------------------------------------------------------- every strategy, zeros kept
STRATEGIES: dict[str, Callable[[], pl.Callback]] = {
    "lottery": lambda: callbacks.LotteryTicket(prune_rate=0.5, rounds=2, steps_per_round=2),
    "taylor": lambda: callbacks.TaylorFilterPruning(
        filters_per_step=1, target_fraction=0.25, steps_between=1, accumulate_batches=1
    ),
    "metagrad": lambda: callbacks.MetaGradientPruning(prune_rate=0.3, steps=2, steps_between=1),
    "powerprop": lambda: callbacks.Powerprop(alpha=2.0, final_sparsity=0.5),
    "set": lambda: callbacks.SET(sparsity=0.5, update_every=1),
    "rigl": lambda: callbacks.RigL(sparsity=0.5, update_every=1),
    "snip": lambda: callbacks.SNIP(sparsity=0.5),
    "static": lambda: callbacks.StaticSparse(sparsity=0.5),
    "topkast": lambda: callbacks.TopKAST(sparsity=0.5),
}
"""Every strategy in callbacks/, set to prune within the 6 steps of a tiny fit."""


def assert_pruned_weights_zero(model: torch.nn.Module) -> None:
    """The model pruned something, and every entry under a zero mask computes as exactly 0."""
    from lthmaml import sparsity

    assert len(model.masks) > 0, "the strategy pruned nothing"
    assert sparsity.sparsity_report(model).sparsity > 0
    for name, mask in model.masks.items():
        assert bool((sparsity.weight(model, name)[mask == 0] == 0).all()), f"{name}: a pruned weight is not 0"


def assert_adapted_weights_zero(model, task, steps: int = 2) -> None:
    """MAML's adapted weights keep every pruned entry zero, in both inner loops."""
    names = [name for name, _ in model.net.named_parameters()]
    with model.adapt(task.support_x, task.support_y, steps, True) as fnet:
        adapted = dict(zip(names, fnet.parameters()))
    functional = model.functional_loop().adapted_params(task.support_x, task.support_y, steps)
    masks = model.net_masks()
    assert masks, "no mask reaches the inner loop"
    for name, mask in masks.items():
        assert bool((adapted[name][mask == 0] == 0).all()), f"higher: {name}"
        assert bool((functional[name][mask == 0] == 0).all()), f"func: {name}"


def assert_checkpoint_zeros(path: Path) -> None:
    """A saved checkpoint carries its masks, and stores every entry under them as exactly 0 (a
    reparametrised weight: its stored ``original``, which is 0 where the weight is)."""
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    masks = {key[len("masks.") :]: value for key, value in state.items() if key.startswith("masks.")}
    assert masks, f"{path} holds no mask"
    for name, mask in masks.items():
        module, _, attribute = name.rpartition(".")
        value = state.get(name, state.get(f"{module}.parametrizations.{attribute}.original"))
        assert value is not None, f"{path} has no tensor for {name}"
        assert bool((value[mask == 0] == 0).all()), f"{path}: {name} stores a pruned weight that is not 0"


# ---------------------------------------------------------------------------------- colour images
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 130, 40),  # the same luma as red: told apart only in colour
    "blue": (40, 60, 220),
    "yellow": (220, 210, 40),
    "magenta": (210, 40, 210),
    "cyan": (40, 200, 200),
    "orange": (240, 140, 20),
    "purple": (110, 30, 170),
    "brown": (120, 70, 30),
    "pink": (250, 170, 190),
    "olive": (120, 130, 20),
    "navy": (20, 20, 100),
}
"""Class colours of the generated photo datasets (tests make them; nothing is downloaded)."""


def colour_photo(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (20, 20)) -> Image.Image:
    """A ``size`` (width, height) RGB photo of ``colour`` with per-pixel noise and a dark blob."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.asarray(colour, dtype=np.int64) + rng.integers(-35, 36, (height, width, 3))
    top, left = rng.integers(0, max(height // 2, 1)), rng.integers(0, max(width // 2, 1))
    pixels[top : top + height // 4, left : left + width // 4] //= 3
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"), mode="RGB")


def write_photos(
    folder: Path, colour: str, count: int, seed: int = 0, suffix: str = ".jpg", **kw
) -> list[Path]:
    """``count`` photos of one class into ``folder`` (JPEG at quality 95, or any PIL suffix)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{colour}_{i:03d}{suffix}"
        image = colour_photo(COLOURS[colour], seed * 1000 + i, **kw)
        image.save(path, **({"quality": 95} if suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def mini_imagenet(root: Path, splits: dict[str, list[str]], per_class: int = 8, **kw) -> Path:
    """The mini-ImageNet layout as published: ``images/<wnid><index>.jpg`` and ``train.csv``,
    ``val.csv``, ``test.csv`` with the header ``filename,label``; one colour per class."""
    images = root / "images"
    images.mkdir(parents=True)
    number = 0
    for split, colours in splits.items():
        rows = ["filename,label"]
        for colour in colours:
            number += 1
            wnid = f"n{number:08d}"
            for i, path in enumerate(write_photos(root / "tmp", colour, per_class, seed=number, **kw)):
                name = f"{wnid}{i:08d}.jpg"
                path.rename(images / name)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "tmp").rmdir()
    return root


def rewrite_metadata(path: Path, **changes) -> Path:
    """The artifact with its metadata fields changed (a value of None removes the field)."""
    with safe_open(str(path), framework="pt") as handle:
        values = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in changes.items():
        values.pop(key, None) if value is None else values.__setitem__(key, value)
    path.write_bytes(sealed(tensors, values))  # checksums of the changed file
    return path


# ---------------------------------------------------------------------------------- artifacts
def stored(path: Path) -> dict[str, torch.Tensor]:
    """An artifact's tensors as written (packed masks, kept values, int8 codes)."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def header_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY])


def rewrite(
    source: Path,
    target: Path,
    tensors: Callable[[dict], dict] = lambda t: t,
    metadata: Callable[[dict], Optional[dict]] = lambda m: m,
) -> Path:
    """A copy of an artifact with its tensors and/or metadata changed, sealed with the checksums of
    the changes (so the loader's other checks meet them); metadata None leaves no header at all."""
    meta = metadata(header_metadata(source))
    if meta is None:
        save_file(tensors(stored(source)), str(target))
    else:
        target.write_bytes(sealed(tensors(stored(source)), meta))
    return target


def assert_pruned_exactly(masks: dict[str, torch.Tensor], loaded: torch.nn.Module) -> None:
    """The loaded net keeps exactly the source's ``masks`` (by parameter name) beside it; every
    entry under a zero mask is exactly 0; no parametrisation left on the device, float32 only."""
    from torch.nn.utils import parametrize

    from lthmaml import sparsity

    got = sparsity.masks_within(loaded)
    assert got.keys() == masks.keys(), sorted(got)
    for name, mask in masks.items():
        assert torch.equal(got[name], mask), name
        assert torch.all(sparsity.weight(loaded, name)[mask == 0] == 0), name
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
