"""ProtoNet, MatchingNet and CNP: their outputs by hand, fits that learn and log the shared metrics,
the pruning callbacks on each through ``task_losses`` and the mask-aware ``net``, and the configs."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import TINY_FIT, TinyImageTasks, fit, quiet_trainer, round_folder

from callbacks.lottery import LotteryTicket
from callbacks.metagrad import MetaGradientPruning
from callbacks.taylor import TaylorFilterPruning
from lthmaml import sparsity
from lthmaml.cli import main
from lthmaml.data import SinusoidDataModule
from lthmaml.data.tasks import TaskBatch
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.export import export_net
from lthmaml.errors import ConfigError, DataError
from lthmaml.meta import CNP, MAML, MatchingNet, ProtoNet
from lthmaml.nets.models import CNPNet, Conv4
from lthmaml.nets.shrink import removed_channels, shrink

REPO = Path(__file__).resolve().parents[1]
PROTONET = str(REPO / "configs" / "protonet_5way1shot.yaml")
OMNIGLOT_CONFIGS = ("protonet_5way1shot", "protonet_20way1shot", "matching_5way1shot")
LOTTERY = str(REPO / "configs" / "prune" / "lottery.yaml")


# ---------------------------------------------------------------------- tiny learners and data
def embedding(hidden: int = 4) -> Conv4:
    """A headless 2-block Conv4 on 8x8 images: 16-dimensional embeddings."""
    return Conv4(out_features=None, hidden_channels=hidden, image_size=8, blocks=2)


def protonet(lr: float = 0.01) -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(embedding(), optimizer=partial(torch.optim.Adam, lr=lr))


def matching(lr: float = 0.01) -> MatchingNet:
    torch.manual_seed(0)
    return MatchingNet(embedding(), optimizer=partial(torch.optim.Adam, lr=lr))


def cnp(lr: float = 0.01) -> CNP:
    torch.manual_seed(0)
    net = CNPNet(representation=16, encoder_hidden=(16,), decoder_hidden=(16, 16))
    return CNP(net, optimizer=partial(torch.optim.Adam, lr=lr))


def images(**kwargs) -> TinyImageTasks:
    return TinyImageTasks(
        **{"meta_batch_size": 2, "tasks_per_epoch": 8, "val_tasks": 4, "test_tasks": 6, **kwargs}
    )


def sinusoid(**kwargs) -> SinusoidDataModule:
    options = {"shots": 5, "query_shots": 5, "meta_batch_size": 4, "tasks_per_epoch": 16, "val_tasks": 8}
    return SinusoidDataModule(**{**options, "test_tasks": 6, **kwargs})


LEARNERS = {"protonet": (protonet, images), "matching": (matching, images), "cnp": (cnp, sinusoid)}


def task(support: list, support_y: list, query: list, query_y: list) -> TaskBatch:
    """One task whose inputs are the embeddings themselves (``embed`` patched to the identity)."""
    return TaskBatch(
        torch.tensor(support, dtype=torch.float64),
        torch.tensor(support_y),
        torch.tensor(query, dtype=torch.float64),
        torch.tensor(query_y),
    )


# ---------------------------------------------------------------------- outputs by hand
def test_protonet_logits_are_minus_squared_distances_to_the_class_means_in_label_order(monkeypatch):
    model = ProtoNet(embedding())
    monkeypatch.setattr(model, "embed", lambda x: x)
    # Class 0 has the support points (0, 0) and (0, 2), class 1 (2, 0) and (4, 0): prototypes
    # (0, 1) and (3, 0), given in an order that interleaves the classes.
    one = task([[2, 0], [0, 0], [4, 0], [0, 2]], [1, 0, 1, 0], [[1, 1], [3, 1], [0, 1]], [0, 1, 0])
    log_p = model.task_log_probabilities(one)
    logits = torch.tensor(
        [[-(1 + 0), -(4 + 1)], [-(9 + 0), -(0 + 1)], [-(0 + 0), -(9 + 1)]], dtype=torch.float64
    )
    assert torch.allclose(model.logits(one.support_x, one.support_y, one.query_x, 2), logits)
    assert torch.allclose(log_p, logits.log_softmax(-1))
    result = model.task_result(one)
    assert torch.allclose(result.loss_post, F.cross_entropy(logits, one.query_y))
    assert float(result.acc_post) == 1.0 and result.loss_pre is None and result.acc_pre is None
    euclidean = ProtoNet(embedding(), distance="euclidean")
    monkeypatch.setattr(euclidean, "embed", lambda x: x)
    roots = -(-logits).sqrt()  # the same distances, not squared
    assert torch.allclose(euclidean.logits(one.support_x, one.support_y, one.query_x, 2), roots, atol=1e-6)
    assert torch.allclose(euclidean.task_log_probabilities(one), roots.log_softmax(-1), atol=1e-6)


def test_matching_probabilities_are_the_attention_weighted_support_labels(monkeypatch):
    model = MatchingNet(embedding(), scale=3.0, learn_scale=False)
    monkeypatch.setattr(model, "embed", lambda x: x)
    support, labels = [[1, 0], [0, 1], [1, 1], [-1, 0]], [0, 1, 1, 2]
    query, query_y = [[2, 1], [0, -3]], [0, 2]
    one = task(support, labels, query, query_y)
    expected = []
    for q in query:
        cosines = [sum(a * b for a, b in zip(q, s)) / math.hypot(*q) / math.hypot(*s) for s in support]
        weights = [math.exp(3.0 * c) for c in cosines]
        total = sum(weights)
        expected.append([sum(w for w, y in zip(weights, labels) if y == k) / total for k in range(3)])
    expected = torch.tensor(expected, dtype=torch.float64)
    probabilities = model.probabilities(one.support_x, one.support_y, one.query_x, 3)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    assert torch.allclose(probabilities.sum(-1), torch.ones(2, dtype=torch.float64))
    nll = -expected[torch.arange(2), one.query_y].log().mean()
    assert torch.allclose(model.task_result(one).loss_post, nll, atol=1e-6)
    assert not model.log_scale.requires_grad and float(model.scale) == pytest.approx(3.0)


def test_cnp_nll_is_the_gaussian_formula_and_loss_post_the_mse_of_the_mean():
    model = cnp()
    data = sinusoid()
    batch = TaskBatch(
        *(
            torch.stack(f)
            for f in zip(*(data.task_source("val").sample(np.random.default_rng(i)) for i in range(3)))
        )
    )
    mean, std = model.predict_gaussian(batch)
    assert mean.shape == std.shape == batch.query_y.shape and bool((std >= 0.1).all())
    by_hand = (0.5 * torch.log(2 * math.pi * std**2) + (batch.query_y - mean) ** 2 / (2 * std**2)).mean(
        (1, 2)
    )
    torch_nll = torch.stack(
        [torch.nn.GaussianNLLLoss(full=True)(m, y, s**2) for m, y, s in zip(mean, batch.query_y, std)]
    )
    results = model.task_results(batch)
    assert torch.allclose(torch.stack([r.nll for r in results]), by_hand, atol=1e-5)
    assert torch.allclose(by_hand, torch_nll, atol=1e-5)
    mse = ((mean - batch.query_y) ** 2).mean((1, 2))
    assert torch.allclose(torch.stack([r.loss_post for r in results]), mse)
    # One task alone gives what the meta-batch gives it, and task_losses is the training objective.
    assert torch.allclose(model.task_result(batch.task(1)).nll, results[1].nll, atol=1e-6)
    assert torch.allclose(torch.stack(list(model.task_losses(batch, adapted=True))), by_hand, atol=1e-5)


# ---------------------------------------------------------------------- fits and metrics
@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_a_short_fit_lowers_the_validation_loss_and_logs_the_shared_metrics(name, caplog):
    make, data = LEARNERS[name]
    model, dm = make(), data(tasks_per_epoch=40)
    objective = "val/nll" if name == "cnp" else "val/loss_post"
    before = quiet_trainer(limit_val_batches=None).validate(model, datamodule=dm, verbose=False)[0]
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=None)
    trainer.fit(model, datamodule=dm)
    after = quiet_trainer(limit_val_batches=None).validate(model, datamodule=dm, verbose=False)[0]
    assert after[objective] < before[objective]

    logged = set(trainer.callback_metrics)
    expected = {"loss_post", "nll"} if name == "cnp" else {"loss_post", "acc_post"}
    assert {f"val/{n}" for n in expected} | {f"train/{n}" for n in expected} <= logged
    assert not any("_pre" in key for key in logged)  # no pre-adaptation model to score
    assert logged <= set(model.monitorable_metrics(dm))

    with caplog.at_level("INFO"):
        quiet_trainer().test(model, datamodule=dm, verbose=False)
    tested = {"loss_post", "nll"} if name == "cnp" else {"loss_post", "acc_post"}
    assert set(model.test_results) == tested | {f"{n}_ci95" for n in tested}
    assert all(math.isfinite(v) for v in model.test_results.values())
    assert f"Post-adaptation on 6 test tasks ({model.adaptation_summary()}), mean +- 95% CI:" in caplog.text


def test_metric_learners_evaluate_under_inference_mode_and_predict_probabilities():
    model, dm = protonet(), images()
    quiet_trainer(inference_mode=True, limit_val_batches=None).validate(model, datamodule=dm, verbose=False)
    (first, *_) = quiet_trainer(inference_mode=True).predict(model, datamodule=dm)
    assert first.shape == (2, 6, 3) and torch.allclose(first.sum(-1), torch.ones(2, 6))
    (gaussians, *_) = quiet_trainer().predict(cnp(), datamodule=sinusoid())
    assert gaussians.shape == (4, 5, 2) and bool((gaussians[..., 1] >= 0.1).all())


def test_maml_logs_and_summarises_as_before_through_the_shared_base(caplog):
    model = MAML(Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2), eval_inner_steps=1)
    dm = images()
    with caplog.at_level("INFO"):
        quiet_trainer().test(model, datamodule=dm, verbose=False)
    assert set(model.test_results) == {"loss_post", "loss_post_ci95", "acc_post", "acc_post_ci95"}
    assert "Post-adaptation on 6 test tasks (1 inner steps), mean +- 95% CI: accuracy" in caplog.text
    assert model.monitorable_metrics(dm)[:4] == [
        "val/loss_pre",
        "val/loss_post",
        "val/acc_pre",
        "val/acc_post",
    ]
    assert "train/acc_pre" not in model.monitorable_metrics(dm)
    assert not any("nll" in key for key in model.state_dict())


# ---------------------------------------------------------------------- pruning callbacks
def zeros_stay_zero(model) -> None:
    masks = sparsity.masks_of(model)
    assert masks and all(name.startswith("net.") for name in masks)
    for name, mask in masks.items():  # every masked parameter: weights, a removed filter's bias and BN
        assert torch.all(sparsity.weight(model, name)[mask == 0] == 0), name


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_a_lottery_ticket_round_prunes_each_learner_and_pruned_weights_stay_zero(name, tmp_path):
    make, data = LEARNERS[name]
    model = make()
    layers = sparsity.prunable(model)
    if name == "cnp":  # encoder and decoder are both under net, both pruned
        assert any(n.startswith("net.encoder.") for n in layers) and any(
            n.startswith("net.decoder.") for n in layers
        )
    fit(model, data(), [LotteryTicket(rounds=1, steps_per_round=2)], tmp_path)
    assert [p.name for p in sorted((tmp_path / "rounds").iterdir())] == ["round_00", "round_01"]
    dense = sparsity.read_masks(round_folder(tmp_path, 0) / "mask.safetensors")
    pruned = sparsity.read_masks(round_folder(tmp_path, 1) / "mask.safetensors")
    assert all(bool((m == 1).all()) for m in dense.values())
    assert sum(int((m == 0).sum()) for m in pruned.values()) > 0
    assert json.loads((round_folder(tmp_path, 1) / "metrics.json").read_text())["sparsity"] == pytest.approx(
        0.2, abs=0.01
    )
    zeros_stay_zero(model)


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_meta_gradient_pruning_scores_each_learner_through_task_losses(name, tmp_path):
    make, data = LEARNERS[name]
    model = make()
    callback = MetaGradientPruning(weights_per_step=5, steps=2, steps_between=1)
    fit(model, data(), [callback], tmp_path, max_steps=3, limit_val_batches=0)
    assert callback.pruning_steps == 2
    assert [r.get("tasks_scored") for r in callback.history][1:] == [2 if name != "cnp" else 4] * 2
    assert sparsity.sparsity_report(model).zeros == 10
    zeros_stay_zero(model)


@pytest.mark.parametrize("name", ["protonet", "matching"])
def test_taylor_filter_pruning_scores_the_embedding_through_task_losses(name, tmp_path):
    make, data = LEARNERS[name]
    model = make()
    callback = TaylorFilterPruning(
        filters_per_step=2, steps_between=1, target_fraction=0.5, accumulate_batches=1
    )
    fit(model, data(), [callback], tmp_path, max_steps=3, limit_val_batches=0)
    assert callback.history[-1]["details"]["filters_remaining"] == 4  # of 8
    x = images().images[0]
    for index, block in enumerate(model.net.features):
        dead = ~sparsity.alive_channels(model, f"net.features.{index}.0")
        assert torch.equal(dead, removed_channels(block[1]))  # BatchNorm scale and shift 0
        assert torch.all(block[0].weight[dead] == 0) and torch.all(block[1].bias[dead] == 0)
        with torch.no_grad():
            out = block[1](block[0](x))
            x = block[3](block[2](out))
        assert torch.all(out[:, dead] == 0) and out[:, ~dead].abs().sum() > 0  # the map is exactly 0
    zeros_stay_zero(model)
    with pytest.raises(ConfigError, match="TaylorFilterPruning"):  # a CNP has no conv filters
        fit(cnp(), sinusoid(), [TaylorFilterPruning()], tmp_path / "cnp", max_steps=1)


def test_a_shrunk_embedding_keeps_every_distance_and_exports(tmp_path):
    model = protonet()
    sparsity.prune_channels(model, "net.features.0.0", [1, 3])
    sparsity.prune_channels(model, "net.features.1.0", [0])
    small, small_masks = shrink(model.net, sparsity.masks_within(model, "net."))
    assert small.head is None and small.embedding_features == 3 * 2 * 2
    assert small_masks == {}  # whole channels removed: nothing left to mask
    batch = next(iter(images().val_dataloader()))
    one = batch.task(0)
    with torch.no_grad():
        assert torch.allclose(
            model.task_log_probabilities(one),
            model.log_probabilities(small(one.support_x), one.support_y, small(one.query_x), 3),
            atol=1e-5,
        )
    artifact = load_artifact(export_net(model, tmp_path / "protonet.safetensors"))
    assert artifact.metadata.architecture["init_args"]["out_features"] is None
    assert artifact.metadata.architecture["init_args"]["hidden_channels"] == [2, 3]


# ---------------------------------------------------------------------- one-line errors
def test_bad_options_and_data_are_one_line_errors():
    with pytest.raises(ConfigError, match="out_features: null"):
        ProtoNet(Conv4(out_features=5))
    with pytest.raises(
        ConfigError, match=r"model.init_args.distance must be one of \['squared', 'euclidean'\]"
    ):
        ProtoNet(embedding(), distance="cosine")
    with pytest.raises(ConfigError, match="out_features"):
        Conv4(out_features=0)
    with pytest.raises(ConfigError, match="scale"):
        MatchingNet(embedding(), scale=0.0)
    with pytest.raises(ConfigError, match="CNPNet"):
        CNP(embedding())
    with pytest.raises(ConfigError, match="min_std"):
        CNPNet(min_std=1.0)
    with pytest.raises(ConfigError, match="integer labels"):
        quiet_trainer(max_steps=1).fit(protonet(), datamodule=sinusoid())
    with pytest.raises(ConfigError, match="regression tasks"):
        quiet_trainer(max_steps=1).fit(cnp(), datamodule=images())
    with pytest.raises(ConfigError, match="x_features"):
        CNP(CNPNet(x_features=2)).predict_gaussian(next(iter(sinusoid().val_dataloader())))
    model = ProtoNet(embedding())
    gap = TaskBatch(
        torch.rand(2, 1, 8, 8), torch.tensor([0, 2]), torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
    )
    with pytest.raises(DataError, match="support labels"):
        model.task_result(gap)
    outside = TaskBatch(
        torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), torch.rand(1, 1, 8, 8), torch.tensor([2])
    )
    with pytest.raises(DataError, match="query labels"):
        model.task_result(outside)


# ---------------------------------------------------------------------- the configs through the CLI
def tiny_protonet_config(tmp_path: Path, fake_omniglot, **trainer) -> str:
    root = fake_omniglot.folder({"Alpha": [f"character{i:02d}" for i in range(1, 11)]})
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        yaml.safe_dump(
            {
                "trainer": {"max_epochs": 1, "enable_progress_bar": False, **trainer},
                "model": {
                    "init_args": {"net": {"init_args": {"hidden_channels": 4, "image_size": 8, "blocks": 2}}}
                },
                "data": {
                    "init_args": {
                        "root": str(root),
                        "ways": 3,
                        "query_shots": 1,
                        "eval_query_shots": 2,
                        "image_size": 8,
                        "class_split": [4, 3, 3],
                        "meta_batch_size": 2,
                        "tasks_per_epoch": 4,
                        "val_tasks": 2,
                        "test_tasks": 2,
                    }
                },
            }
        )
    )
    return str(tiny)


@pytest.mark.parametrize("config", OMNIGLOT_CONFIGS)
def test_tiny_omniglot_fit_from_each_metric_learner_config(
    config, tmp_path, monkeypatch, fake_omniglot, lthmaml_cache, caplog
):
    tiny = tiny_protonet_config(tmp_path, fake_omniglot)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        main(["fit", "-c", str(REPO / "configs" / f"{config}.yaml"), "-c", tiny, "--test_after_fit", "true"])
    run = tmp_path / "runs" / config / "version_0"
    assert (run / "config.yaml").is_file()
    learner = MatchingNet if config.startswith("matching") else ProtoNet
    model = learner.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.net, Conv4) and model.net.head is None and model.net.embedding_features == 16
    assert (
        f"Post-adaptation on 2 test tasks ({model.adaptation_summary()}), mean +- 95% CI: accuracy"
        in caplog.text
    )


def test_tiny_sinusoid_fit_from_the_cnp_config(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        main(
            ["fit", "-c", str(REPO / "configs" / "cnp_sinusoid.yaml"), *TINY_FIT, "--test_after_fit", "true"]
        )
    assert "Post-adaptation on 20 test tasks (the mean representation of the support pairs)" in caplog.text
    assert "95% CI: MSE " in caplog.text and "; Gaussian NLL" in caplog.text
    model = CNP.load_from_checkpoint(
        tmp_path / "runs" / "cnp_sinusoid" / "version_0" / "checkpoints" / "last.ckpt"
    )
    assert isinstance(model.net, CNPNet) and model.net.architecture["representation"] == 128


def test_a_five_round_lottery_ticket_on_protonet_from_the_configs(
    tmp_path, monkeypatch, fake_omniglot, lthmaml_cache
):
    """The issue's end-to-end check: ``protonet_5way1shot.yaml`` with ``prune/lottery.yaml`` (5
    rounds) on tiny Omniglot writes six rounds at the schedule's sparsities, each ticket's pruned
    weights at zero. About a second on tiny data, so not marked slow: CI's ``make test`` runs it."""
    tiny = tiny_protonet_config(tmp_path, fake_omniglot, max_epochs=-1)
    monkeypatch.chdir(tmp_path)
    main(
        [
            *("fit", "-c", PROTONET, "-c", LOTTERY, "-c", tiny),
            *("--trainer.callbacks.init_args.layer_rates", "{}"),
            *("--trainer.callbacks.init_args.epochs_per_round", "1"),
        ]
    )
    run = tmp_path / "runs" / "protonet_5way1shot" / "version_0"
    previous = None
    for r in range(6):
        metrics = json.loads((round_folder(run, r) / "metrics.json").read_text())
        assert metrics["sparsity"] == pytest.approx(1 - 0.8**r, abs=0.01)
        masks = sparsity.read_masks(round_folder(run, r) / "mask.safetensors")
        if previous is not None:  # once pruned, always pruned
            assert all(torch.all(masks[n][previous[n] == 0] == 0) for n in masks)
        previous = masks
        state = torch.load(round_folder(run, r) / "model.ckpt", weights_only=False)["state_dict"]
        for name in masks:  # the masks beside the weights in the checkpoint, the weights zero under them
            if r > 0:
                assert torch.equal(state[f"masks.{name}"], masks[name]), (r, name)
            assert torch.all(state[name][masks[name] == 0] == 0), (r, name)
    assert not round_folder(run, 6).exists()


def test_protonet_trains_on_wider_episodes_than_it_is_tested_on_and_a_head_refuses(tmp_path):
    """train_ways (Snell et al.'s higher-way training): meta-train episodes of 4 classes, val/test of 3."""
    from helpers import quiet_trainer

    from lthmaml.data import FewShotTasks
    from lthmaml.data.datamodule import ImageTasksDataModule
    from lthmaml.errors import ConfigError
    from lthmaml.meta.maml import MAML
    from lthmaml.meta.protonet import ProtoNet
    from lthmaml.nets.models import Conv4

    class Tiny(ImageTasksDataModule):
        def __init__(self, **kwargs):
            super().__init__(
                ways=3, shots=1, query_shots=2, image_size=8, meta_batch_size=2, tasks_per_epoch=4, **kwargs
            )
            self.images = torch.rand(8, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

        def setup(self, stage=None):
            pass

        def split_tasks(self, split):
            return FewShotTasks(
                self.images, self.split_ways(split), self.shots, self.split_query_shots(split), name=split
            )

    data = Tiny(train_ways=4, val_tasks=2, test_tasks=2)
    train = next(iter(data.train_dataloader()))
    val = next(iter(data.val_dataloader()))
    assert train.support_y.unique().numel() == 4 and val.support_y.unique().numel() == 3
    torch.manual_seed(0)
    model = ProtoNet(Conv4(out_features=None, hidden_channels=4, image_size=8, blocks=2))
    trainer = quiet_trainer(max_steps=2, limit_val_batches=None, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    head = MAML(Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2))
    with pytest.raises(ConfigError, match="out_features=3 but data.init_args.train_ways=4"):
        head.check_data_fits(data)
    with pytest.raises(ConfigError, match="train_ways"):
        Tiny(train_ways=1)


@pytest.mark.parametrize(
    ("support", "query", "message"),
    [
        ([0, 1, 2, 2], [0, 1], None),
        ([0, 2, 2, 0], [0], r"support labels must be 0..2 with each class present, got \[0, 2\]"),
        ([-1, 0, 1, 1], [0], "support labels must be 0..1"),
        ([0, 1, 0, 1], [0, 2], r"query labels must lie in the support's classes 0..1"),
    ],
)
def test_task_labels_are_checked_in_one_line(support, query, message):
    from lthmaml.errors import DataError
    from lthmaml.meta.metric import check_labels

    support_y, query_y = torch.tensor(support), torch.tensor(query)
    if message is None:
        assert check_labels(support_y, query_y, "ProtoNet") == 3
        return
    with pytest.raises(DataError, match=message):
        check_labels(support_y, query_y, "ProtoNet")
