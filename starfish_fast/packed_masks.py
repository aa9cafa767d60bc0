"""Bit-packed masks: 8 mask entries a byte, the form ``.safetensors`` mask files are written in.

    from starfish_fast.packed_masks import pack, unpack, packed_header, packed_shapes
    packed = pack(mask)                         # bool (out, in) -> uint8 (ceil(out * in / 8),)
    assert torch.equal(unpack(packed, mask.shape), mask)

A Llama-2-7B's masks are 6.5 GB as bool tensors and 0.8 GB packed. A packed file is a safetensors
file of uint8 tensors under the masks' own keys, whose metadata says ``format`` (``PACKED_FORMAT``)
and ``mask_shapes`` (JSON: key -> shape); the bits run in memory order, least significant first
(numpy's ``packbits(bitorder="little")``), the last byte padded with zeros. Files without that
``format`` are read as before (bool or 0/1 tensors of the weights' shapes). torch and numpy only:
``checkpoint`` reads and writes the files.
"""
from __future__ import annotations

import json
import math
from typing import Mapping

import numpy as np
import torch

PACKED_FORMAT = "starfish_fast.masks.packbits/1"
SHAPES_KEY = "mask_shapes"


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool (or 0/1) mask as uint8 bytes, 8 entries each, memory order, least significant bit first."""
    flat = mask.detach().to("cpu", torch.bool).contiguous().reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder="little"))


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    """The bool mask of ``shape`` that ``pack`` turned into ``packed``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"a packed mask of shape {tuple(shape)} is {(numel + 7) // 8} uint8 bytes, got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    bits = np.unpackbits(packed.contiguous().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).view(tuple(shape))


def packed_header(shapes: Mapping[str, tuple], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safetensors metadata of a packed mask file: ``metadata`` (str values) plus format and shapes."""
    return {**(metadata or {}), "format": PACKED_FORMAT,
            SHAPES_KEY: json.dumps({key: list(shape) for key, shape in shapes.items()})}


def packed_shapes(header: Mapping[str, str] | None) -> dict[str, tuple] | None:
    """key -> shape of a packed mask file's metadata, or None when the file is not packed."""
    if not header or header.get("format") != PACKED_FORMAT:
        return None
    return {key: tuple(shape) for key, shape in json.loads(header[SHAPES_KEY]).items()}
