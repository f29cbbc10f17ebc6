"""Counter-based random numbers that are bit-identical everywhere (format_spec.md, "Seeded masks").

Random dropout masks are not stored: they are regenerated from ``(seed, stream, element index)``.
torch's own RNG streams may change between versions and devices, so this module defines its
own generator from 32-bit integer operations that every language reproduces exactly:

* ``H(x)`` is Chris Wellons' *triple32* integer hash (xor-shifts and multiplications mod 2^32,
  a bijection of ``[0, 2^32)`` with near-ideal avalanche);
* ``k1 = H(seed ^ 0x9E3779B9)``, ``k2 = H(k1 ^ stream)``;
* element ``i`` (``lo = i mod 2^32``, ``hi = i >> 32``) gets
  ``u_i = H(lo ^ K(hi)) ^ k1`` with ``K(hi) = H(k2 ^ H(hi ^ 0x85EBCA6B))``, a value in ``[0, 2^32)``.

One hash round per element keeps regeneration cheap: bulk generation (:func:`uniform_u32_np`,
the masks) runs on numpy ``uint32`` arrays, whose multiplication is defined to wrap mod 2^32 and
whose right shifts are logical, in cache-sized blocks (about 1-2 ns per element on one core; a
mask needs 4 bytes of scratch per element of one block, not of the tensor). The torch helpers
(:func:`hash32_`, :func:`uniform_u32_at`) hold values in int64 tensors in ``[0, 2^32)``, splitting
a multiplication into 16-bit halves of the constant so that no product exceeds 2^49.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._accel import NATIVE_BLOCK, native
from ..errors import InvalidCodecParamsError

MASK32 = 0xFFFFFFFF
#: Constants of the triple32 hash (https://github.com/skeeto/hash-prospector).
_T32 = ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB))
_T32_LAST_SHIFT = 14
SEED_SALT = 0x9E3779B9
HI_SALT = 0x85EBCA6B
#: Elements per block of bulk generation: 256 KiB of uint32, so a block's passes stay in cache.
BLOCK = 1 << 16
_T32_NP = tuple((shift, np.uint32(mult)) for shift, mult in _T32)
_ARANGE = np.arange(BLOCK, dtype=np.uint32)


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


def stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """``(k1, k2)`` of a ``(seed, stream)`` pair (the native kernels take these)."""
    if not 0 <= seed <= MASK32 or not 0 <= stream <= MASK32:
        raise ValueError(f"seed {seed} and stream {stream} must lie in [0, 2^32)")
    k1 = hash32_int(seed ^ SEED_SALT)
    return k1, hash32_int(k1 ^ stream)


def uniform_u32_at(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """``u_i`` for the given non-negative int64 element indices (any shape)."""
    k1, k2 = stream_keys(seed, stream)
    index = index.to(torch.int64)
    if index.numel() == 0 or int(index.max()) <= MASK32:
        x = index ^ hash32_int(k2 ^ hash32_int(HI_SALT))  # hi == 0: one key for the whole tensor
    else:
        x = (index & MASK32) ^ hash32_(hash32((index >> 32) ^ HI_SALT) ^ k2)
    hash32_(x)
    x ^= k1
    return x


def _hash_np_(x: np.ndarray, tmp: np.ndarray) -> None:
    """In-place triple32 on a uint32 array (``tmp``: scratch of the same length)."""
    for shift, mult in _T32_NP:
        np.right_shift(x, shift, out=tmp)
        x ^= tmp
        x *= mult
    np.right_shift(x, _T32_LAST_SHIFT, out=tmp)
    x ^= tmp


def _fill_u32(out: np.ndarray, tmp: np.ndarray, k1: int, k2: int, start: int) -> None:
    """``out[j] = u_(start + j)`` for a uint32 block of at most :data:`BLOCK` elements."""
    done, n = 0, out.size
    while done < n:  # one piece per value of hi = i >> 32 (a block crosses at most one boundary)
        i = start + done
        lo, hi = i & MASK32, i >> 32
        m = min(n - done, (1 << 32) - lo)
        piece = out[done:done + m]
        np.add(_ARANGE[:m], np.uint32(lo), out=piece)
        piece ^= np.uint32(hash32_int(k2 ^ hash32_int((hi ^ HI_SALT) & MASK32)))
        done += m
    _hash_np_(out, tmp[:n])
    out ^= np.uint32(k1)


def uniform_u32_np(seed: int, stream: int, n: int, start: int = 0) -> np.ndarray:
    """``u_start .. u_{start+n-1}`` as a numpy uint32 array (generated block by block)."""
    k1, k2 = stream_keys(seed, stream)
    out = np.empty(n, dtype=np.uint32)
    tmp = np.empty(min(n, BLOCK), dtype=np.uint32)
    for a in range(0, n, BLOCK):
        _fill_u32(out[a:a + BLOCK], tmp, k1, k2, start + a)
    return out


def uniform_u32(seed: int, stream: int, n: int, start: int = 0) -> torch.Tensor:
    """``u_start .. u_{start+n-1}``: int64 tensor of values in ``[0, 2^32)``."""
    return torch.from_numpy(uniform_u32_np(seed, stream, n, start).astype(np.int64))


def keep_threshold(p: float) -> int:
    """``T = floor((1 - p) * 2^32)`` in IEEE-754 double: element ``i`` is kept iff ``u_i < T``."""
    return int((1.0 - float(p)) * 4294967296.0)


def keep_mask(seed: int, stream: int, shape: Sequence[int], p: float) -> torch.Tensor:
    """Bernoulli dropout mask (DARE): element ``i`` (row-major) is kept iff ``u_i < T(p)``."""
    n = 1
    for s in shape:
        n *= int(s)
    t = keep_threshold(p)
    if t > MASK32:
        return torch.ones(tuple(shape), dtype=torch.bool)
    k1, k2 = stream_keys(seed, stream)
    out = np.empty(n, dtype=bool)
    u = np.empty(min(n, BLOCK), dtype=np.uint32)
    tmp = np.empty_like(u)
    for a in range(0, n, BLOCK):
        ub = u[:min(BLOCK, n - a)]
        _fill_u32(ub, tmp, k1, k2, a)
        np.less(ub, np.uint32(t), out=out[a:a + ub.size])
    return torch.from_numpy(out).reshape(tuple(shape))


def _argmin_rows(u: np.ndarray) -> np.ndarray:
    """Column of the smallest ``u[r, :]`` per row, the lowest column on ties (keep = 1).

    Small groups play a knockout over whole columns (three vectorised passes per column, where
    numpy's ``argmin`` would loop per row); the left, lower-column side wins ties.
    """
    rows, g = u.shape
    if g > 8:
        return np.argmin(u, axis=1)  # first occurrence on ties
    vals: list[np.ndarray] = [u[:, j] for j in range(g)]
    idx: list[np.ndarray | int] = list(range(g))
    while len(vals) > 1:
        nv: list[np.ndarray] = []
        ni: list[np.ndarray | int] = []
        for k in range(0, len(vals) - 1, 2):
            right_wins = vals[k + 1] < vals[k]
            nv.append(np.minimum(vals[k], vals[k + 1]))
            ni.append(np.where(right_wins, idx[k + 1], idx[k]))
        if len(vals) % 2:
            nv.append(vals[-1])
            ni.append(idx[-1])
        vals, idx = nv, ni
    return np.broadcast_to(np.asarray(idx[0], dtype=np.int64), (rows,))  # g = 1: the int 0


def _select_rows(u: np.ndarray, keep: int) -> np.ndarray:
    """Flags ``[rows, g]``: whether ``u[r, j]`` has one of the ``keep`` smallest keys ``u * g + j`` of row ``r``."""
    rows, g = u.shape
    kth = np.partition(u, keep - 1, axis=1)[:, keep - 1:keep]
    flags = u <= kth
    if np.count_nonzero(flags) == rows * keep:  # no row has a tie at its threshold (almost always)
        return flags
    over = np.flatnonzero(flags.sum(axis=1) > keep)
    for r in over:  # equal u go to the lower column: drop the highest-column ties beyond keep
        ties = np.flatnonzero(u[r] == kth[r, 0])
        flags[r, ties[keep - int((u[r] < kth[r, 0]).sum()):]] = False
    return flags


def block_ranges(numel: int, group_size: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the blocks the group mask is generated in: whole groups, about
    :data:`BLOCK` elements each (:data:`~._accel.NATIVE_BLOCK` with the native kernels; one group
    when a group is larger)."""
    step = max(1, (NATIVE_BLOCK if native() is not None else BLOCK) // group_size) * group_size
    return [(a, min(step, numel - a)) for a in range(0, numel, step)]


def group_keep_block(seed: int, stream: int, start: int, length: int, group_size: int, keep: int) -> np.ndarray:
    """Row-major indices (int64, ascending) of the kept elements of whole groups ``[start, start + length)``.

    Each of the ``length / group_size`` groups keeps exactly ``keep`` elements (3.5 of format_spec.md).
    """
    g = group_size
    if keep >= g:
        return np.arange(start, start + length, dtype=np.int64)
    if keep <= 0:
        return np.zeros(0, dtype=np.int64)
    k1, k2 = stream_keys(seed, stream)
    nat = native()
    if nat is not None:
        pos = np.empty(length // g * keep, dtype=np.int64)
        nat.positions(k1, k2, start, length, g, keep, pos)
        return pos
    u = np.empty(length, dtype=np.uint32)
    tmp = np.empty(min(length, BLOCK), dtype=np.uint32)
    for a in range(0, length, BLOCK):
        _fill_u32(u[a:a + BLOCK], tmp, k1, k2, start + a)
    u2 = u.reshape(-1, g)
    if keep == 1:
        pos = np.arange(start, start + length, g, dtype=np.int64)
        pos += _argmin_rows(u2)
        return pos
    pos = np.flatnonzero(_select_rows(u2, keep))
    pos += start
    return pos


_POOL: dict[int, ThreadPoolExecutor] = {}


def map_blocks(fn: Callable[[int, int], None], blocks: Sequence[tuple[int, int]], threads: int | None = None) -> None:
    """``fn(start, length)`` for every block, on ``torch.get_num_threads()`` threads (numpy and
    torch release the GIL in their kernels, so blocks of one tensor run in parallel)."""
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1 or len(blocks) <= 1:
        for a, m in blocks:
            fn(a, m)
        return
    pool = _POOL.get(threads)
    if pool is None:
        pool = _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="deltahub-rng")
    for _ in pool.map(lambda b: fn(*b), blocks):
        pass


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
    out = np.zeros(n, dtype=bool)
    for a, m in block_ranges(n, group_size):
        out[group_keep_block(seed, stream, a, m, group_size, keep)] = True
    return torch.from_numpy(out).view(rows, cols)
