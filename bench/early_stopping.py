"""Edge fine-tuning with EarlyStopping against a fixed 10 epochs, dense and pruned.

Target: EarlyStopping runs >= 3x fewer epochs than the fixed 10, at <= 1 point lower query accuracy.
(On a Raspberry Pi an epoch costs minutes and the best one came at ~2 of 10 in the seed runs.)

Setting. A Conv4 meta-trained briefly here with first-order MAML on the shared Omniglot subset's
meta-train classes (5-way 5-shot, 5 query, inner lr 0.4, 1 inner step, Adam 1e-3;
``--meta-steps`` meta-updates of ``--meta-batch`` tasks), or ``--checkpoint`` a 5-way Conv4 MAML
checkpoint of your own. The pruned model is that net 80% magnitude-pruned (global, the engine's
``prune_lowest``) and meta-trained again for ``--retrain-steps`` with its masks (or
``--pruned-checkpoint``). Both are exported as artifacts (``lthmaml.edge.export``) and fine-tuned with
:class:`lthmaml.edge.finetune.FineTuneModule` as ``configs/edge/pi.yaml`` does: SGD at the meta-learned
inner lr, ``data.batch_size`` of the config, masks kept. Tasks: ``--tasks`` task folders of 5
meta-*test* classes (never seen in meta-training), 5 support, 5 val and 10 query images each
(``lthmaml.data.taskfolder_build.omniglot_task``).

Each (task, model) is fine-tuned twice: ``early`` (EarlyStopping as in pi.yaml: val/loss,
patience 2, min_delta 0; ``--monitor``, ``--patience``, ``--min-delta`` to vary it; max 10 epochs,
best-val weights restored) and ``fixed`` (10 epochs, last weights). An epoch is one full-batch
step here (25 support images; smaller batches cost accuracy with batch-statistics BatchNorm).
Reported, as means over tasks: epochs run, the epoch of the best val accuracy and the fit's wall
time up to it, the whole fit's wall time, and the query accuracy after fit (``trainer.test``).

    python -m bench.early_stopping                       # ~4-5 minutes on 2 busy cores (1 thread)
    python -m bench.early_stopping --full                # 2000 + 1000 meta-steps, 50 tasks
    python -m bench.early_stopping --artifacts DIR       # keep the meta-trained pair, reuse it next time
    python -m bench.early_stopping --checkpoint runs/omniglot_5way1shot/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import time
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import yaml

from bench.common import base_parser, make_trainer, print_table, setup, write_json
from lthmaml.data import OmniglotDataModule, TaskFolderDataModule
from lthmaml.data.omniglot import load_omniglot, split_classes
from lthmaml.data.taskfolder_build import omniglot_task
from lthmaml.edge.artifact import load_artifact
from lthmaml.edge.export import export_net
from lthmaml.edge.finetune import FineTuneModule, artifact_from_checkpoint
from lthmaml.edge.stopping import TaskEarlyStopping
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import Conv4
from lthmaml.sparsity import prune_by_magnitude, sparsity_report

ROOT = Path(__file__).resolve().parent.parent
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
PI = ROOT / "configs" / "edge" / "pi.yaml"
WAYS, SHOTS, VAL_SHOTS, QUERY_SHOTS = 5, 5, 5, 10
MAX_EPOCHS = 10
EPOCH_RATIO_TARGET, ACCURACY_LOSS_TARGET = 3.0, 1.0


# ---------------------------------------------------------------------------------- the models
def meta_train(model: MAML, root: Path, steps: int, meta_batch: int, seed: int) -> MAML:
    data = OmniglotDataModule(
        root=str(root),
        ways=WAYS,
        shots=SHOTS,
        query_shots=5,
        meta_batch_size=meta_batch,
        tasks_per_epoch=steps * meta_batch,
        val_tasks=meta_batch,
        test_tasks=meta_batch,
        seed=seed,
    )
    make_trainer(max_steps=steps).fit(model, datamodule=data)
    return model


def build_models(args, out: Path) -> dict[str, Path]:
    """Artifacts of the dense and the pruned model (trained here or from the given checkpoints)."""
    if args.artifacts:
        out = args.artifacts
        out.mkdir(parents=True, exist_ok=True)
    paths = {"dense": out / "dense.safetensors", "pruned": out / "pruned.safetensors"}
    if all(path.is_file() for path in paths.values()):
        print(f"reusing the artifacts in {out}")
        return paths
    if args.checkpoint:
        export_net(artifact_from_checkpoint(args.checkpoint).net, paths["dense"], _meta(args.checkpoint))
        net = load_artifact(paths["dense"]).net.train()
        dense = MAML(net, inner_lr=_meta(args.checkpoint)["inner_lr"])  # it takes over the net's masks
    else:
        torch.manual_seed(args.seed)
        dense = MAML(
            Conv4(out_features=WAYS), inner_lr=0.4, inner_steps=1, eval_inner_steps=3, first_order=True
        )
        start = time.perf_counter()
        meta_train(dense, args.root, args.meta_steps, args.meta_batch, args.seed)
        print(f"meta-trained the dense Conv4: {args.meta_steps} steps in {time.perf_counter() - start:.0f} s")
        export_net(dense, paths["dense"])
    if args.pruned_checkpoint:
        art = artifact_from_checkpoint(args.pruned_checkpoint)
        export_net(art.net, paths["pruned"], _meta(args.pruned_checkpoint))
    else:
        pruned = copy.deepcopy(dense)
        pruned.first_order = True
        prune_by_magnitude(pruned, args.sparsity)  # the learner keeps the masks, meta-training holds them
        start = time.perf_counter()
        if args.retrain_steps:
            meta_train(pruned, args.root, args.retrain_steps, args.meta_batch, args.seed + 1)
        print(
            f"pruned {sparsity_report(pruned.net).sparsity:.1%} by magnitude, meta-trained again "
            f"{args.retrain_steps} steps in {time.perf_counter() - start:.0f} s"
        )
        export_net(pruned, paths["pruned"])
    return paths


def _meta(checkpoint: str) -> dict:
    """The fine-tuning settings of a checkpoint's artifact (export_net of its net keeps them)."""
    meta = artifact_from_checkpoint(checkpoint).metadata
    return {
        key: getattr(meta, key) for key in ("task", "ways", "inner_lr", "inner_steps", "eval_inner_steps")
    }


# ---------------------------------------------------------------------------------- fine-tuning
class EpochLog(pl.Callback):
    """val/acc, val/loss and the fit's elapsed wall time at the end of every epoch."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        self.epochs.append(
            {
                "val_acc": float(metrics.get("val/acc", float("nan"))),
                "val_loss": float(metrics.get("val/loss", float("nan"))),
                "elapsed_s": time.perf_counter() - self.start,
            }
        )


REGIMES = {
    # regime: (EarlyStopping on, the task's validation); "fixed" trains MAX_EPOCHS epochs, last weights
    "early": (True, "auto"),
    "fixed": (False, "auto"),
    "inner-loop": (False, "none"),  # no validation: the artifact's eval_inner_steps steps
}


def finetune(artifact: Path, task: Path, regime: str, stopping: dict, batch_size: int) -> dict:
    """One fit in ``regime`` (early: ``TaskEarlyStopping(**stopping)``, best weights restored)."""
    early, validation = REGIMES[regime]
    module = FineTuneModule(artifact=str(artifact), restore_best=early)
    data = TaskFolderDataModule(str(task), image_size=28, batch_size=batch_size, validation=validation)
    log = EpochLog()
    callbacks: list[pl.Callback] = [log]
    if early:
        callbacks.append(TaskEarlyStopping(**stopping))
    trainer = make_trainer(callbacks=callbacks, max_epochs=MAX_EPOCHS, limit_val_batches=None)
    log.start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - log.start
    with contextlib.redirect_stdout(io.StringIO()):  # the module prints its query accuracy
        trainer.test(module, datamodule=data, verbose=False)
    accs = [e["val_acc"] for e in log.epochs]
    measured = [i for i, acc in enumerate(accs) if acc == acc]  # NaN: no validation that epoch
    best = max(measured, key=accs.__getitem__) if measured else None
    return {
        "epochs": module.epochs_run,
        "best_val_acc_epoch": None if best is None else best + 1,
        "wall_to_best_val_acc_s": None if best is None else log.epochs[best]["elapsed_s"],
        "wall_s": wall,
        "query_acc": module.test_results["acc"],
        "restored_epoch": module.best_epoch if early else None,
        "validation": data.validation_source,
        "val": log.epochs,
    }


def make_tasks(root: Path, count: int, out: Path, seed: int, shots: int, val_shots: int) -> list[Path]:
    """``count`` task folders of 5 meta-test classes of the default class split (seeded)."""
    omniglot = load_omniglot(root, 28)
    test = split_classes(omniglot.classes, (0.6, 0.2, 0.2), 0, False)["test"]
    images, classes = omniglot.images[test], [omniglot.classes[i] for i in test]
    counts = {"shots": shots, "val_shots": val_shots, "query_shots": QUERY_SHOTS}
    return [
        omniglot_task(out / f"task_{i:03d}", images, classes, ways=WAYS, seed=seed + i, **counts)
        for i in range(count)
    ]


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def profile_stopping() -> dict:
    """The edge profile's early stopping (configs/edge/pi.yaml): TaskEarlyStopping's arguments."""
    callbacks = yaml.safe_load(PI.read_text())["trainer"]["callbacks"]
    stopper = next(c for c in callbacks if c["class_path"].endswith("EarlyStopping"))
    return {"monitor": None, **stopper.get("init_args", {})}


def main(argv: Optional[list[str]] = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--root", type=Path, default=OMNIGLOT, help="Omniglot data (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=20, help="fine-tuning tasks (default: %(default)s)")
    parser.add_argument("--meta-steps", type=int, default=400, help="dense meta-training steps")
    parser.add_argument("--retrain-steps", type=int, default=200, help="meta-training steps after pruning")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-update")
    parser.add_argument("--sparsity", type=float, default=0.8, help="magnitude-pruned fraction")
    parser.add_argument("--checkpoint", default=None, help="a 5-way Conv4 MAML checkpoint instead")
    parser.add_argument("--pruned-checkpoint", default=None, help="a pruned one instead of pruning here")
    parser.add_argument(
        "--artifacts", type=Path, default=None, help="keep the two artifacts here; reused when present"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch (default: pi.yaml's)")
    profile = profile_stopping()
    parser.add_argument(
        "--monitor",
        choices=["task", "val/loss", "val/acc"],
        default="task",
        help="what EarlyStopping watches (task: val/acc for classification, as pi.yaml)",
    )
    parser.add_argument("--patience", type=int, default=profile.get("patience", 3), help="default: pi.yaml's")
    parser.add_argument(
        "--min-delta", type=float, default=profile.get("min_delta", 0.0), help="default: pi.yaml's"
    )
    parser.add_argument(
        "--shots", type=int, default=SHOTS, help="support images per class; 1: no val/, derived (default 5)"
    )
    parser.add_argument("--full", action="store_true", help="2000 meta-steps, 1000 after pruning, 50 tasks")
    args = parser.parse_args(argv)
    if args.full:
        args.meta_steps, args.retrain_steps, args.tasks = 2000, 1000, 50
    if args.batch_size is None:
        args.batch_size = yaml.safe_load(PI.read_text())["data"]["batch_size"]
    if not args.root.is_dir():
        raise SystemExit(
            f"no Omniglot data at {args.root}: lthmaml-data omniglot --root DIR, then --root DIR"
        )
    setup(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-early-") as tmp:
        out = Path(tmp)
        artifacts = build_models(args, out)
        val_shots = VAL_SHOTS if args.shots > 1 else 0  # a 1-shot task brings no val/
        tasks = make_tasks(args.root, args.tasks, out, args.seed, args.shots, val_shots)
        monitor = None if args.monitor == "task" else args.monitor
        stopping = {"monitor": monitor, "patience": args.patience, "min_delta": args.min_delta}
        if monitor is not None:
            stopping["mode"] = "max" if monitor == "val/acc" else "min"
        regimes = ["early", "fixed"] + (["inner-loop"] if val_shots == 0 else [])
        runs = {
            (model, regime): [
                finetune(artifacts[model], task, regime, stopping, args.batch_size) for task in tasks
            ]
            for model in artifacts
            for regime in regimes
        }
        sparsities = {m: load_artifact(p).metadata.sparsity for m, p in artifacts.items()}

    summary: dict[str, dict] = {}
    rows = []
    for (model, regime), results in runs.items():
        row = {
            "epochs": mean(r["epochs"] for r in results),
            "best_val_acc_epoch": mean(r["best_val_acc_epoch"] for r in results),
            "wall_to_best_val_acc_s": mean(r["wall_to_best_val_acc_s"] for r in results),
            "wall_s": mean(r["wall_s"] for r in results),
            "query_acc": mean(r["query_acc"] for r in results),
        }
        summary[f"{model}/{regime}"] = row
        rows.append([model, regime, *(row[k] for k in row)])
    validation = runs[(next(iter(artifacts)), "early")][0]["validation"]
    print_table(
        f"fine-tuning {args.tasks} Omniglot meta-test tasks (5-way, {args.shots} support / {val_shots} val / "
        f"{QUERY_SHOTS} query), batch {args.batch_size}; early: TaskEarlyStopping({args.monitor}, patience "
        f"{args.patience}, min_delta {args.min_delta:g}) on {validation}; means",
        ["model", "regime", "epochs", "best val-acc epoch", "wall to it (s)", "wall (s)", "query acc"],
        rows,
    )
    verdicts = {}
    for model in artifacts:
        early, fixed = summary[f"{model}/early"], summary[f"{model}/fixed"]
        ratio = fixed["epochs"] / early["epochs"]
        loss_points = 100 * (fixed["query_acc"] - early["query_acc"])
        verdicts[model] = {
            "sparsity": sparsities[model],
            "epoch_ratio": ratio,
            "wall_ratio": fixed["wall_s"] / early["wall_s"],
            "accuracy_loss_points": loss_points,
            "meets_target": ratio >= EPOCH_RATIO_TARGET and round(loss_points, 6) <= ACCURACY_LOSS_TARGET,
        }
        print(
            f"{model} ({sparsities[model]:.0%} sparse): {ratio:.2f}x fewer epochs with EarlyStopping, "
            f"{verdicts[model]['wall_ratio']:.2f}x less wall time, accuracy {-loss_points:+.2f} points "
            f"(target >= {EPOCH_RATIO_TARGET:g}x at <= {ACCURACY_LOSS_TARGET:g} point lost): "
            f"{'met' if verdicts[model]['meets_target'] else 'NOT met'}"
        )
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    results = {
        "settings": settings,
        "summary": summary,
        "verdicts": verdicts,
        "runs": {f"{m}/{r}": v for (m, r), v in runs.items()},
    }
    write_json("early_stopping", results, args.json)
    return results


if __name__ == "__main__":
    main()
