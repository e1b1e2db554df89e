"""Convert checkpoints and mask files written while masks lived inside the layers.

Before masks moved beside the model, a pruned net's ``state_dict`` held a ``<layer>.mask`` buffer
per prunable layer and a ``<batchnorm>.channel_mask`` per BatchNorm, mask files were keyed by
layer name, and a Powerprop net stored ``phi`` under ``<layer>.weight``. This rewrites such files
once, in place (the original kept beside as ``<file>.orig``):

* ``<layer>.mask`` becomes ``masks.<layer>.weight`` (kept only where it prunes something);
* a ``channel_mask`` becomes masks of the removed channels' conv filters and bias and BatchNorm
  scale and shift (what a removed channel is now), with those entries zeroed;
* Powerprop's ``phi`` moves to ``<layer>.parametrizations.weight.original``;
* callback states keyed by layer name (best-weights masks, Top-KAST's backward sets) are rekeyed;
* a ``mask.safetensors`` is rekeyed by parameter name.

Usage: ``python -m lthmaml.convert PATH [PATH ...]`` (files, or run folders: every ``.ckpt`` and
``mask.safetensors`` below them). A file already in the new layout is left alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lthmaml.errors import DataError, LthmamlError
from lthmaml.files import give_default_mode
from lthmaml.nets.reparam import CHECKPOINT_KEY, ORIGINAL

PROG = "python -m lthmaml.convert"


def convert_state(
    state: Mapping[str, Tensor], powerprop: bool = False
) -> tuple[dict[str, Tensor], list[str]]:
    """A model ``state_dict`` in the new layout, and the layer names whose masks were renamed."""
    old = dict(state)
    layers = [key[: -len(".mask")] for key in old if key.endswith(".mask") and f"{key[:-5]}.weight" in old]
    new: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    last_conv: Optional[str] = None
    for key, value in old.items():
        if key.endswith(".mask") and key[: -len(".mask")] in layers:
            layer = key[: -len(".mask")]
            masks[f"{layer}.weight"] = value.clone()
            if value.dim() == 4:
                last_conv = layer
            continue
        if key.endswith(".channel_mask"):
            batchnorm = key[: -len(".channel_mask")]
            removed = value == 0
            if bool(removed.any()):
                targets = [f"{batchnorm}.weight", f"{batchnorm}.bias"]
                if last_conv is not None and old[f"{last_conv}.weight"].shape[0] == value.numel():
                    targets += [f"{last_conv}.weight", f"{last_conv}.bias"]
                for name in targets:
                    if name not in old:
                        continue
                    mask = masks.get(name, torch.ones_like(old[name]))
                    mask[removed] = 0
                    masks[name] = mask
            continue
        new[key] = value
    for name, mask in masks.items():
        new[name] = new[name] * mask
    if powerprop:
        for layer in layers:
            new[f"{layer}{ORIGINAL}"] = new.pop(f"{layer}.weight")
    prefix_free = {name: mask for name, mask in masks.items() if not bool(mask.all())}
    new.update({f"masks.{name}": mask for name, mask in prefix_free.items()})
    return new, layers


def _rekey(value: Any, layers: set[str]) -> Any:
    """Dicts keyed by old layer names (or ``mask:<layer>``) rekeyed by weight name, recursively."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            plain = key[len("mask:") :] if isinstance(key, str) and key.startswith("mask:") else key
            if plain in layers:
                key = key + ".weight"
            out[key] = _rekey(item, layers)
        return out
    if isinstance(value, list):
        return [_rekey(item, layers) for item in value]
    return value


def is_old_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    state = checkpoint.get("state_dict") or {}
    return any(key.endswith((".mask", ".channel_mask")) for key in state)


def convert_checkpoint(path: Path) -> bool:
    """Rewrite a Lightning checkpoint in place; False if it needed nothing."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise DataError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or not is_old_checkpoint(checkpoint):
        return False
    powerprop = isinstance(checkpoint.get(CHECKPOINT_KEY), Mapping)
    checkpoint["state_dict"], layers = convert_state(checkpoint["state_dict"], powerprop)
    if "callbacks" in checkpoint:
        checkpoint["callbacks"] = _rekey(checkpoint["callbacks"], set(layers))
    _replace(path, lambda target: torch.save(checkpoint, target))
    return True


def convert_mask_file(path: Path) -> bool:
    """Rekey a ``mask.safetensors`` by parameter name; False if it needed nothing."""
    masks = load_file(str(path))
    if all(key.endswith((".weight", ".bias")) for key in masks):
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    renamed = {
        key if key.endswith((".weight", ".bias")) else f"{key}.weight": value for key, value in masks.items()
    }
    _replace(path, lambda target: save_file(renamed, str(target), metadata=metadata))
    return True


def _replace(path: Path, write) -> None:
    backup = path.with_name(path.name + ".orig")
    partial = path.with_name(path.name + ".partial")
    write(partial)
    give_default_mode(partial)  # safetensors writes through a 0600 temporary file
    if not backup.exists():
        os.replace(path, backup)
    os.replace(partial, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="checkpoints, mask files or run folders")
    args = parser.parse_args(argv)
    files: list[Path] = []
    for path in args.paths:
        if path.is_dir():
            files += sorted(path.rglob("*.ckpt")) + sorted(path.rglob("mask.safetensors"))
        elif path.is_file():
            files.append(path)
        else:
            print(f"{PROG}: error: {path}: no such file or folder", file=sys.stderr)
            return 2
    try:
        for file in files:
            changed = convert_mask_file(file) if file.suffix == ".safetensors" else convert_checkpoint(file)
            print(f"{'converted' if changed else 'already current'}: {file}")
    except LthmamlError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
