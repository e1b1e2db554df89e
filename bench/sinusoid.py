"""The MAML paper's sinusoid regression (Finn et al. 2017, section 5.1), K = 5.

Target: post-adaptation test MSE within 15% of the paper's figures, 0.67 / 0.38 / 0.35 after
1 / 5 / 10 inner steps.

Training as in the paper: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5];
MLP 1-40-40-1 (ReLU), K = 5 support points, 1 inner SGD step of 0.01, second order, Adam 1e-3,
25 tasks per meta-batch; ``--train-query`` (default 10) query points per task give the
meta-loss. The paper trained 70,000 meta-iterations; the default here (``--iterations
20000``) fits ~15-20 minutes on 2 CPU cores, and every output states the run length.

Test: the final weights (no checkpoint selection, no validation) on 600 fixed test tasks, each
adapted on its K = 5 support points with the inner lr 0.01 for 1, 5 and 10 steps
(``MAML.eval_inner_steps``); the MSE is measured on ``--test-query`` (default 100) query points
per task, more than the paper's K, so that the mean over 600 tasks is precise. Reported as the
mean over tasks +- the 95% confidence half-width.

    python -m bench.sinusoid                          # default: 20000 iterations
    python -m bench.sinusoid --iterations 500         # smoke run, ~1 minute
    python -m bench.sinusoid --iterations 70000       # the paper's run length
"""

from __future__ import annotations

import time
from functools import partial

import lightning.pytorch as pl
import torch

from bench.common import base_parser, make_trainer, print_table, setup, write_json
from lthmaml.data import SinusoidDataModule
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP

PAPER_MSE = {1: 0.67, 5: 0.38, 10: 0.35}
TOLERANCE = 0.15


class Progress(pl.Callback):
    """Prints iterations, speed and the mean post-adaptation training loss every ``every`` steps."""

    def __init__(self, every: int, total: int) -> None:
        self.every, self.total = every, total
        self.losses: list[float] = []
        self.start = self.last = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        step = trainer.global_step
        if step % self.every == 0 or step == self.total:
            now = time.perf_counter()
            speed = len(self.losses) / (now - self.last)
            mean = sum(self.losses) / len(self.losses)
            print(
                f"iteration {step}/{self.total}  train MSE (post, mean of last {len(self.losses)}) "
                f"{mean:.4f}  {speed:.1f} it/s  elapsed {now - self.start:.0f} s",
                flush=True,
            )
            self.losses, self.last = [], now


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--iterations", type=int, default=20000, help="meta-iterations (paper: 70000)")
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--shots", type=int, default=5, help="K support points")
    parser.add_argument("--train-query", type=int, default=10, help="query points per training task")
    parser.add_argument("--test-query", type=int, default=100, help="query points per test task")
    parser.add_argument("--test-tasks", type=int, default=600)
    parser.add_argument("--eval-steps", type=int, nargs="+", default=sorted(PAPER_MSE))
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam meta learning rate")
    parser.add_argument("--log-every", type=int, default=None, help="progress line every N iterations")
    args = parser.parse_args(argv)
    setup(args.threads)
    log_every = args.log_every or max(1, min(1000, args.iterations // 10))

    pl.seed_everything(args.seed, verbose=False)
    model = MAML(
        MLP(in_features=1, hidden=(40, 40), out_features=1),
        inner_lr=args.inner_lr,
        inner_steps=1,
        first_order=False,
        optimizer=partial(torch.optim.Adam, lr=args.lr),
    )
    train_data = SinusoidDataModule(
        shots=args.shots,
        query_shots=args.train_query,
        meta_batch_size=args.meta_batch,
        tasks_per_epoch=args.meta_batch * min(args.iterations, 1000),
        seed=args.seed,
    )
    print(
        f"meta-training {args.iterations} iterations (paper: 70000), K={args.shots}, "
        f"meta-batch {args.meta_batch}, {args.threads} thread(s)",
        flush=True,
    )
    trainer = make_trainer(max_steps=args.iterations, callbacks=[Progress(log_every, args.iterations)])
    start = time.perf_counter()
    trainer.fit(model, datamodule=train_data)
    train_seconds = time.perf_counter() - start

    test_data = SinusoidDataModule(
        shots=args.shots,
        query_shots=args.test_query,
        meta_batch_size=args.meta_batch,
        test_tasks=args.test_tasks,
        seed=args.seed,
    )
    rows, tests = [], []
    for steps in args.eval_steps:
        model.eval_inner_steps = steps
        metrics = make_trainer().test(model, datamodule=test_data, verbose=False)[0]
        mse, ci95 = model.test_results["loss_post"], model.test_results["loss_post_ci95"]
        paper = PAPER_MSE.get(steps)
        rel = mse / paper - 1 if paper else None
        within = None if paper is None else abs(rel) <= TOLERANCE
        tests.append(
            {
                "eval_inner_steps": steps,
                "mse": mse,
                "ci95": ci95,
                "mse_pre_adaptation": float(metrics["test/loss_pre"]),
                "paper": paper,
                "relative_to_paper": rel,
                "within_15pct": within,
            }
        )
        rows.append(
            [
                steps,
                f"{mse:.3f} +- {ci95:.3f}",
                "-" if paper is None else paper,
                "-" if rel is None else f"{rel:+.1%}",
                "-" if within is None else ("yes" if within else "NO"),
            ]
        )
    print_table(
        f"sinusoid K={args.shots}: test MSE on {args.test_tasks} tasks x {args.test_query} query points, "
        f"after {args.iterations} meta-iterations ({train_seconds / 60:.1f} min, "
        f"{args.iterations / train_seconds:.1f} it/s); paper: 70000 iterations",
        ["inner steps", "MSE +- 95% CI", "paper", "vs paper", f"within {TOLERANCE:.0%}"],
        rows,
    )
    print(f"pre-adaptation MSE (0 steps): {tests[0]['mse_pre_adaptation']:.3f}")
    results = {
        "settings": vars(args) | {"json": str(args.json)},
        "iterations": args.iterations,
        "paper_iterations": 70000,
        "train_seconds": train_seconds,
        "iterations_per_s": args.iterations / train_seconds,
        "tests": tests,
        "tolerance": TOLERANCE,
    }
    write_json("sinusoid", results, args.json)
    return results


if __name__ == "__main__":
    main()
