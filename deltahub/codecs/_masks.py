"""Stored sparse masks, in whichever of two exact encodings is smaller (format_spec.md, "Stored masks").

* ``bitmap``: the ``[rows, cols]`` mask packed with :func:`._bits.pack_bits` (LSB first, rows
  padded to whole bytes): ``rows * ceil(cols / 8)`` bytes, whatever the density.
* ``indices``: the row-major flat indices ``i_0 < i_1 < ...`` of the set elements as gaps
  ``g_0 = i_0``, ``g_k = i_k - i_{k-1} - 1`` (uint32), written byte-plane by byte-plane (all
  least-significant bytes first, then all second bytes, ...) and compressed into one zstd frame
  (``_zstd``), one uint8 tensor. Sparse masks cost about ``log2(1 / density) + 1.5`` bits per set element.

Random dropout masks are never stored: they are regenerated from a seed (``_rng.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ._bits import pack_bits, packed_cols, unpack_bits
from ._zstd import compress, decompress_frame
from ..errors import CodecError

MASK_ENCODINGS = ("bitmap", "indices")
#: zstd level for index streams: level 19 is ~15% smaller than level 3 on gap planes and still fast
#: at mask sizes (a few MB); decompression speed does not depend on the level.
ZSTD_LEVEL = 19


def bitmap_nbytes(rows: int, cols: int) -> int:
    """Bytes of the ``bitmap`` encoding."""
    return rows * packed_cols(cols)


def _encode_indices(mask: torch.Tensor) -> torch.Tensor:
    idx = mask.reshape(-1).nonzero().squeeze(1)
    gaps = torch.diff(idx, prepend=torch.tensor([-1], dtype=torch.int64)) - 1
    planes = np.ascontiguousarray(gaps.numpy().astype("<u4").view(np.uint8).reshape(-1, 4).T)
    return compress(planes.tobytes(), ZSTD_LEVEL)


def _decode_indices(stored: torch.Tensor, numel: int) -> torch.Tensor:
    raw = decompress_frame(stored.numpy().tobytes(), what="mask indices", max_size=4 * numel)
    if len(raw) % 4:
        raise CodecError(f"mask indices: {len(raw)} bytes is not a whole number of uint32 gaps")
    count = len(raw) // 4
    gaps = np.frombuffer(raw, dtype=np.uint8).reshape(4, count).T.copy().view("<u4").reshape(-1)
    idx = torch.from_numpy(gaps.astype(np.int64)).add_(1).cumsum_(0).sub_(1)
    if count and (int(idx[-1]) >= numel):
        raise CodecError(f"mask indices: index {int(idx[-1])} is outside a tensor of {numel} elements")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[idx] = True
    return flat


def encode_mask(mask: torch.Tensor, encoding: str = "auto") -> tuple[str, torch.Tensor]:
    """Encode a 2-D bool mask; ``encoding="auto"`` keeps the smaller of ``bitmap`` and ``indices``.

    Returns ``(encoding used, stored uint8 tensor)``.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"encode_mask needs a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    if encoding not in ("auto", *MASK_ENCODINGS):
        raise ValueError(f"unknown mask encoding {encoding!r}")
    rows, cols = mask.shape
    if encoding == "bitmap" or (encoding == "auto" and mask.numel() >= 2**32):
        return "bitmap", pack_bits(mask)
    if mask.numel() >= 2**32:
        raise CodecError("index-coded masks need fewer than 2^32 elements")
    idx = _encode_indices(mask)
    if encoding == "indices" or idx.numel() < bitmap_nbytes(rows, cols):
        return "indices", idx
    return "bitmap", pack_bits(mask)


def decode_mask(encoding: str, stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`encode_mask`: the ``[rows, cols]`` bool mask."""
    if stored.dtype != torch.uint8 or (encoding == "indices" and stored.dim() != 1):
        raise CodecError(f"mask ({encoding}): stored tensor must be uint8, got {stored.dtype} {list(stored.shape)}")
    if encoding == "bitmap":
        if tuple(stored.shape) != (rows, packed_cols(cols)):
            raise CodecError(f"mask bitmap: shape {list(stored.shape)} does not fit a [{rows}, {cols}] mask")
        return unpack_bits(stored, cols)
    if encoding == "indices":
        return _decode_indices(stored, rows * cols).view(rows, cols)
    raise CodecError(f"unknown mask encoding {encoding!r}; known: {', '.join(MASK_ENCODINGS)}")
