"""Structured shrinking of a Conv4: a physically smaller dense net without its removed channels."""

from __future__ import annotations

from collections.abc import Mapping
from copy import deepcopy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lthmaml.errors import ConfigError
from lthmaml.masks import folded, stored
from lthmaml.nets.models import Conv4, conv_block


def removed_channels(batchnorm: nn.BatchNorm2d) -> Tensor:
    """Boolean ``[channels]``: those whose BatchNorm scale and shift are both exactly zero, so the
    layer emits exactly 0 there whatever comes in (how filter pruning removes a channel)."""
    return (batchnorm.weight.detach() == 0) & (batchnorm.bias.detach() == 0)


def shrink(
    model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None
) -> tuple[nn.Module, dict[str, Tensor]]:
    """A physically smaller dense copy of a :class:`~lthmaml.nets.models.Conv4` without its removed
    channels (:func:`removed_channels`), and its ``masks`` (by parameter name) cut to match.

    A removed channel emits exactly 0, still 0 after ReLU and pooling, so dropping it from its
    conv's outputs, its BatchNorm, the next conv's inputs and the head's flattened inputs leaves
    every output unchanged; a headless Conv4 (an embedding) loses only output coordinates that are
    always 0, which change no distance or cosine similarity between embeddings. (A channel whose
    filters are all pruned but whose BatchNorm shift is not still emits ``relu(beta)`` and is
    kept.) Unstructured sparsity inside kept channels survives in the weights and the masks, so
    the copy can be adapted or pruned further; an elementwise parametrisation (Powerprop's) is
    registered on the copy's layers too, with the kept part of the stored tensors. Its
    ``architecture`` attribute holds the Conv4 arguments, with per-block ``hidden_channels``, that
    rebuild its shape.
    """
    with torch.random.fork_rng(devices=[]):  # building layers draws initial weights: leave the RNG be
        return _shrink_conv4(model, dict(masks or {}))


def _shrink_conv4(model: nn.Module, masks: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Tensor]]:
    if not isinstance(model, Conv4):
        hint = " (pass the LightningModule's .net)" if isinstance(getattr(model, "net", None), Conv4) else ""
        raise ConfigError(f"shrink supports lthmaml.nets.models.Conv4 nets, got {type(model).__name__}{hint}")
    plain = folded(model)  # the architecture checked without parametrisations (Powerprop)
    for index, block in enumerate(plain.features):
        conv = block[0] if isinstance(block, nn.Sequential) and len(block) else None
        if not isinstance(conv, nn.Conv2d) or repr(block) != repr(
            conv_block(conv.in_channels, conv.out_channels)
        ):
            raise ConfigError(
                f"shrink: block features.{index} is not a lthmaml.nets.models.conv_block "
                "(3x3 conv, BatchNorm2d, ReLU, 2x2 max-pool); this architecture is not supported"
            )
    if plain.head is not None and type(plain.head) is not nn.Linear:
        raise ConfigError("shrink: the Conv4 head must be an nn.Linear (or None: an embedding net)")
    blocks = list(model.features)
    keeps = [(~removed_channels(block[1])).nonzero().flatten() for block in blocks]
    empty = [index for index, keep in enumerate(keeps) if keep.numel() == 0]
    if empty:
        raise ConfigError(
            f"shrink: block features.{empty[0]} has no channel left; the net computes a constant"
        )
    shrunk = Conv4(**{**model.architecture, "hidden_channels": [keep.numel() for keep in keeps]})
    reference = blocks[0][0].weight
    shrunk.to(device=reference.device, dtype=reference.dtype).train(model.training)
    _copy_parametrizations(model, shrunk)
    cut: dict[str, Tensor] = {}

    def copy(name: str, select) -> None:  # the stored tensors (Powerprop's phi: elementwise)
        stored(shrunk, name).copy_(select(stored(model, name)))
        if name in masks:
            cut[name] = select(masks[name])

    keep_in = torch.arange(model.in_channels, device=reference.device)
    with torch.no_grad():
        for index, keep in enumerate(keeps):
            conv, batchnorm = f"features.{index}.0", f"features.{index}.1"
            copy(f"{conv}.weight", lambda t, keep=keep, keep_in=keep_in: t[keep][:, keep_in])
            for name in (f"{conv}.bias", f"{batchnorm}.weight", f"{batchnorm}.bias"):
                copy(name, lambda t, keep=keep: t[keep])
            keep_in = keep
        if model.head is not None:
            positions = model.head.in_features // blocks[-1][0].out_channels
            columns = (
                keep_in[:, None] * positions + torch.arange(positions, device=keep_in.device)
            ).flatten()
            copy("head.weight", lambda t: t[:, columns])
            copy("head.bias", lambda t: t)
    return shrunk, {name: mask for name, mask in cut.items() if not bool(mask.all())}


def _copy_parametrizations(model: nn.Module, shrunk: nn.Module) -> None:
    """Register ``model``'s parametrisations (Powerprop's transform) on the same layers of
    ``shrunk``, so the copy computes, adapts and trains as the original does. One holding tensors
    of the original's shape (a Top-KAST forward mask) cannot be cut: a ConfigError."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attribute, chain in module.parametrizations.items():
            for transform in chain:
                if any(True for _ in transform.parameters()) or any(True for _ in transform.buffers()):
                    raise ConfigError(
                        f"shrink: {name}.{attribute} carries {type(transform).__name__}, whose tensors "
                        "cannot be cut to the kept channels; remove it first (lthmaml.masks.folded)"
                    )
                parametrize.register_parametrization(
                    shrunk.get_submodule(name), attribute, deepcopy(transform), unsafe=True
                )
