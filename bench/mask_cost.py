"""What the masks cost a meta-training step: an 80%-pruned Conv4 against the same net with none.

Target: the pruned net's step through ``Trainer.fit`` takes at most 1.05x the unpruned one's.

Both paths are :class:`lthmaml.meta.maml.MAML` on a stock Conv4 (64 filters, 28x28 synthetic
images) built from the same initial weights and trained on the same pre-generated tasks. The
pruned one holds masks (global magnitude pruning to 80%, the head at half rate) beside the net:
its inner steps are masked, its meta-gradient is masked before each Adam step and its weights
and Adam moments after it. The other has an empty mask set, so none of that runs. The dense
convolutions do the same work in both, zeros or not. Each repeat times ``--steps`` meta-steps of
each path back to back, the order alternating; the figure is the median of the paired ratios.
On a shared CPU those ratios scatter by tens of percent, so the script also times the mask work
itself, which does not depend on the load much: per meta-step, the masked inner-loop gradients
of every task and inner step, the meta-gradient masking and the zeroing of weights and Adam
moments, as a fraction of the unmasked step.

    python -m bench.mask_cost --threads 1                # both inner loops, ~6 minutes
    python -m bench.mask_cost --threads 1 --quick        # a smoke run, figures meaningless
"""

from __future__ import annotations

import copy
import time

import torch

from bench.common import (
    StepTimer,
    base_parser,
    image_task_source,
    make_trainer,
    median,
    pregenerate,
    print_table,
    setup,
    task_loader,
    write_json,
)
from lthmaml import sparsity
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import Conv4

TARGET = 1.05
SPARSITY = 0.8


def step_seconds(model: MAML, tasks: list, meta_batch: int) -> float:
    """Seconds per meta-step of ``model`` through ``Trainer.fit`` (the training loop proper)."""
    timer = StepTimer()
    loader = task_loader(tasks, meta_batch)
    make_trainer(max_steps=len(loader), callbacks=[timer]).fit(model, train_dataloaders=loader)
    return timer.seconds / timer.steps


def mask_work_seconds(model: MAML, tasks: int, inner_steps: int, repeats: int = 50) -> float:
    """Seconds of one meta-step's mask work on ``model``: each task's inner steps multiply every
    masked gradient by its mask; before the Adam step the meta-gradient is masked; after it the
    weights and Adam's moments are zeroed."""
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # Adam's moments exist, as after any step
    masks = model.net_masks()
    grads = {name: torch.randn_like(p) for name, p in model.net.named_parameters()}
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in range(tasks * inner_steps):
            for name, mask in model.net_masks().items():
                grads[name] = grads[name] * mask
        sparsity.mask_gradients(model)
        sparsity.apply_masks(model, [optimizer])
    assert masks
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0], default_threads=1)
    parser.add_argument("--steps", type=int, default=3, help="meta-steps a path runs per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="paired repeats per inner loop")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--query", type=int, default=15, help="query images per class")
    parser.add_argument("--loops", nargs="+", default=["higher", "func"])
    parser.add_argument("--quick", action="store_true", help="tiny net and counts: a smoke run")
    args = parser.parse_args()
    setup(args.threads)
    if args.quick:
        args.steps, args.repeats, args.meta_batch = 1, 2, 2
    width = 8 if args.quick else 64
    tasks = pregenerate(
        image_task_source(5, 1, args.query, seed=args.seed), args.steps * args.meta_batch, args.seed
    )
    torch.manual_seed(args.seed)
    init = Conv4(5, hidden_channels=width)
    rows, results = [], {}
    for loop in args.loops:
        ratios, times = [], {"masked": [], "unmasked": []}
        for repeat in range(args.repeats + 1):  # the first pair warms up
            pair = {}
            for kind in ("masked", "unmasked") if repeat % 2 == 0 else ("unmasked", "masked"):
                model = MAML(copy.deepcopy(init), inner_lr=0.4, inner_loop=loop)
                if kind == "masked":
                    sparsity.prune_by_magnitude(model, SPARSITY, layer_rates={"net.head": 0.5})
                pair[kind] = step_seconds(model, tasks, args.meta_batch)
                print(f"  {loop} repeat {repeat} {kind}: {pair[kind]:.3f} s/step", flush=True)
            if repeat:
                ratios.append(pair["masked"] / pair["unmasked"])
                for kind, seconds in pair.items():
                    times[kind].append(seconds)
        ratio = median(ratios)
        probe = MAML(copy.deepcopy(init), inner_lr=0.4, inner_loop=loop)
        sparsity.prune_by_magnitude(probe, SPARSITY, layer_rates={"net.head": 0.5})
        work = mask_work_seconds(probe, args.meta_batch, probe.inner_steps) / median(times["unmasked"])
        results[loop] = {
            "mask_work_fraction": work,
            "masked_s_per_step": median(times["masked"]),
            "unmasked_s_per_step": median(times["unmasked"]),
            "paired_ratios": ratios,
            "median_ratio": ratio,
            "met": ratio <= TARGET,
        }
        rows.append(
            [
                loop,
                median(times["masked"]),
                median(times["unmasked"]),
                ratio,
                f"{work:.2%}",
                _verdict(ratio),
            ]
        )
    print_table(
        f"80%-pruned vs unmasked Conv4-{width}, 5-way 1-shot {args.query}-query, "
        f"meta-batch {args.meta_batch}",
        [
            "inner loop",
            "s/step masked",
            "s/step unmasked",
            "masked/unmasked (paired)",
            "mask work",
            f"<= {TARGET}",
        ],
        rows,
    )
    write_json("mask_cost", {"args": vars(args) | {"json": str(args.json)}, "results": results}, args.json)


def _verdict(ratio: float) -> str:
    return "met" if ratio <= TARGET else "missed"


if __name__ == "__main__":
    main()
