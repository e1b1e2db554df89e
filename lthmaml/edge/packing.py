"""The artifact's tensors, both ways: a pruned net and its masks in as few bytes as stay exact.

Why not ``torch.save`` of sparse tensors: COO stores two (or four) int64 indices per kept weight,
so a pruned conv net saved with ``to_sparse()`` is *larger* than the dense file. Here a pruned
weight costs one bit (its mask) and a kept one its value:

* a parameter with a mask that prunes something (a conv or linear weight, or the bias and
  BatchNorm of a removed channel that is not shrunk away) is stored as ``<name>@values`` (the
  kept values, 1-D, row-major order) and its mask, ``<name>@mask`` or ``<name>@maskz``
  (:mod:`lthmaml.edge.maskbits`: bit-packed, deflated where that is smaller);
* every other tensor is stored dense under its ``state_dict`` name; masks of ones are implied;
* ``float16`` stores every float tensor in half precision (masks stay bits);
* ``int8`` quantises each prunable weight symmetrically per output channel (row ``c`` of
  ``[out, ...]``): ``scale[c] = max |kept w| / 127``, stored as ``<name>@scale`` (float32: a
  float16 scale would underflow for small weights, and the 4 bytes a row cost little), the values
  as ``round(w / scale)`` codes in int8 (``|w - code * scale| <= scale / 2``). The other float
  tensors (biases, BatchNorm) go as float16: their rounding (2^-11 relative) is far below the
  weights' int8 step, and at float32 they would be a sizeable share of a sparse file.

Reading multiplies the codes back and fills the zeros in, so the device always gets float32 and
a pruned weight is exactly 0; every name, shape and count is checked against the net.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lthmaml.edge.maskbits import MASK, MASKZ, pack_mask, unpack_mask
from lthmaml.errors import ConfigError, DataError
from lthmaml.masks import load_masks, prunable

VALUES, SCALE = "@values", "@scale"


# ---------------------------------------------------------------------------- write
def pack_tensors(net: nn.Module, masks: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The artifact's tensors of ``net`` (stock parameters, no parametrisation) and its ``masks``
    by parameter name: kept values and packed masks where a mask prunes something, the rest dense
    (at float16 when the weights are int8, which quantises the prunable weights)."""
    weights = set(prunable(net))
    others = torch.float16 if dtype == torch.int8 else dtype
    tensors: dict[str, Tensor] = {}
    for key, value in net.state_dict().items():
        value = value.detach().cpu()
        if not value.is_floating_point():
            tensors[key] = value
            continue
        value = value.float()
        keep = masks[key].detach().cpu() != 0 if key in masks else torch.ones_like(value, dtype=torch.bool)
        if dtype == torch.int8 and key in weights:
            value, tensors[f"{key}{SCALE}"] = quantise(value, keep, key)
        else:
            value = cast(value, dtype if key in weights else others, key)
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


# ---------------------------------------------------------------------------- read
@torch.no_grad()
def unpack_tensors(net: nn.Module, tensors: Mapping[str, Tensor], path: Path) -> None:
    """Fill ``net`` (fresh, of the artifact's architecture) from the artifact's ``tensors`` and
    install its masks; a tensor missing, left over or of the wrong shape is a DataError naming ``path``."""
    arch = type(net).__name__
    remaining = dict(tensors)

    def take(key: str, shape: torch.Size, floating: bool = True, int8: bool = False) -> Tensor:
        """The tensor ``key`` (float32 if ``floating``; int8 codes also accepted, as floats, if ``int8``)."""
        value = remaining.pop(key)
        codes = int8 and value.dtype == torch.int8
        if value.shape != shape or (value.is_floating_point() != floating and not codes):
            raise DataError(
                f"{path}: tensor '{key}' is {tuple(value.shape)} {value.dtype}, "
                f"the {arch} needs {tuple(shape)}"
            )
        return value.float() if floating else value

    def scale_of(key: str, rows: int) -> Tensor:
        """The int8 weight ``key``'s per-output-channel scales: one per row, finite, >= 0."""
        scale = take(key + SCALE, torch.Size([rows])) if key + SCALE in remaining else None
        if scale is None or not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            raise DataError(f"{path}: int8 weight '{key}' needs '{key + SCALE}', {rows} finite scales >= 0")
        return scale

    masks: dict[str, Tensor] = {}
    for key, current in net.state_dict().items():
        shape, count = current.shape, current.numel()
        packed = [key + end for end in (MASKZ, MASK) if key + end in remaining]  # both: one left over
        if key in remaining:
            stored, keep = key, torch.ones(count, dtype=torch.bool)
        elif key + VALUES in remaining and packed:
            stored, keep = key + VALUES, unpack_mask(packed[0], remaining.pop(packed[0]), count, str(path))
        else:
            raise DataError(f"{path}: no tensor for '{key}' of the {arch}; the artifact does not match it")
        if not current.is_floating_point():
            current.copy_(take(stored, shape, floating=False))
            continue
        quantised = remaining[stored].dtype == torch.int8
        values = take(stored, shape if stored == key else torch.Size([int(keep.sum())]), int8=True)
        flat = torch.zeros(count)
        flat[keep] = values.flatten()
        if quantised:  # code * its row's scale: a pruned weight stays exactly 0
            flat = (flat.view(shape[0], -1) * scale_of(key, shape[0])[:, None]).flatten()
        current.copy_(flat.view(shape))
        if not bool(keep.all()):
            masks[key] = keep.view(shape).float()
    if remaining:
        raise DataError(f"{path}: tensors {sorted(remaining)[:3]} are not part of the {arch}")
    load_masks(net, masks)
    if any(not bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise DataError(f"{path}: the stored weights are not all finite")
