"""MAML's adaptation as an ONNX graph (:mod:`lthmaml.edge.onnx_adapt`) against the torch inner loop.

Target: a 5-step adaptation of a Conv4-64 (1 input channel, 28x28) to a 20-way 1-shot task
through ONNX Runtime takes no more wall time than the torch path's adaptation alone, with the
same predictions.

The torch path is :class:`lthmaml.meta.functional.FunctionalInnerLoop` on one task (plain
autograd, what MAML's evaluation and the edge fine-tuning's fixed-steps regime compute): the
steps' gradients, the masked SGD updates and the query pass, no Lightning around them. The ONNX
path is one ``InferenceSession.run`` of the exported graph (the session is built once, before
the timing; its build time is reported apart). Both on one thread, each repeat times both back
to back with the order alternating; the figures are medians and the median of the paired
ratios. The net is randomly initialised (the speed does not depend on the weights' values; the
agreement is checked on them too) and 80% of its conv and linear weights are pruned, as a
deployed lottery ticket is. ``--ops`` instead runs every operation of the graph alone through
ONNX Runtime, without the module's decompositions (what each of them is for) and with them.

``--device`` times what ``lthmaml-device fit`` computes for a whole query in batches of
``--batch-size`` (BatchNorm on each batch's statistics): :func:`lthmaml.device.runtime.scores`,
which adapts once and feeds the adapted weights to the net graph for the other batches, against
running the adaptation graph for every batch, paired and interleaved, with the largest
difference of their scores.

    python -m bench.onnx_adapt --threads 1                  # ~2 minutes
    python -m bench.onnx_adapt --threads 1 --ops            # op by op, ~3 minutes
    python -m bench.onnx_adapt --threads 1 --device --query-shots 15   # ~2 minutes
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import base_parser, median, print_table, setup, write_json
from lthmaml import sparsity
from lthmaml.edge.artifact import ArtifactMetadata
from lthmaml.edge.onnx_adapt import (
    DECOMPOSITIONS,
    INPUTS,
    adaptation_graph,
    check_ops,
    example_task,
    export_adaptation,
)
from lthmaml.masks import gradient_masks
from lthmaml.meta.functional import FunctionalInnerLoop
from lthmaml.meta.metrics import task_loss
from lthmaml.nets.models import Conv4


def pruned_conv4(ways: int, width: int, seed: int, amount: float) -> Conv4:
    torch.manual_seed(seed)
    net = Conv4(out_features=ways, in_channels=1, hidden_channels=width, image_size=28)
    if amount:
        sparsity.prune_by_magnitude(net, amount)
    return net


def metadata_for(net: Conv4, ways: int, steps: int, inner_lr: float) -> ArtifactMetadata:
    return ArtifactMetadata(
        architecture={"class_path": "lthmaml.nets.models.Conv4", "init_args": net.architecture},
        task="classification",
        ways=ways,
        inner_lr=inner_lr,
        inner_steps=steps,
        eval_inner_steps=steps,
        sparsity=0.0,
    )


def main() -> None:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query-shots", type=int, default=5, help="query images per class")
    parser.add_argument("--steps", type=int, default=5, help="inner SGD steps")
    parser.add_argument("--width", type=int, default=64, help="Conv4 filters per block")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ops", action="store_true", help="check the graph op by op instead of timing it")
    parser.add_argument("--device", action="store_true", help="time the device's whole query instead")
    parser.add_argument("--batch-size", type=int, default=32, help="--device: query batch (lthmaml-device's)")
    args = parser.parse_args()
    setup(args.threads)
    if args.ops:
        return op_by_op(args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    support_x = torch.rand(args.ways * args.shots, 1, 28, 28, generator=generator)
    support_y = torch.arange(args.ways).repeat_interleave(args.shots)
    query_x = torch.rand(args.ways * args.query_shots, 1, 28, 28, generator=generator)
    if args.device:
        return device_query(args, support_x, support_y, query_x)
    feeds = dict(zip(INPUTS, (support_x.numpy(), support_y.numpy(), query_x.numpy())))
    task = f"{args.ways}-way {args.shots}-shot, {len(query_x)} query images"

    agreement, timed_paths = [], None
    for width in sorted({8, args.width}):
        for steps in sorted({1, args.steps}):
            net = pruned_conv4(args.ways, width, args.seed, args.sparsity)
            torch_path, onnx_path, costs = both_paths(
                net, steps, args, (support_x, support_y, query_x), feeds
            )
            reference, got = torch_path(), onnx_path()  # also the warm-up
            agreement.append(
                {
                    "width": width,
                    "steps": steps,
                    "max_abs_logit_difference": float((got - reference).abs().max()),
                    "max_abs_logit": float(reference.abs().max()),
                    "same_labels": bool(torch.equal(got.argmax(-1), reference.argmax(-1))),
                    **costs,
                }
            )
            if (width, steps) == (args.width, args.steps):
                timed_paths = {"torch": torch_path, "onnx": onnx_path}
    print_table(
        f"agreement on one {task}, Conv4 random init, {args.sparsity:.0%} pruned",
        ["width", "steps", "max |logit diff|", "max |logit|", "same labels", "export s", "graph MB"],
        [
            [
                a["width"],
                a["steps"],
                a["max_abs_logit_difference"],
                a["max_abs_logit"],
                a["same_labels"],
                a["export_s"],
                a["graph_bytes"] / 1e6,
            ]
            for a in agreement
        ],
    )

    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    for repeat in range(args.repeats):
        for name in ("torch", "onnx") if repeat % 2 == 0 else ("onnx", "torch"):
            start = time.perf_counter()
            timed_paths[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [o / t for o, t in zip(times["onnx"], times["torch"])]
    results = {
        "task": task,
        "net": f"Conv4-{args.width}, random init, {args.sparsity:.0%} pruned",
        "steps": args.steps,
        "threads": args.threads,
        "torch_s": median(times["torch"]),
        "onnx_s": median(times["onnx"]),
        "onnx_over_torch": median(ratios),
        "agreement": agreement,
        "times": times,
    }
    print_table(
        f"adaptation and query pass: {results['net']}, {args.steps} steps, {args.threads} thread(s), "
        f"medians of {args.repeats} interleaved repeats",
        ["path", "s", "onnx / torch (paired median)"],
        [
            ["torch (FunctionalInnerLoop)", results["torch_s"], ""],
            ["onnxruntime (the graph)", results["onnx_s"], results["onnx_over_torch"]],
        ],
    )
    write_json("onnx_adapt", results, args.json)


def both_paths(net: Conv4, steps: int, args, task: tuple, feeds: dict):
    """The torch path and the ONNX path adapting ``net`` to ``task`` (each returns the query
    logits), and what building the ONNX one cost (export and session seconds, graph bytes)."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapt.onnx"
        start = time.perf_counter()
        export_adaptation(net, metadata_for(net, args.ways, steps, args.inner_lr), path)
        export_s = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = args.threads
        start = time.perf_counter()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        costs = {
            "export_s": export_s,
            "session_s": time.perf_counter() - start,
            "graph_bytes": path.stat().st_size,
        }
    names = [name for name, _ in net.named_parameters()]
    loop = FunctionalInnerLoop(
        net.train(), dict.fromkeys(names, args.inner_lr), task_loss, gradient_masks(net, net)
    )
    support_x, support_y, query_x = task

    def torch_path() -> torch.Tensor:
        return loop.forward(loop.adapted_params(support_x, support_y, steps), query_x).detach()

    def onnx_path() -> torch.Tensor:
        return torch.from_numpy(session.run(None, feeds)[0])

    return torch_path, onnx_path, costs


def device_query(args, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> None:
    """The device's scores for a whole query: adapting once (the product path) against adapting for
    each query batch, both through the artifact's exported graphs."""
    import numpy as np

    from lthmaml.device.runtime import DeviceModel, scores
    from lthmaml.device.task import Split
    from lthmaml.edge.artifact import load_artifact
    from lthmaml.edge.export import export_net
    from lthmaml.edge.onnx_export import export_onnx
    from lthmaml.meta.maml import MAML

    net = pruned_conv4(args.ways, args.width, args.seed, args.sparsity)
    model = MAML(net, inner_lr=args.inner_lr, inner_steps=args.steps, eval_inner_steps=args.steps)
    support = Split(support_x.numpy(), support_y.numpy(), [], True)
    task = SimpleNamespace(splits={"support": support, "query": Split(query_x.numpy(), None, [], False)})
    batches = [query_x[i : i + args.batch_size].numpy() for i in range(0, len(query_x), args.batch_size)]
    with tempfile.TemporaryDirectory() as folder:
        artifact = export_net(model, Path(folder) / "maml.safetensors")
        device = DeviceModel(
            export_onnx(load_artifact(artifact), Path(folder) / "maml.onnx")[0], args.threads
        )
        paths = {
            "adapt once (lthmaml-device)": lambda: scores(device, task, args.batch_size)[0],
            "adapt for each batch": lambda: np.concatenate(
                [device.adapt(support.x, support.y, batch)[0] for batch in batches]
            ),
        }
        outputs = {name: path() for name, path in paths.items()}  # also the warm-up
        times: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(args.repeats):
            for name in paths if repeat % 2 == 0 else reversed(paths):
                start = time.perf_counter()
                paths[name]()
                times[name].append(time.perf_counter() - start)
    once, each = (times[name] for name in paths)
    results = {
        "task": f"{args.ways}-way {args.shots}-shot, {len(query_x)} query images in {len(batches)} batches",
        "net": f"Conv4-{args.width}, random init, {args.sparsity:.0%} pruned",
        "steps": args.steps,
        "threads": args.threads,
        "median_s": {name: median(t) for name, t in times.items()},
        "once_over_each": median([a / b for a, b in zip(once, each)]),
        "max_abs_score_difference": float(np.abs(np.subtract(*outputs.values())).max()),
        "times": times,
    }
    print_table(
        f"the device's query: {results['task']}, {results['net']}, {args.steps} steps, "
        f"{args.threads} thread(s), medians of {args.repeats} interleaved repeats",
        ["path", "s", "once / each (paired median)"],
        [
            [name, results["median_s"][name], results["once_over_each"] if i == 0 else ""]
            for i, name in enumerate(paths)
        ],
    )
    print(f"max |score difference| {results['max_abs_score_difference']:.2e}")
    write_json("onnx_adapt_device", results, args.json)


def op_by_op(args) -> None:
    """Every operation of a small Conv4's one-step graph alone through ONNX Runtime (float64
    convolutions through the ONNX reference implementation), traced without the module's
    decompositions and with them, in float32 and in float64: the operations whose translation
    is wrong, missing, inexact or slow are what :data:`DECOMPOSITIONS` rewrites."""
    rows = []
    for label, decompositions in (("exporter alone", {}), ("with DECOMPOSITIONS", DECOMPOSITIONS)):
        for dtype in (torch.float32, torch.float64):
            net = pruned_conv4(5, 4, args.seed, args.sparsity).to(dtype)
            example = example_task(net, "classification", dtype)
            rates = {name: args.inner_lr for name, _ in net.named_parameters()}
            graph = adaptation_graph(net, rates, 1, *example, decompositions=decompositions)
            name, within = str(dtype).removeprefix("torch."), []
            for check in check_ops(graph, example):
                if check.error <= (1e-6 if dtype == torch.float32 else 1e-10):
                    within.append(check.error)
                else:
                    rows.append([label, name, check.op, check.error, check.problem[:100]])
            rows.append([label, name, f"the {len(within)} others (the largest error)", max(within), ""])
    print_table(
        "operations of the graph whose ONNX form, alone, is off torch's (float32: > 1e-6, float64: > 1e-10)",
        ["graph", "dtype", "op", "relative error", "problem"],
        rows,
    )
    write_json("onnx_adapt_ops", {"rows": rows}, args.json)


if __name__ == "__main__":
    main()
