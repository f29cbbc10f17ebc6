"""Counter-based random numbers that are bit-identical everywhere (format_spec.md, "Seeded masks").

Random dropout masks are not stored: they are regenerated from ``(seed, stream, element index)``.
torch's own RNG streams may change between versions and devices, so this module defines its
own generator from 32-bit integer operations that every language reproduces exactly:

* ``H(x)`` is Chris Wellons' *triple32* integer hash (xor-shifts and multiplications mod 2^32,
  a bijection of ``[0, 2^32)`` with near-ideal avalanche);
* ``k1 = H(seed ^ 0x9E3779B9)``, ``k2 = H(k1 ^ stream)``;
* element ``i`` (``lo = i mod 2^32``, ``hi = i >> 32``) gets
  ``u_i = H(lo ^ K(hi)) ^ k1`` with ``K(hi) = H(k2 ^ H(hi ^ 0x85EBCA6B))``, a value in ``[0, 2^32)``.

One hash round per element keeps regeneration cheap (about 20 ns per element on one CPU core).

Values are held in int64 tensors in ``[0, 2^32)``; a multiplication mod 2^32 is split into two
16-bit halves of the constant so that no intermediate product exceeds 2^49 (no signed overflow,
no reliance on wrapping), and right shifts of non-negative values are logical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..errors import InvalidCodecParamsError

MASK32 = 0xFFFFFFFF
#: Constants of the triple32 hash (https://github.com/skeeto/hash-prospector).
_T32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))
_T32_LAST_SHIFT = 14
SEED_SALT = 0x9E3779B9
HI_SALT = 0x85EBCA6B


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """In place ``x = (x * c) mod 2^32`` for ``x`` in ``[0, 2^32)``: the constant is split in 16-bit halves,
    so no product exceeds 2^49 (exact in int64 everywhere)."""
    t = x * (c >> 16)
    t &= 0xFFFF
    t <<= 16
    x *= c & 0xFFFF
    x += t
    x &= MASK32
    return x


def hash32_(x: torch.Tensor) -> torch.Tensor:
    """In-place triple32 on an int64 tensor of values in ``[0, 2^32)``."""
    for shift, mult in _T32:
        x ^= x >> shift
        _mul32_(x, mult)
    x ^= x >> _T32_LAST_SHIFT
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """triple32 on an int64 tensor of values in ``[0, 2^32)``; returns a new tensor."""
    return hash32_(x.to(torch.int64).clone())


def hash32_int(x: int) -> int:
    """triple32 on one Python int in ``[0, 2^32)`` (reference arithmetic, used for the keys)."""
    for shift, mult in _T32:
        x ^= x >> shift
        x = (x * mult) & MASK32
    return x ^ (x >> _T32_LAST_SHIFT)


def check_seed(codec: str, seed: object) -> None:
    """Seeds are integers in ``[0, 2^32)``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MASK32:
        raise InvalidCodecParamsError(f"codec {codec!r}: seed={seed!r} must be an integer in [0, 4294967295]")


def name_stream(name: str) -> int:
    """The stream of a tensor: the first 4 bytes of ``sha256(utf-8 name)`` read as a little-endian uint32."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


def _keys(seed: int, stream: int) -> tuple[int, int]:
    if not 0 <= seed <= MASK32 or not 0 <= stream <= MASK32:
        raise ValueError(f"seed {seed} and stream {stream} must lie in [0, 2^32)")
    k1 = hash32_int(seed ^ SEED_SALT)
    return k1, hash32_int(k1 ^ stream)


def uniform_u32_at(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """``u_i`` for the given non-negative int64 element indices (any shape)."""
    k1, k2 = _keys(seed, stream)
    index = index.to(torch.int64)
    if index.numel() == 0 or int(index.max()) <= MASK32:
        x = index ^ hash32_int(k2 ^ hash32_int(HI_SALT))  # hi == 0: one key for the whole tensor
    else:
        x = (index & MASK32) ^ hash32_(hash32((index >> 32) ^ HI_SALT) ^ k2)
    hash32_(x)
    x ^= k1
    return x


def uniform_u32(seed: int, stream: int, n: int, start: int = 0) -> torch.Tensor:
    """``u_start .. u_{start+n-1}``: int64 tensor of values in ``[0, 2^32)``."""
    return uniform_u32_at(seed, stream, torch.arange(start, start + n, dtype=torch.int64))


def keep_threshold(p: float) -> int:
    """``T = floor((1 - p) * 2^32)`` in IEEE-754 double: element ``i`` is kept iff ``u_i < T``."""
    return int((1.0 - float(p)) * 4294967296.0)


def keep_mask(seed: int, stream: int, shape: Sequence[int], p: float) -> torch.Tensor:
    """Bernoulli dropout mask (DARE): element ``i`` (row-major) is kept iff ``u_i < T(p)``."""
    n = 1
    for s in shape:
        n *= int(s)
    return (uniform_u32(seed, stream, n) < keep_threshold(p)).reshape(tuple(shape))


def group_keep_mask(seed: int, stream: int, rows: int, cols: int, group_size: int, keep: int) -> torch.Tensor:
    """Exact-count dropout: in every group of ``group_size`` consecutive columns of a row, keep ``keep``.

    The kept elements of a group are those with the ``keep`` smallest keys ``u_i * group_size + j``
    (``i`` the row-major element index, ``j`` its position in the group), so ties cannot occur.
    """
    if cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide {cols}")
    if not 0 <= keep <= group_size:
        raise ValueError(f"cannot keep {keep} of {group_size}")
    n = rows * cols
    if keep == group_size:
        return torch.ones(rows, cols, dtype=torch.bool)
    if keep == 0 or n == 0:
        return torch.zeros(rows, cols, dtype=torch.bool)
    keys = uniform_u32(seed, stream, n).view(-1, group_size)
    keys *= group_size
    keys += torch.arange(group_size, dtype=torch.int64)
    kth = torch.kthvalue(keys, keep, dim=1, keepdim=True).values
    return (keys <= kth).view(rows, cols)
