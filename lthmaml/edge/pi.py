"""``make pi-finetune``: fine-tune the latest run's pruned net on one task as a Raspberry Pi would.

    python -m lthmaml.edge.pi [--artifact A.safetensors] [--task FOLDER] [lthmaml-edge options]

Without ``--artifact``: the newest ``runs/*/version_*/checkpoints/last.ckpt``, exported (once, or
again when the checkpoint is newer) to ``last.safetensors`` beside it. Without ``--task``: a task
is built once into that run folder (``edge_task/``): for a regression net one sinusoid of the
MAML distribution (5 support, 5 val, 50 query points); for a classifier ``ways`` classes of the
run's Omniglot *meta-test* split (its ``config.yaml`` class split, so classes it never trained on),
5 support, 5 val and 10 query images each. Exporting and building the task are the server's
part: they run in a child process, so the fine-tuning process holds only what a device would,
and its peak memory is the device's. Fine-tuning runs with ``configs/edge/pi.yaml`` through
the ``lthmaml-edge fit`` machinery, so its files go to ``runs/edge/<task folder name>/``
(``runs/edge/edge_task/`` for the built task); further arguments go to it (e.g.
``--trainer.max_epochs 5``).

Printed: epochs run, best epoch, wall time of the fit, peak resident memory of the process
(``resource.getrusage``: torch's import included, which dominates for small nets), and the query
accuracy (MSE for regression) before and after fine-tuning. A ProtoNet, MatchingNet or CNP artifact
adapts in one forward pass over the support set: epochs run 0, "before" is the artifact's weights
adapted to the support set, and "after" differs from it only with ``--model.fine_tune_embedding true``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml

from lthmaml.commands import interrupted_quietly, quiet_third_party
from lthmaml.edge.cli import EdgeCLI, run_cli
from lthmaml.errors import ConfigError, DataError, one_line_errors

PROG = "pi-finetune"
DEFAULT_CONFIG = Path("configs") / "edge" / "pi.yaml"
"""Relative to the working directory: ``make pi-finetune`` runs from the repository root."""
SHARED_OMNIGLOT = Path("..") / "shared" / "data" / "omniglot"
"""Where the project's Omniglot subset lies beside a checkout (``$LTHMAML_OMNIGLOT`` overrides it)."""
TASK_FOLDER = "edge_task"
SINUSOID_COUNTS = {"shots": 5, "val_shots": 5, "query_shots": 50}
OMNIGLOT_COUNTS = {"shots": 5, "val_shots": 5, "query_shots": 10}  # 20 drawers per character


class PiFinetuneCLI(EdgeCLI):
    """``lthmaml-edge fit`` that also tests the query before and after, and times the fit."""

    figures: dict[str, Any]

    def before_fit(self) -> None:
        self.figures = {"before": self._query_metrics()}
        super().before_fit()  # the fit's clock starts here

    def after_fit(self) -> None:
        self.figures["wall_s"] = time.perf_counter() - self.fit_started
        super().after_fit()
        self.figures["after"] = self._query_metrics()

    def _query_metrics(self) -> Optional[dict[str, float]]:
        self.datamodule.setup()
        if not self.datamodule.query_labelled:
            return None
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        return dict(self.model.test_results)


# ---------------------------------------------------------------------------------- what to run
def latest_checkpoint(runs: Path) -> Path:
    candidates = sorted(runs.glob("*/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(
            f"no meta-trained run under {runs}/ (runs/*/version_*/checkpoints/last.ckpt): run `make run` "
            "first, or pass ARTIFACT=model.safetensors TASK=folder"
        )
    return candidates[-1]


def artifact_of(checkpoint: Path) -> Path:
    """``last.safetensors`` beside the checkpoint, exported when missing or older than it."""
    from lthmaml.edge.export import export_checkpoint

    artifact = checkpoint.with_suffix(".safetensors")
    if not artifact.is_file() or artifact.stat().st_mtime < checkpoint.stat().st_mtime:
        export_checkpoint(checkpoint, artifact)
        print(f"{PROG}: exported {checkpoint} to {artifact}")
    return artifact


def build_task(artifact: Path, run_dir: Path, seed: int = 0) -> Path:
    """The run folder's demo task (built on first use): see the module docstring."""
    from lthmaml.data.taskfolder_build import make_sinusoid_task, omniglot_task
    from lthmaml.edge.artifact import load_artifact

    task = run_dir / TASK_FOLDER
    if task.is_dir() and any(task.iterdir()):
        return task
    metadata = load_artifact(artifact).metadata
    if metadata.task == "regression":
        made = make_sinusoid_task(task, seed=seed, **SINUSOID_COUNTS)
    else:
        images, classes = meta_test_classes(run_dir, metadata.architecture["init_args"].get("image_size", 28))
        made = omniglot_task(task, images, classes, ways=metadata.ways, seed=seed, **OMNIGLOT_COUNTS)
    print(f"{PROG}: built the task {made}")
    return made


def meta_test_classes(run_dir: Path, image_size: int):
    """The Omniglot classes of the run's meta-test split (its config.yaml data settings)."""
    from lthmaml.data.omniglot import load_omniglot, split_classes

    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    data = ((config or {}).get("data") or {}).get("init_args") or {}
    roots = [Path(data["root"])] if data.get("root") else []
    roots.append(Path(os.environ.get("LTHMAML_OMNIGLOT") or SHARED_OMNIGLOT))
    root = next((r for r in roots if r.is_dir()), None)
    if root is None:
        raise DataError(
            f"no Omniglot data at {' or '.join(map(str, roots))} to build a task from: download it with "
            "`lthmaml-data omniglot --root DIR`, or pass TASK=folder"
        )
    omniglot = load_omniglot(root, image_size)
    split = split_classes(
        omniglot.classes,
        data.get("class_split", (0.6, 0.2, 0.2)),
        data.get("split_seed", 0),
        data.get("split_by_alphabet", False),
    )["test"]
    return omniglot.images[split], [omniglot.classes[i] for i in split]


# ---------------------------------------------------------------------------------- report
def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def seconds(wall: float) -> str:
    """Milliseconds below a second, where a one-pass adaptation's wall time lies."""
    return f"{wall:.2f} s" if wall >= 1 else f"{wall * 1000:.1f} ms"


def report(cli: PiFinetuneCLI, artifact: Path, task: Path) -> str:
    model, figures = cli.model, cli.figures
    metric, key = ("MSE", "loss") if model.regression else ("accuracy", "acc")

    def query(stage: str) -> str:
        values = figures.get(stage)
        if values is None:
            return "n/a (the query is unlabelled)"
        adapted = model.amortized and stage == "before"  # nothing to score before the support pass
        return f"{values[key]:.4f}{' (the artifact, adapted to the support set)' if adapted else ''}"

    if model.adapt_only:
        epochs = f"0 (adapted: {model.support_summary()}, one forward pass, no backward)"
        best = "n/a (no training)"
    elif model.fixed_steps is not None:
        epochs = f"{model.epochs_run} (no val split: eval_inner_steps={model.fixed_steps} full-batch steps)"
        best = "n/a (no val split)"
    else:
        epochs = f"{model.epochs_run} of max {cli.trainer.max_epochs}"
        best = (
            f"{model.best_epoch} ({model.best.monitor} {model.best_score:.4f})" if model.best_epoch else "n/a"
        )
    rows = [
        ("epochs run", epochs),
        ("best epoch", best),
        ("wall time", f"{seconds(figures['wall_s'])} (fit, threads={cli.config['fit'].get('threads')})"),
        ("peak resident memory", f"{peak_rss_mib():.1f} MiB (whole process)"),
        (f"{metric} before", query("before")),
        (f"{metric} after", query("after")),
    ]
    lines = [f"{PROG}: {artifact} fine-tuned on {task} ({cli.datamodule.summary()})"]
    lines += [f"  {name:<22}{value}" for name, value in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lthmaml.edge.pi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="", help="artifact to fine-tune (default: the latest run's)")
    parser.add_argument("--task", default="", help="task folder (default: built from the latest run)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="edge config (default: %(default)s)")
    parser.add_argument("--runs", default="runs", help="where runs are looked for (default: %(default)s)")
    # the server's part, run in a child process by prepare(): export CHECKPOINT, build its task
    parser.add_argument("--prepare-only", default=None, metavar="CHECKPOINT", help=argparse.SUPPRESS)
    parser.add_argument("--with-task", action="store_true", help=argparse.SUPPRESS)
    return parser


def prepare(checkpoint: Path, task_given: bool) -> tuple[Path, Optional[Path]]:
    """The server's part, in a child process when there is work to do (exporting reads the whole
    checkpoint, building a task the Omniglot zip): the device's process then holds only what a
    device would, and its peak memory is the device's."""
    run_dir = checkpoint.parent.parent
    artifact = checkpoint.with_suffix(".safetensors")
    stale = not artifact.is_file() or artifact.stat().st_mtime < checkpoint.stat().st_mtime
    task = run_dir / TASK_FOLDER
    if stale or not (task_given or (task.is_dir() and any(task.iterdir()))):
        command = [sys.executable, "-m", "lthmaml.edge.pi", "--prepare-only", str(checkpoint)]
        subprocess.run([*command, *([] if task_given else ["--with-task"])], check=True)
    return artifact, None if task_given else task


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    quiet_third_party()  # in the child that exports too: Lightning's tips, torch's LeafSpec notice
    with interrupted_quietly(PROG), one_line_errors(PROG):
        if args.prepare_only:  # in the child: export, build the task, nothing else
            checkpoint = Path(args.prepare_only)
            artifact = artifact_of(checkpoint)
            if args.with_task:
                build_task(artifact, checkpoint.parent.parent)
            return 0
        task: Optional[Path] = Path(args.task) if args.task else None
        if args.artifact:
            artifact = Path(args.artifact)
        else:
            artifact, built = prepare(latest_checkpoint(Path(args.runs)), task is not None)
            task = task or built
        if task is None:
            raise ConfigError(
                "with ARTIFACT given, give TASK too (a task folder; see lthmaml.data.taskfolder)"
            )
        if not Path(args.config).is_file():
            raise ConfigError(
                f"--config {args.config}: no such edge config; run from the repository root "
                "(make pi-finetune) or pass --config configs/edge/pi.yaml"
            )
        from lthmaml.edge.artifact import load_artifact

        init_args = load_artifact(artifact).metadata.architecture.get("init_args", {})
        sizes = ["--data.image_size", str(init_args["image_size"])] if "image_size" in init_args else []
        cli_args = ["fit", "-c", args.config, "--model.artifact", str(artifact), "--data.root", str(task)]
        with warnings.catch_warnings():  # our own args, not sys.argv's, are the CLI's: meant so
            warnings.filterwarnings("ignore", ".*args parameter is intended to run from within Python.*")
            cli = run_cli([*cli_args, *sizes, *extra], PiFinetuneCLI)
        print(report(cli, artifact, task), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
