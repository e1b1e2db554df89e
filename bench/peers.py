"""Our meta-training against peer libraries: MAML vs learn2learn 0.2.0 and torchopt 0.7.3, ProtoNet vs
easyfsl 1.5.0, on identical tensors, plus each path's peak RSS in a fresh process.

Targets:
  * MAML: ours >= 1.1x the meta-steps/s of each MAML peer in every setting, with the inner loop
    the shipped configs default to (``configs/omniglot_{5,20}way1shot.yaml``, read here);
  * ProtoNet: ours >= 1.1x easyfsl's training episodes/s;
  * peak RSS of each of our paths <= 1.1x the leanest peer's.

MAML settings: second order, meta-batch 8, inner lr 0.4, Adam 1e-3, Conv4 with 64 filters on 28x28
one-channel synthetic images (FewShotTasks over 50 random classes x 20 examples, the tasks drawn
once and fed to every path), 1-shot: (a) 5-way, 1 query image per class, 1 inner step; (b) 5-way,
15 query images per class, 1 step; (c) 20-way, 1 query per class, 5 steps. Paths:

  * ours: ``lthmaml.meta.maml.MAML`` trained by ``lightning.pytorch.Trainer.fit`` on the
    pre-generated tasks, with ``inner_loop="higher"`` and with ``inner_loop="func"`` (``task_chunk``
    from the shipped config of the same way count);
  * learn2learn: ``l2l.algorithms.MAML(net, lr=0.4, first_order=False)``, ``clone()`` / ``adapt()``
    per task, per-task backward of the query loss / meta-batch, one Adam step per meta-batch;
  * torchopt: its functional MAML of ``examples/MAML-omniglot`` (``torchopt.MetaSGD(net, lr=0.4)``,
    ``extract_state_dict`` / ``recover_state_dict`` around each task), the same loss scaling.

Every path gets the same net: a Conv4 of stock layers (``nn.Conv2d(3, padding=1)``,
``nn.BatchNorm2d(track_running_stats=False)``, ReLU, ``MaxPool2d(2)``, x4, then ``nn.Linear``)
named as ``lthmaml.nets.Conv4``, loaded with one project Conv4's initial parameters. Before
timing, each setting's meta-gradient on 2 tasks is computed in float64 by every path (ours through
``Trainer.fit`` too) and compared: max over parameter tensors of ``|g - g_peer| / |g_peer|`` (L2).
Then each path gets a warm-up run and ``--repeats`` timed runs of ``--steps`` meta-steps (per setting),
interleaved (order reversed every other repeat); reported: steps/s of the medians and the paired
ratio ours/peer, the median over repeats of ``peer seconds / our seconds`` of back-to-back runs
(> 1: ours faster). Our seconds are Lightning's training loop (first batch start to last batch
end: loop, hooks, collation, logging, optimizer step); the whole ``fit()`` call is reported too.

ProtoNet: 20-way 1-shot, 15 query images per class, one episode per Adam step (1e-3): ours
``lthmaml.meta.protonet.ProtoNet`` through ``Trainer.fit`` against easyfsl's
``PrototypicalNetworks(backbone)`` with a plain training loop (``process_support_set``, forward on
the query, cross-entropy, Adam), the headless Conv4 as the embedding. easyfsl scores by minus the
Euclidean distance, ours by minus its square (Snell et al.), so their losses differ; the check is
that the distances agree (float64).

Peak RSS: 20-way 1-shot, 15 query images per class, 1 inner step, meta-batch 8 (MAML: ours higher,
ours func, learn2learn, torchopt; ProtoNet 20-way: ours, easyfsl), each in a fresh process
(``--rss-child``) that imports only what its path needs (ours: Lightning and the project),
builds the net and random tasks of the setting's shape, runs ``--rss-steps`` steps and reads
``ru_maxrss``. The children run first, while this process is small: a child's ``ru_maxrss``
includes its parent's RSS at the fork, so they would otherwise all read this process's size;
each also reports its own ``VmHWM`` as a check. In the peers' venv torchmetrics (so Lightning)
imports torchvision, which the project's own venv does not have, so our paths are measured again
under ``.venv/bin/python`` where it exists (``--ours-python``).

Set up the peers' venv first (it is not the project's): ``bash bench/peers_setup.sh``.

    .venv-peers/bin/python -m bench.peers --quick             # smoke run, ~50 s of CPU
    .venv-peers/bin/python -m bench.peers --threads 1         # default (1 thread), ~10 minutes
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Only torch is imported at the top: a --rss-child process of a peer must not pay for Lightning or
# the project, and --check-import must work whatever state the project is in.

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
OURS_VENV = "project venv"
INNER_LR = 0.4
META_LR = 1e-3
TARGET_SPEED = 1.1
TARGET_RSS = 1.1
PEER_VERSIONS = {"learn2learn": "0.2.0", "torchopt": "0.7.3", "easyfsl": "1.5.0"}
MAML_PEERS = ("learn2learn", "torchopt")
SHIPPED_CONFIGS = {5: "configs/omniglot_5way1shot.yaml", 20: "configs/omniglot_20way1shot.yaml"}
START = time.perf_counter()


def progress(message: str) -> None:
    elapsed = time.perf_counter() - START
    print(f"[{int(elapsed // 60):3d}:{int(elapsed % 60):02d}] {message}", flush=True)


# ---------------------------------------------------------------------------- the peers
TORCHVISION_OPS = {
    # torchvision's _meta_registrations registers fake kernels for these two at import time; the
    # torchvision 0.28.0 wheel's C ops (a CUDA build) do not load against the CPU torch, so without
    # the schemas `import torchvision` fails ("operator torchvision::nms does not exist").
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def declare_torchvision_ops() -> None:
    """Declare the torchvision op schemas that its import needs and its C library did not provide.

    Run before the first import of torchvision (learn2learn and easyfsl import it); only the
    pure-Python parts of either library are used, no torchvision op is ever called."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    for name, schema in TORCHVISION_OPS.items():
        if not _op_exists(name):
            torch.library.define(f"torchvision::{name}", schema)


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def load_peer(name: str) -> Any:
    """The peer's module, imported (``easyfsl``: ``easyfsl.methods``)."""
    if name in ("learn2learn", "easyfsl"):
        declare_torchvision_ops()
    module = importlib.import_module("easyfsl.methods" if name == "easyfsl" else name)
    if name == "torchopt":
        # pure-Python APIs only (MetaSGD, extract/recover_state_dict): check they exist here
        for attr in ("MetaSGD", "extract_state_dict", "recover_state_dict"):
            getattr(module, attr)
    return module


def peer_version(name: str) -> str:
    return importlib.metadata.version(name)


def find_peers(names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The importable peers, and a one-line reason for each one that is not."""
    found, missing = {}, {}
    for name in names:
        try:
            found[name] = load_peer(name)
        except Exception as error:  # noqa: BLE001 - any failure makes the peer missing
            missing[name] = one_line(error)
    return found, missing


def quiet() -> None:
    """Lightning's banners off, after the peers are imported: learn2learn imports the
    ``pytorch_lightning`` mirror package, whose import points the shared rank-zero logger at its own
    (INFO) logger."""
    import logging

    from bench.common import quiet_lightning

    quiet_lightning()
    for name in ("lightning", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:200]


# ---------------------------------------------------------------------------- the net
class StockConv4(nn.Module):
    """Conv4 of stock layers, its parameters named as ``lthmaml.nets.Conv4``'s
    (``features.{i}.0/1.weight/bias``, ``head.weight/bias``); ``out_features=None``: no head."""

    def __init__(
        self, out_features: Optional[int], hidden: int = 64, in_channels: int = 1, image_size: int = 28
    ) -> None:
        super().__init__()
        widths = [in_channels] + [hidden] * 4
        self.features = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(a, b, 3, padding=1),
                    nn.BatchNorm2d(b, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(2),
                )
                for a, b in zip(widths, widths[1:])
            )
        )
        side = image_size
        for _ in range(4):
            side //= 2
        self.out_features, self.image_size = out_features, image_size
        self.head = None if out_features is None else nn.Linear(hidden * side * side, out_features)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x).flatten(1)
        return features if self.head is None else self.head(features)


# ---------------------------------------------------------------------------- the training loops
# A batch is (support_x, support_y, query_x, query_y), each [tasks, examples, ...] (a TaskBatch or a
# plain tuple): the peers' loops do not need the project.
def _task(batch: Sequence[Tensor], i: int) -> list[Tensor]:
    return [field[i] for field in batch]


def l2l_loop(l2l: Any, net: nn.Module, batches: Sequence, inner_steps: int) -> None:
    """learn2learn's MAML: ``clone()`` and ``adapt()`` per task, second order."""
    maml = l2l.algorithms.MAML(net, lr=INNER_LR, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)
    for batch in batches:
        optimizer.zero_grad()
        n = batch[0].shape[0]
        for i in range(n):
            support_x, support_y, query_x, query_y = _task(batch, i)
            learner = maml.clone()
            for _ in range(inner_steps):
                learner.adapt(F.cross_entropy(learner(support_x), support_y))
            (F.cross_entropy(learner(query_x), query_y) / n).backward()
        optimizer.step()


def torchopt_loop(torchopt: Any, net: nn.Module, batches: Sequence, inner_steps: int) -> None:
    """torchopt's functional MAML (its examples/MAML-omniglot): ``MetaSGD`` steps on the module,
    its state extracted once and recovered after each task."""
    optimizer = torch.optim.Adam(net.parameters(), lr=META_LR)
    inner = torchopt.MetaSGD(net, lr=INNER_LR)
    for batch in batches:
        optimizer.zero_grad()
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        inner_state = torchopt.extract_state_dict(inner, by="reference")
        n = batch[0].shape[0]
        for i in range(n):
            support_x, support_y, query_x, query_y = _task(batch, i)
            for _ in range(inner_steps):
                inner.step(F.cross_entropy(net(support_x), support_y))
            (F.cross_entropy(net(query_x), query_y) / n).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner, inner_state)
        optimizer.step()


def easyfsl_loop(methods: Any, net: nn.Module, batches: Sequence) -> None:
    """easyfsl's PrototypicalNetworks with a plain loop: the mean query cross-entropy of a
    meta-batch's episodes per Adam step."""
    model = methods.PrototypicalNetworks(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        n = batch[0].shape[0]
        loss = 0.0
        for i in range(n):
            support_x, support_y, query_x, query_y = _task(batch, i)
            model.process_support_set(support_x, support_y)
            loss = loss + F.cross_entropy(model(query_x), query_y)
        (loss / n).backward()
        optimizer.step()


def fit_ours(module: Any, tasks: Sequence, meta_batch: int, steps: int) -> dict:
    """``Trainer.fit`` of our LightningModule over ``steps`` meta-batches of ``tasks``."""
    from bench.common import StepTimer, make_trainer, task_loader

    timer = StepTimer()
    trainer = make_trainer(max_steps=steps, callbacks=[timer])
    loader = task_loader(tasks[: steps * meta_batch], meta_batch)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    fit_s = time.perf_counter() - start
    return {"loop_s": timer.seconds, "fit_s": fit_s}


def maml_module(net: nn.Module, inner_loop: str, inner_steps: int, options: dict) -> Any:
    """Our MAML; ``options``: the shipped config's ``func`` loop settings (``task_chunk``, and
    ``chunk_memory_mb`` where the project has it), those MAML accepts."""
    import inspect

    from lthmaml.meta.maml import MAML

    accepted = inspect.signature(MAML).parameters
    return MAML(
        net,
        inner_lr=INNER_LR,
        inner_steps=inner_steps,
        first_order=False,
        inner_loop=inner_loop,
        optimizer=lambda params: torch.optim.Adam(params, lr=META_LR),
        **{k: v for k, v in options.items() if k in accepted},
    )


def describe(options: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items()) or "MAML's defaults"


def effective_chunk(work: Work, options: dict) -> Optional[int]:
    """Tasks per ``vmap`` chunk our func loop takes on this work's meta-batches (``auto`` resolved)."""
    module = maml_module(work.net(), "func", work.setting.inner_steps, options)
    if hasattr(module, "chunk_size"):
        try:
            return int(module.chunk_size(work.batches[0], work.setting.inner_steps))
        except TypeError:  # an older signature
            return int(module.chunk_size(work.batches[0]))
    chunk = getattr(module, "task_chunk", None)
    return chunk if isinstance(chunk, int) else None


def protonet_module(net: nn.Module) -> Any:
    from lthmaml.meta.protonet import ProtoNet

    return ProtoNet(net, optimizer=lambda params: torch.optim.Adam(params, lr=META_LR))


# ---------------------------------------------------------------------------- settings and work
@dataclass(frozen=True)
class Setting:
    key: str
    ways: int
    query_shots: int
    inner_steps: int
    shots: int = 1

    @property
    def label(self) -> str:
        steps = f"{self.inner_steps} inner step{'s' if self.inner_steps > 1 else ''}"
        return f"{self.ways}-way {self.shots}-shot {self.query_shots} query/class, {steps}"


MAML_SETTINGS = {
    "a": Setting("a", ways=5, query_shots=1, inner_steps=1),
    "b": Setting("b", ways=5, query_shots=15, inner_steps=1),
    "c": Setting("c", ways=20, query_shots=1, inner_steps=5),
}
PROTONET_SETTING = Setting("protonet", ways=20, query_shots=15, inner_steps=0)
RSS_SETTING = Setting("rss", ways=20, query_shots=15, inner_steps=1)


def shipped_defaults() -> dict[int, dict]:
    """``inner_loop`` and the ``func`` loop's chunking options of the shipped MAML configs, by way count."""
    import yaml

    out = {}
    for ways, path in SHIPPED_CONFIGS.items():
        args = yaml.safe_load((ROOT / path).read_text())["model"]["init_args"]
        out[ways] = {
            "config": path,
            "inner_loop": args["inner_loop"],
            "options": {k: args[k] for k in ("task_chunk", "chunk_memory_mb") if k in args},
        }
    return out


class Work:
    """One setting's initial parameters (a project Conv4's) and pre-generated tasks, for every path."""

    def __init__(
        self, setting: Setting, meta_batch: int, steps: int, hidden: int, seed: int, head: bool = True
    ) -> None:
        from bench.common import image_task_source, meta_batches, pregenerate
        from lthmaml.nets.models import Conv4

        self.setting, self.meta_batch, self.hidden = setting, meta_batch, hidden
        self.out_features = setting.ways if head else None
        torch.manual_seed(seed)
        project = Conv4(out_features=self.out_features, hidden_channels=hidden)
        self.init = {name: p.detach().clone() for name, p in project.named_parameters()}
        source = image_task_source(setting.ways, setting.shots, setting.query_shots, seed=seed)
        self.tasks = pregenerate(source, meta_batch * steps, seed=seed)
        self.batches = meta_batches(self.tasks, meta_batch)
        self.dtype = torch.float32

    def net(self) -> StockConv4:
        net = StockConv4(self.out_features, self.hidden)
        net.load_state_dict(self.init)  # strict: the names match lthmaml.nets.Conv4's
        return net.to(self.dtype)

    def double(self, tasks: int) -> Work:
        """A float64 copy with the first ``tasks`` tasks as one meta-batch."""
        from bench.common import meta_batches

        other = object.__new__(Work)
        other.setting, other.hidden, other.out_features = self.setting, self.hidden, self.out_features
        other.init, other.meta_batch, other.dtype = self.init, tasks, torch.float64
        other.tasks = [
            type(t)(*(f.double() if f.is_floating_point() else f for f in t)) for t in self.tasks[:tasks]
        ]
        other.batches = meta_batches(other.tasks, tasks)
        return other


def maml_runners(work: Work, peers: dict[str, Any], options: dict) -> dict[str, Callable[[int], dict]]:
    """Each MAML path as ``run(steps) -> {"loop_s", "fit_s", "net"}`` from the shared init."""
    inner_steps = work.setting.inner_steps

    def ours(inner_loop: str) -> Callable[[int], dict]:
        def run(steps: int) -> dict:
            module = maml_module(work.net(), inner_loop, inner_steps, options)
            return fit_ours(module, work.tasks, work.meta_batch, steps) | {"net": module.net}

        return run

    def peer(loop: Callable, lib: Any) -> Callable[[int], dict]:
        def run(steps: int) -> dict:
            net = work.net().train()
            start = time.perf_counter()
            loop(lib, net, work.batches[:steps], inner_steps)
            seconds = time.perf_counter() - start
            return {"loop_s": seconds, "fit_s": seconds, "net": net}

        return run

    runners = {"ours higher": ours("higher"), "ours func": ours("func")}
    loops = {"learn2learn": l2l_loop, "torchopt": torchopt_loop}
    for name in MAML_PEERS:
        if name in peers:
            runners[name] = peer(loops[name], peers[name])
    return runners


def meta_gradient(run: Callable[[int], dict]) -> dict[str, Tensor]:
    net = run(1)["net"]
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}


def relative_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Max over parameter tensors of ``||a - b|| / ||b||`` (L2).

    Tensors whose meta-gradient is zero in exact arithmetic are left out: the conv biases ahead of
    a batch-statistics BatchNorm (which subtracts them again) get only rounding noise, ~1e-15,
    whose relative difference means nothing. They are the tensors with ``||b||`` under 1e-9 of the
    whole gradient's norm.
    """
    total = torch.cat([g.flatten() for g in b.values()]).norm()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b if b[k].norm() > 1e-9 * total)


def agreement(work: Work, peers: dict[str, Any], options: dict, tasks: int = 2) -> dict[str, float]:
    """Float64 meta-gradients of every path on ``tasks`` tasks, compared pairwise with ours."""
    work64 = work.double(tasks)
    grads = {name: meta_gradient(run) for name, run in maml_runners(work64, peers, options).items()}
    for name, grad in grads.items():
        dtypes = {g.dtype for g in grad.values()}
        if dtypes != {torch.float64}:
            raise RuntimeError(f"{name}: meta-gradient in {dtypes}, not float64")
    out = {"ours higher vs ours func": relative_difference(grads["ours func"], grads["ours higher"])}
    for ours in ("ours higher", "ours func"):
        for peer in MAML_PEERS:
            if peer in grads:
                out[f"{ours} vs {peer}"] = relative_difference(grads[ours], grads[peer])
    return out


def protonet_agreement(work: Work, methods: Any, tasks: int = 2) -> float:
    """Max relative difference between our squared distances and the square of easyfsl's
    (float64, the same net and episodes): both compute the same embeddings and prototypes."""
    from lthmaml.meta.protonet import ProtoNet

    work64 = work.double(tasks)
    ours = ProtoNet(work64.net())
    theirs = methods.PrototypicalNetworks(work64.net())
    worst = 0.0
    with torch.no_grad():
        for i in range(tasks):
            task = work64.tasks[i]
            ways = int(task.support_y.max()) + 1
            squared = -ours.logits(ours.embed(task.support_x), task.support_y, ours.embed(task.query_x), ways)
            theirs.process_support_set(task.support_x, task.support_y)
            their_squared = theirs(task.query_x).pow(2)
            worst = max(worst, float((squared - their_squared).norm() / their_squared.norm()))
    return worst


def interleaved(
    runners: dict[str, Callable[[int], dict]], steps: int, repeats: int, warmup_steps: int, what: str
) -> dict[str, dict]:
    """A warm-up run of each path, then ``repeats`` timed runs in alternating order."""
    names = list(runners)
    for name in names:
        progress(f"{what}: warm-up {name} ({warmup_steps} step(s))")
        runners[name](warmup_steps)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            result = runners[name](steps)
            runs[name].append({"loop_s": result["loop_s"], "fit_s": result["fit_s"]})
        progress(
            f"{what}: repeat {r + 1}/{repeats}: "
            + ", ".join(f"{n} {runs[n][-1]['loop_s']:.2f}s" for n in names)
        )
    return {
        name: {
            "loop_s": [x["loop_s"] for x in results],
            "fit_s": [x["fit_s"] for x in results],
            "steps_per_s": steps / statistics.median(x["loop_s"] for x in results),
            "steps_per_s_fit": steps / statistics.median(x["fit_s"] for x in results),
        }
        for name, results in runs.items()
    }


def paired(ours: dict, peer: dict, key: str = "loop_s") -> float:
    """Median over repeats of peer seconds / our seconds (a speed ratio ours/peer)."""
    return statistics.median(p / o for p, o in zip(peer[key], ours[key]))


# ---------------------------------------------------------------------------- peak RSS
RSS_PATHS = (
    "maml-ours-higher",
    "maml-ours-func",
    "maml-learn2learn",
    "maml-torchopt",
    "protonet-ours",
    "protonet-easyfsl",
)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hwm_mib() -> Optional[float]:
    """This process's own peak RSS (``VmHWM``, Linux): unlike ``ru_maxrss`` it starts afresh at
    ``exec``, so a parent's size at the fork cannot show through."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def random_tasks(setting: Setting, count: int, seed: int) -> list[tuple[Tensor, ...]]:
    """Tasks of the setting's shape from random pixels (the compute does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randperm(setting.ways, generator=gen)
        support_y = labels.repeat_interleave(setting.shots)
        query_y = labels.repeat_interleave(setting.query_shots)
        support_x = torch.rand(len(support_y), 1, 28, 28, generator=gen)
        query_x = torch.rand(len(query_y), 1, 28, 28, generator=gen)
        out.append((support_x, support_y, query_x, query_y))
    return out


def rss_child(path: str, steps: int, meta_batch: int, hidden: int, options: dict, seed: int) -> dict:
    """In the fresh process: import what the path needs, build net and tasks, run, read the peak."""
    maml = path.startswith("maml")
    setting = RSS_SETTING if maml else PROTONET_SETTING
    batch = meta_batch if maml else 1
    torch.manual_seed(seed)
    net = StockConv4(setting.ways if maml else None, hidden)
    tasks = random_tasks(setting, batch * steps, seed)
    kind = path.split("-", 1)[1]
    extra: dict = {}
    if kind.startswith("ours"):
        from lthmaml.data import TaskBatch

        tasks = [TaskBatch(*t) for t in tasks]
        module = (
            maml_module(net, kind.split("-")[1], setting.inner_steps, options)
            if maml
            else protonet_module(net)
        )
        baseline = max_rss_mib()
        fit_ours(module, tasks, batch, steps)
        if maml and hasattr(module, "chunk_size") and kind.endswith("func"):
            first = TaskBatch(*(torch.stack(f) for f in zip(*tasks[:batch])))
            extra["tasks_per_chunk"] = int(module.chunk_size(first, setting.inner_steps))
    else:
        lib = load_peer(kind)
        batches = [
            tuple(torch.stack(f) for f in zip(*tasks[i : i + batch])) for i in range(0, len(tasks), batch)
        ]
        baseline = max_rss_mib()
        if kind == "easyfsl":
            easyfsl_loop(lib, net.train(), batches)
        else:
            {"learn2learn": l2l_loop, "torchopt": torchopt_loop}[kind](
                lib, net.train(), batches, setting.inner_steps
            )
    peak = max_rss_mib()
    return {
        "path": path,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "delta_mib": peak - baseline,
        "vmhwm_mib": hwm_mib(),
        **extra,
    }


def rss_command(path: str, args: argparse.Namespace, options: dict, python: str) -> list[str]:
    cmd = [python, "-m", "bench.peers", "--rss-child", path, "--rss-steps", str(args.rss_steps)]
    cmd += [
        "--meta-batch",
        str(args.meta_batch),
        "--hidden",
        str(args.hidden),
        "--rss-options",
        json.dumps(options),
    ]
    return cmd + ["--threads", str(args.threads), "--seed", str(args.seed)]


def run_children(commands: dict[str, list[str]], parallel: bool) -> dict[str, dict | str]:
    """Each command's JSON result, or the last line of its error; one after the other, or all
    at once (``--quick``: tiny nets, where the imports are most of the time)."""
    out: dict[str, dict | str] = {}

    def collect(name: str, proc: subprocess.Popen) -> None:
        stdout, stderr = proc.communicate()
        lines = stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            out[name] = json.loads(lines[-1])
        else:
            errors = stderr.strip().splitlines() or ["no output"]
            out[name] = f"exit {proc.returncode}: {errors[-1][:200]}"

    def start(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    if parallel:
        progress(f"peak RSS: {', '.join(commands)}: {len(commands)} fresh processes at once")
        for name, proc in [(name, start(cmd)) for name, cmd in commands.items()]:
            collect(name, proc)
    else:
        for name, cmd in commands.items():
            progress(f"peak RSS: {name} in a fresh process ({cmd[0]})")
            collect(name, start(cmd))
    return out


# ---------------------------------------------------------------------------- main
def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tasks")
    parser.add_argument(
        "--json", type=Path, default=None, help="where to write the results (default: bench/out/peers.json)"
    )
    parser.add_argument("--settings", nargs="+", choices=sorted(MAML_SETTINGS), default=sorted(MAML_SETTINGS))
    parser.add_argument("--meta-batch", type=int, default=8, help="MAML tasks per meta-step")
    parser.add_argument("--hidden", type=int, default=64, help="Conv4 filters per block")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=3,
        default=[4, 2, 1],
        metavar=("A", "B", "C"),
        help="timed MAML meta-steps per run in settings a, b, c (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed runs per path")
    parser.add_argument("--warmup-steps", type=int, default=1, help="meta-steps of each path's warm-up run")
    parser.add_argument("--proto-steps", type=int, default=8, help="timed ProtoNet episodes per run")
    parser.add_argument("--rss-steps", type=int, default=2, help="steps of each fresh RSS process")
    parser.add_argument(
        "--ours-python",
        default=None,
        help="also measure our paths' peak RSS under this interpreter: the project's venv, without the "
        "peers (default: .venv/bin/python where it exists, none with --quick; empty: skip)",
    )
    parser.add_argument("--skip-maml", action="store_true")
    parser.add_argument("--skip-protonet", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 filters, 1 step, 1 repeat")
    parser.add_argument("--check-import", metavar="PEER", help=argparse.SUPPRESS)
    parser.add_argument("--rss-child", choices=RSS_PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--rss-options", type=json.loads, default={}, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.steps, args.repeats, args.proto_steps, args.rss_steps = 8, [1, 1, 1], 1, 2, 1
        args.meta_batch = 4
    if args.ours_python is None:
        args.ours_python = str(PROJECT_PYTHON) if PROJECT_PYTHON.exists() and not args.quick else ""
    return args


def rss_phase(args: argparse.Namespace, defaults: dict, installed: dict[str, str]) -> tuple[dict, list]:
    """Each path's peak RSS in a fresh process, run while this process is still small: on Linux a
    child's ``ru_maxrss`` includes its parent's RSS at the fork (``exec`` keeps the old high-water
    mark), so the children are started before this process imports the peers and the project.
    Each child also reports its own ``VmHWM``, which starts afresh at ``exec``, as a check."""
    options = defaults[RSS_SETTING.ways]["options"]
    commands = {}
    for path in RSS_PATHS:
        lib = path.split("-", 1)[1]
        if lib in PEER_VERSIONS and lib not in installed:
            continue
        commands[path] = rss_command(path, args, options, sys.executable)
        if "-ours" in path and args.ours_python:
            commands[f"{path} [{OURS_VENV}]"] = rss_command(path, args, options, args.ours_python)
    rss, failed = {}, {}
    for name, result in run_children(commands, parallel=args.quick).items():
        if isinstance(result, str):
            failed[name] = result
            progress(f"peak RSS: {name} failed: {result}")
        else:
            rss[name] = result | {"python": commands[name][0]}
    rows, out, checks = [], {}, []
    for family, peers in (("maml", MAML_PEERS), ("protonet", ("easyfsl",))):
        mine = {p: r for p, r in rss.items() if p.startswith(family)}
        peer_peaks = [r["peak_mib"] for p, r in mine.items() if p.split("-", 1)[1] in peers]
        leanest = min(peer_peaks) if peer_peaks else None
        for path, r in mine.items():
            r["ratio_to_leanest_peer"] = None if leanest is None else r["peak_mib"] / leanest
            rows.append(
                [path, r["baseline_mib"], r["peak_mib"], r["delta_mib"], r["vmhwm_mib"]]
                + [r["ratio_to_leanest_peer"] or ""]
            )
            if "-ours" in path and leanest is not None:
                checks.append(
                    _check(f"peak RSS {path} / leanest peer", r["ratio_to_leanest_peer"], TARGET_RSS, True)
                )
        out[family] = mine
    from bench.common import print_table  # after the children: it imports Lightning and the project

    label = f"{RSS_SETTING.label}, meta-batch {args.meta_batch} (ProtoNet 20-way: 1 episode per step)"
    chunks = {r["tasks_per_chunk"] for r in rss.values() if "tasks_per_chunk" in r}
    if chunks:
        options = options | {"tasks per chunk": "/".join(map(str, sorted(chunks)))}
    print_table(
        f"peak RSS (MiB), fresh process each: {label}; {args.rss_steps} step(s), func: {describe(options)}, "
        f"{args.hidden} filters (target <= {TARGET_RSS}x the leanest peer)",
        ["path", "baseline", "peak (ru_maxrss)", "delta", "VmHWM", "peak / leanest peer"],
        rows or [["(none measured)", "", "", "", "", ""]],
    )
    return {
        "setting": label,
        "func_options": options,
        "steps": args.rss_steps,
        "failed": failed,
        **out,
    }, checks


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    # torchmetrics (so Lightning, so the project) imports torchvision where it is installed, as it
    # is in the peers' venv: the schemas must be declared before anything imports it.
    declare_torchvision_ops()
    if args.check_import:
        load_peer(args.check_import)
        print(f"{args.check_import} {peer_version(args.check_import)} imports")
        return {}
    if args.rss_child:
        print(
            json.dumps(
                rss_child(
                    args.rss_child, args.rss_steps, args.meta_batch, args.hidden, args.rss_options, args.seed
                )
            )
        )
        return {}

    installed = {}
    for name in PEER_VERSIONS:
        try:
            installed[name] = peer_version(name)
            note = "" if installed[name] == PEER_VERSIONS[name] else f" (expected {PEER_VERSIONS[name]})"
            progress(f"peer {name} {installed[name]} installed{note}")
        except importlib.metadata.PackageNotFoundError:
            progress(f"peer {name} missing: not installed in {sys.prefix} (run bench/peers_setup.sh)")
    defaults = shipped_defaults()
    for d in defaults.values():
        progress(f"shipped config {d['config']}: inner_loop={d['inner_loop']}, {describe(d['options'])}")

    summary: list[dict] = []
    rss = None
    if not args.skip_rss:
        rss, checks = rss_phase(args, defaults, installed)
        summary += checks

    from bench.common import print_table, write_json

    found, missing = find_peers(list(PEER_VERSIONS))
    quiet()
    versions = {name: peer_version(name) for name in found}
    for name in PEER_VERSIONS:
        if name in found:
            progress(f"peer {name} {versions[name]} imported")
        else:
            progress(f"peer {name} missing: {missing[name]}")
    results: dict = {
        "settings": vars(args) | {"json": str(args.json)},
        "peers": {"found": versions, "missing": missing},
        "shipped_defaults": {str(k): v for k, v in defaults.items()},
        "torch": torch.__version__,
    }
    if rss is not None:
        results["rss"] = rss

    # ---- MAML
    if not args.skip_maml:
        results["maml"] = {}
        for key in args.settings:
            setting = MAML_SETTINGS[key]
            steps = args.steps["abc".index(key)]
            options = defaults[setting.ways]["options"]
            default_loop = defaults[setting.ways]["inner_loop"]
            what = f"MAML ({key}) {setting.label}"
            work = Work(setting, args.meta_batch, max(steps, args.warmup_steps), args.hidden, args.seed)
            chunk = effective_chunk(work, options)
            progress(f"{what}: func loop: {describe(options)}: {chunk} task(s) per vmap chunk")
            progress(f"{what}: float64 meta-gradient agreement on 2 tasks")
            agree = agreement(work, found, options)
            for pair, diff in agree.items():
                progress(f"{what}: {pair}: max relative L2 difference {diff:.2e}")
            runs = interleaved(
                maml_runners(work, found, options), steps, args.repeats, args.warmup_steps, what
            )
            ratios = {
                f"{ours} / {peer}": {
                    "loop": paired(runs[ours], runs[peer]),
                    "fit": paired(runs[ours], runs[peer], "fit_s"),
                }
                for ours in ("ours higher", "ours func")
                for peer in MAML_PEERS
                if peer in runs
            }
            rows = [
                [
                    name,
                    r["steps_per_s"],
                    r["steps_per_s"] * args.meta_batch,
                    r["steps_per_s_fit"],
                    _runs(r["loop_s"]),
                ]
                for name, r in runs.items()
            ]
            print_table(
                f"MAML ({key}) {setting.label}: second order, meta-batch {args.meta_batch}, "
                f"{args.hidden} filters, {steps} step(s) x {args.repeats} repeats, {args.threads} thread(s); "
                f"func: {chunk} task(s) per chunk ({describe(options)})",
                ["path", "steps/s", "tasks/s", "steps/s (whole fit)", "loop seconds of each run"],
                rows,
            )
            print_table(
                f"MAML ({key}): paired median ratio ours/peer (> 1: ours faster)",
                ["pair", "loop", "whole fit"],
                [[pair, r["loop"], r["fit"]] for pair, r in ratios.items()],
            )
            results["maml"][key] = {
                "setting": setting.label,
                "steps": steps,
                "func_options": options,
                "func_tasks_per_chunk": chunk,
                "default_inner_loop": default_loop,
                "agreement_max_rel_l2": agree,
                "runs": runs,
                "paired_ratio": ratios,
            }
            for peer in MAML_PEERS:
                if peer in runs:
                    value = ratios[f"ours {default_loop} / {peer}"]["loop"]
                    summary.append(
                        _check(f"MAML ({key}): ours ({default_loop}) / {peer} speed", value, TARGET_SPEED)
                    )

    # ---- ProtoNet
    if not args.skip_protonet:
        if "easyfsl" not in found:
            progress("ProtoNet: easyfsl missing, skipped")
        else:
            methods = found["easyfsl"]
            steps = args.proto_steps
            work = Work(
                PROTONET_SETTING, 1, max(steps, args.warmup_steps), args.hidden, args.seed, head=False
            )
            what = "ProtoNet 20-way 1-shot 15 query/class"
            agree = protonet_agreement(work, methods)
            progress(
                f"{what}: squared distances ours vs easyfsl, float64: max relative difference {agree:.2e}"
            )

            def ours(n: int) -> dict:
                module = protonet_module(work.net())
                return fit_ours(module, work.tasks, 1, n)

            def theirs(n: int) -> dict:
                net = work.net()
                start = time.perf_counter()
                easyfsl_loop(methods, net, work.batches[:n])
                seconds = time.perf_counter() - start
                return {"loop_s": seconds, "fit_s": seconds}

            runs = interleaved(
                {"ours": ours, "easyfsl": theirs}, steps, args.repeats, args.warmup_steps, what
            )
            ratio = {
                "loop": paired(runs["ours"], runs["easyfsl"]),
                "fit": paired(runs["ours"], runs["easyfsl"], "fit_s"),
            }
            print_table(
                f"{what}: one episode per Adam step, {args.hidden} filters, {steps} episodes x "
                f"{args.repeats} repeats, {args.threads} thread(s)",
                ["path", "episodes/s", "episodes/s (whole fit)", "loop seconds of each run"],
                [[n, r["steps_per_s"], r["steps_per_s_fit"], _runs(r["loop_s"])] for n, r in runs.items()]
                + [["paired ratio ours/easyfsl", ratio["loop"], ratio["fit"], ""]],
            )
            results["protonet"] = {
                "setting": what,
                "steps": steps,
                "agreement_max_rel": agree,
                "runs": runs,
                "paired_ratio": ratio,
            }
            summary.append(_check("ProtoNet 20-way: ours / easyfsl speed", ratio["loop"], TARGET_SPEED))

    if summary:
        print_table(
            "targets",
            ["check", "measured", "target", "verdict"],
            [[c["check"], c["value"], c["target"], "met" if c["met"] else "missed"] for c in summary],
        )
    results["summary"] = summary
    write_json("peers", results, args.json)
    return results


def _runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _check(what: str, value: float, target: float, below: bool = False) -> dict:
    met = value <= target if below else value >= target
    return {"check": what, "value": value, "target": f"{'<=' if below else '>='} {target}", "met": met}


if __name__ == "__main__":
    main()
