"""File size of the compact artifact (``lthmaml.edge.export``) against dense and PyTorch-sparse files.

Target: the MAML paper's Omniglot net (Conv4, 64 filters, 5-way, 28x28) at 80% unstructured
sparsity exports to <= 0.25x the dense float32 safetensors file (<= 0.14x with
``--dtype float16``, <= 0.09x with ``--dtype int8``). The physical limit at sparsity s is about
``H(s)/32 + (1 - s)`` of dense: the mask's entropy (``H(s)`` bits a weight, 0.72 at 80%) plus the
kept 32-bit values (0.22x at 80%; ``H(s)/32 + (1 - s)/2`` = 0.12x for float16; ``H(s)/32 +
(1 - s)/4`` = 0.07x for int8). The artifact's masks come within 10% of it: bit-packed (one bit a
weight, ``1/32``) and deflated where that is smaller (at 80%: 10,785 of 13,936 bytes, 0.77 bits a
weight). Beyond that limit every file pays its safetensors header (about 2.8 kB, 0.006x: one JSON
entry a tensor plus the metadata), the biases and BatchNorm parameters (773 values) and, for
int8, a float32 scale per output channel (261).

Setting: fresh random weights (size does not depend on training), pruned by global magnitude
(``lthmaml.sparsity.magnitude_scores`` + ``prune_lowest``) to 0/50/80/90% of all prunable weights.
Every file holds the same tensors: the prunable layers' effective weights, their biases and the
BatchNorm parameters (no mask buffers):

* dense safetensors: every tensor dense, float32 (the 1.0x reference);
* dense torch.save: the same dict pickled by ``torch.save``;
* torch COO: prunable weights as ``weight.to_sparse()`` (int64 indices per kept value), torch.save;
* torch CSR: prunable weights flattened to 2-D ``[out, in*k*k]`` then ``to_sparse_csr()``, torch.save;
* artifact float32 / float16 / int8: ``lthmaml.edge.export.export_net`` (kept values + bit-packed
  masks, deflated where smaller; int8: per-output-channel codes and scales, the rest float16).

Accuracy (``--checkpoint``, a trained 5-way Conv4 MAML checkpoint): its net dense and pruned to
``--sparsity`` by global magnitude (the head at half rate, as the LTH papers prune it), no
retraining, each exported as float32 and int8 and loaded back into the checkpoint's MAML module;
all four are tested (``trainer.test``: the checkpoint's evaluation inner loop) on the same
``--tasks`` meta-test tasks of ``--config``'s Omniglot split. Target: int8 within 0.5 points of
float32; the difference's interval is the paired one (per task, int8 minus float32).

    python -m bench.artifact_size        # a few seconds; writes bench/out/artifact_size.json
    python -m bench.artifact_size --checkpoint runs/converge/so-q1-func-mb8/t20.ckpt  # ~4 CPU-minutes
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from bench.common import base_parser, make_trainer, print_table, setup, write_json
from lthmaml import sparsity
from lthmaml.data import OmniglotDataModule
from lthmaml.edge.artifact import dense_size, dense_tensors, load_artifact
from lthmaml.edge.export import artifact_from_checkpoint, export_net
from lthmaml.meta.maml import MAML
from lthmaml.meta.metrics import mean_and_ci95
from lthmaml.nets.models import Conv4

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = (0.0, 0.5, 0.8, 0.9)
DTYPES = ("float32", "float16", "int8")
TARGETS = {"float32": (0.8, 0.25), "float16": (0.8, 0.14), "int8": (0.8, 0.09)}
"""dtype: (sparsity, the largest artifact/dense ratio allowed there)."""
ACCURACY_TARGET = 0.005
"""The largest meta-test accuracy drop of int8 against float32 (0.5 points)."""


def torch_sparse(net: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The dense tensors with the prunable weights in a PyTorch sparse layout (``coo`` or ``csr``)."""
    warnings.filterwarnings("ignore", ".*Sparse CSR tensor support is in beta.*")
    tensors = dense_tensors(net)
    for name in sparsity.prunable(net):
        weight = tensors[name]
        tensors[name] = weight.to_sparse() if layout == "coo" else weight.flatten(1).to_sparse_csr()
    return tensors


def entropy(s: float) -> float:
    """The fewest bits per weight a mask with a fraction ``s`` pruned can take (binary entropy)."""
    return 0.0 if s in (0.0, 1.0) else -(s * math.log2(s) + (1 - s) * math.log2(1 - s))


def measure(net: Conv4, folder: Path) -> dict:
    """Bytes of each file for ``net`` at its current masks, and the artifact's round-trip error."""

    def size_of(name: str, write) -> int:
        path = folder / name
        write(path)
        return path.stat().st_size

    dense = dense_tensors(net)
    sizes = {
        "dense_safetensors": size_of("dense.safetensors", lambda p: save_file(dense, str(p))),
        "dense_torch_save": size_of("dense.pt", lambda p: torch.save(dense, p)),
        "torch_coo": size_of("coo.pt", lambda p: torch.save(torch_sparse(net, "coo"), p)),
        "torch_csr": size_of("csr.pt", lambda p: torch.save(torch_sparse(net, "csr"), p)),
    }
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = net.eval()(x)
    errors = {}
    for dtype in DTYPES:
        path = export_net(net, folder / f"artifact_{dtype}.safetensors", {}, dtype)
        sizes[f"artifact_{dtype}"] = path.stat().st_size
        with torch.no_grad():
            errors[dtype] = float((load_artifact(path).net(x) - reference).abs().max())
    return {"bytes": sizes, "max_abs_output_error": errors}


def meta_test(module: MAML, data, artifact: Path) -> torch.Tensor:
    """Per-task query accuracies of ``module`` with the artifact's (dequantised) weights and masks."""
    net = load_artifact(artifact).net
    state = {key: value for key, value in module.state_dict().items() if not key.startswith("masks.")}
    weights = {key: value for key, value in net.state_dict().items() if not key.startswith("masks.")}
    state.update({f"net.{key}": value for key, value in weights.items()})
    state.update({f"masks.net.{key}": mask for key, mask in sparsity.masks_within(net).items()})
    module.load_state_dict(state)  # a Powerprop module stores the weights through its transform
    make_trainer().test(module, datamodule=data, verbose=False)
    return module.test_per_task["acc_post"].compute()


def accuracy(args) -> dict:
    """float32 vs int8 meta-test accuracy of the checkpoint's net, dense and pruned, same tasks."""
    module = MAML.load_from_checkpoint(args.checkpoint, map_location="cpu")
    init_args = yaml.safe_load(args.config.read_text())["data"]["init_args"]  # the config's episodes
    data = OmniglotDataModule(**{**init_args, "test_tasks": args.tasks, "seed": args.seed})
    net = artifact_from_checkpoint(args.checkpoint).net  # effective float32 weights, masks as saved
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in (0.0, args.sparsity):
            pruned = copy.deepcopy(net)
            sparsity.prune_by_magnitude(pruned, level, layer_rates={"head": 0.5})
            actual = sparsity.sparsity_report(pruned).sparsity
            accs, sizes = {}, {}
            for dtype in ("float32", "int8"):
                path = export_net(pruned, Path(tmp) / f"{level}_{dtype}.safetensors", {}, dtype)
                sizes[dtype] = path.stat().st_size / dense_size(pruned)
                accs[dtype] = meta_test(module, data, path)
            (fp32, fp32_ci), (int8, int8_ci) = (mean_and_ci95(accs[d]) for d in ("float32", "int8"))
            diff, diff_ci = mean_and_ci95(accs["int8"] - accs["float32"])  # paired: same tasks
            results[f"{actual:.3f}"] = {
                "sparsity": actual,
                "acc_float32": [fp32, fp32_ci],
                "acc_int8": [int8, int8_ci],
                "int8_minus_float32": [diff, diff_ci],
                "ratio_to_dense_safetensors": sizes,
                "met": abs(diff) <= ACCURACY_TARGET,
            }
            rows.append(
                [
                    f"{actual:.1%}",
                    f"{fp32:.2%} +- {fp32_ci:.2%}",
                    f"{int8:.2%} +- {int8_ci:.2%}",
                    f"{diff * 100:+.2f} +- {diff_ci * 100:.2f}",
                    f"{sizes['float32']:.3f}x / {sizes['int8']:.3f}x",
                    "MET" if abs(diff) <= ACCURACY_TARGET else "MISSED",
                ]
            )
    print_table(
        f"{args.checkpoint}: meta-test accuracy on the same {args.tasks} tasks, mean +- 95% CI "
        f"(global magnitude pruning, head at half rate, no retraining)",
        ["sparsity", "float32", "int8", "int8 - fp32 (points)", "size fp32 / int8", "|diff| <= 0.5"],
        rows,
    )
    return {"checkpoint": str(args.checkpoint), "tasks": args.tasks, "config": str(args.config), **results}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    parser.add_argument("--checkpoint", type=Path, default=None, help="also measure int8 vs fp32 accuracy")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "omniglot_5way1shot.yaml")
    parser.add_argument("--tasks", type=int, default=200, help="meta-test tasks (default: %(default)s)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="pruned level (default: %(default)s)")
    args = parser.parse_args(argv)
    setup(args.threads)
    torch.manual_seed(args.seed)
    net = Conv4(out_features=5, in_channels=1, hidden_channels=64, image_size=28)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for target in SPARSITIES:
            sparsity.prune_by_magnitude(net, target, level=1)  # level=1: up to `target` of all weights
            measured = measure(net, Path(tmp))
            sizes = measured["bytes"]
            dense = sizes["dense_safetensors"]
            ratios = {key: value / dense for key, value in sizes.items()}
            actual = sparsity.sparsity_report(net).sparsity
            mask = entropy(actual) / 32  # the mask bits a weight at least; 0 when nothing is pruned
            limits = {dtype: mask + (1 - actual) / width for dtype, width in zip(DTYPES, (1, 2, 4))}
            results.append(
                {
                    "sparsity": actual,
                    **measured,
                    "ratio_to_dense_safetensors": ratios,
                    "physical_limit": limits,
                }
            )
            rows.append(
                [
                    f"{actual:.0%}",
                    f"{sizes['dense_safetensors']:,}",
                    f"{sizes['dense_torch_save']:,} ({ratios['dense_torch_save']:.2f}x)",
                    f"{sizes['torch_coo']:,} ({ratios['torch_coo']:.2f}x)",
                    f"{sizes['torch_csr']:,} ({ratios['torch_csr']:.2f}x)",
                    *(f"{sizes[f'artifact_{d}']:,} ({ratios[f'artifact_{d}']:.3f}x)" for d in DTYPES),
                    " / ".join(f"{limits[d]:.3f}x" for d in DTYPES),
                ]
            )
    print_table(
        "Conv4 (64 filters, 5-way, 28x28; 111,488 prunable weights), global magnitude pruning: "
        "bytes (x dense safetensors)",
        [
            "sparsity",
            "dense safetensors",
            "dense torch.save",
            "torch COO",
            "torch CSR",
            "artifact fp32",
            "artifact fp16",
            "artifact int8",
            "limit fp32/fp16/int8",
        ],
        rows,
    )
    checks = {}
    for dtype, (at, bound) in TARGETS.items():
        (result,) = [r for r in results if abs(r["sparsity"] - at) < 1e-3]
        ratio = result["ratio_to_dense_safetensors"][f"artifact_{dtype}"]
        checks[dtype] = {"sparsity": at, "ratio": ratio, "target": bound, "met": ratio <= bound}
        print(
            f"target {dtype}: at {at:.0%} the artifact is {ratio:.3f}x dense (<= {bound}x): "
            f"{'MET' if ratio <= bound else 'MISSED'}"
        )
    payload = {
        "net": dict(net.architecture),
        "results": results,
        "targets": checks,
        "command": "python -m bench.artifact_size",
    }
    if args.checkpoint:
        payload["accuracy"] = accuracy(args)
    write_json("artifact_size", payload, args.json)
    return payload


if __name__ == "__main__":
    main()
