"""Quantizers for the kept values of sparse codecs, and dense packing of low-bit codes.

Two exact layouts (format_spec.md, "Quantized values"):

* ``uniform``: asymmetric k-bit, one ``(min, step)`` pair of float16 per group of ``qgroup``
  consecutive values, in units of a per-tensor float32 ``norm`` (the largest |value|, so the
  float16 pairs never under- or overflow whatever the magnitude of the delta). Decoded value
  ``norm * (min_g + step_g * c)``, every operation in float32. The encoder picks, per group,
  the clipping factor ``alpha`` (range ``alpha * [min, max]``) with the smallest squared error.
* ``kmeans``: one sorted codebook of ``2^k`` float32 centroids per tensor (1-D Lloyd);
  decoded value ``codebook[c]``.

*Separate quantization* (DeltaDQ): a k-bit code ``c`` is split by value range into one of
``m = parts`` parts, ``h = c >> b`` (the part), ``l = c & (2^b - 1)`` (its ``b = k - log2 m``-bit
value inside the part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._accel import native
from ._zstd import compress, decompress_frame
from ..errors import CodecError

QUANTIZERS = ("uniform", "kmeans")
#: Clipping factors the uniform encoder tries per group (encoder-only choice; decoders never need it).
CLIP_ALPHAS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
KMEANS_ITERS = 100
#: Lloyd fits on at most this many values (an even-stride subsample; at most 256 centroids, so hundreds of values
#: per centroid; sorting the sample is most of a fit's time); codes are then assigned to all. On the real pair's
#: block matrices (p=0.75, 2 and 4 bits) 65536 values gave the same relative error as 1M to within 0.05% (noise in
#: both directions) at 3.8 instead of 6.9 ms per tensor.
KMEANS_FIT_MAX = 1 << 16


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits packed densely."""
    return (n * bits + 7) // 8


#: Codes handled per pass of :func:`pack_codes` / :func:`unpack_codes` (bounds their int64 scratch).
CODE_CHUNK = 1 << 20


def _shifts(bits: int) -> torch.Tensor:
    """Bit offsets of the 8 codes of a ``bits``-byte word: ``0, bits, ..., 7 * bits``."""
    return torch.arange(0, 8 * bits, bits, dtype=torch.int64)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative codes ``< 2^bits`` into a 1-D uint8 bit stream.

    Code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, least-significant bit first; stream
    bit ``t`` is bit ``t % 8`` of byte ``t // 8``; the last byte is zero-padded. Every 8 codes fill
    exactly ``bits`` bytes: they are OR-ed into one little-endian int64 word (at most 56 bits) whose
    low ``bits`` bytes are the packed bytes.
    """
    codes = codes.reshape(-1)
    n = codes.numel()
    nbytes = packed_nbytes(n, bits)
    if bits == 0 or n == 0:
        return torch.zeros(nbytes, dtype=torch.uint8)
    if bits == 8:
        return codes.to(torch.uint8)
    nat = native()
    if nat is not None and codes.dtype == torch.uint8:
        _, (low,) = nat.split_pack(codes.contiguous().numpy(), bits, 1)
        return torch.frombuffer(low, dtype=torch.uint8)
    out = torch.empty((n + 7) // 8 * bits, dtype=torch.uint8)
    shifts = _shifts(bits)
    for a in range(0, n, CODE_CHUNK):  # CODE_CHUNK is a multiple of 8: chunks fill whole words
        c = codes[a:a + CODE_CHUNK].to(torch.int64) & ((1 << bits) - 1)
        if c.numel() % 8:
            c = torch.nn.functional.pad(c, (0, 8 - c.numel() % 8))
        words = (c.view(-1, 8) << shifts).sum(1)  # disjoint bit fields: the sum is their OR
        out[a // 8 * bits:(a + c.numel()) // 8 * bits] = words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1)
    return out[:nbytes]


#: bits -> uint8 [256, 8 / bits]: the codes held by each byte value, first code first.
_UNPACK_TABLES: dict[int, np.ndarray] = {}


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[n]`` (each ``bits`` bytes hold 8 codes)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(n, bits):
        raise CodecError(
            f"packed codes: expected uint8 [{packed_nbytes(n, bits)}] for {n} codes of {bits} bits, "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    if bits == 0 or n == 0:
        return torch.zeros(n, dtype=torch.uint8)
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: codes never straddle bytes; one table row per byte value
        table = _UNPACK_TABLES.get(bits)
        if table is None:
            table = _UNPACK_TABLES[bits] = ((np.arange(256)[:, None] >> np.arange(0, 8, bits)) & ((1 << bits) - 1)).astype(np.uint8)
        return torch.from_numpy(np.take(table, packed.numpy(), axis=0).reshape(-1)[:n])
    words = (n + 7) // 8
    full = torch.zeros(words * bits, dtype=torch.uint8)
    full[:packed.numel()] = packed
    buf = torch.zeros(words, 8, dtype=torch.uint8)
    buf[:, :bits] = full.view(words, bits)
    out = torch.empty(words * 8, dtype=torch.uint8)
    shifts, low = _shifts(bits), (1 << bits) - 1
    w64 = buf.view(torch.int64).view(-1)
    for a in range(0, words, CODE_CHUNK // 8):
        w = w64[a:a + CODE_CHUNK // 8]
        out[a * 8:(a + w.numel()) * 8] = ((w.unsqueeze(1) >> shifts) & low).view(-1)
    return out[:n]


def split_parts(codes: torch.Tensor, bits: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate quantization: ``(part, low) = (c >> b, c & (2^b - 1))`` with ``b = bits - log2(parts)``."""
    b = bits - (parts.bit_length() - 1)
    return codes >> b, codes & ((1 << b) - 1)


def merge_parts(part: torch.Tensor, low: torch.Tensor, bits: int, parts: int) -> torch.Tensor:
    """Inverse of :func:`split_parts`."""
    b = bits - (parts.bit_length() - 1)
    return (part << b) | low


@dataclass
class UniformQuant:
    """Stored pieces of the ``uniform`` layout."""

    codes: torch.Tensor  # int64 [N]
    mins: torch.Tensor  # float16 [G]
    steps: torch.Tensor  # float16 [G]
    norm: torch.Tensor  # float32 [1]


def num_groups(n: int, qgroup: int) -> int:
    """Quantization groups for ``n`` values: ``ceil(n / qgroup)`` (the last one may be short)."""
    return (n + qgroup - 1) // qgroup


def _grouped(values: torch.Tensor, qgroup: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` padded to whole groups ``[G, qgroup]`` and the validity mask of the padding."""
    n = values.numel()
    g = num_groups(n, qgroup)
    pad = g * qgroup - n
    valid = torch.ones(g * qgroup, dtype=torch.bool)
    if pad:
        valid[n:] = False
        values = torch.nn.functional.pad(values, (0, pad))
    return values.view(g, qgroup), valid.view(g, qgroup)


def dequantize_uniform(codes: torch.Tensor, mins: torch.Tensor, steps: torch.Tensor, norm: torch.Tensor,
                       qgroup: int) -> torch.Tensor:
    """``norm * (min_g + step_g * c)`` in float32 (three separately rounded operations)."""
    n = codes.numel()
    # Gather by group index (not repeat_interleave): O(n) whatever qgroup, even one far above n.
    group = torch.arange(n) // min(qgroup, max(n, 1))
    mn = mins.to(torch.float32)[group]
    st = steps.to(torch.float32)[group]
    out = st * codes.to(torch.float32)
    out = mn + out
    return out * norm.to(torch.float32).reshape(())


def quantize_uniform(values: torch.Tensor, bits: int, qgroup: int) -> UniformQuant:
    """Asymmetric k-bit quantization of a 1-D float32 tensor, per group, with a per-group clip search."""
    values = values.reshape(-1).to(torch.float32)
    n = values.numel()
    levels = (1 << bits) - 1
    norm = values.abs().max() if n else torch.tensor(0.0)
    norm = torch.where(norm > 0, norm, torch.ones(())).to(torch.float32).reshape(1)
    w, valid = _grouped(values / norm, qgroup)
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid, w, big).amin(dim=1)
    hi = torch.where(valid, w, -big).amax(dim=1)
    best_err = torch.full_like(lo, float("inf"))
    best_mn = torch.zeros(lo.shape, dtype=torch.float16)
    best_st = torch.zeros(lo.shape, dtype=torch.float16)
    for alpha in CLIP_ALPHAS:
        mn = (lo * alpha).to(torch.float16)
        st = ((hi - lo) * alpha / levels).to(torch.float16)
        mn32, st32 = mn.to(torch.float32).unsqueeze(1), st.to(torch.float32).unsqueeze(1)
        safe = torch.where(st32 > 0, st32, torch.ones_like(st32))
        c = torch.round((w - mn32) / safe).clamp_(0, levels)
        rec = mn32 + st32 * c
        err = torch.where(valid, (rec - w) ** 2, torch.zeros(())).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_mn = torch.where(better, mn, best_mn)
        best_st = torch.where(better, st, best_st)
    mn32, st32 = best_mn.to(torch.float32).unsqueeze(1), best_st.to(torch.float32).unsqueeze(1)
    safe = torch.where(st32 > 0, st32, torch.ones_like(st32))
    codes = torch.round((w - mn32) / safe).clamp_(0, levels).to(torch.int64).reshape(-1)[:n]
    return UniformQuant(codes, best_mn, best_st, norm)


def kmeans_codebook(values: torch.Tensor, bits: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D Lloyd k-means with ``2^bits`` centroids: ``(sorted float32 codebook, uint8 codes)``."""
    cb = kmeans_fit(values, bits, iters)
    return cb, assign_codebook(values, cb)


def fit_sample(values: torch.Tensor) -> torch.Tensor:
    """The values Lloyd fits on: all of them, or an even-stride subsample of at most :data:`KMEANS_FIT_MAX`."""
    n = values.numel()
    return values if n <= KMEANS_FIT_MAX else values[:: (n + KMEANS_FIT_MAX - 1) // KMEANS_FIT_MAX]


def kmeans_fit(values: torch.Tensor, bits: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """The sorted float32 codebook of ``2^bits`` centroids that 1-D Lloyd iterations reach from a companded start.

    In 1-D every cluster is a contiguous run of the sorted values, so after one sort each Lloyd
    iteration is ``2^bits`` binary searches and prefix-sum differences (no pass over the data);
    the native kernel runs exactly these steps, the numpy loop below is its fallback.
    """
    values = values.reshape(-1).to(torch.float32)
    k = 1 << bits
    if values.numel() == 0:
        return torch.zeros(k)
    nat = native()
    sample = fit_sample(values).numpy()
    if nat is not None:  # a radix sort (numpy's took ~20 ns per value); equal values are interchangeable
        srt = np.empty(sample.size, dtype=np.float32)
        nat.sort_f32(np.ascontiguousarray(sample), srt)
    else:
        srt = np.sort(sample)
    cb = _companded_init(srt, k)
    if nat is not None:
        nat.lloyd(srt, cb, iters)
        return torch.from_numpy(cb)
    csum = np.empty(srt.size + 1, dtype=np.float64)
    csum[0], csum[1:] = 0.0, srt
    np.add.accumulate(csum, out=csum)  # sequential float64 prefix sums, csum[i] = sum of the i smallest
    cuts = np.zeros(k + 1, dtype=np.int64)
    cuts[-1] = srt.size
    two = np.float32(2)
    for _ in range(iters):
        cuts[1:-1] = np.searchsorted(srt, (cb[:-1] + cb[1:]) / two, side="right")
        cnt = cuts[1:] - cuts[:-1]
        means = ((csum[cuts[1:]] - csum[cuts[:-1]]) / np.maximum(cnt, 1)).astype(np.float32)
        new = np.sort(np.where(cnt > 0, means, cb))
        if (new == cb).all():
            break
        cb = new
    return torch.from_numpy(cb)


_CBRT = np.zeros(1)
#: Largest bin count the native start codebook looks up (a bin holding more falls back to the numpy lines).
CBRT_NATIVE_MAX = 1 << 14


def _cbrt_table(n: int) -> np.ndarray:
    """``np.cbrt`` of the integers ``0..n`` (at least), computed once and grown on demand: the bin counts' cube
    roots, looked up, so the native and numpy starts use the very same values."""
    global _CBRT
    table = _CBRT
    if table.size <= n:
        table = np.cbrt(np.arange(max(n + 1, 2 * table.size), dtype=np.float64))
        _CBRT = table
    return table


def _companded_init(srt: np.ndarray, k: int, bins: int | None = None) -> np.ndarray:
    """Initial centroids (float32) at the quantiles of ``density^(1/3)``, the high-resolution optimum of
    MSE quantization (Panter-Dite), so Lloyd converges in few iterations even for heavy tails.

    ``srt`` is sorted: the density is a histogram of ``bins`` equal bins (default 4096, fewer for fewer than
    65536 values: about 16 per bin), counted by binary search.
    """
    if bins is None:
        bins = min(4096, max(256, srt.size // 16))
    lo, hi = float(srt[0]), float(srt[-1])
    if not hi > lo:
        return np.full(k, lo, dtype=np.float32)
    nat = native()
    if nat is not None and srt.dtype == np.float32 and srt.flags.c_contiguous:
        out = np.empty(k, dtype=np.float32)
        # the same steps in one call (~30x less overhead); its table covers the counts of ~16 values per bin with
        # ample room (a table for every count up to a 1M-value sample took longer to build than the fit)
        if nat.companded_init(srt, bins, _cbrt_table(min(srt.size, CBRT_NATIVE_MAX)), out):
            return out
    table = _cbrt_table(srt.size)
    width = (hi - lo) / bins
    cuts = np.searchsorted(srt, (lo + width * np.arange(1, bins)).astype(srt.dtype), side="left")  # no float64 copy of srt
    hist = np.diff(cuts, prepend=0, append=srt.size)
    cdf = np.cumsum(table[hist])
    cdf /= cdf[-1]
    idx = np.clip(np.searchsorted(cdf, (np.arange(k) + 0.5) / k), 0, bins - 1)
    return (lo + (idx + 0.5) * width).astype(np.float32)


def assign_codebook(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest centroid of a sorted codebook of at most 256 (ties to the lower one).

    The code is the number of midpoints strictly below the value (``torch.bucketize``'s answer);
    up to 15 midpoints that count is summed one comparison at a time, which is several times faster.
    """
    values = values.reshape(-1)
    nat = native()
    if nat is not None and values.dtype == torch.float32 and codebook.dtype == torch.float32:
        codes = np.empty(values.numel(), dtype=np.uint8)
        nat.quantize(values.contiguous().numpy(), 1.0, codebook.contiguous().numpy(), codes)
        return torch.from_numpy(codes)
    mids = (codebook[:-1] + codebook[1:]) / 2
    if mids.numel() > 15:
        return torch.bucketize(values, mids).to(torch.uint8)
    codes = torch.zeros(values.numel(), dtype=torch.uint8)
    above = torch.empty(values.numel(), dtype=torch.bool)
    for m in mids.tolist():  # float32 midpoints, exact as Python floats
        torch.gt(values, m, out=above)
        codes += above
    return codes


#: zstd level of code streams. Quantized codes are close to incompressible (k-means codes are near their
#: maximum entropy): on the real pair's default delta, levels 1-9 all store 8.567 MB of the 8.854 MB packed
#: streams and level 12 stores 8.569 MB, in 10 ms (level 3) against 86 ms (level 12) of one core.
STREAM_ZSTD_LEVEL = 3


def store_stream(codes: torch.Tensor, bits: int, *, entropy: bool = True) -> torch.Tensor:
    """Codes as a stored uint8 stream: packed densely, or zstd of the packed bytes iff strictly smaller.

    A reader tells the two apart by length alone: the raw stream of ``n`` codes has exactly
    ``ceil(n * bits / 8)`` bytes, a zstd stream is shorter.
    """
    return stored_bytes(pack_codes(codes, bits), entropy=entropy)


def stored_bytes(packed: torch.Tensor, *, entropy: bool = True) -> torch.Tensor:
    """A packed code stream as stored: its zstd frame when ``entropy`` and strictly smaller, else itself."""
    if entropy and packed.numel() > 0:
        blob = compress(packed.numpy().tobytes(), STREAM_ZSTD_LEVEL)
        if blob.numel() < packed.numel():
            return blob
    return packed


def load_stream(stored: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`store_stream`: uint8 codes ``[n]``."""
    return unpack_codes(load_packed(stored, n, bits), n, bits)


def load_packed(stored: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The packed bytes of a stored code stream of ``n`` ``bits``-bit codes (decompressed when stored
    as a zstd frame; its size checked)."""
    raw_len = packed_nbytes(n, bits)
    if stored.dtype != torch.uint8 or stored.dim() != 1:
        raise CodecError(f"code stream must be a 1-D uint8 tensor, got {stored.dtype} {list(stored.shape)}")
    if stored.numel() > raw_len:
        raise CodecError(f"code stream has {stored.numel()} bytes, more than the {raw_len} of {n} raw {bits}-bit codes")
    if stored.numel() < raw_len:
        raw = decompress_frame(stored.numpy().tobytes(), what="code stream", size=raw_len)
        stored = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return stored
