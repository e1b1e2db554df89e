"""Meta-test accuracy against training wall time, per meta-training recipe, from scratch.

Each recipe is a set of ``lthmaml fit`` overrides on a base config (default
``configs/omniglot_5way1shot.yaml``, the shared Omniglot subset). It trains with validation off,
for ``--minutes`` of training wall time, and saves a checkpoint at each of ``--marks`` (minutes of
*training* time: data loading and meta-updates). Afterwards every checkpoint is tested on the
config's fixed meta-test tasks (600, 15 query images per class: mean and 95% CI), so the table
reads "accuracy reached after m minutes of training on one core", and "time to X%" is the first
mark at or above X.

Recipes run one after another in this process, or ``--jobs 2`` at a time as separate processes
(side by side, so they share the machine alike: the ratios between them are the fair figures).

    python -m bench.converge --recipes today shipped --minutes 30 --marks 5 10 20 30
    python -m bench.converge --recipes fo-q1-func so-q1-func --minutes 10 --json bench/out/sweep.json
    python -m bench.converge --quick        # a smoke run on the test data, figures meaningless
    python -m bench.converge --collect runs/converge/*.json --json bench/out/converge.json  # one table
    python -m bench.converge --recipes shipped --marks 5 30 --test-only   # re-test some saved marks

Testing a mark (600 tasks, 15 query images per class, the evaluation inner loop) takes 5-12
minutes on a busy core, so a run with many marks may test only those that matter (``--test-only``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
M = "--model.init_args."
D = "--data.init_args."
RECIPES: dict[str, list[str]] = {
    # configs/omniglot_5way1shot.yaml as it shipped before the sweep: second order, 15 query images
    # per class in training, meta-batch 32, Adam 1e-3, higher.
    "today": [
        *(f"{M}first_order", "false", f"{D}query_shots", "15", f"{M}inner_loop", "higher"),
        *(f"{D}meta_batch_size", "32", f"{M}optimizer.init_args.lr", "0.001"),
    ],
    "so-q15-higher": [f"{M}first_order", "false", f"{D}query_shots", "15", f"{M}inner_loop", "higher"],
    "fo-q1-higher": [f"{M}first_order", "true", f"{D}query_shots", "1", f"{M}inner_loop", "higher"],
    "fo-q1-func": [f"{M}first_order", "true", f"{D}query_shots", "1", f"{M}inner_loop", "func"],
    "so-q1-func": [f"{M}first_order", "false", f"{D}query_shots", "1", f"{M}inner_loop", "func"],
    "so-q1-higher": [f"{M}first_order", "false", f"{D}query_shots", "1", f"{M}inner_loop", "higher"],
    "fo-q1-func-mb16": [
        *(f"{M}first_order", "true", f"{D}query_shots", "1", f"{M}inner_loop", "func"),
        *(f"{D}meta_batch_size", "16"),
    ],
    "fo-q5-func": [f"{M}first_order", "true", f"{D}query_shots", "5", f"{M}inner_loop", "func"],
    "fo-q1-func-mb8": [
        *(f"{M}first_order", "true", f"{D}query_shots", "1", f"{M}inner_loop", "func"),
        *(f"{D}meta_batch_size", "8"),
    ],
    "so-q1-func-mb8": [
        *(f"{M}first_order", "false", f"{D}query_shots", "1", f"{M}inner_loop", "func"),
        *(f"{D}meta_batch_size", "8"),
    ],
    "fo-q1-func-mb8-lr3e-3": [
        *(f"{M}first_order", "true", f"{D}query_shots", "1", f"{M}inner_loop", "func"),
        *(f"{D}meta_batch_size", "8", f"{M}optimizer.init_args.lr", "0.003"),
    ],
    "fo-q1-func-lr3e-3": [
        *(f"{M}first_order", "true", f"{D}query_shots", "1", f"{M}inner_loop", "func"),
        *(f"{M}optimizer.init_args.lr", "0.003"),
    ],
    # Augmentation (any learner's config): Koch et al.'s affine distortions of meta-training images.
    "affine": [f"{D}augment_affine", "true"],
    "no-affine": [f"{D}augment_affine", "false"],
    # ProtoNet sweep (with the affine distortions): Snell et al. train on wider episodes than they
    # test; easyfsl's logits are minus the Euclidean distance, not its square.
    "affine-euclid": [f"{D}augment_affine", "true", f"{M}distance", "euclidean"],
    "squared": [f"{M}distance", "squared"],  # Snell et al.'s, what the 20-way config took before
    "affine-wide40": [f"{D}augment_affine", "true", f"{D}train_ways", "40", f"{D}meta_batch_size", "1"],
    "affine-w128": [f"{D}augment_affine", "true", f"{M}net.init_args.hidden_channels", "128"],
    # The 20-way config halves its learning rate every 2000 updates (Snell et al.); this keeps it.
    "constant-lr": [f"{M}lr_scheduler", "null"],
    # MAML 20-way (configs/omniglot_20way1shot.yaml) as Finn et al. set it: five inner steps of 0.1
    # (five at evaluation), 16 tasks an update, no affine distortions.
    "finn-20way": [
        *(f"{M}inner_steps", "5", f"{M}inner_lr", "0.1", f"{M}eval_inner_steps", "5"),
        *(f"{D}meta_batch_size", "16", f"{D}augment_affine", "false"),
    ],
    # Within one alphabet: meta-training tasks drawn as the test draws them (one script each).
    "train-within": [f"{D}train_task_sampling", "within_alphabet"],
    # Within one alphabet: one more training alphabet (Latin) taken from validation; the two test
    # alphabets stay, so the test tasks are the same. Koch et al. trained on 40 alphabets.
    "five-alphabets": [f"{D}class_split", "[5, 1, 2]"],
    # ProtoNet: three conv blocks instead of four. At 28 pixels the fourth block pools a 3x3 map to
    # one pixel; without it the embedding keeps where the strokes are (576 features, not 64), for
    # a little less compute.
    "blocks3": [f"{M}net.init_args.blocks", "3"],
}
"""Named recipes of the sweep (CLI overrides); ``shipped`` is whatever the base config says now."""
RECIPES["shipped"] = []


class TrainingTimeMarks(Callback):
    """Saves ``t<minutes>.ckpt`` when the fit's training wall time passes each mark, then stops.

    Training time is summed over training batches (data loading included), so validation, if
    any, does not count.
    """

    def __init__(self, dirpath: str, marks: list[float]) -> None:
        self.dirpath, self.marks = Path(dirpath), sorted(marks)
        self.trained = 0.0
        self.steps: dict[float, int] = {}
        self._last: Optional[float] = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._last = self._last or time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        self.trained += now - (self._last or now)
        self._last = now
        while self.marks and self.trained >= 60 * self.marks[0]:
            mark = self.marks.pop(0)
            trainer.save_checkpoint(self.dirpath / f"t{mark:g}.ckpt")
            self.steps[mark] = trainer.global_step
            (self.dirpath / "steps.json").write_text(json.dumps({str(k): v for k, v in self.steps.items()}))
        if not self.marks:
            trainer.should_stop = True

    def on_validation_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._last = None  # time outside the training batches does not count

    on_train_epoch_end = on_validation_start


def train_and_test(name: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One recipe: fit until the last mark, then test every mark's checkpoint. Progress on stderr."""
    from lthmaml.cli import main as lthmaml

    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    marks = [str(m) for m in args.marks]
    fit = ["fit", "-c", args.config, *args.extra, *overrides, "--threads", str(args.threads)]
    fit += ["--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
    fit += ["--checkpoint.monitor", "null", "--trainer.default_root_dir", str(out)]
    fit += ["--trainer.enable_progress_bar", "false"]
    fit += ["--trainer.num_sanity_val_steps", "0", "--trainer.callbacks+=bench.converge.TrainingTimeMarks"]
    fit += ["--trainer.callbacks.dirpath", str(out), "--trainer.callbacks.marks", f"[{','.join(marks)}]"]
    if not args.test_only:
        print(
            f"converge: {name}: training {args.marks[-1]:g} min ({' '.join(overrides) or 'base config'})",
            file=sys.stderr,
        )
    start = time.perf_counter()
    if args.test_only:  # the checkpoints of an earlier run of this recipe, some of its marks
        print(f"converge: {name}: testing the marks {marks} of {out}", file=sys.stderr)
    else:
        lthmaml(fit)
    wall = None if args.test_only else time.perf_counter() - start
    steps = json.loads((out / "steps.json").read_text())
    rows = []
    for mark in args.marks:
        checkpoint = out / f"t{mark:g}.ckpt"
        test = ["test", "-c", args.config, *args.extra, *overrides, "--threads", str(args.threads)]
        test += [
            "--ckpt_path",
            str(checkpoint),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
        results = test_checkpoint(test)
        rows.append({"minutes": mark, "steps": steps.get(f"{mark}", steps.get(str(mark))), **results})
        print(f"converge: {name}: {mark:g} min: {format_row(rows[-1])}", file=sys.stderr)
    return {"recipe": name, "overrides": overrides, "wall_s": wall, "marks": rows}


def test_checkpoint(test_args: list[str]) -> dict[str, float]:
    from lthmaml.cli import LthmamlCLI, command

    captured: dict[str, float] = {}

    class Capture(LthmamlCLI):
        def after_test(self) -> None:
            captured.update(self.model.test_results)

    command(test_args, Capture, save_config_callback=None)
    return captured


def format_row(row: dict[str, Any]) -> str:
    if "acc_post" in row:
        return (
            f"{100 * row['acc_post']:.2f} ± {100 * row['acc_post_ci95']:.2f} % after {row['steps']} updates"
        )
    return f"MSE {row['loss_post']:.4f} ± {row['loss_post_ci95']:.4f} after {row['steps']} updates"


def time_to(result: dict[str, Any], target: float) -> Optional[float]:
    """The first mark (minutes) whose accuracy is at least ``target``."""
    return next((r["minutes"] for r in result["marks"] if r.get("acc_post", -1) >= target), None)


def table(results: list[dict[str, Any]], targets: tuple[float, ...] = (0.9, 0.95)) -> str:
    marks = sorted({r["minutes"] for result in results for r in result["marks"]})
    head = "| recipe | " + " | ".join(f"{m:g} min" for m in marks)
    head += " | " + " | ".join(f"time to {100 * t:g} %" for t in targets) + " |"
    lines = [head, "|" + "---|" * (1 + len(marks) + len(targets))]
    for result in results:
        by_mark = {r["minutes"]: r for r in result["marks"]}
        cells = []
        for mark in marks:
            row = by_mark.get(mark)
            cells.append(
                ""
                if row is None
                else f"{100 * row['acc_post']:.1f} ± {100 * row['acc_post_ci95']:.1f} ({row['steps']})"
            )
        for target in targets:
            reached = time_to(result, target)
            cells.append("not within the budget" if reached is None else f"≤ {reached:g} min")
        lines.append(f"| {result['recipe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.converge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["today", "shipped"], choices=sorted(RECIPES))
    parser.add_argument("--config", default=str(REPO / "configs" / "omniglot_5way1shot.yaml"))
    parser.add_argument("--marks", nargs="+", type=float, default=[5, 10, 20, 30], help="minutes of training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="recipes trained side by side (processes)")
    parser.add_argument("--out", default="runs/converge", help="checkpoints per recipe")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny marks, few test tasks")
    parser.add_argument(
        "--test-only",
        action="store_true",
        help="no training: test these --marks of an earlier run's checkpoints under --out",
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        default=None,
        help="only print the table of these result JSONs (and --json them)",
    )
    parser.add_argument("extra", nargs="*", help="more lthmaml overrides for every recipe (after --)")
    args = parser.parse_args(argv)
    if args.quick:
        args.marks = [0.05, 0.1]
        args.extra = [
            *args.extra,
            f"{D}test_tasks",
            "20",
            f"{D}meta_batch_size",
            "4",
            f"{D}tasks_per_epoch",
            "400",
        ]
    args.marks = sorted(args.marks)
    if args.collect:
        results = [r for file in args.collect for r in json.loads(Path(file).read_text())["results"]]
    elif args.jobs > 1 and len(args.recipes) > 1:
        results = run_side_by_side(args)
    else:
        results = [train_and_test(name, RECIPES[name], args) for name in args.recipes]
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from lthmaml.environment import machine_info

        Path(args.json).write_text(json.dumps({"machine": machine_info(), "results": results}, indent=2))
    return 0


def run_side_by_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--jobs`` recipes at a time, each in its own process writing its own JSON."""
    pending, running, files = list(args.recipes), [], {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            files[name] = Path(args.out) / f"{name}.json"
            command = [sys.executable, "-m", "bench.converge", "--recipes", name, "--config", args.config]
            command += ["--marks", *map(str, args.marks), "--threads", str(args.threads), "--out", args.out]
            command += ["--test-only"] if args.test_only else []
            command += ["--json", str(files[name]), *(["--", *args.extra] if args.extra else [])]
            running.append(subprocess.Popen(command, cwd=REPO))
        time.sleep(5)
        running = [p for p in running if p.poll() is None]
    return [json.loads(files[name].read_text())["results"][0] for name in args.recipes]


if __name__ == "__main__":
    sys.exit(main())
