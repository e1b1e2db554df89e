"""The meta-learners side by side, dense and as an 80% lottery ticket (docs/benchmarks.md,
"Learners compared").

For each learner of ``--learners`` (MAML, ProtoNet, MatchingNet at 5-way and 20-way 1-shot on the
shared Omniglot subset, each from its shipped config):

- ``--part adapt`` (seconds; no data needed): the device's cost of adapting to one 1-shot task,
  measured on the artifact as ``lthmaml-edge`` loads it, dense and with 80% of its prunable
  weights removed by global magnitude: the median wall time of adapting (MAML: its evaluation
  inner steps of SGD on the support set, masks kept; ProtoNet / MatchingNet: one forward pass
  giving the prototypes / support embeddings) over ``--repeats`` tasks on one thread, and the
  peak resident memory of a fresh process that loads the artifact and adapts (``ru_maxrss``,
  torch's import included) with the part of it the adaptation adds. The images are random
  tensors of the task's shape (the compute is the same for any pixels), the same for every learner.
  With ``--checkpoints DIR`` the artifacts are the ``train`` part's trained rounds instead.
- ``--part train`` (``--minutes`` per round per learner): ``lthmaml fit`` of the config with a
  one-shot lottery ticket (``LotteryTicket``: rounds 1, prune_rate 0.8, the output layer at half
  rate, rewound to init, or with ``--rewind-to K`` to the weights after ``K`` meta-updates of the
  dense round: late rewinding; ``--rewind-to none``: not rewound, the pruned dense net trained
  on), each round the whole epochs closest to ``--minutes`` of meta-updates
  measured on this machine by a short calibration fit (``--epochs N`` instead: N epochs, for runs
  of separate commands that must pair), every round tested on the config's 600 meta-test tasks.
  Reported: meta-test accuracy (mean ± 95% CI) of the dense round and the 80% ticket, and the
  round's training wall time.

    python -m bench.learners --part adapt                      # ~2 minutes on one core
    python -m bench.learners --part train --minutes 20         # 40 minutes per learner
    python -m bench.learners --part train --learners protonet-5way protonet-20way --minutes 20
    python -m bench.learners --part train --learners maml-20way --epochs 6 --rewind-to 100
    python -m bench.learners --collect bench/out/learners-*.json   # one table
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
SPARSITY = 0.8
LEARNERS: dict[str, tuple[str, list[str]]] = {
    # name: (config, overrides)
    "maml-5way": ("configs/omniglot_5way1shot.yaml", []),
    "protonet-5way": ("configs/protonet_5way1shot.yaml", []),
    "matching-5way": ("configs/matching_5way1shot.yaml", []),
    "maml-20way": ("configs/omniglot_20way1shot.yaml", []),
    "protonet-20way": ("configs/protonet_20way1shot.yaml", []),
    "protonet-within-20way": (  # tasks drawn within one alphabet never seen in meta-training
        "configs/protonet_20way1shot.yaml",
        ["-c", str(REPO / "configs" / "protonet_20way1shot_within.yaml")],
    ),
    "protonet-train60-20way": (  # Snell et al.'s Omniglot training: 60-way episodes, 5 queries a class
        "configs/protonet_20way1shot.yaml",
        [
            *("--data.init_args.train_ways", "60", "--data.init_args.meta_batch_size", "1"),
            *("--data.init_args.tasks_per_epoch", "200"),
        ],
    ),
    "matching-20way": (
        "configs/matching_5way1shot.yaml",
        ["--data.init_args.ways", "20", "--data.init_args.meta_batch_size", "2"],
    ),
}
"""The compared learners: a shipped config and the overrides that make it the named task."""


# ---------------------------------------------------------------------------- building the nets
def build_module(name: str, extra: Optional[list[str]] = None) -> tuple[torch.nn.Module, dict]:
    """The learner's LightningModule as its config builds it (seeded), and the config's data section."""
    from lthmaml.cli import command

    config, overrides = LEARNERS[name]
    cli = command(
        ["-c", str(REPO / config), *overrides, *(extra or [])], run=False, save_config_callback=None
    )
    return cli.model, cli.config["data"]["init_args"]


def artifacts_from_configs(names: list[str], folder: Path) -> dict[tuple[str, float], Path]:
    """Each learner's freshly initialised net, dense and pruned, exported as a device would get it."""
    from lthmaml import sparsity
    from lthmaml.edge.export import export_net

    paths = {}
    for name in names:
        for fraction in (0.0, SPARSITY):
            module, data = build_module(name)
            if fraction:  # a head at half rate, as the LTH papers prune it
                rates = {"net.head": 0.5} if module_has_head(module) else None
                sparsity.prune_by_magnitude(module, fraction, layer_rates=rates)
            path = folder / f"{name}-{fraction:g}.safetensors"
            export_net(module, path, metadata={"ways": data["ways"]} if module_has_head(module) else None)
            paths[(name, fraction)] = path
    return paths


def module_has_head(module: torch.nn.Module) -> bool:
    return getattr(module.net, "head", None) is not None


def ways_of(name: str) -> int:
    """``protonet-20way`` -> 20."""
    return int(name.rsplit("-", 1)[1].removesuffix("way"))


# ---------------------------------------------------------------------------- adapting on the device
def random_task(ways: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-shot support set of random images: ``ways`` images, labels ``0..ways-1``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(ways, channels, size, size, generator=generator), torch.arange(ways)


def adapt_once(module: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    """What ``lthmaml-edge`` does to a task's support set before it predicts, on its
    :class:`~lthmaml.edge.finetune.FineTuneModule` (its optimizer, loss and masks), without the
    Trainer around it: the prototypes / support embeddings, or the evaluation inner steps."""
    from lthmaml.edge.amortized import SupportAdapter
    from lthmaml.sparsity import apply_masks, mask_gradients

    adapter = SupportAdapter.for_task(module.metadata, y, "bench")
    if adapter is not None:
        adapter.adapt(module.net, x, y)
        return
    optimizer = module.configure_optimizers()
    for _ in range(module.metadata.eval_inner_steps):
        loss = module.loss(module.net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mask_gradients(module.net)  # as FineTuneModule: before the step and after it
        optimizer.step()
        apply_masks(module.net, [optimizer])


def measure_adaptation(path: Path, ways: int, repeats: int) -> dict[str, Any]:
    """In this (fresh) process: load, adapt ``repeats`` tasks from the loaded weights, time each."""
    import copy
    import resource

    from lthmaml.edge.finetune import FineTuneModule

    torch.set_num_threads(1)
    module = FineTuneModule(artifact=str(path))
    architecture = module.metadata.architecture["init_args"]
    channels, size = architecture.get("in_channels", 1), architecture.get("image_size", 28)
    weights = copy.deepcopy(module.net.state_dict())
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for seed in range(repeats + 2):  # two warm-up tasks
        x, y = random_task(ways, channels, size, seed)
        module.net.load_state_dict(weights)
        start = time.perf_counter()
        adapt_once(module, x, y)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "learner": module.metadata.learner,
        "ways": ways,
        "sparsity": module.metadata.sparsity,
        "artifact_bytes": path.stat().st_size,
        "adapt_ms": 1000 * statistics.median(times[2:]),
        "adapt_ms_min": 1000 * min(times[2:]),
        "peak_rss_mib": peak,
        "adapt_rss_mib": peak - loaded,
    }


def adaptation_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoints:
            paths = artifacts_from_checkpoints(args.learners, Path(args.checkpoints), Path(tmp))
        else:
            paths = artifacts_from_configs(args.learners, Path(tmp))
        rows = []
        for (name, fraction), path in paths.items():
            command = [sys.executable, "-m", "bench.learners", "--measure", str(path)]
            command += ["--ways", str(ways_of(name)), "--repeats", str(args.repeats)]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
            row = {"name": name, "pruned": fraction, **json.loads(done.stdout.strip().splitlines()[-1])}
            print(
                f"learners: {name} at {fraction:.0%}: {row['adapt_ms']:.1f} ms, "
                f"{row['peak_rss_mib']:.0f} MiB peak",
                file=sys.stderr,
            )
            rows.append(row)
    return rows


def artifacts_from_checkpoints(names: list[str], root: Path, folder: Path) -> dict[tuple[str, float], Path]:
    """The ``train`` part's rounds (round 0 dense, round 1 the ticket), exported."""
    from lthmaml.edge.export import export_checkpoint

    paths = {}
    for name in names:
        for index, fraction in enumerate((0.0, SPARSITY)):
            checkpoint = root / name / "rounds" / f"round_{index:02d}" / "model.ckpt"
            paths[(name, fraction)] = export_checkpoint(
                checkpoint, folder / f"{name}-{fraction:g}.safetensors"
            )
    return paths


# ---------------------------------------------------------------------------- meta-training
class UpdateClock(Callback):
    """Training time (data loading and meta-update, nothing else) summed batch by batch: the
    cumulative seconds after each global step, written to ``path`` when the fit ends."""

    def __init__(self, path: str) -> None:
        self.path, self.elapsed, self.at_step = Path(path), 0.0, {}
        self._start: Optional[float] = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.elapsed += time.perf_counter() - (self._start or time.perf_counter())
        self.at_step[trainer.global_step] = self.elapsed

    def on_fit_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.path.write_text(json.dumps(self.at_step))


def seconds_per_update(name: str, folder: Path, updates: int = 12) -> float:
    """The median time of a meta-update of ``name`` here, from a short fit (first 3 left out)."""
    clock = folder / f"{name}-calibration.json"
    config, overrides = LEARNERS[name]
    with tempfile.TemporaryDirectory(prefix="calibration-", dir=folder) as scratch:  # nothing kept
        calibrate(config, overrides, updates, Path(scratch), clock)
    times = sorted((int(step), t) for step, t in json.loads(clock.read_text()).items())
    return statistics.median(b - a for (_, a), (_, b) in zip(times[2:], times[3:]))


def calibrate(config: str, overrides: list[str], updates: int, scratch: Path, clock: Path) -> None:
    """A fit of ``updates`` meta-updates without validation, its update times written to ``clock``."""
    from lthmaml.cli import main as lthmaml

    lthmaml(
        [
            *("fit", "-c", str(REPO / config), *overrides, "--threads", "1"),
            *("--trainer.max_steps", str(updates), "--trainer.max_epochs", "-1"),
            *(
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger",
                "false",
                "--checkpoint.monitor",
                "null",
            ),
            *(
                "--trainer.default_root_dir",
                str(scratch),
                "--trainer.enable_progress_bar",
                "false",
            ),
            *("--trainer.callbacks+=bench.learners.UpdateClock", "--trainer.callbacks.path", str(clock)),
        ]
    )


def epochs_for(updates: float, updates_per_epoch: int) -> int:
    """Whole epochs closest to ``updates`` meta-updates (at least one). A round keeps its best
    validated weights, and the configs validate at each epoch's end: a round of whole epochs ends
    on a validation, where one of 451 steps of 250-update epochs keeps its validation at step 250."""
    return max(1, round(updates / updates_per_epoch))


def train_one(
    name: str, minutes: float, root: Path, rewind_to: str = "init", epochs: Optional[int] = None
) -> dict[str, Any]:
    """The dense round and the 80% ticket of ``name``, each about ``minutes`` of meta-updates long
    (whole epochs; ``epochs`` fixes their number instead, so that runs of separate commands pair),
    the ticket's weights rewound to ``rewind_to`` (``init`` or a step)."""
    from lthmaml.cli import main as lthmaml

    root.mkdir(parents=True, exist_ok=True)
    config, overrides = LEARNERS[name]
    module, data = build_module(name)
    per_epoch = data["tasks_per_epoch"] // data["meta_batch_size"]
    if epochs is None:
        epochs = epochs_for(60 * minutes / seconds_per_update(name, root), per_epoch)
    rates = "{net.head: 0.5}" if module_has_head(module) else "{}"
    clock = root / f"{name}-clock.json"
    print(
        f"learners: {name}: 2 rounds of {epochs} epochs of {per_epoch} meta-updates",
        file=sys.stderr,
    )
    lthmaml(
        [
            *("fit", "-c", str(REPO / config), *overrides, "--threads", "1", "--trainer.max_epochs", "-1"),
            *("--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", name),
            *("--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false"),
            *("--trainer.callbacks+=callbacks.LotteryTicket", "--trainer.callbacks.rounds", "1"),
            *(
                "--trainer.callbacks.prune_rate",
                str(SPARSITY),
                "--trainer.callbacks.epochs_per_round",
                str(epochs),
            ),
            *("--trainer.callbacks.test_each_round", "true", "--trainer.callbacks.layer_rates", rates),
            *("--trainer.callbacks.rewind_to", rewind_to),
            *("--trainer.callbacks+=bench.learners.UpdateClock", "--trainer.callbacks.path", str(clock)),
        ]
    )
    elapsed = {int(step): t for step, t in json.loads(clock.read_text()).items()}
    rounds = []
    for index in (0, 1):
        record = json.loads(
            (root / name / "version_0" / "rounds" / f"round_{index:02d}" / "metrics.json").read_text()
        )
        start, end = record.get("round_start_step") or 0, record["global_step"]
        rounds.append(
            {
                "sparsity": record["sparsity"],
                "updates": end - start,
                "train_minutes": (elapsed.get(end, 0.0) - elapsed.get(start, 0.0)) / 60,
                "test_acc": record["test_metrics"].get("test/acc_post"),
                "test_acc_ci95": record["test_metrics"].get("test/acc_post_ci95"),
            }
        )
    return {"name": name, "rewind_to": rewind_to, "rounds": rounds}


# ---------------------------------------------------------------------------- the table
def table(adapt: list[dict[str, Any]], train: list[dict[str, Any]]) -> str:
    """One row per (learner, sparsity): accuracy, training time, adaptation time and memory."""
    trained = {(t["name"], index): r for t in train for index, r in enumerate(t["rounds"])}
    lines = [
        "| learner | ways | weights pruned | meta-test accuracy (%) | meta-training (min, updates) "
        "| adaptation per task (ms) | peak memory (MiB; adaptation's part) | artifact (KiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys([row["name"] for row in adapt] + [t["name"] for t in train]))
    for name in names:
        for index, fraction in enumerate((0.0, SPARSITY)):
            cells = [name.rsplit("-", 1)[0], str(ways_of(name)), f"{fraction:.0%}"]
            round_ = trained.get((name, index))
            if round_ and round_["test_acc"] is not None:
                cells.append(f"{100 * round_['test_acc']:.1f} ± {100 * (round_['test_acc_ci95'] or 0):.1f}")
                cells.append(f"{round_['train_minutes']:.1f} ({round_['updates']})")
            else:
                cells += ["", ""]
            row = next((r for r in adapt if r["name"] == name and r["pruned"] == fraction), None)
            if row:
                cells += [f"{row['adapt_ms']:.1f}", f"{row['peak_rss_mib']:.0f} ({row['adapt_rss_mib']:.1f})"]
                cells.append(f"{row['artifact_bytes'] / 1024:.0f}")
            else:
                cells += ["", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(adapt: list[dict[str, Any]]) -> list[str]:
    """MAML's adaptation time over each metric learner's, per ways and sparsity."""
    lines = []
    for row in adapt:
        learner, ways = row["name"].rsplit("-", 1)
        maml = next((r for r in adapt if r["name"] == f"maml-{ways}" and r["pruned"] == row["pruned"]), None)
        if maml and learner != "maml":
            lines.append(
                f"{learner} {ways} at {row['pruned']:.0%}: {row['adapt_ms']:.1f} ms, "
                f"{maml['adapt_ms'] / row['adapt_ms']:.0f}x less than MAML's {maml['adapt_ms']:.1f} ms"
            )
    return lines


def rewind_point(text: str) -> str:
    """``init``, ``none`` or a whole number of meta-updates, checked before any training."""
    if text not in ("init", "none") and not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected init, none or a number of meta-updates > 0, got {text!r}")
    return text


def whole_epochs(text: str) -> int:
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"expected a number of epochs > 0, got {text!r}")
    return int(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learners", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["adapt", "train", "both"], default="adapt")
    parser.add_argument("--learners", nargs="+", default=list(LEARNERS), choices=list(LEARNERS))
    parser.add_argument("--minutes", type=float, default=20.0, help="meta-training per round (train part)")
    parser.add_argument(
        "--epochs",
        type=whole_epochs,
        default=None,
        help="epochs a round instead of calibrating --minutes (train part)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="tasks timed per artifact (adapt part)")
    parser.add_argument("--checkpoints", default=None, help="adapt the train part's rounds under this folder")
    parser.add_argument("--out", default="runs/learners", help="the train part's run folders")
    parser.add_argument(
        "--rewind-to",
        default="init",
        type=rewind_point,
        help="the ticket's weights: init, those after this many meta-updates (late rewinding), or none "
        "(the dense round's trained weights pruned and trained on: fine-tuning, not a lottery ticket)",
    )
    parser.add_argument(
        "--json", default=None, help="write the results here (default bench/out/learners.json)"
    )
    parser.add_argument("--collect", nargs="+", default=None, help="only merge these JSONs into one table")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one artifact, in a fresh process
    parser.add_argument("--ways", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_adaptation(Path(args.measure), args.ways, args.repeats)))
        return 0
    if args.collect:
        loaded = [json.loads(Path(file).read_text()) for file in args.collect]
        adapt = [row for data in loaded for row in data.get("adapt", [])]
        train = [row for data in loaded for row in data.get("train", [])]
    else:
        adapt = adaptation_part(args) if args.part in ("adapt", "both") else []
        train = (
            [
                train_one(name, args.minutes, Path(args.out), args.rewind_to, args.epochs)
                for name in args.learners
            ]
            if args.part != "adapt"
            else []
        )
    print(table(adapt, train))
    for line in speedups(adapt):
        print(line)
    from lthmaml.environment import machine_info

    path = Path(args.json) if args.json else OUT / "learners.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), "adapt": adapt, "train": train}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
