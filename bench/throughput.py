"""Meta-training throughput (tasks/s) of our ``fit`` path against a bare ``higher`` loop, and of
both inner loops (``higher``, ``torch.func``) against both bare loops.

Targets:
  * ours / bare >= 0.95: ``Trainer.fit`` on :class:`lthmaml.meta.maml.MAML` costs at most 5% over a
    hand-written loop doing the same work (``higher.innerloop_ctx`` per task, per-task backward,
    one Adam step per meta-batch), on identical pre-generated tasks and the same Conv4 init.
  * first-order / second-order >= 2x on our path (reported for 1 inner step, 5-way, and for
    5 inner steps, 20-way, the MAML Omniglot 20-way setting).

Setting: Conv4 on 28x28 synthetic images (FewShotTasks over 50 random classes x 20 examples),
5-way 1-shot 15-query, meta-batch 8, inner lr 0.4, Adam 1e-3. Each path gets a warm-up run,
then ``--repeats`` interleaved timed runs (order alternating); figures are medians.

Reported for our path: the training loop (first batch start to last batch end, DataLoader
collation and Lightning's per-step work included) and the whole ``fit()`` call (Trainer set-up
and teardown included, a fixed ~30 ms per run). The ratio is given four ways: of the median
tasks/s, as the median of back-to-back paired runs, of the best runs, and from the per-step
overheads (time outside the per-task adaptation + backward, which both paths share; a check
shows they give bit-identical weights). On a shared CPU the first three swing with other
processes' load; the overhead-based one barely does, and is the one to read when they disagree.

    python -m bench.throughput             # default, ~4-8 minutes on 2 CPU cores
    python -m bench.throughput --quick     # smoke run, ~1 minute, figures meaningless
    python -m bench.throughput --profile   # also cProfile one run of our path
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Optional

import higher
import torch
import torch.nn.functional as F

from bench.common import (
    StepTimer,
    base_parser,
    image_task_source,
    make_trainer,
    median,
    meta_batches,
    pregenerate,
    print_table,
    setup,
    task_loader,
    timed,
    write_json,
)
from lthmaml.data import TaskBatch
from lthmaml.meta.maml import MAML
from lthmaml.nets.models import Conv4

INNER_LR = 0.4


@dataclass(frozen=True)
class Setting:
    ways: int
    inner_steps: int
    shots: int = 1
    query_shots: int = 15

    @property
    def label(self) -> str:
        return f"{self.ways}-way {self.shots}-shot {self.query_shots}-query, {self.inner_steps} inner step(s)"


class Workload:
    """One setting's initial weights and tasks, shared by every run of every path."""

    def __init__(self, setting: Setting, meta_batch: int, steps: int, seed: int) -> None:
        self.setting, self.meta_batch, self.steps = setting, meta_batch, steps
        torch.manual_seed(seed)
        self.init = Conv4(out_features=setting.ways).state_dict()
        source = image_task_source(setting.ways, setting.shots, setting.query_shots, seed=seed)
        self.tasks = pregenerate(source, meta_batch * steps, seed=seed)
        self.batches = meta_batches(self.tasks, meta_batch)

    def net(self) -> Conv4:
        net = Conv4(out_features=self.setting.ways)
        net.load_state_dict(self.init)
        return net

    def run_ours(self, first_order: bool, steps: int | None = None, inner_loop: str = "higher") -> dict:
        steps = steps or self.steps
        inner_steps = self.setting.inner_steps
        model = MAML(
            self.net(),
            inner_lr=INNER_LR,
            inner_steps=inner_steps,
            first_order=first_order,
            inner_loop=inner_loop,
            task_chunk=self.meta_batch,
        )
        task_s = _time_calls(model, "meta_train")
        timer = StepTimer()
        trainer = make_trainer(max_steps=steps, callbacks=[timer])
        loader = task_loader(self.tasks[: steps * self.meta_batch], self.meta_batch)
        total = timed(lambda: trainer.fit(model, train_dataloaders=loader))
        return {"loop_s": timer.seconds, "fit_s": total, "task_s": task_s[0], "params": _flat(model.net)}

    def run_bare(self, first_order: bool, steps: int | None = None, loop: Callable | None = None) -> dict:
        """A bare reference loop (``bare_loop``, or ``bare_func_loop``) on the same tasks and weights."""
        steps = steps or self.steps
        net = self.net().train()
        optimizer = torch.optim.Adam(net.parameters())
        batches = self.batches[:steps]
        task_s = [0.0]
        run = loop or bare_loop
        seconds = timed(lambda: run(net, optimizer, batches, self.setting.inner_steps, first_order, task_s))
        return {"loop_s": seconds, "fit_s": seconds, "task_s": task_s[0], "params": _flat(net)}


def bare_func_loop(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[TaskBatch],
    inner_steps: int,
    first_order: bool,
    task_s: list[float],
) -> None:
    """The second reference: MAML written directly with torch.func, the meta-batch in one vmap."""
    from torch.func import functional_call, grad, vmap

    def loss_at(params, x, y):
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    def query_loss(params, support_x, support_y, query_x, query_y):
        for _ in range(inner_steps):
            g = grad(loss_at)(params, support_x, support_y)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - INNER_LR * g[k] for k in params}
        return loss_at(params, query_x, query_y)

    for batch in batches:
        optimizer.zero_grad()
        start = time.perf_counter()
        losses = vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(dict(net.named_parameters()), *batch)
        losses.mean().backward()
        task_s[0] += time.perf_counter() - start
        optimizer.step()


def _time_calls(obj: object, method: str) -> list[float]:
    """Wraps ``obj.method`` (on the instance only) to add its wall time to the returned cell."""
    total = [0.0]
    original = getattr(obj, method)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    object.__setattr__(obj, method, wrapper)
    return total


def bare_loop(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[TaskBatch],
    inner_steps: int,
    first_order: bool,
    task_s: list[float],
) -> None:
    """The reference: MAML written directly against ``higher``, nothing else.

    ``task_s[0]`` accumulates the time of the per-task work (adaptation and backward).
    """
    for batch in batches:
        optimizer.zero_grad()
        n = batch.num_tasks
        for i in range(n):
            start = time.perf_counter()
            support_x, support_y, query_x, query_y = batch.task(i)
            inner = torch.optim.SGD(net.parameters(), lr=INNER_LR)
            with higher.innerloop_ctx(
                net, inner, copy_initial_weights=False, track_higher_grads=not first_order
            ) as (fnet, diffopt):
                for _ in range(inner_steps):
                    diffopt.step(F.cross_entropy(fnet(support_x), support_y))
                loss = F.cross_entropy(fnet(query_x), query_y) / n
                if first_order:
                    grads = torch.autograd.grad(loss, list(fnet.parameters()))
                    for p, g in zip(net.parameters(), grads):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    loss.backward()
            task_s[0] += time.perf_counter() - start
        optimizer.step()


def _flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


Runner = Callable[[Optional[int]], dict]


def measure(runners: dict[str, Runner], steps: int, meta_batch: int, repeats: int, warmup_steps: int) -> dict:
    """Warm up every path, then ``repeats`` interleaved runs (order alternating); medians.

    Besides the throughput, each path's time per meta-step outside the per-task work (the
    adaptation and backward that every path shares) is its overhead: Lightning's loop, data
    collation, logging, the optimizer step. Contention inflates the tasks' time far more than this.
    """
    tasks = steps * meta_batch
    names = list(runners)
    for name in names:
        runners[name](warmup_steps)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(runners[name](None))
    out = {}
    for name, results in runs.items():
        loop = [x["loop_s"] for x in results]
        fit = [x["fit_s"] for x in results]
        overhead = [(x["loop_s"] - x["task_s"]) / steps for x in results]
        out[name] = {
            "loop_s": loop,
            "fit_s": fit,
            "task_s": [x["task_s"] for x in results],
            "overhead_s_per_step": median(overhead),
            "tasks_per_s_loop": tasks / median(loop),
            "tasks_per_s_best": tasks / min(loop),
            "tasks_per_s_fit": tasks / median(fit),
            "params": results[-1]["params"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="timed meta-steps per run, ours vs bare")
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved timed runs per path, ours vs bare"
    )
    parser.add_argument("--fo-steps", type=int, default=1, help="timed meta-steps per run, FO vs SO")
    parser.add_argument("--fo-repeats", type=int, default=3, help="interleaved timed runs per path, FO vs SO")
    parser.add_argument("--warmup-steps", type=int, default=1, help="meta-steps of each path's warm-up run")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 step, 1 repeat (meaningless figures)"
    )
    parser.add_argument("--skip-fo", action="store_true", help="skip the first- vs second-order table")
    parser.add_argument("--skip-loops", action="store_true", help="skip the inner-loop table")
    parser.add_argument("--loop-steps", type=int, default=2, help="timed meta-steps per run, inner loops")
    parser.add_argument("--loop-repeats", type=int, default=3, help="interleaved timed runs, inner loops")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of our path")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.fo_steps, args.fo_repeats = 1, 1, 1, 1
        args.loop_steps, args.loop_repeats = 1, 1
    setup(args.threads)
    results: dict = {"settings": vars(args) | {"json": str(args.json)}}

    # ---- ours vs bare, MAML's default: second order, 1 inner step
    setting = Setting(ways=5, inner_steps=1)
    work = Workload(setting, args.meta_batch, args.steps, args.seed)
    res = measure(
        {"ours": partial(work.run_ours, False), "bare": partial(work.run_bare, False)},
        args.steps,
        args.meta_batch,
        args.repeats,
        args.warmup_steps,
    )
    ours, bare = res["ours"], res["bare"]
    max_param_diff = float((ours.pop("params") - bare.pop("params")).abs().max())
    ratio_loop = ours["tasks_per_s_loop"] / bare["tasks_per_s_loop"]
    ratio_fit = ours["tasks_per_s_fit"] / bare["tasks_per_s_fit"]
    ratio_paired = paired_ratio(bare["loop_s"], ours["loop_s"])
    ratio_best = ours["tasks_per_s_best"] / bare["tasks_per_s_best"]
    # Noise-robust view: both paths do the same per-task work; they differ only outside it.
    task_per_step = median(ours["task_s"] + bare["task_s"]) / args.steps
    ratio_overhead = (task_per_step + bare["overhead_s_per_step"]) / (
        task_per_step + ours["overhead_s_per_step"]
    )
    print_table(
        f"ours vs bare higher loop: {setting.label}, second order, meta-batch {args.meta_batch}, "
        f"{args.steps} steps x {args.repeats} repeats, medians, {args.threads} threads",
        [
            "path",
            "tasks/s (loop)",
            "tasks/s (whole fit)",
            "tasks/s (best loop)",
            "overhead ms/step",
            "loop seconds of each run",
        ],
        [
            [
                "ours (Trainer.fit)",
                ours["tasks_per_s_loop"],
                ours["tasks_per_s_fit"],
                ours["tasks_per_s_best"],
                1e3 * ours["overhead_s_per_step"],
                _runs(ours["loop_s"]),
            ],
            [
                "bare higher loop",
                bare["tasks_per_s_loop"],
                bare["tasks_per_s_fit"],
                bare["tasks_per_s_best"],
                1e3 * bare["overhead_s_per_step"],
                _runs(bare["loop_s"]),
            ],
            ["ratio ours/bare", ratio_loop, ratio_fit, ratio_best, "", f"paired median {ratio_paired:.3f}"],
        ],
    )
    print(
        f"target ours/bare >= 0.95. Overhead = time per meta-step outside the per-task adaptation and\n"
        f"backward; with the median per-task work of {task_per_step:.3f} s/step the overheads give\n"
        f"ours/bare = {ratio_overhead:.4f} (insensitive to how busy the CPU was between runs).\n"
        f"Same work: max |parameter difference| between the paths after a run = {max_param_diff:.1e}"
    )
    results["ours_vs_bare"] = {
        "setting": setting.label + ", second order",
        "ours": ours,
        "bare": bare,
        "ratio_loop": ratio_loop,
        "ratio_fit": ratio_fit,
        "ratio_loop_paired_median": ratio_paired,
        "ratio_best": ratio_best,
        "task_s_per_step": task_per_step,
        "ratio_from_overheads": ratio_overhead,
        "max_param_diff": max_param_diff,
        "target": 0.95,
    }

    # ---- first order vs second order, our path
    if not args.skip_fo:
        rows, fo_results = [], []
        for fo_setting in (Setting(ways=5, inner_steps=1), Setting(ways=20, inner_steps=5)):
            w = Workload(fo_setting, args.meta_batch, args.fo_steps, args.seed)
            r = measure(
                {"SO": partial(w.run_ours, False), "FO": partial(w.run_ours, True)},
                args.fo_steps,
                args.meta_batch,
                args.fo_repeats,
                args.warmup_steps,
            )
            for x in r.values():
                x.pop("params")
            so, fo = r["SO"], r["FO"]
            speedup = fo["tasks_per_s_loop"] / so["tasks_per_s_loop"]
            speedup_paired = paired_ratio(so["loop_s"], fo["loop_s"])
            speedup_best = fo["tasks_per_s_best"] / so["tasks_per_s_best"]
            rows.append(
                [
                    fo_setting.label,
                    so["tasks_per_s_loop"],
                    fo["tasks_per_s_loop"],
                    speedup,
                    speedup_paired,
                    speedup_best,
                ]
            )
            fo_results.append(
                {
                    "setting": fo_setting.label,
                    "so": so,
                    "fo": fo,
                    "speedup": speedup,
                    "speedup_paired_median": speedup_paired,
                    "speedup_best": speedup_best,
                }
            )
        print_table(
            f"first vs second order, our path: meta-batch {args.meta_batch}, "
            f"{args.fo_steps} steps x {args.fo_repeats} repeats, medians (target FO/SO >= 2)",
            ["setting", "SO tasks/s", "FO tasks/s", "FO/SO", "FO/SO paired median", "FO/SO best runs"],
            rows,
        )
        results["fo_vs_so"] = fo_results

    # ---- the two inner loops against the two bare loops, on the same episodes
    if not args.skip_loops:
        rows, loop_results = [], []
        for setting in (Setting(ways=5, inner_steps=1, query_shots=1), Setting(ways=5, inner_steps=1)):
            w = Workload(setting, args.meta_batch, args.loop_steps, args.seed)
            for first_order in (True, False):
                r = measure(
                    {
                        "higher": partial(w.run_ours, first_order, inner_loop="higher"),
                        "func": partial(w.run_ours, first_order, inner_loop="func"),
                        "bare higher": partial(w.run_bare, first_order),
                        "bare func": partial(w.run_bare, first_order, loop=bare_func_loop),
                    },
                    args.loop_steps,
                    args.meta_batch,
                    args.loop_repeats,
                    args.warmup_steps,
                )
                for x in r.values():
                    x.pop("params")
                bare = r["bare higher"]["tasks_per_s_loop"]
                order = "first" if first_order else "second"
                rows.append(
                    [f"{setting.label}, {order} order"]
                    + [r[name]["tasks_per_s_loop"] for name in ("higher", "func", "bare higher", "bare func")]
                    + [r["higher"]["tasks_per_s_loop"] / bare, r["func"]["tasks_per_s_loop"] / bare]
                )
                loop_results.append({"setting": rows[-1][0], **r})
        print_table(
            f"inner loops, tasks/s of the training loop: meta-batch {args.meta_batch} (func: one chunk), "
            f"{args.loop_steps} steps x {args.loop_repeats} repeats, medians "
            "(target: the default >= 1.2x bare higher)",
            ["setting", "higher", "func", "bare higher", "bare func", "higher/bare", "func/bare"],
            rows,
        )
        results["inner_loops"] = loop_results

    if args.profile:
        profile_ours(work)
    write_json("throughput", results, args.json)
    return results


def paired_ratio(numerator_s: list[float], denominator_s: list[float]) -> float:
    """Median over repeats of the time ratio of runs made back to back (a speed ratio)."""
    return median([n / d for n, d in zip(numerator_s, denominator_s)])


def _runs(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def profile_ours(work: Workload, top: int = 30) -> None:
    """cProfile one run of our path: where the time goes besides the tasks' own compute."""
    profiler = cProfile.Profile()
    profiler.enable()
    work.run_ours(False)
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs().sort_stats("cumulative")
    print(f"\ncProfile of one run of our path ({work.steps} steps), top {top} by cumulative time:")
    stats.print_stats(top)


if __name__ == "__main__":
    main()
