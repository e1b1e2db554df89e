"""ResNet-12 and ResNet-18 (lthmaml.nets.resnet) under every learner, both inner loops and every
strategy, at tiny widths: the residual sums, 1x1 projections and BatchNorms the structured and
unstructured strategies meet in few-shot and lottery-ticket work, with a pruned weight exactly
zero in the net after the fit, in the checkpoint it saves and in MAML's adapted weights."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    COLOURS,
    STRATEGIES,
    TinyClassification,
    TinyImageTasks,
    assert_adapted_weights_zero,
    assert_checkpoint_zeros,
    assert_pruned_weights_zero,
    mini_imagenet,
    quiet_trainer,
)
from torch import nn

from lthmaml import sparsity
from lthmaml.cli import main
from lthmaml.errors import ConfigError
from lthmaml.meta.classifier import Classifier
from lthmaml.meta.maml import MAML
from lthmaml.meta.protonet import ProtoNet
from lthmaml.nets import ResNet12, ResNet18

IMAGE_SIZE = {"resnet12": 16, "resnet18": 8}
"""The smallest input each net takes: ResNet-12 halves it in four stages, ResNet-18 in three."""


def backbone(name: str, out_features, running_stats: bool = False) -> nn.Module:
    if name == "resnet12":
        return ResNet12(out_features, 1, widths=(4, 4, 8, 8), image_size=16, running_stats=running_stats)
    return ResNet18(out_features, in_channels=1, width=2, image_size=8, running_stats=running_stats)


def tasks(name: str, **kwargs) -> TinyImageTasks:
    return TinyImageTasks(image_size=IMAGE_SIZE[name], meta_batch_size=2, tasks_per_epoch=4, **kwargs)


def task(name: str):
    return next(iter(tasks(name).train_dataloader())).task(0)


LEARNERS = {
    "maml-higher": lambda net: MAML(backbone(net, 3), inner_lr=0.1, inner_loop="higher"),
    "maml-func": lambda net: MAML(backbone(net, 3), inner_lr=0.1, inner_loop="func"),
    # Without an inner loop BatchNorm keeps running statistics, as the ProtoNet and supervised
    # configs set it.
    "protonet": lambda net: ProtoNet(backbone(net, None, running_stats=True)),
    "classifier": lambda net: Classifier(backbone(net, 3, running_stats=True)),
}


def data(learner: str, net: str):
    if learner == "classifier":
        return TinyClassification(shape=(1, IMAGE_SIZE[net], IMAGE_SIZE[net]))
    return tasks(net)


@pytest.mark.parametrize("learner", sorted(LEARNERS))
@pytest.mark.parametrize("net", sorted(IMAGE_SIZE))
def test_every_learner_trains_a_pruned_resnet_and_keeps_its_zeros(net, learner, tmp_path):
    torch.manual_seed(0)
    model = LEARNERS[learner](net)
    sparsity.prune_by_magnitude(model, 0.5)
    before = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(model, datamodule=data(learner, net))

    assert_pruned_weights_zero(model)
    kept = model.masks[next(iter(model.masks))].bool()
    name = next(iter(model.masks))[len("net.") :]
    assert not torch.equal(before[name][kept], sparsity.weight(model.net, name)[kept]), "nothing trained"
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert_checkpoint_zeros(tmp_path / "model.ckpt")
    if isinstance(model, MAML):
        assert_adapted_weights_zero(model, task(net))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("net", sorted(IMAGE_SIZE))
def test_every_strategy_prunes_a_resnet_and_keeps_its_layers(net, strategy, tmp_path):
    torch.manual_seed(0)
    model = MAML(backbone(net, 3), inner_lr=0.1, inner_loop="func")
    layers = {name: type(m) for name, m in model.net.named_modules()}
    trainer = quiet_trainer(
        callbacks=[STRATEGIES[strategy]()], default_root_dir=tmp_path, max_steps=6, max_epochs=-1
    )
    trainer.fit(model, datamodule=tasks(net))

    assert all(isinstance(model.net.get_submodule(name), cls) for name, cls in layers.items())
    assert_pruned_weights_zero(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    assert_checkpoint_zeros(tmp_path / "model.ckpt")
    assert_adapted_weights_zero(model, task(net))


def test_the_classifier_tests_a_resnet_with_its_accuracys_interval_over_the_test_examples():
    """What a supervised lottery's levels are compared by: test/acc and its normal 95% CI."""
    torch.manual_seed(0)
    model = Classifier(backbone("resnet18", 3, running_stats=True))
    trainer = quiet_trainer(max_steps=3)
    data = TinyClassification(shape=(1, 8, 8))
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data, verbose=False)
    images, labels = data.data["test"].tensors
    correct = (model.eval()(images).argmax(-1) == labels).double()
    assert results["test/acc"] == pytest.approx(float(correct.mean()))
    assert 0 < results["test/acc"] < 1
    assert results["test/acc_ci95"] == pytest.approx(1.96 * float(correct.std()) / 12**0.5, rel=1e-5)


# ------------------------------------------------------------------------------- the nets themselves
def test_resnets_give_logits_or_an_embedding_of_the_last_stage():
    x = torch.rand(2, 3, 32, 32)
    assert ResNet12(5, widths=(4, 6, 8, 10), image_size=32)(x).shape == (2, 5)
    assert ResNet12(None, widths=(4, 6, 8, 10), image_size=32)(x).shape == (2, 10)
    assert ResNet18(10, width=2)(x).shape == (2, 10)
    assert ResNet18(None, width=2)(x).shape == (2, 16)
    # ResNet-18 is He et al.'s 18 layers: 17 convs on the main paths and the linear head.
    main_path = [
        n
        for n, m in ResNet18(10, width=2).named_modules()
        if isinstance(m, nn.Conv2d) and "shortcut" not in n
    ]
    assert len(main_path) == 17
    # ResNet-12: 12 layers, 3 convs in each of 4 stages.
    convs = [n for n, m in ResNet12(5).named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    assert len(convs) == 12


def test_the_published_resnet12_has_its_published_size():
    """64-160-320-640 (MetaOptNet, TADAM): about 12.4 million parameters."""
    count = sum(p.numel() for p in ResNet12(None, widths=(64, 160, 320, 640)).parameters())
    assert 12.0e6 < count < 12.6e6


@pytest.mark.parametrize(
    "build, option",
    [
        (lambda: ResNet12(5, widths=(4, 4, 8, 8), image_size=8), "image_size=8"),
        (lambda: ResNet12(0), "out_features"),
        (lambda: ResNet12(5, widths=(4, 0)), "widths"),
        (lambda: ResNet18(5, image_size=4), "image_size=4"),
        (lambda: ResNet18(5, width=0), "width"),
    ],
)
def test_bad_resnet_options_are_one_line_config_errors(build, option):
    with pytest.raises(ConfigError, match=option):
        build()


# ------------------------------------------------------------------------------------- the configs
REPO = Path(__file__).resolve().parents[1]
EPISODES = [
    *("--data.init_args.ways", "3", "--data.init_args.query_shots", "2"),
    *("--data.init_args.eval_query_shots", "2", "--data.init_args.meta_batch_size", "2"),
    *("--data.init_args.tasks_per_epoch", "4", "--data.init_args.val_tasks", "2"),
    *("--data.init_args.test_tasks", "2"),
]
"""3-way episodes small enough for the generated data, two meta-updates."""
NARROW_RESNET12 = ["--model.init_args.net.init_args.widths", "[4, 4, 8, 8]"]
SMALL_IMAGES = ["--data.init_args.image_size", "16", "--model.init_args.net.init_args.image_size", "16"]
CONFIGS = {
    "protonet_miniimagenet_resnet12": ("mini", [*EPISODES, *NARROW_RESNET12, *SMALL_IMAGES]),
    "maml_miniimagenet_resnet12": (
        "mini",
        [*EPISODES, *NARROW_RESNET12, *SMALL_IMAGES, "--model.init_args.net.init_args.out_features", "3"],
    ),
    "protonet_omniglot_resnet12": ("omniglot", [*EPISODES, *NARROW_RESNET12]),
    "supervised_resnet18": (
        "omniglot",
        [
            *(
                "--model.init_args.net.init_args.width",
                "2",
                "--model.init_args.net.init_args.out_features",
                "15",
            ),
            *("--data.init_args.val_drawers", "1", "--data.init_args.test_drawers", "1"),
        ],
    ),
}


@pytest.mark.usefixtures("lthmaml_cache")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_resnet_config_fits_and_tests_on_generated_data_of_its_layout(
    config, tmp_path, monkeypatch, fake_omniglot
):
    """The shipped configs, narrowed, on generated data in the layout each reads (mini-ImageNet
    cannot be fetched here; the Omniglot configs read the official zips' layout)."""
    monkeypatch.chdir(tmp_path)
    layout, overrides = CONFIGS[config]
    if layout == "mini":
        colours = list(COLOURS)[:9]
        root = mini_imagenet(
            tmp_path / "mini", {"train": colours[:3], "val": colours[3:6], "test": colours[6:]}, 4
        )
    else:
        root = fake_omniglot.zip({f"Alphabet_{a}": [f"character{c:02d}" for c in range(5)] for a in range(3)})
    main(
        [
            "fit",
            *("-c", str(REPO / "configs" / f"{config}.yaml")),
            *("--data.init_args.root", str(root), "--trainer.max_steps", "2", "--trainer.max_epochs", "1"),
            *("--trainer.enable_progress_bar", "false", "--test_after_fit", "true"),
            *overrides,
        ]
    )
    run = next((tmp_path / "runs").glob("*/version_0"))
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["init_args"]["net"]["class_path"].startswith("lthmaml.nets.resnet.ResNet1")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] >= 1  # the supervised split is one batch


def test_the_resnet18_lottery_experiment_reaches_80_percent_and_tests_every_level(tmp_path, resolved_config):
    """``make resnet18-lottery``: the supervised ResNet-18 config with the experiment stacked on it,
    resumable in its fixed run folder, pruned past the papers' 80%, every level tested."""
    experiment = REPO / "configs" / "experiments" / "supervised" / "resnet18_lottery.yaml"
    config = resolved_config("-c", REPO / "configs" / "supervised_resnet18.yaml", "-c", experiment)
    assert config["model"]["init_args"]["net"]["class_path"] == "lthmaml.nets.resnet.ResNet18"
    assert config["data"]["class_path"] == "lthmaml.data.OmniglotClassificationDataModule"
    (lottery,) = config["trainer"]["callbacks"]
    args = lottery["init_args"]
    assert lottery["class_path"] == "callbacks.LotteryTicket" and args["test_each_round"] is True
    assert 1 - (1 - args["prune_rate"]) ** args["rounds"] >= 0.8
    assert config["trainer"]["logger"]["init_args"]["version"] == 0  # a rerun resumes in place

    out = subprocess.run(
        ["make", "-n", "-B", "resnet18-lottery", f"EXP_DIR={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (fit,) = [line for line in out.splitlines() if "lthmaml fit" in line]
    assert (
        "fit -c configs/supervised_resnet18.yaml -c configs/experiments/supervised/resnet18_lottery.yaml"
        in fit
    )
    assert "--trainer.logger.init_args.name resnet18_lottery" in fit and "--ckpt_path $last" in fit
