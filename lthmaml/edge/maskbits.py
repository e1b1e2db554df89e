"""A prunable weight's keep-mask as the artifact stores it: bit-packed, deflated where that is smaller.

``<name>.weight@mask`` holds ``np.packbits`` of the flattened mask (uint8, most significant bit
first, zero padding); ``<name>.weight@maskz`` holds those same bytes ``zlib.compress``-ed at level
9, written instead whenever it is shorter. Why: a mask with a fraction ``s`` pruned carries only
``H(s)`` bits a weight (binary entropy: 0.72 at 80%), and deflate's Huffman codes come close
(0.77 for the Omniglot Conv4), while at 50% random a mask is incompressible and stays ``@mask``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import Tensor

from lthmaml.errors import DataError

MASK, MASKZ = "@mask", "@maskz"


def pack_mask(keep: Tensor) -> tuple[str, Tensor]:
    """``(suffix, uint8 tensor)`` for the bool mask ``keep``: ``@maskz`` if deflating pays, else ``@mask``."""
    packed = np.packbits(keep.detach().cpu().flatten().numpy())
    deflated = zlib.compress(packed.tobytes(), 9)
    if len(deflated) < packed.size:
        return MASKZ, torch.from_numpy(np.frombuffer(deflated, dtype=np.uint8).copy())
    return MASK, torch.from_numpy(packed)


def unpack_mask(name: str, stored: Tensor, count: int, where: str) -> Tensor:
    """The ``count`` keep bools of mask tensor ``name`` (``@mask`` or ``@maskz``); a wrong one is a
    one-line DataError naming ``where`` (the file) and ``name``."""
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise DataError(f"{where}: mask '{name}' is {tuple(stored.shape)} {stored.dtype}, not 1-D uint8")
    size = math.ceil(count / 8)
    packed = stored.numpy().tobytes()
    if name.endswith(MASKZ):
        packed = _inflate(packed, size, name, where)
    if len(packed) != size:
        raise DataError(
            f"{where}: mask '{name}' has {len(packed)} bytes of bits, its {count} weights need {size}"
        )
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))
    if bits[count:].any():
        raise DataError(f"{where}: mask '{name}' has bits set past its {count} weights")
    return torch.from_numpy(bits[:count].astype(bool))


def _inflate(data: bytes, size: int, name: str, where: str) -> bytes:
    """The packed bits of a deflated mask, never more than ``size + 1`` bytes of them (so a crafted
    stream cannot fill memory); a corrupt, cut or padded stream is a DataError."""
    stream = zlib.decompressobj()
    try:
        packed = stream.decompress(data, size + 1)
    except zlib.error as error:
        raise DataError(f"{where}: mask '{name}' is not a valid zlib stream ({error})") from None
    if len(packed) > size:
        raise DataError(f"{where}: mask '{name}' inflates to more than the {size} bytes its weights need")
    if not stream.eof or stream.unused_data:
        raise DataError(f"{where}: mask '{name}' is a cut or padded zlib stream")
    return packed
