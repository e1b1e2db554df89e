"""Distillation from the dense net: the loss by hand, weight 0 changes no bit, the term pulls the
student towards the teacher in every learner and both MAML loops, and the lottery rounds find the
round-0 teacher, also after a resume."""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TinyClassification, TinyImageTasks, assert_same, fit, quiet_trainer, round_folder
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.lottery import LotteryTicket
from lthmaml import sparsity
from lthmaml.data import EpisodeDataset, SinusoidDataModule, TaskBatch
from lthmaml.errors import ConfigError
from lthmaml.meta import CNP, MAML, Classifier, ProtoNet
from lthmaml.meta.distill import Distillation, distillation_loss
from lthmaml.nets.models import MLP, CNPNet, Conv4

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ---------------------------------------------------------------------- tiny learners and data
def maml(seed: int = 0, loop: str = "higher", **kwargs) -> MAML:
    torch.manual_seed(seed)
    net = Conv4(out_features=3, hidden_channels=4, image_size=8, blocks=2)
    options = dict(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, inner_loop=loop, task_chunk=2)
    return MAML(net, optimizer=partial(torch.optim.Adam, lr=0.01), **{**options, **kwargs})


def protonet(seed: int = 0) -> ProtoNet:
    torch.manual_seed(seed)
    net = Conv4(out_features=None, hidden_channels=4, image_size=8, blocks=2)
    return ProtoNet(net, optimizer=partial(torch.optim.Adam, lr=0.01))


def classifier(seed: int = 0, **kwargs) -> Classifier:
    torch.manual_seed(seed)
    net = MLP(in_features=4, hidden=(16,), out_features=3)
    return Classifier(net, optimizer=partial(torch.optim.Adam, lr=0.05), **kwargs)


LEARNERS = {
    "maml-higher": (maml, TinyImageTasks),
    "maml-func": (partial(maml, loop="func"), TinyImageTasks),
    "protonet": (protonet, TinyImageTasks),
    "classifier": (classifier, TinyClassification),
}


def data(make_data):
    if make_data is TinyClassification:
        return TinyClassification()
    return make_data(meta_batch_size=4, tasks_per_epoch=8, val_tasks=4)


def frozen(model):
    return model.eval().requires_grad_(False)


def meta_batch(tasks: int = 4) -> TaskBatch:
    datamodule = TinyImageTasks()
    dataset = EpisodeDataset(datamodule.task_source("train"), tasks, datamodule.seed, "train")
    return TaskBatch(*(torch.stack(field) for field in zip(*(dataset[i] for i in range(tasks)))))


def meta_gradient(model: MAML, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """``.grad`` after the meta-training pass of one batch (the module's own code, no Trainer)."""
    model.zero_grad()
    model.manual_backward = lambda loss: loss.backward()  # no Trainer attached
    model.meta_train(batch, 1.0 / batch.num_tasks)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def kl_to_teacher(student: MAML, teacher: MAML, batch: TaskBatch) -> float:
    pairs = zip(student.query_logits(batch), teacher.query_logits(batch))
    return float(sum(distillation_loss(s, t, 4.0) for s, t in pairs))


# ---------------------------------------------------------------------- the loss
def test_the_loss_is_t_squared_times_the_kl_of_the_tempered_softmaxes_averaged_over_examples():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    temperature = 2.0

    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p, q = softmax(t), softmax(s)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = temperature**2 * expected / 2  # batchmean over the 2 examples
    assert float(distillation_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-7)
    assert float(Distillation(torch.nn.Identity(), 0.5, 2.0).loss(student, teacher)) == pytest.approx(
        expected / 2, rel=1e-6
    )


def test_regression_outputs_and_bad_options_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="regression") as error:
        distillation_loss(torch.zeros(5, 1), torch.zeros(5, 1), 4.0)
    bad = [
        (partial(LotteryTicket, epochs_per_round=1, distill_weight=-1.0), "LotteryTicket.distill_weight"),
        (partial(LotteryTicket, epochs_per_round=1, distill_weight=float("nan")), "distill_weight"),
        (partial(LotteryTicket, epochs_per_round=1, distill_temperature=0.0), "distill_temperature"),
        (partial(classifier, distill_temperature=-2.0), "model.init_args.distill_temperature"),
        (partial(classifier, distill_weight=-0.1), "model.init_args.distill_weight"),
        (partial(classifier, distill_weight=1.0), "needs distill_from"),
    ]
    messages = [str(error.value)]
    for make, match in bad:
        with pytest.raises(ConfigError, match=match) as error:
            make()
        messages.append(str(error.value))
    torch.manual_seed(0)
    cnp = CNP(CNPNet(representation=8, encoder_hidden=(8,), decoder_hidden=(8,)))
    sinusoid = SinusoidDataModule(meta_batch_size=2, tasks_per_epoch=4, val_tasks=2)
    with pytest.raises(ConfigError, match="CNP has no class logits") as error:
        fit(cnp, sinusoid, [LotteryTicket(rounds=1, epochs_per_round=1, distill_weight=1.0)], tmp_path)
    messages.append(str(error.value))
    both = LotteryTicket(rounds=1, epochs_per_round=1, distill_weight=1.0)
    own_teacher = classifier(distill_from=str(tmp_path / "teacher.ckpt"), distill_weight=1.0)
    with pytest.raises(ConfigError, match="distils from its own distill_from") as error:
        fit(own_teacher, TinyClassification(), [both], tmp_path)
    messages.append(str(error.value))
    with pytest.raises(ConfigError, match="teacher.ckpt does not exist") as error:
        fit(own_teacher, TinyClassification(), [], tmp_path, max_steps=1)
    messages.append(str(error.value))
    assert all("\n" not in message for message in messages)


# ---------------------------------------------------------------------- weight 0 changes no bit
@pytest.mark.parametrize("loop", ["higher", "func"])
def test_maml_weight_zero_gives_the_bit_identical_meta_gradient_and_weight_one_another(loop):
    batch = meta_batch()
    plain = meta_gradient(maml(loop=loop), batch)
    student = maml(loop=loop)
    student.distillation = Distillation(frozen(maml(seed=1, loop=loop)), weight=0.0)
    assert_same(meta_gradient(student, batch), plain)
    student.distillation = Distillation(frozen(maml(seed=1, loop=loop)), weight=1.0)
    distilled = meta_gradient(student, batch)
    assert distilled.keys() == plain.keys()
    assert any(not torch.allclose(distilled[name], plain[name]) for name in plain)
    assert all(p.grad is None for p in student.distillation.teacher.parameters())


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_weight_zero_trains_to_the_bit_identical_weights(name):
    make, make_data = LEARNERS[name]
    plain, student = make(), make()
    student.distillation = Distillation(frozen(make(seed=1)), weight=0.0)
    for model in (plain, student):
        torch.manual_seed(0)
        quiet_trainer(max_steps=3).fit(model, datamodule=data(make_data))
    assert_same(student.state_dict(), plain.state_dict())
    assert not any(key.startswith("distillation") for key in student.state_dict())


# ---------------------------------------------------------------------- the term's effect
def test_both_maml_loops_give_the_same_distilled_meta_gradient():
    batch = meta_batch()
    gradients = []
    for loop in ("higher", "func"):
        student = maml(loop=loop, inner_steps=2)
        student.distillation = Distillation(frozen(maml(seed=1, loop=loop)), weight=2.0, temperature=3.0)
        gradients.append(meta_gradient(student, batch))
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loop", ["higher", "func"])
def test_steps_along_the_distillation_term_alone_bring_the_students_adapted_outputs_to_the_teachers(loop):
    """The term's own meta-gradient (distilled minus plain) is descent on the KL to the teacher."""
    batch = meta_batch()
    student, teacher = maml(loop=loop), frozen(maml(seed=1, loop=loop))
    before = kl_to_teacher(student, teacher, batch)
    for _ in range(5):
        student.distillation = None
        plain = meta_gradient(student, batch)
        student.distillation = Distillation(teacher, weight=1.0)
        distilled = meta_gradient(student, batch)
        with torch.no_grad():
            for name, param in student.named_parameters():
                param -= 0.05 * (distilled[name] - plain[name])
    assert kl_to_teacher(student, teacher, batch) < 0.8 * before


@pytest.mark.parametrize("name", ["protonet", "classifier"])
def test_the_term_moves_protonet_and_classifier_outputs_towards_the_teachers(name):
    make, make_data = LEARNERS[name]
    datamodule = data(make_data)
    batch = next(iter(datamodule.train_dataloader()))
    student, teacher = make(), frozen(make(seed=1))
    student.log = lambda *args, **kwargs: None  # no Trainer attached

    def kl() -> float:
        pairs = zip(student.query_logits(batch), teacher.query_logits(batch))
        return float(sum(distillation_loss(s, t, 4.0) for s, t in pairs))

    def gradient() -> list[torch.Tensor]:
        student.zero_grad()
        student.training_step(batch, 0).backward()
        return [p.grad.clone() for p in student.parameters()]

    before = kl()
    for _ in range(5):
        student.distillation = None
        plain = gradient()
        student.distillation = Distillation(teacher, weight=1.0)
        distilled = gradient()
        assert any(not torch.allclose(a, b) for a, b in zip(distilled, plain))
        with torch.no_grad():
            for param, a, b in zip(student.parameters(), distilled, plain):
                param -= 0.05 * (a - b)
    assert kl() < 0.8 * before


def test_the_classifier_distils_from_its_distill_from_checkpoint(tmp_path):
    teacher = classifier(seed=1)
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(teacher, datamodule=TinyClassification())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    student = classifier(distill_from=str(tmp_path / "teacher.ckpt"), distill_weight=1.0)
    plain = classifier()
    for model in (student, plain):
        quiet_trainer(max_steps=3).fit(model, datamodule=TinyClassification())
    loaded = student.distillation.teacher
    assert_same(loaded.state_dict(), teacher.state_dict())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), plain.parameters()))
    narrower = MLP(in_features=4, hidden=(8,), out_features=3)
    other = Classifier(narrower, distill_from=str(tmp_path / "teacher.ckpt"), distill_weight=1.0)
    with pytest.raises(ConfigError, match="does not hold this Classifier's net"):
        quiet_trainer(max_steps=1).fit(other, datamodule=TinyClassification())


# ---------------------------------------------------------------------- the lottery rounds
class TeacherWatch(Callback):
    """After LotteryTicket: the teacher attached at each epoch's start, and the student's masks."""

    def __init__(self) -> None:
        self.teachers: dict[int, object] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        distillation = pl_module.distillation
        self.teachers[trainer.current_epoch] = (
            None if distillation is None else copy.deepcopy(distillation.teacher.state_dict())
        )


def recorded_state(root: Path, index: int) -> dict:
    return torch.load(round_folder(root, index) / "model.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("name", ["maml-higher", "protonet", "classifier"])
def test_lottery_rounds_distil_from_the_round_zero_record(name, tmp_path):
    make, make_data = LEARNERS[name]
    watch = TeacherWatch()
    lottery = LotteryTicket(rounds=2, epochs_per_round=1, distill_weight=1.0, distill_temperature=2.0)
    model = make()
    fit(model, data(make_data), [lottery, watch], tmp_path)
    teacher_weights = recorded_state(tmp_path, 0)
    assert watch.teachers[0] is None  # round 0 trains the teacher itself
    for epoch in (1, 2):
        assert_same(watch.teachers[epoch], teacher_weights)
    teacher = model.distillation.teacher
    assert teacher is not model and not any(p.requires_grad for p in teacher.parameters())
    assert teacher._trainer is None  # the copy left the trainer (and its data) behind
    assert all(bool((mask == 1).all()) for mask in sparsity.masks_of(teacher).values())
    assert sparsity.sparsity_report(model).sparsity > 0.3
    assert lottery.teacher_file == str((round_folder(tmp_path, 0) / "model.ckpt").resolve())
    for r in range(3):
        details = json.loads((round_folder(tmp_path, r) / "metrics.json").read_text())["details"]
        assert details == {"distill_weight": 1.0, "distill_temperature": 2.0}
    assert not any(key.startswith("distillation") for key in recorded_state(tmp_path, 2))


@pytest.mark.parametrize(
    "resume_from",
    ["ckpt/epoch=2.ckpt", "rounds/round_00/model.ckpt"],
    ids=["mid-round-1", "round-0-record-before-pruning"],
)
def test_a_resumed_lottery_fit_distils_from_the_same_teacher_to_the_same_weights(tmp_path, resume_from):
    def run(root: Path, weight: float, ckpt_path=None):
        watch = TeacherWatch()
        lottery = LotteryTicket(
            rounds=2, epochs_per_round=2, monitor="val/acc", mode="max", distill_weight=weight
        )
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        model = classifier()
        callbacks = [lottery, watch, checkpoints]
        fit(model, TinyClassification(), callbacks, root, enable_checkpointing=True, ckpt_path=ckpt_path)
        return model, lottery, watch

    full, full_lottery, _ = run(tmp_path / "full", 1.0)
    resumed, resumed_lottery, watch = run(tmp_path / "resumed", 1.0, tmp_path / "full" / resume_from)
    assert not round_folder(tmp_path / "resumed", 0).exists()  # its teacher is the full run's record
    teacher_weights = recorded_state(tmp_path / "full", 0)
    assert len(watch.teachers) >= 3
    for teacher in watch.teachers.values():
        assert_same(teacher, teacher_weights)
    assert_same(resumed.distillation.teacher.state_dict(), teacher_weights)
    assert_same(resumed.state_dict(), full.state_dict())
    assert resumed_lottery.history == full_lottery.history
    undistilled, _, _ = run(tmp_path / "undistilled", 0.0)
    assert undistilled.distillation is None
    assert any(not torch.equal(a, b) for a, b in zip(undistilled.parameters(), full.parameters()))


def test_the_distill_config_is_the_lottery_config_with_distillation_on(resolved_config):
    config = resolved_config(
        "-c", CONFIGS / "omniglot_5way1shot.yaml", "-c", CONFIGS / "prune" / "lottery_distill.yaml"
    )
    (callback,) = config["trainer"]["callbacks"]
    options = callback["init_args"]
    assert (options["distill_weight"], options["distill_temperature"]) == (1.0, 4.0)
    lottery = yaml.safe_load((CONFIGS / "prune" / "lottery.yaml").read_text())
    distill = yaml.safe_load((CONFIGS / "prune" / "lottery_distill.yaml").read_text())
    (plain,), (distilled,) = lottery["trainer"]["callbacks"], distill["trainer"]["callbacks"]
    rest = {k: v for k, v in distilled["init_args"].items() if not k.startswith("distill_")}
    assert {**distilled, "init_args": rest} == plain and distill["trainer"]["max_epochs"] == -1
