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

Beside MAML, a Conditional Neural Process (``configs/cnp_sinusoid.yaml``'s net: encoder 128-128,
representation 128, decoder 4 x 128, Gaussian NLL) is meta-trained on the same tasks for the same
iterations (``--no-cnp``: MAML only) and tested on the same 600 test tasks: the MSE of its
predictive mean after one forward pass over the K support points. ``--plot PNG`` draws, for four
test tasks, MAML's prediction after 10 steps and the CNP's predictive mean and +- 2 standard
deviations.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from bench.common import base_parser, make_trainer, print_table, setup, write_json
from lthmaml.data import SinusoidDataModule
from lthmaml.data.tasks import TaskBatch
from lthmaml.meta.cnp import CNP
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import MLP, CNPNet

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
    parser.add_argument("--no-cnp", action="store_true", help="MAML only (no CNP beside it)")
    parser.add_argument(
        "--plot", default=None, help="PNG of MAML's and the CNP's predictions on 4 test tasks"
    )
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
    cnp = None if args.no_cnp else train_and_test_cnp(args, train_data, test_data, log_every)
    if args.plot:
        model.eval_inner_steps = max(args.eval_steps)
        plot_predictions(model, cnp, test_data, args.plot)
    results = {
        "settings": vars(args) | {"json": str(args.json)},
        "iterations": args.iterations,
        "paper_iterations": 70000,
        "train_seconds": train_seconds,
        "iterations_per_s": args.iterations / train_seconds,
        "tests": tests,
        "tolerance": TOLERANCE,
        "cnp": None if cnp is None else cnp["results"],
        "plot": args.plot,
    }
    write_json("sinusoid", results, args.json)
    return results


def train_and_test_cnp(
    args, train_data: SinusoidDataModule, test_data: SinusoidDataModule, log_every: int
) -> dict:
    """The CNP on the same training tasks for as many iterations, tested on the same test tasks."""
    pl.seed_everything(args.seed, verbose=False)
    net = CNPNet(x_features=1, y_features=1, representation=128, encoder_hidden=(128, 128))
    cnp = CNP(net, optimizer=partial(torch.optim.Adam, lr=args.lr))
    print(f"CNP: meta-training {args.iterations} iterations on the same tasks", flush=True)
    trainer = make_trainer(max_steps=args.iterations, callbacks=[Progress(log_every, args.iterations)])
    start = time.perf_counter()
    trainer.fit(cnp, datamodule=train_data)
    seconds = time.perf_counter() - start
    make_trainer().test(cnp, datamodule=test_data, verbose=False)
    mse, ci95 = cnp.test_results["loss_post"], cnp.test_results["loss_post_ci95"]
    nll = cnp.test_results.get("nll")
    print(
        f"CNP: test MSE {mse:.3f} +- {ci95:.3f} on the same {args.test_tasks} tasks (one forward pass"
        f" over the {args.shots} support points), after {args.iterations} iterations ({seconds / 60:.1f} min)"
    )
    results = {"mse": mse, "ci95": ci95, "nll": nll, "train_seconds": seconds, "iterations": args.iterations}
    return {"model": cnp, "results": results}


def plot_predictions(maml: MAML, cnp: dict | None, test_data: SinusoidDataModule, path: str) -> None:
    """Four test tasks: the true function (the query points), the support points, MAML after its
    evaluation steps and the CNP's mean +- 2 standard deviations on a grid over [-5, 5]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test_data.setup("test")
    batch = next(iter(test_data.test_dataloader()))
    grid = torch.linspace(-5, 5, 200)[None, :, None].expand(4, -1, -1)
    tasks = TaskBatch(batch.support_x[:4], batch.support_y[:4], grid, torch.zeros_like(grid))
    maml_y = maml.predict_step(tasks, 0)
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for index, axis in enumerate(axes):
        order = batch.query_x[index, :, 0].argsort()
        axis.plot(
            batch.query_x[index, order, 0], batch.query_y[index, order, 0], color="0.6", lw=3, label="true"
        )
        axis.plot(
            grid[index, :, 0],
            maml_y[index, :, 0],
            color="tab:blue",
            label=f"MAML, {maml.eval_inner_steps} steps",
        )
        if cnp is not None:
            mean, std = (t.detach() for t in cnp["model"].predict_gaussian(tasks))
            m, sd = mean[index, :, 0], std[index, :, 0]
            axis.plot(grid[index, :, 0], m, color="tab:orange", label="CNP mean")
            axis.fill_between(
                grid[index, :, 0], m - 2 * sd, m + 2 * sd, color="tab:orange", alpha=0.25, label="CNP +- 2 sd"
            )
        axis.scatter(
            batch.support_x[index, :, 0],
            batch.support_y[index, :, 0],
            color="k",
            zorder=5,
            label="K = 5 support",
        )
        axis.set_title(f"test task {index}")
        axis.set_xlabel("x")
    axes[0].set_ylabel("y")
    axes[-1].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
