"""Mask-aware layers, the nets built from them, their reparametrisations and structured shrinking."""

from lthmaml.nets.layers import MaskedBatchNorm2d, MaskedConv2d, MaskedLinear, masked_layers
from lthmaml.nets.models import MLP, Conv4

__all__ = ["MLP", "Conv4", "MaskedBatchNorm2d", "MaskedConv2d", "MaskedLinear", "masked_layers"]
