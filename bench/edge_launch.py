"""Device launches: start-up against adaptation, and one launch against two.

Every ``lthmaml-edge`` launch pays Python's, torch's and Lightning's start-up before it adapts
anything. This measures, on the edge profile (``configs/edge/pi.yaml``), a fit that also writes
the predictions (``fit --predict_after_fit true``: one launch) against ``fit`` then ``predict``
(two launches): the wall time of each launch as the shell sees it, and the start-up, fit and
predict times the launch logs (``Timings: ...``), medians over ``--repeats`` rounds, the two
ways interleaved. The artifact is a fresh 5-way Conv4 (64 filters) unless ``--artifact``; the
task a 5-way 5-shot one of random glyphs (5 val and 10 query images per class) unless ``--task``:
start-up does not depend on the weights or the pixels, the fit's length (early stopping) does.

The device path (``--device``): ``lthmaml-device fit`` (onnxruntime, numpy, Pillow) against
``lthmaml-edge fit --predict_after_fit true`` on the same ProtoNet artifact and task, one launch
each, interleaved, one thread: the wall time of each process and its peak resident memory
(``ru_maxrss``, :data:`MEASURE`), medians over ``--repeats``, and whether the two wrote
the same labels. The artifact is a fresh headless Conv4 (64 filters, 28x28; start-up and memory do
not depend on the weights) exported both ways, the task 20-way 1-shot with 5 query images a class,
drawn from the Omniglot subset's meta-test classes (``../shared/data/omniglot`` or
``$LTHMAML_OMNIGLOT``); ``--checkpoint`` exports a meta-trained ProtoNet instead (its run's split).
The int8 graph's query accuracy against the float32 graph's is measured on ``--int8_tasks`` such
tasks (meaningful with ``--checkpoint``). It also sums what each path installs (the packages and
their dependencies as installed in this environment, ``__pycache__`` included).

    python -m bench.edge_launch                    # ~1-2 minutes
    python -m bench.edge_launch --artifact model.safetensors --task my_task/ --repeats 5
    python -m bench.edge_launch --device --repeats 5   # ~1 minute
    python -m bench.edge_launch --device --checkpoint runs/protonet_20way1shot/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bench.common import base_parser, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
TIMINGS = re.compile(r"Timings: start-up ([\d.]+) s .*?, fit ([\d.]+) s(?:, predict ([\d.]+) s)?")


def default_artifact_and_task(folder: Path) -> tuple[Path, Path]:
    from lthmaml.data.taskfolder_build import make_image_task
    from lthmaml.edge.export import export_net
    from lthmaml.nets.models import Conv4

    torch.manual_seed(0)
    artifact = export_net(Conv4(out_features=5), folder / "model.safetensors")
    glyphs = torch.rand(5, 1, 1, 28, 28).expand(5, 20, 1, 28, 28)
    images = (0.7 * glyphs + 0.3 * torch.rand(5, 20, 1, 28, 28)).clamp(0, 1)
    task = make_image_task(folder / "task", images, [f"c{i}" for i in range(5)], 5, 5, 10)
    return artifact, task


def launch(arguments: list[str], cwd: Path) -> dict[str, float]:
    """One ``lthmaml-edge`` process: its wall time and the times it logged."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lthmaml.edge.cli", *arguments], cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"edge launch failed: {done.stderr.strip().splitlines()[-1]}")
    found = TIMINGS.search(done.stderr + done.stdout)
    startup, fit, predict = (float(v) if v else None for v in found.groups()) if found else (None,) * 3
    return {"wall_s": wall, "startup_s": startup, "fit_s": fit, "predict_s": predict}


# ---------------------------------------------------------------------------------- the device path
DEVICE_PACKAGES = ["onnxruntime", "numpy", "pillow"]
TORCH_PACKAGES = ["torch", "lightning"]


def protonet_artifacts_and_task(
    folder: Path, checkpoint: Optional[Path] = None, ways: int = 20, query_shots: int = 5
) -> tuple[Path, Path, Path, Path]:
    """A ProtoNet embedding (``checkpoint``'s, else a fresh one) exported as safetensors, ONNX and
    int8 ONNX, and a ``ways``-way 1-shot task folder of the Omniglot meta-test classes (of the
    checkpoint's run, else of the default split)."""
    from lthmaml.data.taskfolder_build import omniglot_task
    from lthmaml.edge.artifact import load_artifact
    from lthmaml.edge.export import export_checkpoint, export_net
    from lthmaml.edge.onnx_export import export_onnx
    from lthmaml.edge.pi import meta_test_classes
    from lthmaml.meta import ProtoNet
    from lthmaml.nets.models import Conv4

    torch.manual_seed(0)
    if checkpoint is not None:
        artifact = export_checkpoint(checkpoint, folder / "protonet.safetensors")
    else:
        artifact = export_net(ProtoNet(Conv4(out_features=None)), folder / "protonet.safetensors")
    loaded = load_artifact(artifact)
    onnx = export_onnx(loaded, folder / "protonet.onnx")[0]
    int8 = export_onnx(loaded, folder / "protonet.int8.onnx", int8=True)[0]
    run_dir = checkpoint.parents[1] if checkpoint is not None else folder  # its config.yaml: the split
    images, classes = meta_test_classes(run_dir, 28)
    task = omniglot_task(folder / "task", images, classes, ways=ways, shots=1, query_shots=query_shots)
    return artifact, onnx, int8, task


def int8_agreement(onnx: Path, int8: Path, folder: Path, tasks: int, run_dir: Path) -> dict:
    """Query accuracy of the float32 and the int8 graph over ``tasks`` 20-way 1-shot tasks (seeds
    0..tasks-1), and how often and how far their predictions differ."""
    import numpy as np

    from lthmaml.data.taskfolder_build import omniglot_task
    from lthmaml.device.cli import softmax
    from lthmaml.device.runtime import DeviceModel, scores
    from lthmaml.device.task import read_task
    from lthmaml.edge.pi import meta_test_classes

    images, classes = meta_test_classes(run_dir, 28)
    models = {"float32": DeviceModel(onnx), "int8": DeviceModel(int8)}
    correct = {name: 0 for name in models}
    same, count, worst = 0, 0, 0.0
    for seed in range(tasks):
        root = omniglot_task(
            folder / f"accuracy{seed}", images, classes, ways=20, seed=seed, shots=1, query_shots=5
        )
        task = read_task(root, models["float32"].metadata, str(onnx))
        truth = task.splits["query"].y
        probabilities = {name: softmax(scores(model, task, 32)[0]) for name, model in models.items()}
        for name, p in probabilities.items():
            correct[name] += int((p.argmax(1) == truth).sum())
        same += int((probabilities["float32"].argmax(1) == probabilities["int8"].argmax(1)).sum())
        worst = max(worst, float(np.abs(probabilities["float32"] - probabilities["int8"]).max()))
        count += len(truth)
    return {
        "tasks": tasks,
        "queries": count,
        "accuracy": {name: c / count for name, c in correct.items()},
        "same_label": same / count,
        "max_probability_difference": worst,
        "bytes": {"float32": onnx.stat().st_size, "int8": int8.stat().st_size},
    }


MEASURE = """
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"@@measured {time.perf_counter() - start} {usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""
"""Runs a command as the child of a small Python process and reports its wall time and peak RSS
(KiB): a child forked from this benchmark would count the benchmark's own memory (torch, the
artifacts) as its high-water mark, which Linux carries across exec."""


def measured(command: list[str], cwd: Path, threads: int) -> dict:
    """One process: its wall time, its peak resident memory (MiB) and its output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], cwd=cwd, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"launch failed: {' '.join(command)}\n{done.stderr.strip().splitlines()[-1]}")
    found = re.search(r"@@measured ([\d.]+) (\d+)", done.stderr)
    return {
        "wall_s": float(found[1]),
        "peak_rss_mib": int(found[2]) / 1024,
        "output": done.stdout + done.stderr,
    }


def installed(roots: list[str]) -> dict:
    """The installed size of ``roots`` and their dependencies (no extras), as installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    sizes: dict[str, int] = {}
    todo = [canonicalize_name(name) for name in roots]
    while todo:
        name = todo.pop()
        if name in sizes:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        sizes[name] = sum(p.stat().st_size for f in dist.files or [] if (p := Path(f.locate())).is_file())
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return {"mib": sum(sizes.values()) / 2**20, "packages": sorted(sizes)}


def device_path(args, folder: Path) -> dict:
    artifact, onnx, int8, task = protonet_artifacts_and_task(folder, args.checkpoint)
    edge = [sys.executable, "-m", "lthmaml.edge.cli", "fit", "-c", str(REPO / "configs/edge/pi.yaml")]
    edge += ["--data.root", str(task), "--threads", str(args.threads), "--model.artifact", str(artifact)]
    edge += ["--predict_after_fit", "true"]
    runs: dict[str, list[dict]] = {"lthmaml-edge (torch)": [], "lthmaml-device (onnxruntime)": []}
    labels: dict[str, Optional[list[str]]] = {}
    for repeat in range(args.repeats):
        out = folder / f"device{repeat}"
        out.mkdir()
        device = [
            sys.executable,
            "-m",
            "lthmaml.device.cli",
            "fit",
            "--artifact",
            str(onnx),
            "--task",
            str(task),
        ]
        device += ["--threads", str(args.threads), "--output", str(out / "predictions.csv")]
        for name, command in zip(runs, (edge, device)):
            run = measured(command, out, args.threads)
            runs[name].append({key: run[key] for key in ("wall_s", "peak_rss_mib")})
        labels = {
            "edge": _labels(out / "runs" / "edge" / task.name / "predictions.csv"),
            "device": _labels(out / "predictions.csv"),
        }
    median = {
        name: {key: statistics.median(r[key] for r in rows) for key in ("wall_s", "peak_rss_mib")}
        for name, rows in runs.items()
    }
    sizes = {
        "device: onnxruntime, numpy, Pillow": installed(DEVICE_PACKAGES),
        "torch path: torch, lightning": installed(TORCH_PACKAGES),
    }
    print_table(
        f"20-way 1-shot ProtoNet, adapt + predict in one launch ({args.threads} thread(s), medians of "
        f"{args.repeats}, start-up included)",
        ["path", "wall (s)", "peak RSS (MiB)"],
        [[name, f"{m['wall_s']:.2f}", f"{m['peak_rss_mib']:.0f}"] for name, m in median.items()],
    )
    same = labels["edge"] == labels["device"]
    print(f"same predicted labels: {'yes' if same else 'NO'} ({len(labels['device'] or [])} query images)")
    print_table(
        "Installed for each path (with dependencies, as installed here)",
        ["path", "MiB", "packages"],
        [[name, f"{size['mib']:.0f}", len(size["packages"])] for name, size in sizes.items()],
    )
    run_dir = args.checkpoint.parents[1] if args.checkpoint is not None else folder
    quantised = int8_agreement(onnx, int8, folder, args.int8_tasks, run_dir)
    print_table(
        f"int8 graph against float32 ({quantised['tasks']} tasks, {quantised['queries']} queries"
        f"{'' if args.checkpoint else '; untrained weights: pass --checkpoint for accuracy'})",
        ["graph", "bytes", "query accuracy"],
        [
            [name, f"{quantised['bytes'][name]:,}", f"{acc:.4f}"]
            for name, acc in quantised["accuracy"].items()
        ],
    )
    print(
        f"same label {quantised['same_label']:.4f}, largest probability difference "
        f"{quantised['max_probability_difference']:.4f}"
    )
    return {"median": median, "runs": runs, "same_labels": same, "installed": sizes, "int8": quantised}


def _labels(path: Path) -> Optional[list[str]]:
    import csv

    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        return [row["label"] for row in csv.DictReader(handle)]


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--task", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", action="store_true", help="lthmaml-device against lthmaml-edge instead")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="--device: a ProtoNet checkpoint to export"
    )
    parser.add_argument(
        "--int8_tasks", type=int, default=10, help="--device: tasks the int8 accuracy is measured on"
    )
    args = parser.parse_args(argv)
    if args.device:
        with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
            results = {
                "settings": {"threads": args.threads, "repeats": args.repeats},
                **device_path(args, Path(tmp)),
            }
        write_json("edge_launch_device", results, args.json)
        return results
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        folder = Path(tmp)
        artifact, task = (args.artifact, args.task) if args.artifact else default_artifact_and_task(folder)
        common = [
            "-c",
            str(REPO / "configs/edge/pi.yaml"),
            "--data.root",
            str(task),
            "--threads",
            str(args.threads),
        ]
        runs: dict[str, list[dict]] = {"one launch": [], "fit": [], "predict": []}
        for repeat in range(args.repeats):
            out = folder / f"r{repeat}"
            out.mkdir()
            runs["one launch"].append(
                launch(
                    ["fit", *common, "--model.artifact", str(artifact), "--predict_after_fit", "true"], out
                )
            )
            runs["fit"].append(launch(["fit", *common, "--model.artifact", str(artifact)], out))
            tuned = out / "runs" / "edge" / Path(task).resolve().name / "finetuned.safetensors"  # per task
            runs["predict"].append(launch(["predict", *common, "--model.artifact", str(tuned)], out))
    median = {
        name: {key: statistics.median(r[key] for r in rows if r[key] is not None) for key in ("wall_s",)}
        | {
            key: statistics.median([r[key] for r in rows if r[key] is not None] or [float("nan")])
            for key in ("startup_s", "fit_s", "predict_s")
        }  # fmt: skip
        for name, rows in runs.items()
    }
    two = median["fit"]["wall_s"] + median["predict"]["wall_s"]
    rows = [
        [name, f"{m['wall_s']:.2f}", f"{m['startup_s']:.2f}", f"{m['fit_s']:.2f}"]
        for name, m in median.items()
    ]
    print_table(
        f"lthmaml-edge launches ({args.threads} thread(s), medians of {args.repeats})",
        ["launch", "wall (s)", "start-up (s)", "fit (s)"],
        rows,
    )
    one = median["one launch"]["wall_s"]
    print(f"one launch {one:.2f} s vs fit + predict {two:.2f} s: {two / one:.2f}x")
    results = {"settings": {"threads": args.threads, "repeats": args.repeats}, "median": median, "runs": runs}
    write_json("edge_launch", results, args.json)
    return results


if __name__ == "__main__":
    main()
