"""Device launches: start-up against adaptation, and one launch against two.

Every ``lthmaml-edge`` launch pays Python's, torch's and Lightning's start-up before it adapts
anything. This measures, on the edge profile (``configs/edge/pi.yaml``), a fit that also writes
the predictions (``fit --predict_after_fit true``: one launch) against ``fit`` then ``predict``
(two launches): the wall time of each launch as the shell sees it, and the start-up, fit and
predict times the launch logs (``Timings: ...``), medians over ``--repeats`` rounds, the two
ways interleaved. The artifact is a fresh 5-way Conv4 (64 filters) unless ``--artifact``; the
task a 5-way 5-shot one of random glyphs (5 val and 10 query images per class) unless ``--task``:
start-up does not depend on the weights or the pixels, the fit's length (early stopping) does.

    python -m bench.edge_launch                    # ~1-2 minutes
    python -m bench.edge_launch --artifact model.safetensors --task my_task/ --repeats 5
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--task", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
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
