"""The native decode and encode kernels (deltahub/codecs/_native.c) against the numpy paths, bit for bit, and
the in-place rebuild (``Codec.reconstruct_``) against ``reconstruct``."""

from __future__ import annotations

import math
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from deltahub.codecs import EncodeInput, get_codec
from deltahub.codecs._accel import native_available
from deltahub.codecs._quant import pack_codes, packed_nbytes
from deltahub.codecs._rng import group_keep_block, stream_keys
from deltahub.codecs.deltadq import gather_kept, keep_count, scatter_kept
from deltahub.errors import CodecError

needs_native = pytest.mark.skipif(not native_available(), reason="the native kernels were not built")


def test_native_kernels_are_built_where_a_compiler_is() -> None:
    """An install on a machine with a C compiler (CI's included) must not silently fall back to numpy."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    assert native_available()


def _both(monkeypatch: pytest.MonkeyPatch, fn):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    a = fn()
    monkeypatch.setenv("DELTAHUB_NATIVE", "0")
    b = fn()
    return a, b


@needs_native
@pytest.mark.parametrize("g,keep", [(1, 1), (2, 1), (3, 2), (4, 1), (4, 3), (5, 5), (8, 2), (16, 4), (16, 15), (17, 9),
                                    (32, 8), (33, 1), (64, 16), (576, 144), (576, 1), (1536, 384), (5000, 4999)])
@pytest.mark.parametrize("start_groups", [0, 3, (2**32 - 700) // 1])
def test_positions_match_numpy(g: int, keep: int, start_groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    start = (start_groups // g) * g if start_groups > 10 else start_groups * g  # near 2^32: a block crossing hi
    length = g * max(1, 3000 // g)
    a, b = _both(monkeypatch, lambda: group_keep_block(11, 22, start, length, g, keep))
    assert a.dtype == b.dtype == np.int64
    assert np.array_equal(a, b)
    assert len(a) == length // g * keep



@needs_native
@pytest.mark.parametrize("g,keep", [(1, 1), (2, 1), (3, 2), (4, 1), (4, 3), (8, 2), (16, 4), (17, 9), (64, 16), (64, 63),
                                    (576, 144), (1536, 384), (5000, 4999)])
def test_gather_matches_numpy(g: int, keep: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept values in order (the vectorised compaction, 8 elements per step, and its tail)."""
    n = g * max(3, 40000 // g)
    flat = torch.randn(n, generator=torch.Generator().manual_seed(g))
    a, b = _both(monkeypatch, lambda: gather_kept(flat, 5, 9, g, keep))
    assert a.numel() == b.numel() == n // g * keep
    assert torch.equal(a, b)

@needs_native
@pytest.mark.parametrize("quantizer", ["kmeans", "uniform"])
@pytest.mark.parametrize("shape,g", [((64, 96), 8), ((7, 576), 576), ((33, 40), 4), ((5, 1536), 1536), ((300, 12), 3)])
def test_deltadq_decode_and_inplace_rebuild_match_numpy(quantizer: str, shape: tuple[int, int], g: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    delta = torch.randn(shape) * 1e-3
    base = torch.randn(shape)
    base[0, :5] = -0.0  # -0.0 + 0.0 is +0.0: the in-place add must keep that rule at dropped elements
    base[1, 1] = float("nan")
    codec = get_codec("deltadq")
    params = codec.validate_params({"p": 0.75, "bits": 3, "parts": 2, "quantizer": quantizer, "group_size": g})
    enc = codec.encode(EncodeInput(name="w", finetuned=base + delta, base=base, _delta=delta), params)

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = codec.decode_delta(enc.tensors, enc.params, shape)
        r = codec.reconstruct(enc.tensors, enc.params, base, shape, torch.float32)
        owned = base.clone()
        r_ = codec.reconstruct_(enc.tensors, enc.params, owned, shape, torch.float32)
        return d, r, r_

    (d1, r1, i1), (d0, r0, i0) = _both(monkeypatch, run)
    for x, y in ((d1, d0), (r1, r0), (i1, i0), (i1, r1)):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    assert torch.equal(r1.view(torch.int32), (base + d0).view(torch.int32))


@needs_native
def test_gather_scatter_roundtrip_across_the_2_32_boundary() -> None:
    """Element indices >= 2^32 take the other key of the generator (format_spec.md): the native kernel
    switches it mid-block."""
    from deltahub.codecs import _native  # type: ignore[attr-defined]

    g, keep = 8, 3
    start = 2**32 - 8 * 100
    k1, k2 = stream_keys(5, 6)
    dense = np.random.default_rng(0).standard_normal(8 * 200).astype(np.float32)
    kept = np.empty(200 * keep, dtype=np.float32)
    assert _native.gather(k1, k2, start, g, keep, dense, kept) == 200 * keep
    pos = np.empty(200 * keep, dtype=np.int64)
    _native.positions(k1, k2, start, 8 * 200, g, keep, pos)
    assert np.array_equal(pos, np.asarray(group_keep_block(5, 6, start, 8 * 200, g, keep)))
    assert np.array_equal(kept, dense[pos - start])
    out = np.empty_like(dense)
    _native.scatter(k1, k2, start, g, keep, out, kept, None)
    ref = np.zeros_like(dense)
    ref[pos - start] = kept
    assert np.array_equal(out.view(np.int32), ref.view(np.int32))


@needs_native
def test_native_kernels_refuse_buffers_that_do_not_fit() -> None:
    from deltahub.codecs import _native  # type: ignore[attr-defined]

    k1, k2 = stream_keys(0, 0)
    dense = np.zeros(64, dtype=np.float32)
    with pytest.raises(ValueError):
        _native.scatter(k1, k2, 0, 8, 2, dense, np.zeros(15, dtype=np.float32), None)  # needs 16 values
    with pytest.raises(ValueError):
        _native.scatter(k1, k2, 0, 8, 2, dense, np.zeros(16, dtype=np.uint8), np.zeros(16, dtype=np.float32))  # table of 16
    with pytest.raises(ValueError):
        _native.scatter(k1, k2, 4, 8, 2, dense, np.zeros(16, dtype=np.float32), None)  # start inside a group
    with pytest.raises(ValueError):
        _native.scatter(k1, k2, 0, 8, 9, dense, np.zeros(90, dtype=np.float32), None)  # keep > g
    with pytest.raises(ValueError):  # an unknown 16-bit kind, and a 16-bit block that is overwritten rather than added to
        _native.scatter(k1, k2, 0, 8, 2, dense, np.zeros(16, dtype=np.float32), None, True, 3)
    with pytest.raises(ValueError):
        _native.scatter(k1, k2, 0, 8, 2, dense.view(np.int16), np.zeros(32, dtype=np.float32), None, False, 1)
    with pytest.raises(ValueError):  # a bf16 block of 64 elements needs 128 bytes, not 256
        _native.sign_add(dense, np.zeros((64, 1), np.uint8), np.ones(1, np.float32), 64, 1, 0, 1, 1)
    with pytest.raises(ValueError):
        _native.gather(k1, k2, 0, 8, 2, dense, np.zeros(15, dtype=np.float32))
    with pytest.raises(ValueError):
        _native.positions(k1, k2, 0, 64, 8, 2, np.zeros(15, dtype=np.int64))
    part = pack_codes(torch.tensor([0, 1, 1, 0, 1]), 1).numpy()
    with pytest.raises(ValueError):  # part 1 has 3 members: its 2-bit stream needs 1 byte, given 2
        _native.merge_parts(np.zeros(5, dtype=np.uint8), part, 1, [np.zeros(1, np.uint8), np.zeros(2, np.uint8)], 2)
    with pytest.raises(ValueError):  # one low stream per part
        _native.merge_parts(np.zeros(5, dtype=np.uint8), part, 1, [np.zeros(1, np.uint8)], 2)
    with pytest.raises(ValueError):  # the part stream must hold exactly 5 one-bit codes
        _native.part_counts(np.zeros(2, np.uint8), 5, 1)


@needs_native
@pytest.mark.parametrize("pbits,lbits", [(1, 1), (1, 3), (2, 2), (3, 5), (1, 7), (4, 4)])
def test_merge_parts_matches_numpy(pbits: int, lbits: int) -> None:
    from deltahub.codecs import _native  # type: ignore[attr-defined]

    n = 10_007
    rng = np.random.default_rng(pbits * 10 + lbits)
    codes = rng.integers(0, 1 << (pbits + lbits), n).astype(np.uint8)
    part, low = codes >> lbits, codes & ((1 << lbits) - 1)
    part_packed = pack_codes(torch.from_numpy(part), pbits).numpy()
    counts = _native.part_counts(part_packed, n, pbits)
    assert counts == [int((part == j).sum()) for j in range(1 << pbits)]
    lows = [pack_codes(torch.from_numpy(low[part == j]), lbits).numpy() for j in range(1 << pbits)]
    assert [len(x) for x in lows] == [packed_nbytes(c, lbits) for c in counts]
    out = np.empty(n, dtype=np.uint8)
    _native.merge_parts(out, part_packed, pbits, lows, lbits)
    assert np.array_equal(out, codes)


@pytest.mark.usefixtures("decode_impl")
def test_gather_scatter_inplace_add(monkeypatch: pytest.MonkeyPatch) -> None:
    g, keep = 16, keep_count(0.75, 16)
    flat = torch.randn(16 * 500)
    kept = gather_kept(flat, 1, 2, g, keep)
    target = torch.randn(16 * 500)
    want = target + scatter_kept(flat.numel(), kept, 1, 2, g, keep)
    got = scatter_kept(flat.numel(), kept, 1, 2, g, keep, out=target.clone())
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_native
@pytest.mark.parametrize("granularity,group_size", [("tensor", 0), ("row", 0), ("group", 8), ("group", 5), ("group", 1000)])
@pytest.mark.parametrize("shape", [(37, 21), (3, 1), (300, 64), (2, 3, 40)])
def test_bitdelta_inplace_rebuild_matches_reconstruct(granularity: str, group_size: int, shape: tuple[int, ...],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.codecs import bitdelta

    monkeypatch.setattr(bitdelta, "SIGN_BLOCK", 64)  # several row blocks on the threads
    torch.manual_seed(1)
    base = torch.randn(shape)
    base.view(-1)[:3] = -0.0
    delta = torch.randn(shape) * 1e-2
    codec = get_codec("bitdelta")
    raw = {"granularity": granularity} | ({"group_size": group_size} if group_size else {})
    params = codec.validate_params(raw)
    enc = codec.encode(EncodeInput(name="w", finetuned=base + delta, base=base, _delta=delta), params)
    want = codec.reconstruct(enc.tensors, enc.params, base, shape, torch.float32)
    got = codec.reconstruct_(enc.tensors, enc.params, base.clone(), shape, torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    half = codec.reconstruct_(enc.tensors, enc.params, base.clone(), shape, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, want.to(torch.bfloat16))


def test_env_switch_selects_the_numpy_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.codecs._accel import native

    for off in ("0", "false", "off", " no "):
        monkeypatch.setenv("DELTAHUB_NATIVE", off)
        assert native() is None
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    assert (native() is not None) == native_available()


@needs_native
@pytest.mark.parametrize("g,keep", [(4, 1), (4, 3), (8, 2), (16, 4), (16, 13), (32, 8), (64, 16), (64, 60)])
def test_selection_with_ties_at_the_threshold(g: int, keep: int) -> None:
    """Equal u values (astronomically rare from the hash, so made here on purpose) go to the lower
    column: the vector-lane path hands such groups to the scalar rule, and both match a full sort."""
    from deltahub.codecs import _native  # type: ignore[attr-defined]

    rng = np.random.default_rng(g * 100 + keep)
    groups = 64
    u = rng.integers(0, 6, (groups, g)).astype(np.uint32) * np.uint32(1 << 29)  # few distinct values: many ties
    u[::3] = rng.integers(0, 2**32, (len(u[::3]), g), dtype=np.uint64).astype(np.uint32)  # and some without
    keys = u.astype(np.int64) * g + np.arange(g)
    want = np.zeros_like(u, dtype=np.uint8)
    np.put_along_axis(want, np.argsort(keys, axis=1)[:, :keep], 1, axis=1)
    for lanes in (True, False):
        got = np.zeros(groups * g, dtype=np.uint8)
        redone = _native.select_flags(u.reshape(-1), g, keep, got, lanes)
        assert np.array_equal(got.reshape(groups, g), want), lanes
        if lanes:
            assert redone > 0  # the tie path ran


@needs_native
@pytest.mark.parametrize("itemsize", [2, 3, 4, 8])
def test_unshuffle_matches_numpy(itemsize: int) -> None:
    """Byte planes back into elements, written or XORed into a buffer (raw's decode), aligned or not."""
    from deltahub.codecs import _native  # type: ignore[attr-defined]

    rng = np.random.default_rng(itemsize)
    n = 1003
    elems = rng.integers(0, 256, (n, itemsize), dtype=np.uint8)
    planes = np.ascontiguousarray(elems.T).reshape(-1)
    out = np.zeros(n * itemsize, dtype=np.uint8)
    _native.unshuffle(out, planes, itemsize, False)
    assert np.array_equal(out, elems.reshape(-1))
    dst = rng.integers(0, 256, n * itemsize + 1, dtype=np.uint8)
    for view in (dst[:-1], dst[1:]):  # aligned and misaligned buffers take different loops
        want = view ^ elems.reshape(-1)
        _native.unshuffle(view, planes, itemsize, True)
        assert np.array_equal(view, want)
    with pytest.raises(ValueError):
        _native.unshuffle(out[:-1], planes, itemsize, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("stream_in", [7, 1 << 18])
def test_raw_inplace_rebuild_matches_reconstruct(dtype: torch.dtype, shuffle: bool, stream_in: int, decode_impl: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """raw xor's in-place rebuild (planes XORed into the base buffer as they decompress, pieces straddling the
    planes' boundaries) gives reconstruct's bits, native or not."""
    import deltahub.codecs._zstd as zs

    monkeypatch.setattr(zs, "STREAM_IN", stream_in)
    codec = get_codec("raw")
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(67, 45, generator=g) * 100).to(dtype)
    ft = (base.to(torch.float32) + torch.randn(67, 45, generator=g)).to(dtype)
    if dtype == torch.uint8:
        base = torch.randint(0, 256, (67, 45), generator=g, dtype=torch.uint8)
        ft = base ^ (torch.rand(67, 45, generator=g) < 0.1).to(torch.uint8)
    params = codec.validate_params({"mode": "xor", "shuffle": shuffle})
    enc = codec.encode(EncodeInput("w", ft, base), params)
    want = codec.reconstruct(enc.tensors, enc.params, base, tuple(ft.shape), dtype)
    assert torch.equal(want.view(-1).view(torch.uint8), ft.view(-1).view(torch.uint8))
    got = codec.reconstruct_(enc.tensors, enc.params, base.clone(), tuple(ft.shape), dtype)
    assert torch.equal(got.view(-1).view(torch.uint8), ft.view(-1).view(torch.uint8))


@needs_native
def test_xor_plane_checks_its_bounds() -> None:
    from deltahub.codecs import _native  # type: ignore[attr-defined]

    dst = torch.zeros(10, dtype=torch.int16)
    _native.xor_plane(dst.numpy(), bytes([1, 2, 3]), 2, 1, 7)  # elements 7..9, high byte
    assert dst[7:].tolist() == [256, 512, 768] and not dst[:7].any()
    for args in ((2, 1, 8), (2, 2, 0), (2, -1, 0), (2, 0, -1), (0, 0, 0), (3, 0, 0)):
        with pytest.raises(ValueError):
            _native.xor_plane(dst.numpy(), bytes([1, 2, 3]), *args)


def _half_base(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A 16-bit base with the awkward values: -0.0 (turns +0.0 at dropped elements), inf, the largest finite (a
    positive delta rounds it to inf), subnormals (float16), and many round-to-nearest-even halfway cases;
    NaN for bf16 (torch writes every NaN as 0xFFFF; float16 NaN payloads differ between torch's own paths)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    flat = base.view(-1)
    flat[:4] = -0.0
    if dtype == torch.bfloat16:
        flat[5] = float("nan")
    else:
        flat[5] = 3e-6  # a float16 subnormal
        flat[8:12] = torch.tensor([6e-8, -5e-7, 1e-5, -2e-5])
    flat[6] = float("inf")
    flat[7] = torch.finfo(dtype).max
    return base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantizer", ["kmeans", "uniform"])
@pytest.mark.parametrize("shape,g", [((64, 96), 8), ((7, 576), 576), ((33, 40), 4), ((300, 12), 3), ((3, 13), 13)])
def test_deltadq_half_inplace_rebuild_matches_reconstruct(dtype: torch.dtype, quantizer: str, shape: tuple[int, int], g: int,
                                                          decode_impl: str) -> None:
    """A 16-bit model rebuilds in place, dtype(float32(base) + delta) rounded once: the bits of reconstruct
    (torch's conversion), native (vector and tail loops) or numpy."""
    base = _half_base(shape, g, dtype)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1e-2
    delta.view(-1)[7] = 1e38  # the largest finite value + a large kept delta overflows to inf
    codec = get_codec("deltadq")
    params = codec.validate_params({"p": 0.5, "bits": 3, "parts": 2, "quantizer": quantizer, "group_size": g})
    enc = codec.encode(EncodeInput(name="w", finetuned=(base.float() + delta).to(dtype), base=base, _delta=delta), params)
    want = codec.reconstruct(enc.tensors, enc.params, base, shape, dtype)
    owned = base.clone()
    got = codec.reconstruct_(enc.tensors, enc.params, owned, shape, dtype)
    assert got.dtype == dtype and got.data_ptr() == owned.data_ptr()  # in place, no float32 copy
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    ref = (base.float() + codec.decode_delta(enc.tensors, enc.params, shape)).to(dtype)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity,group_size", [("tensor", 0), ("row", 0), ("group", 8), ("group", 5)])
@pytest.mark.parametrize("shape", [(37, 21), (3, 1), (300, 64)])
def test_bitdelta_half_inplace_rebuild_matches_reconstruct(dtype: torch.dtype, granularity: str, group_size: int,
                                                           shape: tuple[int, ...]) -> None:
    base = _half_base(shape, 2, dtype) if math.prod(shape) > 12 else torch.randn(shape).to(dtype)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 1e-2
    codec = get_codec("bitdelta")
    raw = {"granularity": granularity} | ({"group_size": group_size} if group_size else {})
    params = codec.validate_params(raw)
    enc = codec.encode(EncodeInput(name="w", finetuned=(base.float() + delta).to(dtype), base=base, _delta=delta), params)
    want = codec.reconstruct(enc.tensors, enc.params, base, shape, dtype)
    owned = base.clone()
    got = codec.reconstruct_(enc.tensors, enc.params, owned, shape, dtype)
    assert got.data_ptr() == owned.data_ptr() and torch.equal(got.view(torch.int16), want.view(torch.int16))
    as_fp32 = codec.reconstruct_(enc.tensors, enc.params, base.clone(), shape, torch.float32)  # other output dtype: not in place
    want32 = codec.reconstruct(enc.tensors, enc.params, base, shape, torch.float32)
    assert as_fp32.dtype == torch.float32 and torch.equal(as_fp32.view(torch.int32), want32.view(torch.int32))


# ------------------------------------------------------------------------------------------ encoding


@needs_native
@pytest.mark.parametrize("shape", [(64, 96), (7, 576), (33, 40), (300, 12), (3, 13)])
@pytest.mark.parametrize("setting", [{"p": 0.5, "bits": 4, "parts": 2}, {"preset": "16x"}, {"preset": "128x"},
                                     {"p": 0.5, "bits": 3, "parts": 4}, {"p": 0.9, "bits": 8, "parts": 1},
                                     {"p": 0.9, "bits": 2, "parts": 4}, {"p": 0.25, "bits": 5, "parts": 1, "entropy": "none"},
                                     {"p": 0.5, "bits": 1, "parts": 2}, {"p": 0.75, "bits": 7, "parts": 128}])
def test_deltadq_encode_matches_numpy(shape: tuple[int, int], setting: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native encoder (Lloyd steps, codes, packed streams) stores the bytes of the numpy/torch encoder; its
    float64 error sums agree to rounding."""
    gen = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=gen)
    delta = torch.randn(shape, generator=gen) * 1e-3 * (1 + 3 * torch.rand(shape, generator=gen))
    codec = get_codec("deltadq")
    params = codec.validate_params(dict(setting))
    a, b = _both(monkeypatch, lambda: codec.encode(EncodeInput(name="w", finetuned=base + delta, base=base), params))
    assert a.params == b.params and a.tensors.keys() == b.tensors.keys()
    for role in a.tensors:
        assert torch.equal(a.tensors[role], b.tensors[role]), role
    d2 = b.stats["delta_l2"] ** 2
    assert a.stats["delta_l2"] == pytest.approx(b.stats["delta_l2"], rel=1e-12)
    assert a.stats["error_l2"] == pytest.approx(b.stats["error_l2"], rel=1e-9)
    assert a.stats["error_dot"] == pytest.approx(b.stats["error_dot"], rel=1e-9, abs=1e-12 * d2)


@needs_native
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 33, 1000])
def test_pack_codes_and_kmeans_match_numpy(bits: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.codecs._quant import kmeans_codebook

    codes = torch.from_numpy(np.random.default_rng(n * bits).integers(0, 256, n).astype(np.uint8))  # high bits ignored
    a, b = _both(monkeypatch, lambda: pack_codes(codes, bits))
    assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b) and a.numel() == packed_nbytes(n, bits)
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3  # heavy tails: many Lloyd steps
    (cb_a, codes_a), (cb_b, codes_b) = _both(monkeypatch, lambda: kmeans_codebook(values, min(bits, 6)))
    assert torch.equal(cb_a, cb_b) and torch.equal(codes_a, codes_b)


@needs_native
@pytest.mark.parametrize("bits,parts", [(1, 2), (2, 2), (3, 2), (4, 2), (8, 2), (4, 4), (3, 1), (8, 256), (2, 4)])
def test_split_pack_matches_numpy(bits: int, parts: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Separate quantization's packed streams from the native kernel (two parts: gathered a chunk at a time and
    written eight 1-bit values per step) are those of the numpy split and packers, across chunk boundaries and
    counts that are not a multiple of eight."""
    from deltahub.codecs._accel import native
    from deltahub.codecs._quant import split_parts

    pbits = (parts - 1).bit_length()
    for n in (0, 1, 7, 8, 9, 4095, 4096, 4097, 10001, 70003):
        codes = np.random.default_rng(n + bits).integers(0, 1 << bits, n).astype(np.uint8)
        part, lows = native().split_pack(codes, bits, parts)
        monkeypatch.setenv("DELTAHUB_NATIVE", "0")
        part_t, low = split_parts(torch.from_numpy(codes), bits, parts)
        if pbits:
            assert bytes(part) == bytes(pack_codes(part_t, pbits).numpy())
        if bits > pbits:
            for j in range(parts):
                want = pack_codes(torch.from_numpy(np.compress(part_t.numpy() == j, low.numpy())), bits - pbits)
                assert bytes(lows[j]) == bytes(want.numpy()), (n, j)
        monkeypatch.setenv("DELTAHUB_NATIVE", "1")


@needs_native
def test_spread_sums_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.codecs.deltadq import auto_candidates, spread_sums

    for shape in [(64, 96), (7, 576), (33, 40), (5, 7), (300, 12), (3, 1), (2, 4096)]:
        d = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
        sizes = auto_candidates(shape[1], 0.5)
        (t1a, ta), (t1b, tb) = _both(monkeypatch, lambda: spread_sums(d, sizes))
        assert t1a == pytest.approx(t1b, rel=1e-12) and ta.keys() == tb.keys()
        assert all(ta[g] == pytest.approx(tb[g], rel=1e-9, abs=1e-12 * t1b) for g in sizes)


@needs_native
def test_encoder_error_sums_do_not_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A delta element near float32's largest value: its square is summed in float64 (finite), on both paths."""
    base = torch.zeros(8, 64)
    delta = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)) * 1e-3
    delta[2, 5] = 3e38
    codec = get_codec("deltadq")
    params = codec.validate_params({"p": 0.5, "bits": 4, "parts": 2, "group_size": 8})
    for enc in _both(monkeypatch, lambda: codec.encode(EncodeInput(name="w", finetuned=base + delta, base=base), params)):
        assert math.isfinite(enc.stats["delta_l2"]) and enc.stats["delta_l2"] == pytest.approx(3e38, rel=1e-6)
        assert math.isfinite(enc.stats["error_l2"])


def _same_encoded(a: object, b: object) -> bool:
    """Two encode results (or errors) alike bit for bit: params, stats, stored tensors; errors by type and text."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return (a.params == b.params and a.stats == b.stats and a.tensors.keys() == b.tensors.keys()  # type: ignore[attr-defined]
            and all(a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])  # type: ignore[attr-defined]
                    for k in a.tensors))  # type: ignore[attr-defined]


LADDER = [{"preset": n} for n in ("16x", "32x", "64x", "128x", "256x", "512x")] + [
    {"p": 0.5, "bits": 4, "parts": 2}, {"p": 0.3, "bits": 3, "parts": 1}, {"p": 0.6, "bits": 8, "parts": 4, "group_size": 10},
    {"p": 0.75, "bits": 2, "quantizer": "uniform"}, {"p": 0.5, "bits": 1, "parts": 2, "seed": 7, "stream": 3},
    {"p": 0.5, "bits": 2, "group_size": 7}, {"p": 0.5, "bits": 5, "parts": 1, "entropy": "none"}]


@needs_native
@pytest.mark.parametrize("shape", [(57, 576), (16, 1536), (3, 20), (1, 70), (300, 40), (0, 40), (60, 576), (256, 576)])
@pytest.mark.parametrize("kind", ["normal", "heavy", "constant", "three values", "spike", "nan"])
@pytest.mark.parametrize("table", ["full", "tiny"])
def test_deltadq_encode_many_is_encode(shape: tuple[int, int], kind: str, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocation's one-call ladder (``encode_many``: native ``dq_ladder``) stores what ``encode`` stores for each
    setting in turn on the same input, bit for bit, errors included: group sizes that do not divide the row, a NaN
    delta, a constant one (one distinct value), an empty one, a spike (most values equal), more kept values than the
    k-means fit sample (every other one fitted). With a tiny cube-root table the ladder's start codebooks do not fit
    it: those settings are encoded alone, with the same result."""
    import deltahub.codecs.deltadq as dq

    if table == "tiny":
        monkeypatch.setattr(dq, "_cbrt_table", lambda n: np.cbrt(np.arange(2, dtype=np.float64)))
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1] + len(kind))
    base = torch.randn(shape, generator=gen)
    delta = {"normal": lambda: torch.randn(shape, generator=gen) * 1e-3,
             "heavy": lambda: torch.randn(shape, generator=gen) ** 5 * 1e-3,
             "constant": lambda: torch.full(shape, 1e-3),
             "three values": lambda: (torch.randint(0, 3, shape, generator=gen).float() - 1) * 1e-3,
             "spike": lambda: torch.zeros(shape).index_fill_(-1, torch.tensor([0]), 1e-2),
             "nan": lambda: torch.randn(shape, generator=gen).index_fill_(-1, torch.tensor([1]), float("nan"))}[kind]()
    codec = get_codec("deltadq")
    settings = [codec.validate_params(dict(s)) for s in LADDER]
    many = codec.encode_many(EncodeInput(name="m.w", finetuned=base + delta, base=base), settings)
    one = EncodeInput(name="m.w", finetuned=base + delta, base=base)
    for params, got in zip(settings, many):
        try:
            want: object = codec.encode(one, params)
        except CodecError as exc:
            want = exc
        assert _same_encoded(got, want), (params, got, want)


@needs_native
def test_native_encoders_refuse_arguments_that_do_not_fit() -> None:
    from deltahub.codecs._accel import native

    nat = native()
    f = np.zeros(8, dtype=np.float32)
    with pytest.raises(ValueError):
        nat.split_pack(np.zeros(4, np.uint8), 2, 8)  # more parts than 2-bit codes have
    with pytest.raises(ValueError):
        nat.split_pack(np.zeros(4, np.uint8), 3, 3)  # parts not a power of two
    with pytest.raises(ValueError):
        nat.split_pack(np.zeros(4, np.uint8), 9, 1)
    with pytest.raises(ValueError):
        nat.quantize(f, 1.0, np.zeros(4, np.float32), np.zeros(7, np.uint8))  # codes buffer of the wrong size
    with pytest.raises(ValueError):
        nat.quantize(f, 1.0, np.zeros(257, np.float32), np.zeros(8, np.uint8))
    with pytest.raises(ValueError):
        nat.quantize(np.zeros(9, np.uint8), 1.0, np.zeros(4, np.float32), np.zeros(2, np.uint8))  # not float32
    with pytest.raises(ValueError):
        nat.lloyd(f, np.zeros(0, np.float32), 10)
    with pytest.raises(ValueError):
        nat.spread_sums(f, 2, 5, [1])  # 2 x 5 is not 8 elements
    with pytest.raises(ValueError):
        nat.spread_sums(f, 2, 4, [4, 2])  # not ascending
    with pytest.raises(ValueError):
        nat.spread_sums(f, 1, 8, [3])  # neither a power of two nor the row
    cbrt = np.cbrt(np.arange(64, dtype=np.float64))
    for bad in [(1, 2, 3, 1, 2, 2),  # a group size that does not divide the 8 elements
                (1, 2, 4, 5, 2, 2),  # keeps more than the group
                (1, 2, 4, 0, 2, 2), (1, 2, 4, 2, 9, 1), (1, 2, 4, 2, 2, 3), (1, 2, 4, 2, 2, 8), (1, 2, 0, 1, 2, 1)]:
        with pytest.raises(ValueError):
            nat.dq_ladder(f, [bad], cbrt, 1 << 16, 100)
    with pytest.raises(ValueError):
        nat.dq_ladder(f, [(1, 2, 4, 2, 2, 2)], cbrt, 0, 100)  # no fit sample
    assert len(nat.dq_ladder(f, [(1, 2, 4, 2, 2, 2)] * 100, cbrt, 1 << 16, 100)) == 100  # any number of settings
    with pytest.raises(TypeError):
        nat.dq_ladder(f, [(1, 2, 4)], cbrt, 1 << 16, 100)
    spike = np.zeros(64, dtype=np.float32)
    spike[::4] = 1.0  # most kept values are 0: the first start bin holds many of them
    assert nat.dq_ladder(spike, [(1, 2, 4, 2, 2, 2)], cbrt[:2], 1 << 16, 100) == [None]  # a bin outgrows the table
    assert nat.dq_ladder(spike, [(1, 2, 4, 2, 2, 2)], cbrt, 1 << 16, 100)[0] is not None


@needs_native
@pytest.mark.parametrize("shape", [(3, 1), (5, 7), (7, 8), (9, 17), (64, 576), (2, 1001)])
def test_pack_signs_matches_pack_bits(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """BitDelta's sign bits: delta >= 0 (so -0.0 is 1 and NaN is 0), LSB first, rows padded with zero bits."""
    from deltahub.codecs._accel import native
    from deltahub.codecs._bits import pack_bits, pack_signs

    d = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    d.view(-1)[0] = -0.0
    d.view(-1)[-1] = float("nan")
    a, b = _both(monkeypatch, lambda: pack_signs(d))
    assert torch.equal(a, b) and torch.equal(a, pack_bits(d >= 0))
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    with pytest.raises(ValueError):
        native().pack_signs(d.numpy(), shape[0], shape[1] + 1, np.zeros(a.numel(), np.uint8))


@needs_native
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 576), (5, 1001)])
def test_row_sums_match_numpy(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.codecs.rowsparse import row_sums

    d = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 1e19  # squares beyond float32
    (sq_a, ab_a), (sq_b, ab_b) = _both(monkeypatch, lambda: row_sums(d))
    assert torch.allclose(sq_a, sq_b, rtol=1e-12) and torch.allclose(ab_a, ab_b, rtol=1e-12)
    assert torch.isfinite(sq_a).all()


@needs_native
@pytest.mark.parametrize("dist", ["normal", "heavy", "few_values", "skewed", "spike"])
@pytest.mark.parametrize("n", [2, 300, 16000, 70000])
@pytest.mark.parametrize("k", [2, 16, 256])
def test_companded_init_matches_numpy(dist: str, n: int, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The k-means start codebook, native and numpy, bit for bit, and the values np.cbrt of the counts gives."""
    from deltahub.codecs._quant import _companded_init

    rng = np.random.default_rng(n + k)
    x = {"normal": lambda: rng.standard_normal(n), "heavy": lambda: rng.standard_t(2, n),
         "few_values": lambda: rng.integers(-3, 4, n) * 1e-3, "skewed": lambda: rng.exponential(1.0, n),
         # most values in one bin: more than the native table covers at n=70000 (the numpy lines finish it)
         "spike": lambda: np.where(rng.random(n) < 0.9, 0.5, rng.standard_normal(n))}[dist]()
    srt = np.sort((x * 1e-4).astype(np.float32))
    a, b = _both(monkeypatch, lambda: _companded_init(srt, k))
    assert np.array_equal(a.view(np.int32), b.view(np.int32))
    bins = min(4096, max(256, n // 16))  # the straightforward numpy lines, cube roots computed directly
    lo, hi = float(srt[0]), float(srt[-1])
    width = (hi - lo) / bins
    cuts = np.searchsorted(srt, (lo + width * np.arange(1, bins)).astype(np.float32), side="left")
    cdf = np.cumsum(np.cbrt(np.diff(cuts, prepend=0, append=n).astype(np.float64)))
    cdf /= cdf[-1]
    idx = np.clip(np.searchsorted(cdf, (np.arange(k) + 0.5) / k), 0, bins - 1)
    assert np.array_equal(a.view(np.int32), (lo + (idx + 0.5) * width).astype(np.float32).view(np.int32))


@needs_native
@pytest.mark.parametrize("n", [0, 1, 2, 7, 2048, 70_001])
def test_sort_f32_matches_numpy(n: int) -> None:
    """The k-means fit's radix sort: numpy's order for every float32 (signs, subnormals, zeros, infinities,
    values spanning every exponent), and only buffers of the same size."""
    from deltahub.codecs._accel import native

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 38, n)).astype(np.float32)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 3.4e38, -3.4e38], dtype=np.float32)
    x[: min(n, special.size)] = special[: min(n, special.size)]
    out = np.empty_like(x)
    native().sort_f32(x, out)
    assert np.array_equal(out, np.sort(x))
    with pytest.raises(ValueError):
        native().sort_f32(x, np.empty(n + 1, dtype=np.float32))
