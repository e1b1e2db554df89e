"""What the affine augmentation adds to a meta-update: drawing a meta-batch of tasks with and
without ``augment_affine``, against the meta-update itself (ProtoNet, Conv4-64, the 20-way 1-shot
config's episodes: 2 tasks of 20 classes, 1 support and 5 query images each, 28x28).

Paired and interleaved on one thread: each repeat draws the same tasks both ways (same seeds) and
times one meta-update between them; figures are medians.

    python -m bench.augment_cost              # about a minute
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import numpy as np
import torch

from bench.common import base_parser, random_images, setup, stack_tasks, write_json
from lthmaml.data.augment import Affine
from lthmaml.data.fewshot import FewShotTasks
from lthmaml.meta import ProtoNet
from lthmaml.nets import Conv4


def draw(tasks: FewShotTasks, seeds: list[int]) -> tuple[float, list]:
    start = time.perf_counter()
    drawn = [tasks.sample(np.random.default_rng(seed)) for seed in seeds]
    return time.perf_counter() - start, drawn


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0], default_threads=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    setup(args.threads)
    images = random_images(classes=120, examples=20)
    plain = FewShotTasks(images, ways=20, shots=1, query_shots=5, rotations=True)
    affine = FewShotTasks(images, ways=20, shots=1, query_shots=5, rotations=True, affine=Affine())
    torch.manual_seed(0)
    model = ProtoNet(Conv4(None, 1, 64, 28), optimizer=partial(torch.optim.Adam, lr=1e-3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {"plain": [], "affine": [], "update": []}
    for repeat in range(args.repeats):
        seeds = [2 * repeat, 2 * repeat + 1]
        order = [("plain", plain), ("affine", affine)][:: 1 if repeat % 2 else -1]
        for name, tasks in order:
            seconds, drawn = draw(tasks, seeds)
            times[name].append(seconds)
        batch = stack_tasks(drawn)
        start = time.perf_counter()
        optimizer.zero_grad()
        _, objective = model.training_objectives(batch)
        objective.mean().backward()
        optimizer.step()
        times["update"].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    added = (medians["affine"] - medians["plain"]) / (medians["plain"] + medians["update"])
    print(
        f"draw a meta-batch: {medians['plain']:.1f} ms plain, {medians['affine']:.1f} ms with affine; "
        f"meta-update {medians['update']:.1f} ms; a meta-update's time grows by {100 * added:.1f}%"
    )
    payload = {"median_ms": medians, "added_fraction": added, "repeats": args.repeats}
    write_json("augment_cost", payload, args.json)
    return payload


if __name__ == "__main__":
    main()
