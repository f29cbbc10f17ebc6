"""DeltaDQ (arXiv 2410.08666): group-wise dropout of the delta, then separate quantization.

1. **Group-wise dropout.** Each row of the ``[rows, cols]`` view is cut into groups of
   ``group_size`` consecutive columns; in every group exactly ``keep = round((1 - p) * group_size)``
   elements survive, chosen by the seeded counter-based generator (``_rng.group_keep_block``), and
   are rescaled by ``group_size / keep``. The mask costs zero bytes: it is regenerated from
   ``(seed, stream)``, block by block (:func:`gather_kept`, :func:`scatter_kept`), so it never
   exists whole and decoding needs little beyond the output tensor.
2. **Group size.** With ``group_size="auto"`` the group size minimizing the *expected* squared
   error of the layer output ``X @ delta.T`` is chosen (:func:`group_size_errors`); ``X`` is the
   calibration input when given, else one all-ones input (the delta entries are the intermediate
   results).
3. **Separate quantization.** Kept (rescaled) values are quantized to ``bits``-bit codes
   (per-tensor k-means codebook or per-group uniform), then split by value range into ``parts``
   parts: the part id of every kept value, and for each part the low bits of its members, stored
   as separate streams, each zstd-compressed when that is smaller.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import register_codec
from ._quant import (CBRT_NATIVE_MAX, KMEANS_FIT_MAX, KMEANS_ITERS, QUANTIZERS, _cbrt_table, dequantize_uniform, fit_sample,
                     kmeans_codebook, kmeans_fit, load_packed, load_stream, merge_parts, num_groups, packed_nbytes,
                     quantize_uniform, split_parts, store_stream, stored_bytes)
from ._accel import HALF_KINDS, native
from ._rng import block_ranges, check_seed, group_keep_block, map_blocks, name_stream, stream_keys
from .base import (SUMSQ_BLOCK, Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, matrix_view_shape,
                   param_choice, param_float, param_int)
from ..errors import CodecError, InvalidCodecParamsError
from ..utils.logging import get_logger

logger = get_logger(__name__)

#: Presets named by the compression ratio against the fp16 delta, ``16 / ((1 - p) * bits)``
#: (stream rounding and the codebook excluded; zstd only makes them smaller). Compared on the
#: real pair in benchmarks/README.md (``python benchmarks/bench_real_pair.py``).
PRESETS: dict[str, dict[str, Any]] = {
    # 16x: p=0.75 with 4-bit codes measured KL 0.00115 on the real pair, p=0.5 with 2-bit 0.00204;
    # at 32x and above 2-bit codes with more kept values won (32x tie, 64x 0.0041 vs 0.0056).
    "16x": {"p": 0.75, "bits": 4, "parts": 2, "quantizer": "kmeans"},
    "32x": {"p": 0.75, "bits": 2, "parts": 2, "quantizer": "kmeans"},
    "64x": {"p": 0.875, "bits": 2, "parts": 2, "quantizer": "kmeans"},
    "128x": {"p": 0.9375, "bits": 2, "parts": 2, "quantizer": "kmeans"},
    "256x": {"p": 0.96875, "bits": 2, "parts": 2, "quantizer": "kmeans"},
    "512x": {"p": 0.984375, "bits": 2, "parts": 2, "quantizer": "kmeans"},
}
#: Largest power-of-two group size ``group_size="auto"`` tries (the row length is always tried too).
AUTO_MAX_GROUP = 4096
#: Calibration rows used by the group-size procedure (an even-stride subsample beyond this).
CALIB_MAX_TOKENS = 512
DEFAULT_QGROUP = 64


def keep_count(p: float, group_size: int) -> int:
    """Kept elements per group: ``floor((1 - p) * group_size + 0.5)`` in IEEE-754 double."""
    return int(math.floor((1.0 - float(p)) * group_size + 0.5))


def auto_candidates(cols: int, p: float) -> list[int]:
    """Group sizes ``auto`` compares: powers of two dividing ``cols`` whose keep count is a whole,
    non-zero number (``(1 - p) * g`` integral), and ``cols`` itself (rounded keep count)."""
    return list(_auto_candidates(cols, p, AUTO_MAX_GROUP))


@functools.lru_cache(maxsize=1024)  # per row length and drop rate: the allocation asks per setting and matrix
def _auto_candidates(cols: int, p: float, max_group: int) -> tuple[int, ...]:
    out = []
    g = 2
    while g <= min(cols, max_group):
        exact = (1.0 - p) * g
        if cols % g == 0 and abs(exact - round(exact)) < 1e-9 and round(exact) >= 1:
            out.append(g)
        g *= 2
    if cols not in out and keep_count(p, cols) >= 1:
        out.append(cols)
    return tuple(out)


def group_size_errors(delta2d: torch.Tensor, p: float, candidates: list[int],
                      calibration: torch.Tensor | None = None) -> dict[int, float]:
    """Expected ``||X (D_hat - D)^T||_F^2`` of group-wise dropout for each candidate group size.

    Keeping ``n`` of ``g`` elements uniformly at random and rescaling by ``g / n`` estimates each
    group's partial sum ``sum_j x_tj D_ij`` without bias, with the sampling-without-replacement
    variance ``g (g - n) / (n (g - 1)) * sum_j (z_tj - mean_G z_t)^2``, ``z_tj = x_tj D_ij``.
    Groups are independent, so summing over tokens ``t``, rows ``i`` and groups gives
    ``c(g) * (sum_ij D_ij^2 H_jj - sum_{i,G} (1/g) D_iG^T H_GG D_iG)`` with ``H = X^T X``.
    The smaller the within-group spread of the intermediate results ("balanced intermediate
    results"), the smaller the error. ``calibration=None`` takes one all-ones input (``H = 1 1^T``),
    i.e. the delta entries themselves as the intermediate results; isotropic inputs (``H = I``)
    would make every group size equal (``E = p / (1 - p) * ||D||^2``) and so could not choose.
    """
    if calibration is None:
        return _spread_errors(delta2d, p, candidates)
    d = delta2d.to(torch.float64)
    rows, cols = d.shape
    x = None
    if calibration is not None:
        x = calibration.reshape(-1, calibration.shape[-1]).to(torch.float64)
        if x.shape[1] != cols:
            raise CodecError(f"calibration has {x.shape[1]} features but the tensor has {cols} columns")
        if x.shape[0] > CALIB_MAX_TOKENS:
            x = x[:: (x.shape[0] + CALIB_MAX_TOKENS - 1) // CALIB_MAX_TOKENS]
    hdiag = (x * x).sum(0) if x is not None else torch.ones(cols, dtype=torch.float64)
    term1 = float((d * d * hdiag).sum())
    h = x.T @ x if x is not None else None
    out: dict[int, float] = {}
    for g in candidates:
        n = keep_count(p, g)
        if n >= g:
            out[g] = 0.0
            continue
        nb = cols // g
        d3 = d.view(rows, nb, g)
        if x is None:
            term2 = float((d3.sum(2) ** 2).sum()) / g
        elif g <= x.shape[0]:
            hb = h.view(nb, g, nb, g).diagonal(dim1=0, dim2=2)  # [g, g, nb]: the diagonal blocks
            term2 = float(torch.einsum("rbj,jkb,rbk->", d3, hb, d3)) / g
        else:
            y = torch.einsum("tbj,rbj->tbr", x.view(-1, nb, g), d3)  # per-group partial outputs
            term2 = float((y * y).sum()) / g
        c = g * (g - n) / (n * (g - 1))
        out[g] = c * max(term1 - term2, 0.0)
    return out


#: Elements of the delta converted to float64 at a time by :func:`_spread_errors`.
SPREAD_BLOCK = 1 << 20


def _spread_errors(delta2d: torch.Tensor, p: float, candidates: list[int],
                   sums: tuple[float, dict[int, float]] | None = None) -> dict[int, float]:
    """:func:`group_size_errors` without calibration (``H = 1 1^T``): ``c(g) * (sum D^2 - sum_G (sum_G D)^2 / g)``.

    ``sums`` (from :func:`spread_sums` over a superset of ``candidates``) saves the pass over the delta.
    """
    term1, term2 = sums if sums is not None else spread_sums(delta2d, candidates)
    out: dict[int, float] = {}
    for g in candidates:
        n = keep_count(p, g)
        out[g] = 0.0 if n >= g else g * (g - n) / (n * (g - 1)) * max(term1 - term2[g] / g, 0.0)
    return out


def spread_sums(delta2d: torch.Tensor, sizes: list[int]) -> tuple[float, dict[int, float]]:
    """``(sum D^2, {g: sum over groups of (sum_G D)^2})`` for group sizes that are powers of two dividing the
    row, or the row itself; the same for every drop rate ``p``.

    Group sums of every power-of-two size come from the previous size's by adding neighbours, so all
    sizes cost about two passes over the delta, in float64 blocks of :data:`SPREAD_BLOCK` elements.
    """
    rows, cols = delta2d.shape
    sizes = sorted(sizes)
    nat = native()
    if nat is not None and delta2d.dtype == torch.float32 and delta2d.is_contiguous() and len(sizes) <= 64:
        term1, sums = nat.spread_sums(delta2d.numpy(), rows, cols, sizes)
        return term1, dict(zip(sizes, sums))
    term1, term2 = 0.0, dict.fromkeys(sizes, 0.0)
    step = max(1, SPREAD_BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        s = delta2d[r0:r0 + step].to(torch.float64)
        flat = s.view(-1)
        term1 += float(torch.dot(flat, flat))
        size = 1
        for g in sorted(sizes):
            while size < g and g % (2 * size) == 0:  # sizes are powers of two dividing cols, and cols
                s = s[:, 0::2] + s[:, 1::2]
                size *= 2
            sg = (s if size == g else s.sum(1)).reshape(-1)  # g = cols, not a power of two: the row sums
            term2[g] += float(torch.dot(sg, sg))
    return term1, term2


def choose_group_size(delta2d: torch.Tensor, p: float, calibration: torch.Tensor | None = None,
                      memo: dict[str, Any] | None = None) -> int:
    """The candidate group size with the smallest expected output error (ties: the larger group).

    ``memo`` (an :class:`EncodeInput`'s) keeps the calibration-free sums for the other drop rates of the same delta.
    """
    cols = delta2d.shape[1]
    cands = auto_candidates(cols, p)
    if not cands:
        raise InvalidCodecParamsError(f"codec 'deltadq': no group size keeps an element at p={p} for {cols} columns")
    if calibration is None and memo is not None:
        sums = _memo_spread_sums(delta2d, memo)
        if all(g in sums[1] for g in cands):
            errs = _spread_errors(delta2d, p, cands, sums)
        else:
            errs = group_size_errors(delta2d, p, cands)
    else:
        errs = group_size_errors(delta2d, p, cands, calibration)
    best = min(errs.values())
    return max(g for g, e in errs.items() if e <= best * (1 + 1e-9))


def _memo_spread_sums(delta2d: torch.Tensor, memo: dict[str, Any]) -> tuple[float, dict[int, float]]:
    """:func:`spread_sums` for every group size ``auto`` may try (any drop rate), computed once per tensor; their
    ``sum D^2`` also serves as the tensor's ``||D||^2`` (one pass over the delta fewer)."""
    sums = memo.get("deltadq.spread")
    if sums is None:
        cols = delta2d.shape[1]
        sums = memo["deltadq.spread"] = spread_sums(delta2d, auto_candidates(cols, 0.5) or [cols])
        memo.setdefault("delta_sumsq", sums[0])
    return sums


def gather_kept(flat: torch.Tensor, seed: int, stream: int, g: int, keep: int) -> torch.Tensor:
    """The elements of ``flat`` the group mask keeps, in row-major order (``flat[M]``), generated
    block by block so the mask never exists whole."""
    out = torch.empty(flat.numel() // g * keep, dtype=flat.dtype)
    nat = native() if flat.dtype == torch.float32 and flat.is_contiguous() else None
    if nat is not None:
        k1, k2 = stream_keys(seed, stream)
        src, dst = flat.numpy(), out.numpy()

        def block(a: int, m: int) -> None:
            v0 = a // g * keep
            nat.gather(k1, k2, a, g, keep, src[a:a + m], dst[v0:v0 + m // g * keep])
    else:
        def block(a: int, m: int) -> None:
            pos = torch.from_numpy(group_keep_block(seed, stream, a, m, g, keep))
            v0 = a // g * keep
            torch.index_select(flat, 0, pos, out=out[v0:v0 + pos.numel()])

    map_blocks(block, block_ranges(flat.numel(), g))
    return out


def scatter_kept(numel: int, values: torch.Tensor, seed: int, stream: int, g: int, keep: int,
                 table: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The flat float32 tensor with ``values`` at the group mask ``M`` and 0 elsewhere (the inverse of
    :func:`gather_kept`), block by block; peak scratch is a few bytes per element of one block.

    With ``table`` (float32, at most 256 entries), ``values`` are uint8 codes and the kept elements get
    ``table[code]``. With ``out`` (flat contiguous float32, bfloat16 or float16 of ``numel``), the decoded delta is added
    to it in place (``out + 0`` at dropped elements: the bits of ``dtype(float32(out) + delta)``) and ``out`` is
    returned.
    """
    nat = native()
    if nat is not None and (out is None or (out.dtype in HALF_KINDS and out.is_contiguous())):
        if table is not None:
            padded = torch.zeros(256, dtype=torch.float32)
            padded[:table.numel()] = table
            return _scatter_native(nat, numel, values.contiguous().numpy(), padded.numpy(), seed, stream, g, keep, out)
        return _scatter_native(nat, numel, values.to(torch.float32).contiguous().numpy(), None, seed, stream, g, keep, out)
    if table is not None:
        values = table.index_select(0, values.to(torch.int32))
    values = values.to(torch.float32)
    delta = torch.zeros(numel, dtype=torch.float32)

    def block(a: int, m: int) -> None:
        pos = torch.from_numpy(group_keep_block(seed, stream, a, m, g, keep))
        v0 = a // g * keep
        delta.index_copy_(0, pos, values[v0:v0 + pos.numel()])

    map_blocks(block, block_ranges(numel, g))
    if out is None:
        return delta
    if out.dtype != torch.float32:  # dtype(float32(out) + delta): one rounding, as reconstruct does
        return out.copy_((out.to(torch.float32) + delta).to(out.dtype))
    return out.add_(delta)


def _scatter_native(nat: Any, numel: int, src: np.ndarray, table: np.ndarray | None, seed: int, stream: int,
                    g: int, keep: int, out: torch.Tensor | None) -> torch.Tensor:
    """:func:`scatter_kept` by the native kernel, which writes every element (no zero fill first)."""
    acc = out is not None
    if out is None:
        out = torch.empty(numel, dtype=torch.float32)
    half = HALF_KINDS[out.dtype]
    dst = out.view(torch.int16).numpy() if half else out.numpy()  # 16-bit floats as their bits
    k1, k2 = stream_keys(seed, stream)

    def block(a: int, m: int) -> None:
        v0 = a // g * keep
        nat.scatter(k1, k2, a, g, keep, dst[a:a + m], src[v0:v0 + m // g * keep], table, acc, half)

    map_blocks(block, block_ranges(numel, g))
    return out


def _closed_form_stats(d2: float, kept: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
    """``delta_l2``, ``error_l2`` and ``error_dot`` (``Σ e·Δ``) without decoding (``d2 = ||Δ||^2``): dropped
    elements err by minus their value, kept ones by ``decoded - kept`` (in float64, as the native kernel, a block
    at a time: no float64 copy of all kept values; equal to measuring the decoded tensor up to float rounding)."""
    k2 = q2 = qd = 0.0
    for a in range(0, kept.numel(), SUMSQ_BLOCK):
        k = kept[a:a + SUMSQ_BLOCK].to(torch.float64)
        err = decoded[a:a + SUMSQ_BLOCK].to(torch.float64) - k
        k2, q2, qd = k2 + float(torch.dot(k, k)), q2 + float(torch.dot(err, err)), qd + float(torch.dot(err, k))
    return _stats_from_sums(d2, k2, q2, qd)


def _stats_from_sums(d2: float, k2: float, q2: float, qd: float) -> dict[str, float]:
    """The closed-form stats from ``||Δ||^2``, ``Σ kept^2``, ``Σ e_kept^2`` and ``Σ e_kept·kept``."""
    return {"delta_l2": math.sqrt(d2), "error_l2": math.sqrt(max(d2 - k2, 0.0) + q2), "error_dot": qd - (d2 - k2)}


def _native_encoded(d2: float, out: dict[str, Any], codebook: torch.Tensor, sums: tuple[float, float, float],
                    part: bytearray | None, lows: list[bytearray] | None) -> Encoded:
    """The :class:`Encoded` of the native k-means path from its codebook, error sums and packed streams (each stream
    stored as a zstd frame when that is smaller and ``out``'s entropy is ``zstd``)."""
    entropy = out["entropy"] == "zstd"
    tensors = {"codebook": codebook}
    if part is not None:
        tensors["part"] = stored_bytes(_bytes_tensor(part), entropy=entropy)
    for j, low in enumerate(lows or ()):
        tensors[f"low{j}"] = stored_bytes(_bytes_tensor(low), entropy=entropy)
    return Encoded(tensors, out, _stats_from_sums(d2, *sums))


def _bytes_tensor(buf: bytearray) -> torch.Tensor:
    """A native kernel's bytearray as a uint8 tensor (``torch.frombuffer`` refuses an empty one)."""
    return torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.zeros(0, dtype=torch.uint8)


def _part_bits(bits: int, parts: int) -> tuple[int, int]:
    """(bits of a part id, bits of a value inside its part)."""
    pb = parts.bit_length() - 1
    return pb, bits - pb


@register_codec
class DeltaDQ(Codec):
    """Group-wise dropout (seeded, zero-byte mask) + separate quantization of the kept values."""

    name = "deltadq"
    delta_only = True
    presets = PRESETS
    default_params: dict[str, Any] = {
        "preset": "16x", "p": None, "bits": None, "parts": None, "quantizer": None, "qgroup": None,
        "group_size": "auto", "seed": 0, "stream": None, "entropy": "zstd",
    }
    inplace_dtypes = tuple(HALF_KINDS)
    fixed_size_roles = frozenset({"codebook", "norm"})

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        m = super().validate_params(params)
        preset = m["preset"]
        if preset is not None:
            if preset not in PRESETS:
                raise InvalidCodecParamsError(
                    f"codec 'deltadq': unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
            for key, val in PRESETS[preset].items():
                if m[key] is None:
                    m[key] = val
        if m["p"] is None or m["bits"] is None:
            raise InvalidCodecParamsError("codec 'deltadq': give a preset, or both p and bits")
        m["parts"] = 1 if m["parts"] is None else m["parts"]
        m["quantizer"] = "kmeans" if m["quantizer"] is None else m["quantizer"]
        check_range(self.name, "p", m["p"], lo=0.0, hi=1.0, hi_open=True)
        check_range(self.name, "bits", m["bits"], lo=1, hi=8, integer=True)
        check_range(self.name, "parts", m["parts"], lo=1, hi=1 << m["bits"], integer=True)
        if m["parts"] & (m["parts"] - 1):
            raise InvalidCodecParamsError(f"codec 'deltadq': parts={m['parts']} must be a power of two")
        if m["quantizer"] not in QUANTIZERS:
            raise InvalidCodecParamsError(
                f"codec 'deltadq': quantizer={m['quantizer']!r} is not one of {', '.join(QUANTIZERS)}")
        if m["quantizer"] == "uniform":
            m["qgroup"] = DEFAULT_QGROUP if m["qgroup"] is None else m["qgroup"]
            check_range(self.name, "qgroup", m["qgroup"], lo=1, integer=True)
        else:
            m["qgroup"] = None
        if m["group_size"] != "auto":
            check_range(self.name, "group_size", m["group_size"], lo=1, integer=True)
            if keep_count(m["p"], m["group_size"]) < 1:
                raise InvalidCodecParamsError(
                    f"codec 'deltadq': group_size={m['group_size']} keeps no element at p={m['p']}; "
                    f"use group_size >= {math.ceil(0.5 / (1 - m['p']))}")
        check_seed(self.name, m["seed"])
        if m["stream"] is not None:
            check_range(self.name, "stream", m["stream"], lo=0, hi=0xFFFFFFFF, integer=True)
        if m["entropy"] not in ("zstd", "none"):
            raise InvalidCodecParamsError(f"codec 'deltadq': entropy={m['entropy']!r} is not 'zstd' or 'none'")
        return m

    def measured_params(self, params: dict[str, Any], sample: Encoded) -> dict[str, Any]:
        """``group_size="auto"`` becomes the group size the sample chose (its columns are the tensor's)."""
        if params["group_size"] == "auto":
            return {**params, "group_size": sample.params["group_size"]}
        return params

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        d2, d2d, g, keep, out = self._setting(inp, params)
        nat = native() if d2d.dtype == torch.float32 else None
        kept = gather_kept(d2d.reshape(-1), params["seed"], out["stream"], g, keep)
        if params["quantizer"] == "kmeans" and nat is not None:
            # Native: codes, error sums and the packed streams in three passes over the kept values.
            # The kept values rescaled, float32(kept * (g / keep)), only for the fit sample; the kernel rescales the rest.
            codebook = kmeans_fit(fit_sample(kept) * (g / keep), params["bits"])
            codes = np.empty(kept.numel(), dtype=np.uint8)
            sums = nat.quantize(kept.numpy(), g / keep, codebook.numpy(), codes, True)
            return _native_encoded(d2, out, codebook, sums, *nat.split_pack(codes, params["bits"], params["parts"]))
        return self._numpy_encode(kept, d2, g, keep, params, out)

    def encode_many(self, inp: EncodeInput, params_list: list[dict[str, Any]]) -> list[Encoded | CodecError]:
        """The k-means settings of float32 deltas in one native call (:func:`_native.dq_ladder`: the same bytes as
        :meth:`encode`, without a Python round trip per step); the others one by one."""
        nat = native() if inp.delta.dtype == torch.float32 else None
        results: list[Encoded | CodecError | None] = [None] * len(params_list)
        batch: list[tuple[int, float, torch.Tensor, dict[str, Any], int, int]] = []
        for i, params in enumerate(params_list):
            try:
                if nat is None or params["quantizer"] != "kmeans":
                    results[i] = self.encode(inp, params)
                    continue
                d2, d2d, g, keep, out = self._setting(inp, params)
            except CodecError as exc:
                results[i] = exc
                continue
            batch.append((i, d2, d2d, out, g, keep))
        if batch:
            d2d = batch[0][2]
            fit_most = min(max(d2d.numel() // g * keep for _, _, _, _, g, keep in batch), KMEANS_FIT_MAX)
            settings = [(*stream_keys(out["seed"], out["stream"]), g, keep, out["bits"], out["parts"])
                        for _, _, _, out, g, keep in batch]
            done = nat.dq_ladder(d2d.reshape(-1).numpy(), settings, _cbrt_table(min(fit_most, CBRT_NATIVE_MAX)),
                                 KMEANS_FIT_MAX, KMEANS_ITERS)
            for (i, d2, _, out, _, _), r in zip(batch, done):
                if r is None:  # the companded start needs the numpy lines: this setting alone
                    results[i] = self.encode(inp, params_list[i])
                else:
                    cb, sums, part, lows = r
                    results[i] = _native_encoded(d2, out, torch.frombuffer(cb, dtype=torch.float32), sums, part, lows)
        return results  # type: ignore[return-value]

    def _setting(self, inp: EncodeInput, params: dict[str, Any]) -> tuple[float, torch.Tensor, int, int, dict[str, Any]]:
        """What every setting of :meth:`encode` starts from: ``(||D||^2, the [rows, cols] delta, group size, keep
        count, the stored params)``; a delta with NaN / Inf or a group size that does not divide the row raise."""
        delta = inp.delta
        rows, cols = matrix_view_shape(delta.shape)
        d2d = delta.reshape(rows, cols)
        if params["group_size"] == "auto" and inp.calibration is None:
            _memo_spread_sums(d2d, inp._memo)  # gives ||D||^2 too
        d2 = inp.delta_sumsq()
        if not math.isfinite(d2):
            raise CodecError(f"tensor {inp.name!r}: the delta has NaN or Inf values; deltadq cannot code them")
        p, bits, parts = float(params["p"]), params["bits"], params["parts"]
        g = params["group_size"]
        if g == "auto":
            g = choose_group_size(d2d, p, inp.calibration, inp._memo)
            logger.debug("deltadq %s: group_size=auto chose %d", inp.name, g)
        elif cols % g:
            raise InvalidCodecParamsError(
                f"codec 'deltadq': group_size={g} does not divide the last dimension ({cols}) of tensor {inp.name!r}")
        stream = params["stream"] if params["stream"] is not None else name_stream(inp.name)
        out = {"p": p, "bits": bits, "parts": parts, "group_size": g, "quantizer": params["quantizer"],
               "seed": params["seed"], "stream": stream, "entropy": params["entropy"]}
        return d2, d2d, g, keep_count(p, g), out

    def _numpy_encode(self, kept: torch.Tensor, d2: float, g: int, keep: int, params: dict[str, Any],
                      out: dict[str, Any]) -> Encoded:
        """:meth:`encode` without the native kernels (or with the uniform quantizer)."""
        bits, parts = params["bits"], params["parts"]
        tensors: dict[str, torch.Tensor] = {}
        entropy = params["entropy"] == "zstd"
        values = kept * (g / keep)
        if params["quantizer"] == "kmeans":
            codebook, codes_t = kmeans_codebook(values, bits)
            tensors["codebook"] = codebook
            decoded = codebook.index_select(0, codes_t.to(torch.int32))
        else:
            q = quantize_uniform(values, bits, params["qgroup"])
            codes_t = q.codes
            tensors.update(norm=q.norm, qmin=q.mins, qstep=q.steps)
            out["qgroup"] = params["qgroup"]
            decoded = dequantize_uniform(codes_t, q.mins, q.steps, q.norm, params["qgroup"])
        stats = _closed_form_stats(d2, kept, decoded)
        pbits, lbits = _part_bits(bits, parts)
        part_t, low = split_parts(codes_t, bits, parts)
        if pbits:
            tensors["part"] = store_stream(part_t, pbits, entropy=entropy)
        if lbits:
            part_np, low_np = part_t.numpy(), low.numpy()
            for j in range(parts):  # np.compress: the members of part j in order, far faster than a[mask]
                low_j = torch.from_numpy(np.compress(part_np == j, low_np)) if parts > 1 else low
                tensors[f"low{j}"] = store_stream(low_j, lbits, entropy=entropy)
        return Encoded(tensors, out, stats)

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        rows, cols = matrix_view_shape(shape)
        p = param_float(self.name, params, "p", 0.0, 1.0, hi_open=True)
        bits = param_int(self.name, params, "bits", 1, 8)
        parts = param_int(self.name, params, "parts", 1, 1 << bits)
        if parts & (parts - 1):
            raise InvalidCodecParamsError(f"codec 'deltadq': parts={parts} must be a power of two")
        quantizer = param_choice(self.name, params, "quantizer", QUANTIZERS)
        # group_size divides cols, so it never exceeds the row (no allocation beyond the tensor's).
        g = param_int(self.name, params, "group_size", 1, max(cols, 1))
        if cols % g:
            raise InvalidCodecParamsError(f"codec 'deltadq': group_size={g} does not divide the last dimension ({cols})")
        keep = keep_count(p, g)
        if not 1 <= keep <= g:
            raise InvalidCodecParamsError(f"codec 'deltadq': p={p!r} keeps {keep} of every {g} elements; it must keep 1 to {g}")
        param_int(self.name, params, "seed", 0, 0xFFFFFFFF)
        param_int(self.name, params, "stream", 0, 0xFFFFFFFF)
        if "entropy" in params:
            param_choice(self.name, params, "entropy", ("zstd", "none"))
        n = rows * (cols // g) * keep
        expected: dict[str, tuple[torch.dtype, tuple[int, ...] | int]] = {}
        if quantizer == "kmeans":
            if params.get("qgroup") is not None:
                raise InvalidCodecParamsError(f"codec 'deltadq': qgroup={params['qgroup']!r} is only for quantizer 'uniform'")
            expected["codebook"] = (torch.float32, (1 << bits,))
        else:
            # Any qgroup >= 1 is valid (a group larger than n is one group); dequantizing gathers by index.
            qg = param_int(self.name, params, "qgroup", 1, 2**63 - 1)
            ng = num_groups(n, qg)
            expected.update(norm=(torch.float32, (1,)), qmin=(torch.float16, (ng,)), qstep=(torch.float16, (ng,)))
        pbits, lbits = _part_bits(bits, parts)
        if pbits:
            expected["part"] = (torch.uint8, packed_nbytes(n, pbits))
        if lbits:
            for j in range(parts):
                expected[f"low{j}"] = (torch.uint8, packed_nbytes(n, lbits))
        expect_stored(self.name, stored, expected)

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        return self._decode(stored, params, shape, None).reshape(shape)

    def add_delta_(self, target: torch.Tensor, stored: dict[str, torch.Tensor], params: dict[str, Any],
                   shape: tuple[int, ...]) -> None:
        """Adds the delta straight into ``target`` (float32, bfloat16 or float16; native kernels: one pass, no delta tensor)."""
        if target.dtype not in self.inplace_dtypes or not target.is_contiguous():
            return super().add_delta_(target, stored, params, shape)
        self._decode(stored, params, shape, target.view(-1))

    def _decode(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...],
                out: torch.Tensor | None) -> torch.Tensor:
        """The flat decoded delta, or ``out + delta`` in place when ``out`` (flat float32) is given."""
        rows, cols = matrix_view_shape(shape)
        g, bits, parts = params["group_size"], params["bits"], params["parts"]
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise CodecError(f"deltadq: group_size {g!r} is not a positive integer")
        if cols % g:
            raise CodecError(f"deltadq: group_size {g} does not divide the last dimension of shape {list(shape)}")
        keep = keep_count(params["p"], g)
        if not 1 <= keep <= g:
            raise CodecError(f"deltadq: p={params['p']!r} keeps {keep} of every {g} elements; it must keep 1 to {g}")
        n = rows * (cols // g) * keep
        codes = self._codes(stored, n, bits, parts)
        if params["quantizer"] == "kmeans":
            cb = stored["codebook"]
            if cb.dtype != torch.float32 or tuple(cb.shape) != (1 << bits,):
                raise CodecError(f"deltadq: codebook must be float32 [{1 << bits}], got {cb.dtype} {list(cb.shape)}")
            return scatter_kept(rows * cols, codes, params["seed"], params["stream"], g, keep, table=cb, out=out)
        qg = params["qgroup"]
        ng = num_groups(n, qg)
        qmin, qstep, norm = stored["qmin"], stored["qstep"], stored["norm"]
        if tuple(qmin.shape) != (ng,) or tuple(qstep.shape) != (ng,) or tuple(norm.shape) != (1,):
            raise CodecError(f"deltadq: uniform scales do not fit {n} values in groups of {qg}")
        values = dequantize_uniform(codes, qmin, qstep, norm, qg)
        return scatter_kept(rows * cols, values, params["seed"], params["stream"], g, keep, out=out)

    @staticmethod
    def _codes(stored: dict[str, torch.Tensor], n: int, bits: int, parts: int) -> torch.Tensor:
        """The ``n`` uint8 codes: part ids, and each part's low bits filled in at its members in order."""
        pbits, lbits = _part_bits(bits, parts)
        if not pbits:
            return load_stream(stored["low0"], n, lbits)
        nat = native()
        if nat is not None and lbits:
            part_packed = load_packed(stored["part"], n, pbits).numpy()
            counts = nat.part_counts(part_packed, n, pbits)
            lows = [load_packed(stored[f"low{j}"], c, lbits).numpy() for j, c in enumerate(counts)]
            codes = np.empty(n, dtype=np.uint8)
            nat.merge_parts(codes, part_packed, pbits, lows, lbits)
            return torch.from_numpy(codes)
        part = load_stream(stored["part"], n, pbits)
        if not lbits:
            return part
        low = np.zeros(n, dtype=np.uint8)
        part_np = part.numpy()
        for j in range(parts):  # np.place fills the members of part j in order (masked scatter)
            sel = part_np == j
            np.place(low, sel, load_stream(stored[f"low{j}"], int(np.count_nonzero(sel)), lbits).numpy())
        return merge_parts(part, torch.from_numpy(low), bits, parts)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """Exact only without entropy coding and with one part (per-part streams round to whole bytes);
        otherwise None (see :func:`max_nbytes` for the bound)."""
        if params.get("entropy", "zstd") != "none" or params["parts"] != 1 or params["group_size"] == "auto":
            return None
        return max_nbytes(shape, params)


def max_nbytes(shape: tuple[int, ...], params: dict[str, Any]) -> int:
    """Upper bound of the stored bytes (exact for ``entropy="none"`` and ``parts=1``):
    side info + ``ceil(N log2(parts) / 8) + sum_j ceil(N_j b / 8) <= ... + ceil(N b / 8) + parts - 1``."""
    rows, cols = matrix_view_shape(shape)
    g, bits, parts = params["group_size"], params["bits"], params["parts"]
    n = rows * (cols // g) * keep_count(params["p"], g)
    pbits, lbits = _part_bits(bits, parts)
    side = 4 * (1 << bits) if params["quantizer"] == "kmeans" else 4 + 4 * num_groups(n, params["qgroup"])
    low = (packed_nbytes(n, lbits) + parts - 1) if lbits else 0
    return side + (packed_nbytes(n, pbits) if pbits else 0) + low
