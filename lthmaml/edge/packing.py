"""The artifact's tensors from a net and the masks beside it: kept values and mask bits where a
mask prunes something, int8 codes and their scales, everything else dense.

The layout is described in :mod:`lthmaml.edge.export`; :func:`lthmaml.edge.artifact.load_artifact`
reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lthmaml import sparsity
from lthmaml.edge.artifact import SCALE, VALUES
from lthmaml.edge.maskbits import pack_mask
from lthmaml.errors import ConfigError


def pack_tensors(net: nn.Module, masks: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The artifact's tensors of ``net`` (stock parameters, no parametrisation) and its ``masks``
    by parameter name: kept values and packed masks where a mask prunes something, the rest dense
    (at float16 when the weights are int8, which quantises the prunable weights)."""
    prunable = set(sparsity.prunable(net))
    others = torch.float16 if dtype == torch.int8 else dtype
    tensors: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        value = value.detach().cpu()
        if not value.is_floating_point():
            tensors[key] = value
            continue
        value = value.float()
        keep = masks[key].detach().cpu() != 0 if key in masks else torch.ones_like(value, dtype=torch.bool)
        if dtype == torch.int8 and key in prunable:
            value, tensors[f"{key}{SCALE}"] = quantise(value, keep, key)
        else:
            value = cast(value, dtype if key in prunable else others, key)
        if bool(keep.all()):
            tensors[key] = value
        else:
            tensors[f"{key}{VALUES}"] = value[keep]  # row-major, as the mask bits
            suffix, bits = pack_mask(keep)  # @mask, or @maskz where deflating pays
            tensors[f"{key}{suffix}"] = bits
    return {key: value.contiguous() for key, value in tensors.items()}


def quantise(weight: Tensor, keep: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 codes of ``weight`` (0 where not kept) and the float32
    scale of each row (``max |kept w| / 127``; 0 for a row with nothing kept or all zeros)."""
    kept = torch.where(keep, weight, torch.zeros(())).flatten(1)
    if not bool(torch.isfinite(kept).all()):
        raise ConfigError(f"'{name}' has non-finite weights, which int8 cannot store: fix the net first")
    scale = kept.abs().amax(dim=1) / 127
    codes = (kept / torch.where(scale > 0, scale, 1)[:, None]).round().clamp(-127, 127)
    return codes.to(torch.int8).view(weight.shape), scale


def cast(value: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``value`` in ``dtype``; a ConfigError naming ``name`` where finite values overflow it."""
    converted = value.to(dtype)
    if not bool(torch.isfinite(converted).all()) and bool(torch.isfinite(value).all()):
        raise ConfigError(f"'{name}' has values beyond {dtype}'s range: export as float32")
    return converted
