"""Taylor filter pruning of a residual net: a narrow ResNet-12 meta-trained on Omniglot, pruned to
half its filters by whole channel groups, shrunk, and fine-tuned on the device's step.

Target: the shrunk net computes what the pruned (masked) net does (outputs within 1e-5), and its
fine-tuning step takes <= 0.5x the dense net's, at 50% of the filters removed; the meta-test
accuracy before and after is reported.

Setting. ResNet-12 of widths 16-32-64-128 (each stage three 3x3 conv-BatchNorm layers and a 1x1
projection on the skip path, summed) on 28x28 one-channel images, as MAML's learner (5-way
head, inner lr 0.4). A channel of a stage's output is one *channel group* with the skip path's
projection, found by torch-pruning's dependency graph (:mod:`lthmaml.channels`): Taylor's
criterion sums over the group's BatchNorms, and pruning and shrinking take the whole group. The
net has 12 groups and 720 group channels ("filters"); half go.

What runs, in one process, on the Omniglot subset of ``--config`` (5-way 1-shot episodes, 1
query image a class in meta-training, 15 at evaluation):

1. ``--dense-steps`` meta-updates of first-order MAML (meta-batch 8, Adam 1e-3) through
   ``Trainer.fit`` from random weights; the dense net's meta-test accuracy, and that of a copy
   trained ``--prune-steps`` more updates without pruning (as long as the pruned nets).
2. From that net, once with the plain criterion and once with each ``--activations-weight``
   (``flops_weight`` with ``cost="activations"``: a channel costs its maps' positions, so the
   full-resolution first stages go sooner, which is what a CPU step's time follows):
   ``--prune-steps`` more meta-updates with :class:`callbacks.taylor.TaylorFilterPruning`
   (``--filters-per-step`` every ``--steps-between`` updates, scores summed over the last
   ``--accumulate`` batches before each step) until 50% of the filters are removed, the rest
   of the updates training the pruned net.
3. :func:`lthmaml.nets.shrink.shrink` of each: the largest output difference between the
   masked and the shrunk net on a meta-test batch (BatchNorm on the batch's statistics, as MAML
   uses it, and in evaluation mode), and the shrunk net's meta-test accuracy (the masked net's,
   to that difference).
4. A fine-tuning step as the device takes it (a 5-way 5-shot support set of 25 images, one
   full batch: forward, cross-entropy, backward, SGD, re-masking) of the dense, each shrunk and
   each pruned but unshrunk (masked, full-size) net: the median over ``--steps`` steps after
   ``--warmup``, ``--repeats`` times with the nets interleaved (the median of the medians).

Accuracy: ``--accuracy-tasks`` meta-test tasks (the same tasks for every net), the query
accuracy after 3 inner SGD steps of 0.4.

    python -m bench.resnet_taylor                     # ~6.5 minutes on one busy core (1 thread)
    python -m bench.resnet_taylor --dense-steps 20 --prune-steps 25 --steps-between 2 \
        --accumulate 1 --accuracy-tasks 10 --repeats 1   # a quick look (~2 minutes)
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bench.common import base_parser, make_trainer, median, print_table, random_images, setup, write_json
from bench.structured_speed import omniglot, step_time
from callbacks.taylor import TaylorFilterPruning
from lthmaml import sparsity
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import mean_and_ci95
from lthmaml.nets.resnet import ResNet12
from lthmaml.nets.shrink import shrink

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.5
WIDTHS = (16, 32, 64, 128)
WAYS, SHOTS = 5, 5
INNER_LR = 0.4


def learner(net: torch.nn.Module) -> MAML:
    return MAML(
        net, inner_lr=INNER_LR, inner_steps=1, eval_inner_steps=3, first_order=True, inner_loop="func"
    )


def accuracy(model: MAML, data) -> tuple[float, float]:
    """Mean query accuracy (and 95% half-width) over ``data``'s meta-test tasks after the
    evaluation inner loop."""
    results = [result.acc_post for batch in data.test_dataloader() for result in model.evaluate_batch(batch)]
    return mean_and_ci95(torch.stack(results))


def prune(model: MAML, data, args, weight: float) -> tuple[MAML, dict, float]:
    """A copy of ``model`` meta-trained ``--prune-steps`` more updates with Taylor pruning (the
    activations cost at ``weight``; 0: the plain criterion); its filters left, and the minutes."""
    model = copy.deepcopy(model)
    callback = TaylorFilterPruning(
        filters_per_step=args.filters_per_step,
        target_fraction=args.fraction,
        steps_between=args.steps_between,
        accumulate_batches=args.accumulate,
        flops_weight=weight,
        cost="activations",
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-resnet-taylor-") as rounds:  # its level records
        make_trainer(args.prune_steps, callbacks=[callback], default_root_dir=rounds).fit(
            model, datamodule=data
        )
    return model, callback.details(model), (time.perf_counter() - start) / 60


def main(argv: Optional[list[str]] = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--config", default=str(REPO / "configs" / "omniglot_5way1shot.yaml"))
    parser.add_argument("--dense-steps", type=int, default=400, help="meta-updates of the dense net")
    parser.add_argument("--prune-steps", type=int, default=120, help="meta-updates with Taylor pruning")
    parser.add_argument("--filters-per-step", type=int, default=36, help="filters removed per pruning step")
    parser.add_argument("--steps-between", type=int, default=10, help="meta-updates between pruning steps")
    parser.add_argument("--accumulate", type=int, default=2, help="batches scored before each pruning step")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the filters removed")
    parser.add_argument(
        "--activations-weight",
        type=float,
        nargs="*",
        default=[0.5, 1.0],
        help="flops_weight of the activations cost, each a pruned net beside the plain criterion's",
    )
    parser.add_argument("--accuracy-tasks", type=int, default=100, help="meta-test tasks for the accuracy")
    parser.add_argument("--steps", type=int, default=30, help="timed fine-tuning steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per net")
    args = parser.parse_args(argv)
    setup(args.threads)
    torch.manual_seed(args.seed)

    data = omniglot(args.config, args.accuracy_tasks, args.seed)
    model = learner(ResNet12(WAYS, in_channels=1, widths=WIDTHS, image_size=28))
    start = time.perf_counter()
    make_trainer(args.dense_steps).fit(model, datamodule=data)
    minutes = {"dense": (time.perf_counter() - start) / 60}
    nets = {"dense": model.net}
    accuracies = {"dense": accuracy(model, data)}
    control = copy.deepcopy(model)  # trained as long as the pruned nets, without pruning
    start = time.perf_counter()
    make_trainer(args.prune_steps).fit(control, datamodule=data)
    name = f"dense, {args.prune_steps} more updates"
    minutes[name] = (time.perf_counter() - start) / 60
    nets[name], accuracies[name] = control.net, accuracy(control, data)
    filters, difference = {}, {}
    batch = next(iter(data.test_dataloader()))
    x = batch.query_x.flatten(0, 1)
    for weight in [0.0, *(w for w in args.activations_weight if w)]:
        name = f"taylor activations {weight:g}" if weight else "taylor plain"
        pruned, filters[name], minutes[name] = prune(model, data, args, weight)
        small, small_masks = shrink(pruned.net, sparsity.masks_within(pruned, "net."))
        shrunk = learner(small)
        sparsity.load_masks(shrunk, {f"net.{n}": mask for n, mask in small_masks.items()})
        accuracies[name] = accuracy(shrunk, data)
        with torch.no_grad():  # BatchNorm on the batch's statistics (MAML's) and in evaluation mode
            difference[name] = max(
                float((small.train(mode)(x) - pruned.net.train(mode)(x)).abs().max())
                for mode in (True, False)
            )
        nets[name] = small
        masked = copy.deepcopy(pruned.net)  # the pruned net before shrinking: masks beside, full size
        sparsity.load_masks(masked, sparsity.masks_within(pruned, "net."))
        nets[f"{name}, unshrunk"] = masked

    images = random_images(classes=WAYS, examples=SHOTS, seed=args.seed)
    fx, fy = images.flatten(0, 1), torch.arange(WAYS).repeat_interleave(SHOTS)
    timings: dict[str, list[float]] = {name: [] for name in nets}
    for repeat in range(args.repeats):
        for name in nets if repeat % 2 == 0 else reversed(list(nets)):
            timings[name].append(step_time(nets[name], fx, fy, args.warmup, args.steps))
    step = {name: median(t) for name, t in timings.items()}
    parameters = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    ratio = {name: step[name] / step["dense"] for name in nets}

    def widths(name: str) -> str:
        channels = filters[name]["channels"] if name in filters else None
        if channels is None:
            return "-"
        by_stage = [[channels[f"net.stages.{s}.{c}"] for c in ("conv1", "conv2", "conv3")] for s in range(4)]
        return " | ".join("/".join(map(str, stage)) for stage in by_stage)

    rows = [
        [
            name,
            widths(name),
            f"{parameters[name]} ({parameters[name] / parameters['dense']:.3f}x)",
            f"{1e3 * step[name]:.2f} ({ratio[name]:.3f}x)",
            f"{accuracies[name][0]:.2%} +- {accuracies[name][1]:.2%}"
            if name in accuracies
            else "(as shrunk)",
            f"{difference[name]:.1e}" if name in difference else "-",
        ]
        for name in nets
    ]
    print_table(
        f"ResNet-12 {'-'.join(map(str, WIDTHS))}, first-order MAML on {Path(args.config).name}'s Omniglot: "
        f"{args.dense_steps} dense meta-updates, then {args.prune_steps} with Taylor pruning removing "
        f"{args.fraction:.0%} of the filters; fine-tuning step on 25 28x28 images, "
        f"{args.threads} thread(s), median of {args.repeats} x {args.steps} steps",
        [
            "net",
            "channels per group (conv1/conv2/conv3+skip a stage)",
            "parameters",
            "fine-tune step ms",
            f"accuracy ({args.accuracy_tasks} meta-test tasks)",
            "shrunk - masked",
        ],
        rows,
    )
    print("minutes: " + ", ".join(f"{name} {m:.1f}" for name, m in minutes.items()))
    same = max(difference.values()) <= 1e-5
    print(f"outputs of the shrunk nets within 1e-5 of the masked ones: {'met' if same else 'NOT met'}")
    for name in filters:
        verdict = "met" if ratio[name] <= TARGET else "NOT met"
        print(f"{name}: step {ratio[name]:.3f}x dense, target <= {TARGET} {verdict}")
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "minutes": minutes,
        "filters": filters,
        "parameters": parameters,
        "accuracy": {name: {"mean": a, "ci95": c} for name, (a, c) in accuracies.items()},
        "output_difference": difference,
        "step_s": step,
        "timings_s": timings,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": {name: same and ratio[name] <= TARGET for name in filters},
    }
    write_json("resnet_taylor", results, args.json)
    return results


if __name__ == "__main__":
    main()
