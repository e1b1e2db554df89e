"""Fine-tuning step time, FLOPs and parameters of Taylor-pruned, shrunk Conv4s against the dense Conv4.

Target: pruned step time / dense step time <= 0.5 with 50% of the filters removed.

Unstructured sparsity leaves the tensors' shapes, so dense kernels run as long as before; removing
whole filters and shrinking the net (:func:`lthmaml.nets.shrink.shrink`) makes every layer narrower,
and a 3x3 conv's cost falls with its input *and* output widths (about 4x at half of each). Which
filters go decides how much: the plain Taylor criterion keeps most of the full-resolution first
block, whose maps (BatchNorm, ReLU, pooling and their backward) dominate a CPU step. The FLOPs
regularisation (``--flops-weight``, the callback's ``flops_weight``) takes filters of the blocks
with the most multiply-adds per filter first: the second block (a first-block filter costs 0.85 of
one, the third 0.24), so FLOPs fall faster than the step time. ``--cost activations`` (the
callback's ``cost``) weighs each filter by its map's positions instead, taking the first block's
filters first (the second costs 0.25 of one), which is what brings a CPU step down.

Setting. The MAML Omniglot net (Conv4, 64 filters a block, 28x28 inputs, 5-way); a fine-tuning
step as the device takes it on a 5-way 5-shot task (25 support images, one full batch): forward,
cross-entropy, backward, SGD, re-masking. Pruning: :class:`callbacks.taylor.TaylorFilterPruning`'s
own criterion and steps, without the training in between: the query loss after MAML's inner loop
(``MAML.task_losses(adapted=True)``) on ``--score-tasks`` tasks is scored, the ``--filters-per-step``
lowest filters go (0: all at once), and again until ``--fraction`` of all filters is removed; once
with ``flops_weight`` 0 and once with each ``--flops-weight`` and ``--cost``. ``shrink`` then builds
each narrower Conv4. Every net goes through ``lthmaml.edge.export`` and is loaded back, as the device gets it.

Weights and tasks: random weights and synthetic Omniglot-shaped tasks (the step time depends on
shapes only, but the widths Taylor leaves depend on the weights), or ``--checkpoint`` (a 5-way
Conv4 MAML checkpoint; or ``--artifact``, a dense artifact): then the scored tasks come from the
meta-training split of ``--config``'s Omniglot data, and ``--accuracy-tasks`` meta-test tasks of
that split (the config's episodes: 5-way 1-shot, 15 query images a class) measure each net's
accuracy: the query accuracy after the checkpoint's evaluation inner loop (3 SGD steps of 0.4 at
the shipped config) from the pruned, shrunk net, with no retraining after pruning.

Reported per net, against the dense net: parameters, multiply-adds of one image's forward pass
(:func:`lthmaml.nets.flops.forward_flops`: convs and head), the filters left per block and the
step time, timed two ways, each the median over ``--steps`` steps after ``--warmup`` steps,
repeated ``--repeats`` times with the nets interleaved (the median of the medians is reported):
``lightning``: :class:`lthmaml.edge.finetune.FineTuneModule` in a Trainer (what ``lthmaml-edge``
runs; per step, ``on_train_batch_start`` to ``on_train_batch_end``); ``bare``: the same step
in a plain torch loop.

    python -m bench.structured_speed                 # ~5 minutes on 2 busy cores (1 thread)
    python -m bench.structured_speed --threads 4     # the Pi 4 profile's threads
    python -m bench.structured_speed --steps 100 --repeats 5 --flops-weight 0.05 0.1 0.2
    # a trained net, with its meta-test accuracy (~8 minutes):
    python -m bench.structured_speed --checkpoint runs/converge/so-q1-func-mb8/t20.ckpt --score-tasks 40
    # the activations cost against the FLOPs cost, each at two weights:
    python -m bench.structured_speed --checkpoint runs/converge/so-q1-func-mb8/t20.ckpt --score-tasks 40 \
        --flops-weight 0.05 0.1 --cost flops activations
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml

from bench.common import (
    base_parser,
    image_task_source,
    make_trainer,
    median,
    pregenerate,
    print_table,
    random_images,
    setup,
    stack_tasks,
    write_json,
)
from callbacks.taylor import TaylorFilterPruning
from lthmaml import sparsity
from lthmaml.data import OmniglotDataModule, TaskFolderDataModule
from lthmaml.data.taskfolder_build import make_image_task
from lthmaml.data.tasks import TaskBatch
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.export import export_net
from lthmaml.edge.finetune import FineTuneModule, artifact_from_checkpoint
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import mean_and_ci95
from lthmaml.nets.flops import COSTS, Cost, forward_flops
from lthmaml.nets.models import Conv4

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.5
WAYS, SHOTS = 5, 5
INNER_LR = 0.4


# ---------------------------------------------------------------------------------- pruning
def taylor_prune(
    model: MAML, fraction: float, per_step: int, flops_weight: float, tasks: TaskBatch, cost: Cost = "flops"
) -> dict[str, int]:
    """Prune ``model.net`` as :class:`TaylorFilterPruning` does, rescoring ``tasks`` before each
    step (no training between steps); the filters left per conv."""
    total = sum(group.width for group in sparsity.channel_groups(model.net).values())
    callback = TaylorFilterPruning(
        filters_per_step=per_step or total, target_fraction=fraction, flops_weight=flops_weight, cost=cost
    )
    while not callback.pruned_enough(model):
        scores, _ = callback.score_batch(model, tasks)
        if not callback.prune_level(None, model, scores)["filters_removed"]:  # type: ignore[arg-type]
            break  # every layer is down to one filter
    return {name.removeprefix("net."): n for name, n in callback.details(model)["channels"].items()}


def omniglot(config: str, test_tasks: int, seed: int) -> OmniglotDataModule:
    """The Omniglot episodes of ``config`` (its data section), ``test_tasks`` meta-test tasks."""
    init_args = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    return OmniglotDataModule(**{**init_args, "test_tasks": max(test_tasks, 1), "seed": seed})


def learner(net: torch.nn.Module, like: MAML) -> MAML:
    """A MAML around ``net`` with ``like``'s inner loops, taking over the masks ``net`` carries."""
    return MAML(net, like.inner_lr, like.inner_steps, like.eval_inner_steps, inner_loop="func")


def build_artifacts(args, out: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]], Optional[MAML]]:
    """The dense and pruned, shrunk artifacts, the filters each leaves, and the source MAML if trained."""
    torch.manual_seed(args.seed)
    trained = bool(args.checkpoint or args.artifact)
    if trained:
        art = artifact_from_checkpoint(args.checkpoint) if args.checkpoint else load_artifact(args.artifact)
        meta = art.metadata
        model = MAML(art.net, meta.inner_lr, meta.inner_steps, meta.eval_inner_steps, inner_loop="func")
        source = omniglot(args.config, 1, args.seed).task_source("train")
    else:
        model = MAML(Conv4(out_features=WAYS), inner_lr=INNER_LR, inner_steps=1, first_order=True)
        source = image_task_source(WAYS, SHOTS, query_shots=15, seed=args.seed)
    tasks = stack_tasks(pregenerate(source, args.score_tasks, args.seed))
    steps = {"inner_lr": INNER_LR, "eval_inner_steps": args.warmup + args.steps, "task": "classification"}
    paths = {"dense": export_net(model.net, out / "dense.safetensors", steps)}
    widths = {"dense": {f"features.{i}.0": b[0].out_channels for i, b in enumerate(model.net.features)}}
    runs = [("flops", 0.0)] + [(c, w) for c in args.cost for w in sorted(set(args.flops_weight)) if w]
    for cost, weight in runs:
        name = f"taylor {cost} {weight:g}" if weight else "taylor plain"
        pruned = learner(copy.deepcopy(model.net), model)
        widths[name] = taylor_prune(pruned, args.fraction, args.filters_per_step, weight, tasks, cost)
        paths[name] = export_net(pruned, out / f"pruned{len(paths)}.safetensors", steps)  # shrinks it
    return paths, widths, model if trained else None


def meta_test_accuracy(artifact: Path, like: MAML, data: OmniglotDataModule) -> tuple[float, float]:
    """Mean query accuracy (and 95% half-width) over ``data``'s meta-test tasks after ``like``'s
    evaluation inner loop from the artifact's net (no retraining)."""
    model = learner(load_artifact(artifact).net, like)
    accuracies = [
        result.acc_post for batch in data.test_dataloader() for result in model.evaluate_batch(batch)
    ]
    return mean_and_ci95(torch.stack(accuracies))


# ---------------------------------------------------------------------------------- timing
class StepTimes(pl.Callback):
    """Wall time of each training step (batch start to batch end: forward, backward, step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def lightning_step(artifact: Path, task: Path, warmup: int) -> float:
    """Median step of ``FineTuneModule`` fit (no val split: the artifact's eval_inner_steps steps)."""
    timer = StepTimes()
    module = FineTuneModule(artifact=str(artifact))
    data = TaskFolderDataModule(str(task), image_size=28, batch_size=WAYS * SHOTS, validation="none")
    make_trainer(callbacks=[timer]).fit(module, datamodule=data)
    return median(timer.times[warmup:])


def step_time(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> float:
    """Median fine-tuning step of a copy of ``net`` on one full batch, masked as FineTuneModule
    masks around its step."""
    net = copy.deepcopy(net).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=INNER_LR)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        sparsity.mask_gradients(net)
        optimizer.step()
        sparsity.apply_masks(net, [optimizer])
        times.append(time.perf_counter() - start)
    return median(times[warmup:])


def bare_step(artifact: Path, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> float:
    return step_time(load_artifact(artifact).net, x, y, warmup, steps)


def sizes(artifact: Path) -> dict[str, int]:
    """Parameters and forward multiply-adds (one image) of an artifact's net."""
    net = load_artifact(artifact).net
    return {"parameters": sum(p.numel() for p in net.parameters()), "flops": forward_flops(net)}


def time_steps(args, artifacts: dict[str, Path], out: Path) -> dict[str, dict[str, list[float]]]:
    """Step times of every net, both ways, ``--repeats`` times with the nets interleaved."""
    images = random_images(classes=WAYS, examples=SHOTS, seed=args.seed)
    task = make_image_task(out / "task", images, [f"c{i}" for i in range(WAYS)], shots=SHOTS)
    data = TaskFolderDataModule(str(task), image_size=28)
    data.setup()
    x, y = data.splits["support"].x, data.splits["support"].y
    timings: dict[str, dict[str, list[float]]] = {m: {"lightning": [], "bare": []} for m in artifacts}
    for repeat in range(args.repeats):
        order = list(artifacts) if repeat % 2 == 0 else list(reversed(artifacts))
        for model in order:
            timings[model]["lightning"].append(lightning_step(artifacts[model], task, args.warmup))
            timings[model]["bare"].append(bare_step(artifacts[model], x, y, args.warmup, args.steps))
    return timings


def main(argv: Optional[list[str]] = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of all filters removed")
    parser.add_argument(
        "--flops-weight",
        type=float,
        nargs="+",
        default=[0.1],
        help="TaylorFilterPruning.flops_weight of the pruned nets beside the plain criterion's (weight 0)",
    )
    parser.add_argument(
        "--cost",
        nargs="+",
        choices=sorted(COSTS),
        default=["flops"],
        help="TaylorFilterPruning.cost the weights regularise (several: each weight with each cost)",
    )
    parser.add_argument(
        "--filters-per-step", type=int, default=8, help="filters removed per scoring (0: all in one step)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per net")
    parser.add_argument("--score-tasks", type=int, default=8, help="tasks the Taylor scores sum over")
    parser.add_argument("--checkpoint", default=None, help="a 5-way Conv4 MAML checkpoint to prune")
    parser.add_argument("--artifact", default=None, help="or an exported dense 5-way Conv4 artifact")
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "omniglot_5way1shot.yaml"),
        help="its Omniglot data (with --checkpoint/--artifact): scored and meta-test tasks",
    )
    parser.add_argument(
        "--accuracy-tasks", type=int, default=200, help="meta-test tasks for the accuracy (0: none)"
    )
    args = parser.parse_args(argv)
    setup(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        out = Path(tmp)
        artifacts, widths, trained = build_artifacts(args, out)
        accuracy: dict[str, tuple[float, float]] = {}
        if trained is not None and args.accuracy_tasks > 0:
            data = omniglot(args.config, args.accuracy_tasks, args.seed)
            accuracy = {m: meta_test_accuracy(path, trained, data) for m, path in artifacts.items()}
        timings = time_steps(args, artifacts, out)
        size = {m: sizes(p) for m, p in artifacts.items()}

    step = {m: {way: median(t) for way, t in ways.items()} for m, ways in timings.items()}
    ratio = {
        m: {
            **{way: step[m][way] / step["dense"][way] for way in ("lightning", "bare")},
            **{what: size[m][what] / size["dense"][what] for what in ("flops", "parameters")},
        }
        for m in artifacts
    }
    rows = [
        [
            m,
            "/".join(str(n) for n in widths[m].values()),
            f"{size[m]['parameters']} ({ratio[m]['parameters']:.3f}x)",
            f"{size[m]['flops'] / 1e6:.2f} M ({ratio[m]['flops']:.3f}x)",
            f"{1e3 * step[m]['lightning']:.2f} ({ratio[m]['lightning']:.3f}x)",
            f"{1e3 * step[m]['bare']:.2f} ({ratio[m]['bare']:.3f}x)",
            f"{accuracy[m][0]:.2%} +- {accuracy[m][1]:.2%}" if m in accuracy else "-",
        ]
        for m in artifacts
    ]
    print_table(
        f"fine-tuning step on 25 28x28 images, {args.threads} thread(s), median of {args.repeats} x "
        f"{args.steps} steps; {args.fraction:.0%} of the filters removed, {args.filters_per_step or 'all'} "
        f"a step (target step time pruned/dense <= {TARGET})",
        [
            "net",
            "filters per block",
            "parameters",
            "forward MACs",
            "lightning step ms",
            "bare step ms",
            "accuracy",
        ],
        rows,
    )
    if accuracy:
        print(
            f"accuracy: {args.accuracy_tasks} meta-test tasks of {Path(args.config).name}, query accuracy "
            f"after {trained.eval_inner_steps} inner steps of {trained.inner_lr}, no retraining after pruning"
        )
    for m in artifacts:
        if m != "dense":
            verdict = "met" if ratio[m]["lightning"] <= TARGET else "NOT met"
            print(f"{m}: target {verdict}: {ratio[m]['lightning']:.3f}x the dense step")
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    results = {
        "settings": settings,
        "filters_left": widths,
        "parameters": {m: s["parameters"] for m, s in size.items()},
        "forward_flops": {m: s["flops"] for m, s in size.items()},
        "accuracy": {m: {"mean": a, "ci95": c} for m, (a, c) in accuracy.items()},
        "step_s": step,
        "timings_s": timings,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": {m: r["lightning"] <= TARGET for m, r in ratio.items() if m != "dense"},
    }
    write_json("structured_speed", results, args.json)
    return results


if __name__ == "__main__":
    main()
