"""The fast deltadq paths (blockwise numpy masks, word-wise packing, numpy Lloyd, blockwise group-size
search) against straightforward reference implementations, bit for bit, on awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltahub.codecs import EncodeInput, get_codec
from deltahub.codecs import _quant, _rng
from deltahub.codecs._quant import (assign_codebook, kmeans_codebook, pack_codes, packed_nbytes, split_parts,
                                    unpack_codes)
from deltahub.codecs._quant import STREAM_ZSTD_LEVEL
from deltahub.codecs._zstd import compress
from deltahub.codecs._rng import (BLOCK, group_keep_block, group_keep_mask, hash32_, keep_mask, keep_threshold,
                                  uniform_u32, uniform_u32_at, uniform_u32_np)
from deltahub.codecs.deltadq import (_spread_errors, auto_candidates, choose_group_size, gather_kept, keep_count,
                                     scatter_kept)

from test_rng_masks import ref_u, ref_unpack

pytestmark = pytest.mark.usefixtures("decode_impl")  # every test: native kernels and numpy paths


# --- straightforward references (torch int64 arithmetic, whole-tensor, as before the fast paths) ------
def ref_u32(seed: int, stream: int, idx: torch.Tensor) -> torch.Tensor:
    """``u_i`` through the int64 torch hash, one element at a time in the vector sense (no blocks)."""
    return uniform_u32_at(seed, stream, idx)


def ref_group_mask(seed: int, stream: int, rows: int, cols: int, g: int, keep: int,
                   u: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``keep`` smallest 64-bit keys ``u * g + j`` of every group, by a full sort."""
    u = ref_u32(seed, stream, torch.arange(rows * cols)) if u is None else u
    keys = u.view(-1, g) * g + torch.arange(g)
    order = keys.argsort(dim=1)
    mask = torch.zeros_like(keys, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], True)
    return mask.view(rows, cols)


def ref_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """format_spec.md 3.3 bit by bit: code ``i`` bit ``j`` is stream bit ``i * bits + j``, LSB first."""
    n = codes.numel()
    out = np.zeros(packed_nbytes(n, bits), dtype=np.uint8)
    for i, c in enumerate(codes.tolist()):
        for j in range(bits):
            t = i * bits + j
            out[t // 8] |= ((c >> j) & 1) << (t % 8)
    return torch.from_numpy(out)


def ref_store(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """A stored code stream (3.3): the bitwise-reference packing, zstd-coded iff strictly shorter."""
    packed = ref_pack(codes, bits)
    blob = compress(packed.numpy().tobytes(), STREAM_ZSTD_LEVEL)
    return blob if blob.numel() < packed.numel() else packed


def ref_kmeans(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lloyd loop in torch (sorted fit, prefix sums, up to 100 iterations) and bucketize codes."""
    values = values.reshape(-1).to(torch.float32)
    n, k = values.numel(), 1 << bits
    fit = values if n <= _quant.KMEANS_FIT_MAX else values[:: (n + _quant.KMEANS_FIT_MAX - 1) // _quant.KMEANS_FIT_MAX]
    srt = fit.sort().values
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), srt.to(torch.float64).cumsum(0)])
    cb = torch.from_numpy(_quant._companded_init(srt.numpy(), k))
    for _ in range(_quant.KMEANS_ITERS):
        cuts = torch.searchsorted(srt, (cb[:-1] + cb[1:]) / 2, right=True)
        cuts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([srt.numel()])])
        cnt = cuts[1:] - cuts[:-1]
        sums = csum[cuts[1:]] - csum[cuts[:-1]]
        new = torch.where(cnt > 0, (sums / cnt.clamp(min=1)).to(torch.float32), cb).sort().values
        if torch.equal(new, cb):
            break
        cb = new
    return cb, torch.bucketize(values, (cb[:-1] + cb[1:]) / 2)


def ref_spread_errors(d: torch.Tensor, p: float, candidates: list[int]) -> dict[int, float]:
    """E(g) of format_spec.md 4.4 without calibration, straight from the definition (float64)."""
    d = d.to(torch.float64)
    rows, cols = d.shape
    out = {}
    for g in candidates:
        n = keep_count(p, g)
        d3 = d.view(rows, cols // g, g)
        spread = float(((d3 - d3.mean(2, keepdim=True)) ** 2).sum())
        out[g] = 0.0 if n >= g else g * (g - n) / (n * (g - 1)) * spread
    return out


# --- generator and masks -------------------------------------------------------------------------------
@pytest.mark.parametrize("start,n", [(0, 1), (0, BLOCK + 3), (2**32 - 5, 11), (2**32 - 1000, 3000),
                                     (2**40 + 123, 300), (2**64 - 9, 9)])
def test_uniform_u32_blocks_match_reference(start: int, n: int) -> None:
    got = uniform_u32_np(1234, 0xB16528AF, n, start)
    assert got.dtype == np.uint32
    for j in sorted({0, 1 % n, n // 2, n - 1}):  # the plain-integer reference, also beyond int64
        assert int(got[j]) == ref_u(1234, 0xB16528AF, start + j)
    if start + n < 2**63:
        idx = torch.arange(n, dtype=torch.int64) + start
        assert np.array_equal(got.astype(np.int64), ref_u32(1234, 0xB16528AF, idx).numpy())
        assert torch.equal(uniform_u32(1234, 0xB16528AF, n, start), ref_u32(1234, 0xB16528AF, idx))


def test_torch_hash_is_the_numpy_hash() -> None:
    x = np.random.default_rng(0).integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32)
    y = x.copy()
    _rng._hash_np_(y, np.empty_like(y))
    assert np.array_equal(y.astype(np.int64), hash32_(torch.from_numpy(x.astype(np.int64))).numpy())


@pytest.mark.parametrize("rows,cols,g", [(1, 1, 1), (1, 7, 7), (3, 5, 5), (5, 33, 3), (2, 36, 4), (1, 96, 8),
                                         (7, 48, 16), (3, 576, 64), (2, 1536, 1536), (21846, 3, 3),
                                         (1, 70001, 70001), (3, 10, 2)])
def test_group_mask_every_keep_matches_reference(rows: int, cols: int, g: int) -> None:
    """Odd columns, one row, groups larger than a block, blocks that are not a power of two, every keep."""
    keeps = range(g + 1) if g <= 16 else sorted({0, 1, 2, g // 4, g // 2, g - 1, g})
    u = ref_u32(5, 77, torch.arange(rows * cols))
    for keep in keeps:
        got = group_keep_mask(5, 77, rows, cols, g, keep)
        assert torch.equal(got, ref_group_mask(5, 77, rows, cols, g, keep, u)), keep
        assert int(got.sum()) == rows * (cols // g) * keep


@pytest.mark.parametrize("g", [1, 2, 3, 4, 5, 8, 9, 16, 17, 64])
def test_group_selection_ties_go_to_the_lower_column(g: int) -> None:
    """u drawn from 3 values: nearly every group ties; the key ``u * g + j`` decides (spec 3.5)."""
    u = np.random.default_rng(g).integers(0, 3, (400, g)).astype(np.uint32)
    keys = torch.from_numpy(u.astype(np.int64)) * g + torch.arange(g)
    order = keys.argsort(dim=1)
    assert np.array_equal(_rng._argmin_rows(u), order[:, 0].numpy())
    for keep in range(1, g):
        ref = torch.zeros(400, g, dtype=torch.bool).scatter_(1, order[:, :keep], True)
        assert np.array_equal(_rng._select_rows(u, keep), ref.numpy()), keep


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gather_scatter_kept_any_thread_count(threads: int) -> None:
    rows, cols, g, keep = 257, 96, 8, 3
    flat = torch.randn(rows * cols)
    mask = ref_group_mask(9, 10, rows, cols, g, keep).view(-1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = gather_kept(flat, 9, 10, g, keep)
        out = scatter_kept(rows * cols, got, 9, 10, g, keep)
        table = torch.linspace(-1, 1, 16)
        codes = torch.randint(0, 16, (got.numel(),), dtype=torch.uint8)
        coded = scatter_kept(rows * cols, codes, 9, 10, g, keep, table=table)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got, flat[mask])
    assert torch.equal(out, torch.where(mask, flat, torch.zeros(())))
    assert torch.equal(coded[mask], table[codes.long()]) and not coded[~mask].any()


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1 - 2**-32])
def test_bernoulli_mask_matches_reference(p: float) -> None:
    n = BLOCK + 1001
    ref = ref_u32(3, 4, torch.arange(n)) < keep_threshold(p)
    assert torch.equal(keep_mask(3, 4, (n,), p), ref)


# --- code streams and quantizers ----------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 9, 1001])
def test_pack_unpack_match_bitwise_reference(bits: int, n: int) -> None:
    codes = torch.from_numpy(np.random.default_rng(bits * 1000 + n).integers(0, 1 << bits, n)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, ref_pack(codes, bits))
    assert torch.equal(pack_codes(codes.to(torch.int64), bits), packed)
    got = unpack_codes(packed, n, bits)
    assert got.dtype == torch.uint8 and got.tolist() == ref_unpack(packed.numpy().tobytes(), n, bits) == codes.tolist()


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_pack_unpack_across_chunks(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_quant, "CODE_CHUNK", 64)
    n = 64 * 5 + 13
    codes = torch.from_numpy(np.random.default_rng(bits).integers(0, 1 << bits, n)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, ref_pack(codes, bits))
    assert torch.equal(unpack_codes(packed, n, bits), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_assign_codebook_is_bucketize(bits: int) -> None:
    rng = np.random.default_rng(bits)
    cb = torch.from_numpy(np.sort(rng.standard_normal(1 << bits).astype(np.float32)))
    mids = (cb[:-1] + cb[1:]) / 2
    values = torch.cat([torch.from_numpy(rng.standard_normal(3001).astype(np.float32)), mids, cb,
                        torch.tensor([0.0, -0.0, 1e30, -1e30])])  # ties at every midpoint go to the lower code
    got = assign_codebook(values, cb)
    assert got.dtype == torch.uint8
    assert torch.equal(got.to(torch.int64), torch.bucketize(values, mids))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "heavy", "constant", "few", "zeros-and-ties"])
def test_kmeans_matches_torch_reference(bits: int, kind: str) -> None:
    rng = np.random.default_rng(bits)
    v = {"normal": rng.standard_normal(5000), "heavy": rng.standard_t(1.5, 20000) * 1e-3,
         "constant": np.full(100, 0.25), "few": rng.standard_normal(3),
         "zeros-and-ties": rng.integers(-3, 4, 4000) * 0.5}[kind]
    values = torch.from_numpy(v.astype(np.float32))
    cb, codes = kmeans_codebook(values, bits)
    ref_cb, ref_codes = ref_kmeans(values, bits)
    assert torch.equal(cb.view(torch.int32), ref_cb.view(torch.int32))
    assert torch.equal(codes.to(torch.int64), ref_codes)


def test_kmeans_subsampled_fit_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_quant, "KMEANS_FIT_MAX", 1000)
    values = torch.from_numpy(np.random.default_rng(0).standard_normal(4321).astype(np.float32))
    cb, codes = kmeans_codebook(values, 3)
    ref_cb, ref_codes = ref_kmeans(values, 3)
    assert torch.equal(cb, ref_cb) and torch.equal(codes.to(torch.int64), ref_codes)


# --- group-size search ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", [(1, 2), (3, 576), (5, 1536), (2, 12), (1, 4096 * 3), (2, 8192), (700, 96)])
def test_spread_errors_match_definition(rows: int, cols: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deltahub.codecs.deltadq.SPREAD_BLOCK", 2048)  # several row blocks
    g = torch.Generator().manual_seed(cols)
    d = torch.randn(rows, cols, generator=g) * torch.rand(cols, generator=g)
    for p in (0.5, 0.75, 0.875, 0.984375, 0.7):
        cands = auto_candidates(cols, p)
        if not cands:
            continue
        got, ref = _spread_errors(d, p, cands), ref_spread_errors(d, p, cands)
        for k in cands:
            assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-300)
        best = min(ref.values())
        assert choose_group_size(d, p) == max(k for k, e in ref.items() if e <= best * (1 + 1e-9) + 1e-300)


# --- whole codec: the fast encoder equals the straightforward one byte for byte ------------------------
@pytest.mark.parametrize("bits,parts", [(b, m) for b in range(1, 6) for m in (1, 2, 4, 8, 16, 32) if m <= 1 << b])
def test_deltadq_encode_matches_reference_encoder(bits: int, parts: int) -> None:
    rows, cols, g, p = 3, 45, 9, 2 / 3
    gen = torch.Generator().manual_seed(bits * 100 + parts)
    base = torch.randn(rows, cols, generator=gen)
    ft = base + torch.randn(rows, cols, generator=gen) * 1e-3
    codec = get_codec("deltadq")
    prm = codec.validate_params(dict(preset=None, p=p, bits=bits, parts=parts, group_size=g, seed=3, stream=4))
    enc = codec.encode(EncodeInput("w", ft, base), prm)
    keep = keep_count(p, g)
    mask = ref_group_mask(3, 4, rows, cols, g, keep)
    delta = ft - base
    cb, codes = ref_kmeans(delta[mask] * (g / keep), bits)
    part, low = split_parts(codes, bits, parts)
    pb = parts.bit_length() - 1
    assert torch.equal(enc.tensors["codebook"], cb)
    if pb:
        assert torch.equal(enc.tensors["part"], ref_store(part, pb))
    for j in range(parts if bits > pb else 0):
        assert torch.equal(enc.tensors[f"low{j}"], ref_store(low[part == j], bits - pb))
    out = codec.decode_delta(enc.tensors, enc.params, (rows, cols))
    ref_out = torch.zeros(rows, cols)
    ref_out[mask] = cb[codes]
    assert torch.equal(out, ref_out)
    assert sorted(enc.tensors) == sorted(["codebook"] + (["part"] if pb else [])
                                         + [f"low{j}" for j in range(parts if bits > pb else 0)])
