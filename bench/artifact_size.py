"""File size of the compact artifact (``lthmaml.edge.export``) against dense and PyTorch-sparse files.

Target: the MAML paper's Omniglot net (Conv4, 64 filters, 5-way, 28x28) at 80% unstructured
sparsity exports to <= 0.25x the dense float32 safetensors file (<= 0.14x with
``--dtype float16``). The physical limit at sparsity s is about ``1/32 + (1 - s)`` of dense: one
mask bit per weight plus the kept 32-bit values (0.23x at 80%; ``1/32 + (1 - s)/2`` = 0.13x for
float16).

Setting: fresh random weights (size does not depend on training), pruned by global magnitude
(``lthmaml.sparsity.magnitude_scores`` + ``prune_lowest``) to 0/50/80/90% of all prunable weights.
Every file holds the same tensors: the prunable layers' effective weights, their biases and the
BatchNorm parameters (no mask buffers):

* dense safetensors: every tensor dense, float32 (the 1.0x reference);
* dense torch.save: the same dict pickled by ``torch.save``;
* torch COO: prunable weights as ``weight.to_sparse()`` (int64 indices per kept value), torch.save;
* torch CSR: prunable weights flattened to 2-D ``[out, in*k*k]`` then ``to_sparse_csr()``, torch.save;
* artifact float32 / float16: ``lthmaml.edge.export.export_net`` (kept values + 1-bit packed masks).

    python -m bench.artifact_size        # a few seconds; writes bench/out/artifact_size.json
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import base_parser, print_table, setup, write_json
from lthmaml import sparsity
from lthmaml.edge.artifact import dense_tensors, load_artifact
from lthmaml.edge.export import export_net
from lthmaml.nets.layers import masked_layers
from lthmaml.nets.models import Conv4

SPARSITIES = (0.0, 0.5, 0.8, 0.9)
TARGETS = {"float32": (0.8, 0.25), "float16": (0.8, 0.14)}
"""dtype: (sparsity, the largest artifact/dense ratio allowed there)."""


def torch_sparse(net: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The dense tensors with the prunable weights in a PyTorch sparse layout (``coo`` or ``csr``)."""
    warnings.filterwarnings("ignore", ".*Sparse CSR tensor support is in beta.*")
    tensors = dense_tensors(net)
    for name in masked_layers(net):
        weight = tensors[f"{name}.weight"]
        tensors[f"{name}.weight"] = (
            weight.to_sparse() if layout == "coo" else weight.flatten(1).to_sparse_csr()
        )
    return tensors


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
    for dtype in ("float32", "float16"):
        path = export_net(net, folder / f"artifact_{dtype}.safetensors", {}, getattr(torch, dtype))
        sizes[f"artifact_{dtype}"] = path.stat().st_size
        with torch.no_grad():
            errors[dtype] = float((load_artifact(path).net(x) - reference).abs().max())
    return {"bytes": sizes, "max_abs_output_error": errors}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__, default_threads=1)
    args = parser.parse_args(argv)
    setup(args.threads)
    torch.manual_seed(args.seed)
    net = Conv4(out_features=5, in_channels=1, hidden_channels=64, image_size=28)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for target in SPARSITIES:
            scores = sparsity.magnitude_scores(net)  # rounds=1: prune up to `target` of all weights
            sparsity.load_masks(net, sparsity.prune_lowest(sparsity.masks_of(net), scores, target, rounds=1))
            measured = measure(net, Path(tmp))
            sizes = measured["bytes"]
            dense = sizes["dense_safetensors"]
            ratios = {key: value / dense for key, value in sizes.items()}
            actual = sparsity.sparsity_report(net).sparsity
            mask = 1 / 32 if actual > 0 else 0.0  # nothing pruned: no mask bits needed
            limits = {"float32": mask + (1 - actual), "float16": mask + (1 - actual) / 2}
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
                    f"{sizes['artifact_float32']:,} ({ratios['artifact_float32']:.3f}x)",
                    f"{sizes['artifact_float16']:,} ({ratios['artifact_float16']:.3f}x)",
                    f"{limits['float32']:.3f}x / {limits['float16']:.3f}x",
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
            "limit fp32/fp16",
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
    write_json("artifact_size", payload, args.json)
    return payload


if __name__ == "__main__":
    main()
