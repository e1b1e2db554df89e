"""Structured shrinking of a Conv4: a physically smaller dense net without its removed channels."""

from __future__ import annotations

import torch
from torch import nn

from lthmaml.errors import ConfigError
from lthmaml.nets.layers import MaskedConv2d, MaskedLinear, MaskedMixin
from lthmaml.nets.models import Conv4, conv_block


def shrink(model: nn.Module) -> nn.Module:
    """A physically smaller dense copy of a :class:`~lthmaml.nets.models.Conv4` without its removed channels.

    A channel whose BatchNorm ``channel_mask`` is 0 emits exactly 0, still 0 after ReLU and
    pooling, so dropping it from its conv's outputs, its BatchNorm, the next conv's inputs and the
    head's flattened inputs leaves every output unchanged; a headless Conv4 (an embedding) loses
    only output coordinates that are always 0, which change no distance or cosine similarity
    between embeddings. (A channel whose filters are all pruned but whose BatchNorm is not still
    emits ``relu(beta)`` and is kept.) The copy is built from the same mask-aware layers with the
    kept weights' masks and weight transforms, so unstructured sparsity inside kept channels
    survives and the copy can be adapted or pruned further. Its ``architecture`` attribute holds
    the Conv4 arguments, with per-block ``hidden_channels``, that rebuild its shape.
    """
    with torch.random.fork_rng(devices=[]):  # building layers draws initial weights: leave the RNG be
        return _shrink_conv4(model)


def _shrink_conv4(model: nn.Module) -> nn.Module:
    if not isinstance(model, Conv4):
        hint = " (pass the LightningModule's .net)" if isinstance(getattr(model, "net", None), Conv4) else ""
        raise ConfigError(f"shrink supports lthmaml.nets.models.Conv4 nets, got {type(model).__name__}{hint}")
    blocks = list(model.features)
    for index, block in enumerate(blocks):
        conv = block[0] if isinstance(block, nn.Sequential) and len(block) else None
        if not isinstance(conv, MaskedConv2d) or repr(block) != repr(
            conv_block(conv.in_channels, conv.out_channels)
        ):
            raise ConfigError(
                f"shrink: block features.{index} is not a lthmaml.nets.models.conv_block "
                "(masked 3x3 conv, MaskedBatchNorm2d, ReLU, 2x2 max-pool); this architecture is not supported"
            )
    if model.head is not None and not isinstance(model.head, MaskedLinear):
        raise ConfigError("shrink: the Conv4 head must be a MaskedLinear (or None: an embedding net)")
    keeps = [block[1].channel_mask.nonzero().flatten() for block in blocks]
    empty = [index for index, keep in enumerate(keeps) if keep.numel() == 0]
    if empty:
        raise ConfigError(
            f"shrink: block features.{empty[0]} has no channel left; the net computes a constant"
        )
    shrunk = Conv4(**{**model.architecture, "hidden_channels": [keep.numel() for keep in keeps]})
    reference = blocks[0][0].weight
    shrunk.to(device=reference.device, dtype=reference.dtype).train(model.training)
    keep_in = torch.arange(model.in_channels, device=reference.device)
    with torch.no_grad():
        for block, new, keep in zip(blocks, shrunk.features, keeps):
            conv, batchnorm = block[0], block[1]
            _copy_masked(conv, new[0], lambda t, keep=keep, keep_in=keep_in: t[keep][:, keep_in])
            new[0].bias.copy_(conv.bias[keep])
            for name in ("weight", "bias", "channel_mask"):
                getattr(new[1], name).copy_(getattr(batchnorm, name)[keep])
            keep_in = keep
        if model.head is None:  # an embedding: the kept channels' maps are its output
            return shrunk
        positions = model.head.in_features // blocks[-1][0].out_channels
        columns = (keep_in[:, None] * positions + torch.arange(positions, device=keep_in.device)).flatten()
        _copy_masked(model.head, shrunk.head, lambda t: t[:, columns])
        shrunk.head.bias.copy_(model.head.bias)
    return shrunk


def _copy_masked(source: MaskedMixin, target: MaskedMixin, select) -> None:
    """Copy the ``select``-ed part of a masked layer's weight and mask, and its weight transform."""
    target.weight.copy_(select(source.weight))
    target.mask.copy_(select(source.mask))
    target.weight_transform = source.weight_transform
