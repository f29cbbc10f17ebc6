"""Row-sparse coding of vocabulary matrices (embeddings, untied LM heads): whole rows kept or dropped.

A full fine-tune moves every token's row a little and the rows of the tokens it trained on a
lot. This codec keeps the ``K = round(density * base_rows)`` rows of largest delta L2 norm
(data-free: the least-squares error of dropping a row is its squared norm), stores which ones as
a row mask (format_spec.md 3.6, bitmap or zstd'ed indices, whichever is smaller) and codes every
kept row with ``bits``-bit symmetric uniform codes and float32 scales, one per row (or per group
of ``group_size`` columns of a row):

    decoded = scale * (2 * code - (2^bits - 1))        (bits = 1: +-scale, BitDelta row-wise)

Dropped rows decode to a zero delta. Scales are fitted to minimize each row's squared error
(clip search, then alternating least-squares refits), not set from the row's absolute maximum.

Resized vocabularies: when the fine-tune has more rows than the base (same columns), the first
``base_rows`` rows are coded as above and the added rows are stored exactly (role ``new_rows``,
the fine-tune's dtype): there is no base row to diff them against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import register_codec
from ._accel import HALF_KINDS, native
from ._bits import pack_signs, packed_cols
from ._masks import MASK_ENCODINGS, bitmap_nbytes, decode_mask, encode_mask
from .bitdelta import sign_add_
from ._quant import load_packed, load_stream, packed_nbytes, store_stream, stored_bytes, unpack_codes
from .base import (MAX_NUMEL, Codec, EncodeInput, Encoded, StoredSpec, check_range, expect_stored, matrix_view_shape,
                   param_choice, param_float, param_int, row_blocks)
from ..errors import CodecError, InvalidCodecParamsError

BITS = (1, 2, 3, 4, 8)
#: Presets named by the compression ratio against the fp16 delta for 576 columns (mask and scales
#: included; 127.6x for ``128x``): the largest density of 1-bit rows that fits. On the real pair's
#: embedding 1-bit rows had the lowest L2 error of 1/2/3/4/8 bits and a lower KL than 2 bits at
#: every budget (benchmarks/vocab.md).
PRESETS: dict[str, dict[str, Any]] = {
    "16x": {"density": 0.9375, "bits": 1},
    "32x": {"density": 0.46875, "bits": 1},
    "64x": {"density": 0.234375, "bits": 1},
    "128x": {"density": 0.1171875, "bits": 1},
}
#: Clip factors (times the absmax-derived scale) the ``mse`` scale fit tries before refining.
CLIP_ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
REFITS = 3
#: Elements of the row blocks the encoder packs and :meth:`RowSparse.reconstruct_` rebuilds (settings without the
#: native path) at a time.
REBUILD_BLOCK = 1 << 20


def kept_rows(density: float, base_rows: int) -> int:
    """``K = floor(density * base_rows + 0.5)`` in IEEE-754 double."""
    return int(density * base_rows + 0.5)


def scale_cols(cols: int, group_size: int | None) -> int:
    """Scales per kept row: 1, or ``ceil(cols / group_size)``."""
    return 1 if group_size is None else (cols + group_size - 1) // group_size


def levels(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The odd integer level ``2c - (2^bits - 1)`` of each code, as float32 (exact)."""
    return (codes.to(torch.int64) * 2 - ((1 << bits) - 1)).to(torch.float32)


def quantize_rows(x: torch.Tensor, bits: int, fit: str, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[n, m]`` and float32 scales ``[n]`` of the symmetric ``bits``-bit quantizer of each row of ``x``.

    ``fit="absmax"``: the top level is the row's max |x|. ``fit="mse"`` (and always for 1 bit): the
    clip factor with the smallest squared error, then alternating refits (codes for the scale,
    least-squares scale ``<x, q> / <q, q>`` for the codes), each kept only if it lowers the error.
    ``valid`` (0/1 float32, like ``x``) marks the elements that count (padding of a short group).
    """
    top = (1 << bits) - 1
    w = torch.ones_like(x) if valid is None else valid
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    if fit == "absmax" and bits > 1:
        s = (amax / top).to(torch.float32)
        return _codes(x, s, bits), s
    best_s, best_err = amax / top, torch.full(amax.shape, float("inf"))
    for alpha in ((1.0,) if bits == 1 else CLIP_ALPHAS):
        s = (amax * alpha / top).to(torch.float32)
        err = _sq_error(x, s, bits, w)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    s = best_s
    for _ in range(REFITS):
        q = levels(_codes(x, s, bits), bits) * w
        qq = (q * q).sum(1)
        s_new = ((x * q).sum(1) / qq.clamp(min=1)).clamp(min=0)
        err = _sq_error(x, s_new, bits, w)
        better = err < best_err
        if not bool(better.any()):
            break
        s, best_err = torch.where(better, s_new, s), torch.where(better, err, best_err)
    return _codes(x, s, bits), s


def _codes(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest level ``s * (2c - top)`` for each element (ties up; a zero scale gives the upper middle code)."""
    top = (1 << bits) - 1
    safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    return torch.floor((x / safe + top) / 2 + 0.5).clamp_(0, top).to(torch.int64)


def _sq_error(x: torch.Tensor, s: torch.Tensor, bits: int, w: torch.Tensor) -> torch.Tensor:
    rec = s.to(torch.float32).unsqueeze(1) * levels(_codes(x, s, bits), bits)
    return ((rec - x).square_().mul_(w)).sum(1)


def _kept_signs(rows_of: Callable[[int, int], torch.Tensor], rows: int, cols: int, keep: torch.Tensor,
                k: int) -> torch.Tensor:
    """The packed sign bits of the ``k`` rows ``keep`` marks, in order (flat uint8; ``cols % 8 == 0``), from the
    delta's rows ``rows_of(r0, r1)``: packed a block of rows at a time, so only the kept rows' bits are ever held
    whole."""
    out = torch.empty(k, cols // 8, dtype=torch.uint8)
    j = 0
    for r0, r1 in row_blocks(rows, cols):
        sel = keep[r0:r1]
        m = int(sel.sum())
        if m:
            out[j:j + m] = pack_signs(rows_of(r0, r1))[sel]
            j += m
    return out.reshape(-1)


def row_sums_of(rows_of: Callable[[int, int], torch.Tensor], rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_sums` of a delta given a block of rows at a time (``rows_of(r0, r1)``)."""
    sq, ab = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    for r0, r1 in row_blocks(rows, cols):
        sq[r0:r1], ab[r0:r1] = row_sums(rows_of(r0, r1))
    return sq, ab


def streams_rows(params: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether :meth:`RowSparse.encode` of a same-shape delta with these (validated) params needs the delta only a
    block of rows at a time (1 bit, a scale per row, whole bytes per row: two passes over the rows, row sums then
    signs), so a caller may give :attr:`~deltahub.codecs.base.EncodeInput._delta_rows` instead of the delta."""
    return params["bits"] == 1 and params["group_size"] is None and matrix_view_shape(shape)[1] % 8 == 0


def row_sums(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a float32 matrix: ``(sum x^2, sum |x|)`` in float64 (one native pass when built)."""
    rows, cols = d2.shape
    nat = native()
    if nat is not None and d2.dtype == torch.float32 and d2.is_contiguous() and d2.device.type == "cpu":
        sq, ab = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
        nat.row_sums(d2.numpy(), rows, cols, sq.numpy(), ab.numpy())
        return sq, ab
    return (torch.linalg.vector_norm(d2, dim=1, dtype=torch.float64) ** 2,
            torch.linalg.vector_norm(d2, 1, dim=1, dtype=torch.float64))


def decode_rows(codes: torch.Tensor, scale: torch.Tensor, k: int, cols: int, bits: int,
                group_size: int | None) -> torch.Tensor:
    """Kept rows' float32 deltas ``[k, cols]``: ``scale[row, col // group_size] * level(code)``, one multiply."""
    lv = levels(codes.reshape(k, cols), bits)
    if group_size is None:
        s = scale.reshape(k, 1)
    else:
        # Gather by column (not repeat_interleave): O(k * cols) whatever group_size.
        s = scale.reshape(k, -1)[:, torch.arange(cols) // min(group_size, max(cols, 1))]
    return s.to(torch.float32) * lv


@register_codec
class RowSparse(Codec):
    """Keep the rows of largest delta norm, ``bits``-bit codes + per-row (or per-group) float32 scales."""

    name = "rowsparse"
    delta_only = True
    presets = PRESETS
    default_params: dict[str, Any] = {"preset": None, "density": None, "bits": None, "group_size": None,
                                      "mask_encoding": "auto", "entropy": "none", "scale_fit": "mse"}

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        m = super().validate_params(params)
        if m["preset"] is not None:
            if m["preset"] not in PRESETS:
                raise InvalidCodecParamsError(f"codec 'rowsparse': unknown preset {m['preset']!r}; presets: {', '.join(PRESETS)}")
            for key, val in PRESETS[m["preset"]].items():
                m[key] = val if m[key] is None else m[key]
        m["density"] = 1.0 if m["density"] is None else m["density"]
        m["bits"] = 1 if m["bits"] is None else m["bits"]
        check_range(self.name, "density", m["density"], lo=0.0, hi=1.0, lo_open=True)
        if isinstance(m["bits"], bool) or m["bits"] not in BITS:
            raise InvalidCodecParamsError(f"codec 'rowsparse': bits={m['bits']!r} is not one of {', '.join(map(str, BITS))}")
        if m["group_size"] is not None:
            check_range(self.name, "group_size", m["group_size"], lo=1, integer=True)
        for key, choices in (("mask_encoding", ("auto", *MASK_ENCODINGS)), ("entropy", ("zstd", "none")),
                             ("scale_fit", ("mse", "absmax"))):
            if m[key] not in choices:
                raise InvalidCodecParamsError(f"codec 'rowsparse': {key}={m[key]!r} is not one of {', '.join(choices)}")
        return m

    def base_shape(self, params: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        """The base tensor shape this entry decodes against: ``[base_rows, cols]`` (fewer rows when resized)."""
        if params.get("base_rows") == matrix_view_shape(shape)[0]:
            return tuple(shape)
        return (int(params["base_rows"]), int(shape[-1]))

    def encode(self, inp: EncodeInput, params: dict[str, Any]) -> Encoded:
        ft, base = inp.finetuned, inp.base
        if base is None:
            raise CodecError(f"tensor {inp.name!r}: rowsparse needs a base tensor")
        rows, cols = matrix_view_shape(ft.shape)
        resized = tuple(base.shape) != tuple(ft.shape)
        if resized and not (ft.dim() == 2 and base.dim() == 2 and base.shape[1] == cols and 1 <= base.shape[0] < rows):
            raise CodecError(f"tensor {inp.name!r}: rowsparse needs a base of the same shape or a 2-D base with fewer "
                             f"rows and the same columns; fine-tune {list(ft.shape)}, base {list(base.shape)}")
        base_rows = base.shape[0] if resized else rows
        bits, g = params["bits"], params["group_size"]
        by_rows = not resized and inp._delta is None and inp._delta_rows is not None and streams_rows(params, ft.shape)
        if by_rows:  # the delta a block of rows at a time (two passes), never whole
            assert inp._delta_rows is not None
            rows_of = inp._delta_rows
            sums = inp._memo.get("rowsparse.row_sums")
            sq, l1_rows = sums if sums is not None else row_sums_of(rows_of, rows, cols)
        else:
            if resized:
                d2 = (ft.reshape(rows, cols)[:base_rows].to(torch.float32) - base.reshape(base_rows, cols).to(torch.float32))
            else:
                d2 = inp.delta.reshape(rows, cols)
            sq, l1_rows = row_sums(d2)
            rows_of = lambda r0, r1: d2[r0:r1]  # noqa: E731
        if not bool(torch.isfinite(sq).all()):  # a float32 squared cannot overflow a double: only NaN / Inf do
            raise CodecError(f"tensor {inp.name!r}: the delta has NaN or Inf values; rowsparse cannot code them")
        k = kept_rows(params["density"], base_rows)
        norms = sq.sqrt()
        keep = torch.zeros(base_rows, dtype=torch.bool)
        keep[torch.sort(-norms, stable=True).indices[:k]] = True
        groups = scale_cols(cols, g)
        packed = None
        if bits == 1 and g is None:
            # 1 bit, a scale per row (every preset): the sign codes and the row's mean |delta| are the least-squares
            # optimum quantize_rows converges to, computed in one pass each; the error in closed form. With whole
            # bytes per row the code stream is the kept rows of the packed signs (no copy of the kept rows).
            if cols % 8 == 0:
                packed = _kept_signs(rows_of, base_rows, cols, keep, k)
            else:
                codes = (d2[keep] >= 0).to(torch.uint8)
            l1 = l1_rows[keep]
            scale = (l1 / max(cols, 1)).to(torch.float32)
            s64 = scale.to(torch.float64)
            err = max(float((sq[keep] - 2 * s64 * l1 + cols * s64 * s64).sum()), 0.0)
        else:
            sel = d2[keep]
            gsize = cols if g is None else min(g, cols)
            pad = groups * gsize - cols
            padded = torch.nn.functional.pad(sel, (0, pad)).reshape(k * groups, gsize)
            valid = torch.nn.functional.pad(torch.ones(k, cols), (0, pad)).reshape(k * groups, gsize) if pad else None
            codes, scale = quantize_rows(padded, bits, params["scale_fit"], valid)
            codes = codes.reshape(k, groups * gsize)[:, :cols]
            err = None
        encoding, mask = encode_mask(keep.reshape(1, base_rows), params["mask_encoding"])
        entropy = params["entropy"] == "zstd"
        stream = stored_bytes(packed, entropy=entropy) if packed is not None else store_stream(codes.contiguous(), bits, entropy=entropy)
        tensors = {"mask": mask, "codes": stream,
                   "scale": scale.reshape(k) if g is None else scale.reshape(k, groups)}
        if resized:
            tensors["new_rows"] = ft.reshape(rows, cols)[base_rows:].contiguous().clone()
        out = {"density": params["density"], "bits": bits, "group_size": g, "mask_encoding": encoding,
               "entropy": params["entropy"], "base_rows": base_rows}
        if err is None:
            err = float(((decode_rows(codes, tensors["scale"], k, cols, bits, g) - sel) ** 2).sum(dtype=torch.float64))
        d_sq = float(sq.sum())
        stats = {"delta_l2": math.sqrt(d_sq), "error_l2": math.sqrt(max(d_sq - float(sq[keep].sum()) + err, 0.0))}
        return Encoded(tensors, out, stats)

    def check_decode(self, params: dict[str, Any], stored: Mapping[str, StoredSpec],
                     shape: tuple[int, ...], dtype: torch.dtype) -> None:
        rows, cols = matrix_view_shape(shape)
        unknown = set(params) - {"density", "bits", "group_size", "mask_encoding", "entropy", "base_rows"}
        if unknown:
            raise InvalidCodecParamsError(f"codec 'rowsparse': unknown params {sorted(unknown)}")
        density = param_float(self.name, params, "density", 0.0, 1.0, lo_open=True)
        bits = param_choice(self.name, params, "bits", BITS)
        if "group_size" not in params:
            raise InvalidCodecParamsError("codec 'rowsparse': params have no group_size (null for one scale per row)")
        g = params["group_size"]
        if g is not None:
            # Any size >= 1 is valid (wider than the row: one group); scales are gathered by column.
            g = param_int(self.name, params, "group_size", 1, 2**63 - 1)
        encoding = param_choice(self.name, params, "mask_encoding", MASK_ENCODINGS)
        param_choice(self.name, params, "entropy", ("zstd", "none"))
        base_rows = param_int(self.name, params, "base_rows", min(rows, 1), rows)
        if base_rows != rows and len(shape) != 2:
            raise InvalidCodecParamsError(f"codec 'rowsparse': base_rows={base_rows} differs from the {rows} rows, "
                                          f"which only a 2-D tensor may do (shape {list(shape)})")
        k = kept_rows(density, base_rows)
        if encoding == "bitmap":
            mask: tuple[torch.dtype, tuple[int, ...] | int] = (torch.uint8, (1, packed_cols(base_rows)))
        else:
            if base_rows >= 2**32:
                raise InvalidCodecParamsError(f"codec 'rowsparse': index-coded row masks need fewer than 2^32 rows, got {base_rows}")
            # One zstd frame of 4 bytes per kept row, bounded before decompressing (format_spec.md 3.6).
            mask = (torch.uint8, 8 * base_rows + 1024)
        expected: dict[str, tuple[torch.dtype, tuple[int, ...] | int]] = {
            "mask": mask, "codes": (torch.uint8, packed_nbytes(k * cols, bits)),
            "scale": (torch.float32, (k,) if g is None else (k, scale_cols(cols, g)))}
        if base_rows != rows:
            expected["new_rows"] = (dtype, (rows - base_rows, cols))
        expect_stored(self.name, stored, expected)
        if k * cols > MAX_NUMEL:
            raise InvalidCodecParamsError(f"codec 'rowsparse': {k} kept rows of {cols} columns is too large")

    def _mask_scale(self, stored: dict[str, torch.Tensor], params: dict[str, Any], cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row mask [base_rows], scales)``, the mask checked against ``K`` and the scales against its rows."""
        base_rows, g = params["base_rows"], params.get("group_size")
        k = kept_rows(params["density"], base_rows)
        mask = decode_mask(params["mask_encoding"], stored["mask"], 1, base_rows).reshape(base_rows)
        if int(mask.sum()) != k:
            raise CodecError(f"rowsparse: the row mask keeps {int(mask.sum())} rows, density {params['density']} "
                             f"of {base_rows} rows means {k}")
        scale = stored["scale"]
        if scale.dtype != torch.float32 or tuple(scale.shape) != ((k,) if g is None else (k, scale_cols(cols, g))):
            raise CodecError(f"rowsparse: scale {scale.dtype} {list(scale.shape)} does not fit {k} kept rows")
        return mask, scale

    def _kept(self, stored: dict[str, torch.Tensor], params: dict[str, Any], cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row mask [base_rows], kept rows' deltas [K, cols])``, checking the mask against ``K``."""
        mask, scale = self._mask_scale(stored, params, cols)
        k = scale.shape[0]
        codes = load_stream(stored["codes"], k * cols, params["bits"])
        return mask, decode_rows(codes, scale, k, cols, params["bits"], params.get("group_size"))

    def decode_delta(self, stored: dict[str, torch.Tensor], params: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 delta; only for unresized entries (added rows have no delta: use :meth:`reconstruct`)."""
        rows, cols = matrix_view_shape(shape)
        if params["base_rows"] != rows:
            raise CodecError(f"rowsparse: the entry adds {rows - params['base_rows']} rows to the base, which have no "
                             "delta; rebuild it with reconstruct()")
        mask, kept = self._kept(stored, params, cols)
        out = torch.zeros(rows, cols, dtype=torch.float32)
        out[mask] = kept
        return out.reshape(shape)

    def reconstruct(self, stored: dict[str, torch.Tensor], params: dict[str, Any], base: torch.Tensor | None,
                    shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """``dtype(float32(base) + delta)`` on the base rows (kept rows only), then the stored new rows."""
        if base is None:
            raise CodecError("rowsparse needs the base tensor to rebuild")
        rows, cols = matrix_view_shape(shape)
        base_rows = params["base_rows"]
        if tuple(base.shape) != self.base_shape(params, shape):
            raise CodecError(f"rowsparse: base shape {list(base.shape)}, expected {list(self.base_shape(params, shape))}")
        mask, kept = self._kept(stored, params, cols)
        delta = torch.zeros(base_rows, cols, dtype=torch.float32)
        delta[mask] = kept
        out = torch.empty(rows, cols, dtype=dtype)
        out[:base_rows] = (base.reshape(base_rows, cols).to(torch.float32) + delta).to(dtype)
        if base_rows != rows:
            new = stored["new_rows"]
            if new.dtype != dtype or tuple(new.shape) != (rows - base_rows, cols):
                raise CodecError(f"rowsparse: new_rows {new.dtype} {list(new.shape)} do not fit {rows - base_rows} added rows")
            out[base_rows:] = new
        return out.reshape(shape)

    def reconstruct_(self, stored: dict[str, torch.Tensor], params: dict[str, Any], base: torch.Tensor | None,
                     shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """:meth:`reconstruct` into the caller's ``base`` buffer (float32, or the output's 16-bit dtype), same bits,
        without a float32 copy of the whole matrix: 1-bit rows with one scale each (every preset) by BitDelta's
        native sign-add (a dropped row adds +0.0 as the rule does), other settings a block of rows at a time."""
        rows, cols = matrix_view_shape(shape)
        if (base is None or params["base_rows"] != rows or base.dtype not in HALF_KINDS
                or (base.dtype != torch.float32 and base.dtype != dtype) or not base.is_contiguous()
                or base.numel() != rows * cols):
            return self.reconstruct(stored, params, base, shape, dtype)
        mask, scale = self._mask_scale(stored, params, cols)
        k, bits, g = scale.shape[0], params["bits"], params.get("group_size")
        target = base.reshape(rows, cols)
        if bits == 1 and g is None and cols % 8 == 0 and native() is not None:
            # Every row as a BitDelta row: kept rows their sign codes and scale, dropped rows +1 x 0.0.
            signs = torch.full((rows, cols // 8), 0xFF, dtype=torch.uint8)
            signs[mask] = load_packed(stored["codes"], k * cols, 1).view(k, cols // 8)
            scales = torch.zeros(rows, dtype=torch.float32)
            scales[mask] = scale
            sign_add_(target, signs, scales, rows, cols, 1, max(cols, 1))
            return base.reshape(shape).to(dtype)
        packed = load_packed(stored["codes"], k * cols, bits)
        at = mask.nonzero().reshape(-1)  # the row of each kept row
        step = max(8, REBUILD_BLOCK // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            j0, j1 = (int(j) for j in torch.searchsorted(at, torch.tensor([r0, r1])))
            part = target[r0:r1]
            f = part if part.dtype == torch.float32 else part.to(torch.float32)
            delta = torch.zeros(r1 - r0, cols, dtype=torch.float32)
            if j1 > j0:  # codes of kept rows j0..j1, unpacked from the 8-code word holding the first
                c0, c1 = j0 * cols, j1 * cols
                a = c0 - c0 % 8
                codes = unpack_codes(packed[a * bits // 8:a * bits // 8 + packed_nbytes(c1 - a, bits)], c1 - a, bits)[c0 - a:]
                delta[at[j0:j1] - r0] = decode_rows(codes, scale[j0:j1], j1 - j0, cols, bits, g)
            f.add_(delta)
            if f is not part:
                part.copy_(f)
        return base.reshape(shape).to(dtype)

    def expected_nbytes(self, shape: tuple[int, ...], params: dict[str, Any]) -> int | None:
        """Exact for a ``bitmap`` mask without entropy coding (None otherwise: see :func:`max_nbytes`), and
        None for a resized entry (its added rows' bytes depend on the dtype). ``params`` without
        ``base_rows`` (an encoder's params) mean an unresized tensor."""
        if params.get("mask_encoding") != "bitmap" or params.get("entropy", "none") != "none":
            return None
        if params.get("base_rows") not in (None, matrix_view_shape(shape)[0]):
            return None
        return max_nbytes(shape, params)


def max_nbytes(shape: tuple[int, ...], params: Mapping[str, Any], itemsize: int = 2) -> int:
    """Upper bound of the stored bytes (exact with a bitmap mask and no entropy coding):
    ``ceil(R/8) + ceil(K*cols*bits/8) + 4*K*scales_per_row`` (+ the added rows at ``itemsize`` bytes)."""
    rows, cols = matrix_view_shape(shape)
    base_rows = params.get("base_rows") or rows
    k = kept_rows(params["density"], base_rows)
    new = (rows - base_rows) * cols * itemsize
    return (bitmap_nbytes(1, base_rows) + packed_nbytes(k * cols, params["bits"])
            + 4 * k * scale_cols(cols, params.get("group_size")) + new)
