"""Fine-tuning step time of a Taylor-pruned, shrunk Conv4 against the dense Conv4.

Target: pruned step time / dense step time <= 0.5 with 50% of the filters removed.

Unstructured sparsity leaves the tensors' shapes, so dense kernels run as long as before; removing
whole filters and shrinking the net (:func:`lthmaml.nets.shrink.shrink`) makes every layer narrower,
and a 3x3 conv's cost falls with its input *and* output widths (about 4x at half of each).

Setting. The MAML Omniglot net (Conv4, 64 filters a block, 28x28 inputs, 5-way); a fine-tuning
step as the device takes it on a 5-way 5-shot task (25 support images, one full batch): forward,
cross-entropy, backward, SGD, re-masking. Pruning: the Taylor criterion of Molchanov et al.
(``callbacks.taylor.taylor_scores``: |activation x gradient| per filter, each layer L2-normalised)
on the query loss after MAML's inner loop (``MAML.task_losses(adapted=True)``), summed over
``--score-tasks`` tasks; the lowest ``--fraction`` of all filters go in one shot
(``lthmaml.sparsity.lowest_channels``, a layer keeps at least one; ``lthmaml.sparsity.prune_channels``), then
``shrink`` builds the narrower Conv4. Both nets go through ``lthmaml.edge.export`` and are loaded
back, as the device gets them. Weights: random (the step time depends on shapes only, but the
widths Taylor leaves per layer depend on the weights) unless ``--checkpoint`` names a MAML
checkpoint (or ``--artifact`` a dense artifact) to prune; tasks: synthetic Omniglot-shaped images.

Timed two ways, each the median over ``--steps`` steps after ``--warmup`` steps, repeated
``--repeats`` times with the nets interleaved (the median of the medians is reported):
``lightning``: :class:`lthmaml.edge.finetune.FineTuneModule` in a Trainer (what ``lthmaml-edge``
runs; per step, ``on_train_batch_start`` to ``on_train_batch_end``); ``bare``: the same step
in a plain torch loop.

    python -m bench.structured_speed                 # ~1-2 minutes on 2 busy cores (1 thread)
    python -m bench.structured_speed --threads 4     # the Pi 4 profile's threads
    python -m bench.structured_speed --steps 100 --repeats 5
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

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
from callbacks.taylor import layer_normalized, taylor_scores
from lthmaml import sparsity
from lthmaml.data import TaskFolderDataModule
from lthmaml.data.taskfolder_build import make_image_task
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.export import export_net
from lthmaml.edge.finetune import FineTuneModule, artifact_from_checkpoint
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import Conv4
from lthmaml.nets.shrink import shrink

TARGET = 0.5
WAYS, SHOTS = 5, 5
INNER_LR = 0.4


# ---------------------------------------------------------------------------------- pruning
def taylor_prune(model: MAML, fraction: float, score_tasks: int, seed: int) -> dict[str, int]:
    """Remove ``fraction`` of all filters of ``model.net`` by the Taylor criterion; widths left."""
    pairs = sparsity.conv_batchnorm_pairs(model.net)
    batchnorms = {name: batchnorm for name, (_, batchnorm) in pairs.items()}
    tasks = pregenerate(image_task_source(WAYS, SHOTS, query_shots=15, seed=seed), score_tasks, seed)
    scores, _ = taylor_scores(batchnorms, model.task_losses(stack_tasks(tasks), adapted=True))
    alive = {name: sparsity.alive_channels(conv) for name, (conv, _) in pairs.items()}
    total = sum(int(a.numel()) for a in alive.values())
    chosen = sparsity.lowest_channels(layer_normalized(scores), alive, round(fraction * total))
    for name, channels in chosen.items():
        sparsity.prune_channels(model.net, name, channels)
    return {name: int(sparsity.alive_channels(conv).sum()) for name, (conv, _) in pairs.items()}


def build_artifacts(args, out: Path) -> tuple[dict[str, Path], dict[str, int]]:
    torch.manual_seed(args.seed)
    if args.checkpoint or args.artifact:
        art = artifact_from_checkpoint(args.checkpoint) if args.checkpoint else load_artifact(args.artifact)
        model = MAML(art.net, inner_lr=art.metadata.inner_lr)
    else:
        model = MAML(Conv4(out_features=WAYS), inner_lr=INNER_LR, inner_steps=1, first_order=True)
    steps = {"inner_lr": INNER_LR, "eval_inner_steps": args.warmup + args.steps, "task": "classification"}
    paths = {"dense": export_net(model.net, out / "dense.safetensors", steps)}
    widths = taylor_prune(model, args.fraction, args.score_tasks, args.seed)
    shrunk = shrink(model.net)
    paths["pruned"] = export_net(shrunk, out / "pruned.safetensors", steps)
    return paths, widths


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
    """Median step of ``FineTuneModule`` fit (no val split: the artifact's eval_inner_steps)."""
    timer = StepTimes()
    module = FineTuneModule(artifact=str(artifact))
    data = TaskFolderDataModule(str(task), image_size=28, batch_size=WAYS * SHOTS)
    make_trainer(callbacks=[timer]).fit(module, datamodule=data)
    return median(timer.times[warmup:])


def bare_step(artifact: Path, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> float:
    net = load_artifact(artifact).net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=INNER_LR)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
        sparsity.apply_masks(net)
        times.append(time.perf_counter() - start)
    return median(times[warmup:])


def parameters(artifact: Path) -> int:
    return sum(p.numel() for p in load_artifact(artifact).net.parameters())


def main(argv: Optional[list[str]] = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of all filters removed")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per net")
    parser.add_argument("--score-tasks", type=int, default=8, help="tasks the Taylor scores sum over")
    parser.add_argument("--checkpoint", default=None, help="a 5-way Conv4 MAML checkpoint to prune")
    parser.add_argument("--artifact", default=None, help="or an exported dense 5-way Conv4 artifact")
    args = parser.parse_args(argv)
    setup(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-structured-") as tmp:
        out = Path(tmp)
        artifacts, widths = build_artifacts(args, out)
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
        sizes = {m: parameters(p) for m, p in artifacts.items()}
        shapes = {
            m: load_artifact(p).metadata.architecture["init_args"]["hidden_channels"]
            for m, p in artifacts.items()
        }

    step = {m: {way: median(t) for way, t in ways.items()} for m, ways in timings.items()}
    ratios = {way: step["pruned"][way] / step["dense"][way] for way in ("lightning", "bare")}
    rows = [
        [m, str(shapes[m]), sizes[m], 1e3 * step[m]["lightning"], 1e3 * step[m]["bare"]] for m in artifacts
    ]
    rows.append(["pruned / dense", "", sizes["pruned"] / sizes["dense"], ratios["lightning"], ratios["bare"]])
    print_table(
        f"fine-tuning step on 25 28x28 images, {args.threads} thread(s), median of {args.repeats} x "
        f"{args.steps} steps (target pruned/dense <= {TARGET})",
        ["net", "filters per block", "parameters", "lightning step (ms)", "bare step (ms)"],
        rows,
    )
    print(f"Taylor pruning left {widths} filters ({args.fraction:.0%} of all removed)")
    print(f"target {'met' if ratios['lightning'] <= TARGET else 'NOT met'}: {ratios['lightning']:.3f}x")
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    results = {
        "settings": settings,
        "filters_left": widths,
        "hidden_channels": shapes,
        "parameters": sizes,
        "step_s": step,
        "timings_s": timings,
        "ratio": ratios,
        "target": TARGET,
        "meets_target": ratios["lightning"] <= TARGET,
    }
    write_json("structured_speed", results, args.json)
    return results


if __name__ == "__main__":
    main()
