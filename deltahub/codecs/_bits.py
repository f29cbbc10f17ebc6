"""Bit packing shared by codecs: 8 booleans per byte, least-significant bit first, rows padded.

Layout (format_spec.md, "Packed bits"): a ``[rows, cols]`` boolean matrix becomes a
``[rows, ceil(cols / 8)]`` uint8 matrix; element ``(r, c)`` is bit ``c % 8`` (value
``1 << (c % 8)``) of byte ``(r, c // 8)``; the pad bits at the end of each row are 0.
Vectorized: 8 bytes of 0/1 are gathered into one byte with a single int64 multiply.
"""

from __future__ import annotations

import torch

from ._accel import native

# Multiplying 8 little-endian 0/1 bytes (as one int64) by this moves byte i's bit to bit 56 + i,
# with no carries between the terms; the top byte is then the packed byte.
_GATHER = 0x0102040810204080
# Byte value -> its 8 bits, LSB first.
_UNPACK_TABLE = ((torch.arange(256, dtype=torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).to(torch.bool)
# Byte value -> its 8 signs (bit 1 = +1, bit 0 = -1), LSB first: the same table as ±1 floats.
_PM1_TABLE = _UNPACK_TABLE.to(torch.float32) * 2 - 1
_PM1_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def packed_cols(cols: int) -> int:
    """Bytes per packed row."""
    return (cols + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool tensor ``[rows, cols]`` into uint8 ``[rows, ceil(cols/8)]`` (LSB first, zero pad)."""
    if bits.dim() != 2:
        raise ValueError(f"pack_bits needs a 2-D tensor, got shape {tuple(bits.shape)}")
    rows, cols = bits.shape
    nbytes = packed_cols(cols)
    u8 = bits.to(torch.uint8)
    pad = nbytes * 8 - cols
    if pad:
        u8 = torch.nn.functional.pad(u8, (0, pad))
    u8 = u8.contiguous()
    if rows == 0 or nbytes == 0:
        return torch.zeros(rows, nbytes, dtype=torch.uint8)
    words = u8.view(rows, nbytes * 8).view(torch.int64)  # [rows, nbytes], 8 flags per word
    packed = (words * _GATHER) >> 56
    return (packed & 0xFF).to(torch.uint8)


def pack_signs(delta2d: torch.Tensor) -> torch.Tensor:
    """``pack_bits(delta2d >= 0)`` (BitDelta's sign bits), by the native kernel in one pass when it is built."""
    nat = native()
    if nat is None or delta2d.dtype != torch.float32 or not delta2d.is_contiguous() or delta2d.device.type != "cpu":
        return pack_bits(delta2d >= 0)
    rows, cols = delta2d.shape
    out = torch.empty(rows, packed_cols(cols), dtype=torch.uint8)
    if out.numel():
        nat.pack_signs(delta2d.numpy(), rows, cols, out.numpy())
    return out


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[rows, ceil(cols/8)]`` -> bool ``[rows, cols]``."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits needs a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    if nbytes != packed_cols(cols):
        raise ValueError(f"{nbytes} bytes per row cannot hold {cols} bits (need {packed_cols(cols)})")
    bits = _UNPACK_TABLE[packed.to(torch.int64)]  # [rows, nbytes, 8]
    return bits.reshape(rows, nbytes * 8)[:, :cols]


def unpack_signs(packed: torch.Tensor, cols: int, scale: torch.Tensor) -> torch.Tensor:
    """``where(bit, +scale, -scale)`` as float32 ``[rows, cols]``; ``scale`` broadcasts against it."""
    bits = unpack_bits(packed, cols)
    scale = scale.to(torch.float32)
    return torch.where(bits, scale, -scale)


def _pm1_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:data:`_PM1_TABLE` in ``dtype`` on ``device`` (cached: 256x8 elements)."""
    key = (dtype, device)
    t = _PM1_CACHE.get(key)
    if t is None:
        t = _PM1_CACHE[key] = _PM1_TABLE.to(device=device, dtype=dtype)
    return t


def unpack_pm1(packed: torch.Tensor, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed sign bits uint8 ``[rows, ceil(cols/8)]`` -> ``[rows, cols]`` of ±1 in ``dtype`` (bit 1 = +1)."""
    rows = packed.shape[0]
    table = _pm1_table(dtype, packed.device)
    return table.index_select(0, packed.reshape(-1).to(torch.int64)).reshape(rows, -1)[:, :cols]
