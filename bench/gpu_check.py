"""The GPU path in one prepared run: the CUDA-gated tests, then meta-training throughput on the GPU
against one CPU core on the same episodes, written to one JSON.

Throughput: 5-way 1-shot Omniglot-shaped tasks (28x28, 15 query images a class; synthetic pixels,
so no data is needed), the shipped Conv4-64, meta-batch 8, one inner step, Adam 1e-3. Per path:
second-order MAML through ``higher`` and through ``torch.func``, and ProtoNet. Each runs
``--steps`` meta-updates after a warm-up, on the same pre-generated tasks, on the GPU (tasks/s,
peak GPU memory) and on one CPU core (tasks/s); the ratio is GPU over CPU. Mixed precision: one
``bf16-mixed`` MAML step's meta-gradient against float32's (relative error).

    python -m bench.gpu_check                       # about 3-6 minutes on a GPU machine
    python -m bench.gpu_check --json $OUT/gpu.json  # where the JSON goes (default bench/out/)
    python -m bench.gpu_check --skip-tests          # throughput only

Targets: every CUDA-gated test passes; second-order MAML >= 50x one CPU core; ``func`` at least
as fast as ``higher`` on the GPU; the bf16 meta-gradient within 5% of float32.
"""

from __future__ import annotations

import subprocess
import sys
import time
from functools import partial

import torch

from bench.common import (
    base_parser,
    image_task_source,
    make_trainer,
    meta_batches,
    pregenerate,
    setup,
    write_json,
)
from lthmaml.meta import MAML, ProtoNet
from lthmaml.nets import Conv4

TESTS = ["tests/test_devices.py", "tests/test_precision.py"]


def run_tests() -> dict:
    """The CUDA-gated tests (on a CPU-only machine they skip with their reason)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TESTS],
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = done.stdout.strip().splitlines()[-15:]
    print("\n".join(tail))
    return {
        "returncode": done.returncode,
        "summary": tail[-1] if tail else "",
        "seconds": time.perf_counter() - start,
    }


def learner(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    adam = partial(torch.optim.Adam, lr=1e-3)
    if kind == "protonet":
        return ProtoNet(Conv4(None, 1, 64, 28), optimizer=adam)
    return MAML(Conv4(5, 1, 64, 28), inner_lr=0.4, inner_steps=1, inner_loop=kind, optimizer=adam)


class Loader(torch.utils.data.Dataset):
    def __init__(self, batches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return self.batches[index]


def tasks_per_second(kind: str, device: str, batches, meta_batch: int) -> dict:
    """Meta-updates over ``batches`` after a warm-up of two; tasks/s and peak GPU memory."""
    model = learner(kind)
    loader = torch.utils.data.DataLoader(Loader(batches), batch_size=None)
    warm = torch.utils.data.DataLoader(Loader(batches[:2]), batch_size=None)
    make_trainer(max_steps=2, accelerator=device).fit(model, train_dataloaders=warm)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer = make_trainer(max_steps=len(batches), accelerator=device)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"tasks_per_s": len(batches) * meta_batch / seconds, "seconds": seconds}
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def bf16_error(batch) -> float:
    grads = {}
    for precision in ("32-true", "bf16-mixed"):
        model = learner("func")
        grads[precision] = probe = {}

        def keep(optimizer, model=model, probe=probe) -> None:
            probe.update(
                {
                    n: p.grad.detach().float().clone()
                    for n, p in model.named_parameters()
                    if p.grad is not None
                }
            )

        model.on_before_optimizer_step = keep
        trainer = make_trainer(max_steps=1, accelerator="cuda", precision=precision)
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(Loader([batch]), batch_size=None))
    full, half = grads["32-true"], grads["bf16-mixed"]
    diff = sum(float((half[n] - full[n]).norm() ** 2) for n in full) ** 0.5
    return diff / sum(float(full[n].norm() ** 2) for n in full) ** 0.5


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0], default_threads=1)
    parser.add_argument("--steps", type=int, default=20, help="timed meta-updates per path and device")
    parser.add_argument("--cpu-steps", type=int, default=4, help="timed meta-updates on the CPU core")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    setup(args.threads)  # one CPU core for the CPU side
    payload: dict = {"cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        payload["card"] = torch.cuda.get_device_name(0)
    if not args.skip_tests:
        payload["tests"] = run_tests()
    if not torch.cuda.is_available():
        print("no CUDA device: the throughput part needs one")
        write_json("gpu_check", payload, args.json)
        return payload
    source = image_task_source(ways=5, shots=1, query_shots=15)
    tasks = pregenerate(source, (args.steps + 2) * args.meta_batch)
    batches = meta_batches(tasks, args.meta_batch)
    rows = {}
    for kind in ("higher", "func", "protonet"):
        gpu = tasks_per_second(kind, "cuda", batches[: args.steps], args.meta_batch)
        cpu = tasks_per_second(kind, "cpu", batches[: args.cpu_steps], args.meta_batch)
        rows[kind] = {
            "gpu": gpu,
            "cpu_one_core": cpu,
            "gpu_over_cpu": gpu["tasks_per_s"] / cpu["tasks_per_s"],
        }
        print(
            f"{kind:9s} GPU {gpu['tasks_per_s']:8.1f} tasks/s ({gpu['peak_gpu_mib']:.0f} MiB)  "
            f"CPU core {cpu['tasks_per_s']:6.2f} tasks/s  ratio {rows[kind]['gpu_over_cpu']:.1f}x"
        )
    payload["throughput"] = rows
    payload["func_over_higher_gpu"] = (
        rows["func"]["gpu"]["tasks_per_s"] / rows["higher"]["gpu"]["tasks_per_s"]
    )
    payload["bf16_meta_gradient_relative_error"] = bf16_error(batches[0])
    print(
        f"func / higher on the GPU {payload['func_over_higher_gpu']:.2f}x; bf16 meta-gradient error "
        f"{payload['bf16_meta_gradient_relative_error']:.4f}"
    )
    write_json("gpu_check", payload, args.json)
    return payload


if __name__ == "__main__":
    main()
