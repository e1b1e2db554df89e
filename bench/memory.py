"""Peak memory (RSS) of meta-training at meta-batch 4 and 32.

Target: the peak at meta-batch 32 is within 1.3x of the peak at meta-batch 4. Our fit path
adapts and back-propagates one task at a time, so a task's graph is freed before the next is
built and the peak should not grow with the meta-batch (only the collated meta-batch itself,
~0.3 MB of images per task here, does).

Setting: our fit path (``Trainer.fit`` on :class:`lthmaml.meta.maml.MAML`), Conv4 on 28x28
synthetic images, 5-way 5-shot 15-query (so activations matter), second order, 1 inner step,
tasks drawn lazily by :class:`lthmaml.data.EpisodeDataset` as the real DataModule does.

Each meta-batch size runs in a fresh subprocess. There, ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` is read once after the imports and the model, data and Trainer are built (the
baseline) and again after ``--steps`` meta-steps of ``fit`` (the peak); both the absolute peak
and the delta (peak - baseline) are reported, and the target is checked on both.

    python -m bench.memory            # default: 2 meta-steps per size, ~2-4 minutes on 2 CPU cores
    python -m bench.memory --quick    # 1 meta-step per size
    python -m bench.memory --inner-loop func --task-chunk 4   # the torch.func loop, 4 tasks per vmap
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from bench.common import (
    base_parser,
    image_task_source,
    make_trainer,
    print_table,
    setup,
    task_loader,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.3


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(meta_batch: int, steps: int, seed: int, inner_loop: str = "higher", task_chunk: int = 4) -> dict:
    """Runs in the fresh subprocess: baseline, then ``steps`` meta-steps of fit, then the peak."""
    import torch

    from lthmaml.data import EpisodeDataset
    from lthmaml.meta.maml import MAML
    from lthmaml.nets.models import Conv4

    torch.manual_seed(seed)
    model = MAML(
        Conv4(out_features=5),
        inner_lr=0.4,
        inner_steps=1,
        first_order=False,
        inner_loop=inner_loop,
        task_chunk=task_chunk,
    )
    source = image_task_source(ways=5, shots=5, query_shots=15, seed=seed)
    loader = task_loader(EpisodeDataset(source, meta_batch * steps, seed, "train"), meta_batch)
    trainer = make_trainer(max_steps=steps)
    baseline = max_rss_mib()
    trainer.fit(model, train_dataloaders=loader)
    peak = max_rss_mib()
    return {
        "meta_batch": meta_batch,
        "steps": steps,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "delta_mib": peak - baseline,
    }


def run_fresh(meta_batch: int, steps: int, seed: int, threads: int, inner_loop: str, task_chunk: int) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--child", str(meta_batch)]
    cmd += ["--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    cmd += ["--inner-loop", inner_loop, "--task-chunk", str(task_chunk)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--meta-batches", type=int, nargs=2, default=[4, 32], metavar=("SMALL", "LARGE"))
    parser.add_argument("--steps", type=int, default=2, help="meta-steps of fit per measurement")
    parser.add_argument("--quick", action="store_true", help="1 meta-step per size")
    parser.add_argument("--inner-loop", choices=["higher", "func"], default="higher")
    parser.add_argument("--task-chunk", type=int, default=4, help="tasks per vmap of the func loop")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.seed, args.inner_loop, args.task_chunk)))
        return {}
    if args.quick:
        args.steps = 1

    runs = [
        run_fresh(mb, args.steps, args.seed, args.threads, args.inner_loop, args.task_chunk)
        for mb in args.meta_batches
    ]
    small, large = runs
    ratio_peak = large["peak_mib"] / small["peak_mib"]
    ratio_delta = large["delta_mib"] / small["delta_mib"]
    rows = [[r["meta_batch"], r["baseline_mib"], r["peak_mib"], r["delta_mib"]] for r in runs]
    rows.append([f"ratio {large['meta_batch']}/{small['meta_batch']}", "", ratio_peak, ratio_delta])
    print_table(
        f"peak RSS (MiB) of fit, Conv4 5-way 5-shot 15-query, second order, {args.inner_loop} loop, "
        f"{args.steps} meta-step(s), "
        f"fresh process each (target: ratio <= {TARGET})",
        ["meta-batch", "baseline", "peak", "delta (peak - baseline)"],
        rows,
    )
    results = {
        "settings": {
            "meta_batches": args.meta_batches,
            "inner_loop": args.inner_loop,
            "task_chunk": args.task_chunk,
            "steps": args.steps,
            "threads": args.threads,
            "seed": args.seed,
        },
        "runs": runs,
        "ratio_peak": ratio_peak,
        "ratio_delta": ratio_delta,
        "target": TARGET,
    }
    write_json("memory", results, args.json)
    return results


if __name__ == "__main__":
    main()
