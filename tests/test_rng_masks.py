"""Seeded mask generator (fixed vectors of format_spec.md), stored masks, and code streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.codecs._bits import packed_cols
from deltahub.codecs._masks import bitmap_nbytes, decode_mask, encode_mask
from deltahub.codecs._quant import (load_stream, merge_parts, pack_codes, packed_nbytes, split_parts,
                                    store_stream, unpack_codes)
from deltahub.codecs._rng import (group_keep_mask, keep_mask, keep_threshold, name_stream, uniform_u32,
                                  uniform_u32_at)
from deltahub.errors import CodecError

pytestmark = pytest.mark.usefixtures("decode_impl")  # native kernels and numpy paths alike

M32 = 0xFFFFFFFF


# --- an independent reference of the spec's generator, in plain Python integers -------------------
def ref_h(x: int) -> int:
    for shift, mult in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        x ^= x >> shift
        x = (x * mult) & M32
    return x ^ (x >> 14)


def ref_u(seed: int, stream: int, i: int) -> int:
    k1 = ref_h(seed ^ 0x9E3779B9)
    k2 = ref_h(k1 ^ stream)
    key = ref_h(k2 ^ ref_h((i >> 32) ^ 0x85EBCA6B))
    return ref_h((i & M32) ^ key) ^ k1


# Fixed vectors of the generator (format_spec.md 3.5 has more; tests/test_spec_vectors.py parses those).
VECTORS = {
    (0, 0): [1380034501, 546650681, 1012638151, 3750264175, 3619959183, 172991981, 3568116162, 1589604770],
    (1234, 7): [3383186200, 2607922001, 830127526, 430606989, 2833008684, 374939467, 1807691397, 2684924375],
}


@pytest.mark.parametrize("key", sorted(VECTORS))
def test_fixed_vectors(key: tuple[int, int]) -> None:
    seed, stream = key
    assert uniform_u32(seed, stream, 8).tolist() == VECTORS[key]
    assert [ref_u(seed, stream, i) for i in range(8)] == VECTORS[key]


def test_fixed_vectors_high_indices_and_names() -> None:
    assert uniform_u32_at(1234, 7, torch.tensor([2**32, 2**32 + 1])).tolist() == [2717746903, 3244923292]
    assert name_stream("model.layers.0.mlp.up_proj.weight") == 2976196783
    assert name_stream("") == 1120186595
    assert keep_mask(1234, 7, (16,), 0.5).int().tolist() == [0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1]
    assert group_keep_mask(1234, 7, 2, 8, 4, 1).int().tolist() == [[0, 0, 0, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 1]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, M32), stream=st.integers(0, M32),
       idx=st.lists(st.integers(0, 2**40), min_size=1, max_size=16))
def test_generator_matches_reference(seed: int, stream: int, idx: list[int]) -> None:
    got = uniform_u32_at(seed, stream, torch.tensor(idx, dtype=torch.int64)).tolist()
    assert got == [ref_u(seed, stream, i) for i in idx]


def test_generator_statistics() -> None:
    u = uniform_u32(5, 9, 1 << 18).to(torch.float64) / 2**32
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01
    assert not torch.equal(uniform_u32(5, 9, 64), uniform_u32(5, 10, 64))
    assert not torch.equal(uniform_u32(5, 9, 64), uniform_u32(6, 9, 64))


def test_keep_mask_is_thresholded_generator() -> None:
    p = 0.7
    u = torch.tensor([ref_u(3, 4, i) for i in range(500)])
    assert torch.equal(keep_mask(3, 4, (20, 25), p), (u < keep_threshold(p)).view(20, 25))
    assert keep_threshold(0.0) == 2**32 and keep_threshold(0.5) == 2**31
    assert keep_mask(3, 4, (4000,), 0.0).all()


@pytest.mark.parametrize("group,keep", [(4, 1), (8, 3), (16, 1), (16, 15), (24, 6)])
def test_group_keep_mask_reference(group: int, keep: int) -> None:
    rows, cols, seed, stream = 3, 48, 11, 22
    mask = group_keep_mask(seed, stream, rows, cols, group, keep)
    assert (mask.view(rows, cols // group, group).sum(2) == keep).all()
    ref = torch.zeros(rows * cols, dtype=torch.bool)
    for g0 in range(0, rows * cols, group):
        keys = sorted((ref_u(seed, stream, g0 + j) * group + j, j) for j in range(group))
        for _, j in keys[:keep]:
            ref[g0 + j] = True
    assert torch.equal(mask, ref.view(rows, cols))


# --- stored masks -----------------------------------------------------------------------------------
def ref_decode_indices(blob: bytes, numel: int) -> np.ndarray:
    raw = zstandard.ZstdDecompressor().decompress(blob)
    n = len(raw) // 4
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(4, n).astype(np.int64)
    gaps = planes[0] | planes[1] << 8 | planes[2] << 16 | planes[3] << 24
    flat = np.zeros(numel, dtype=bool)
    flat[np.cumsum(gaps + 1) - 1] = True
    return flat


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_mask_round_trip(rows: int, cols: int, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    for enc in ("auto", "bitmap", "indices"):
        used, stored = encode_mask(mask, enc)
        assert used in ("bitmap", "indices") and (enc == "auto" or used == enc)
        assert stored.dtype == torch.uint8
        assert torch.equal(decode_mask(used, stored, rows, cols), mask)
        if used == "bitmap":
            assert stored.numel() == bitmap_nbytes(rows, cols) == rows * ((cols + 7) // 8)
        else:
            assert np.array_equal(ref_decode_indices(stored.numpy().tobytes(), rows * cols), mask.reshape(-1).numpy())


def test_mask_smaller_of() -> None:
    g = torch.Generator().manual_seed(0)
    sparse = torch.rand(256, 512, generator=g) < 0.01
    dense = torch.rand(256, 512, generator=g) < 0.5
    used, stored = encode_mask(sparse)
    assert used == "indices" and stored.numel() < bitmap_nbytes(256, 512) / 3
    used, stored = encode_mask(dense)
    assert used == "bitmap" and stored.numel() == bitmap_nbytes(256, 512)
    _, as_idx = encode_mask(dense, "indices")
    assert as_idx.numel() >= bitmap_nbytes(256, 512)


def test_mask_decode_errors() -> None:
    with pytest.raises(CodecError, match="bitmap"):
        decode_mask("bitmap", torch.zeros(3, 2, dtype=torch.uint8), 3, 20)
    with pytest.raises(CodecError, match="zstd"):
        decode_mask("indices", torch.tensor([1, 2, 3], dtype=torch.uint8), 3, 20)
    with pytest.raises(CodecError, match="unknown mask encoding"):
        decode_mask("rle", torch.zeros(3, dtype=torch.uint8), 1, 3)


# --- dense code streams -------------------------------------------------------------------------------
def ref_unpack(packed: bytes, n: int, bits: int) -> list[int]:
    """Spec layout: code i is stream bits [i*bits, (i+1)*bits), LSB first; bit t = byte t//8, bit t%8."""
    stream = [(packed[t // 8] >> (t % 8)) & 1 for t in range(len(packed) * 8)]
    return [sum(stream[i * bits + j] << j for j in range(bits)) for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_codes_layout(bits: int, data: st.DataObject) -> None:
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=40))
    packed = pack_codes(torch.tensor(codes, dtype=torch.int64), bits)
    assert packed.numel() == packed_nbytes(len(codes), bits) == (len(codes) * bits + 7) // 8
    assert ref_unpack(packed.numpy().tobytes(), len(codes), bits) == codes
    assert unpack_codes(packed, len(codes), bits).tolist() == codes


def test_pack_codes_example() -> None:
    # 2-bit codes 1, 2, 3, 0, 1 -> bits 10 01 11 00 | 10 -> bytes 0b00111001, 0b00000001
    assert pack_codes(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [0b00111001, 0b00000001]


def test_streams_and_parts() -> None:
    g = torch.Generator().manual_seed(0)
    skewed = (torch.rand(5000, generator=g) < 0.05).long()
    s = store_stream(skewed, 1)
    assert s.numel() < packed_nbytes(5000, 1)  # zstd kept: strictly smaller
    assert torch.equal(load_stream(s, 5000, 1), skewed)
    uniform = torch.randint(0, 16, (301,), generator=g)
    s = store_stream(uniform, 4)
    assert s.numel() == packed_nbytes(301, 4)  # incompressible: raw
    assert torch.equal(load_stream(s, 301, 4), uniform)
    assert store_stream(skewed, 1, entropy=False).numel() == packed_nbytes(5000, 1)
    with pytest.raises(CodecError, match="more than"):
        load_stream(torch.zeros(200, dtype=torch.uint8), 301, 4)
    part, low = split_parts(uniform, 4, 4)
    assert part.max() < 4 and low.max() < 4 and torch.equal(part, uniform >> 2)
    assert torch.equal(merge_parts(part, low, 4, 4), uniform)
    assert packed_cols(9) == 2


def test_zstd_frames_are_single_with_content_size() -> None:
    """format_spec.md 3.4: exactly one frame that records its content size, nothing after it."""
    codes = torch.zeros(4000, dtype=torch.int64)
    good = store_stream(codes, 2)
    assert good.numel() < packed_nbytes(4000, 2)
    assert torch.equal(load_stream(good, 4000, 2), codes)
    blob = good.numpy().tobytes()
    no_size = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(1000))
    trailing = torch.frombuffer(bytearray(blob + b"\x00"), dtype=torch.uint8)
    two = torch.frombuffer(bytearray(blob + zstandard.ZstdCompressor().compress(b"x")), dtype=torch.uint8)
    for bad, match in ((trailing, "corrupt zstd frame"), (two, "corrupt zstd frame"),
                       (torch.frombuffer(bytearray(no_size), dtype=torch.uint8), "content size"),
                       (store_stream(codes[:2000], 2), "expected 1000")):
        with pytest.raises(CodecError, match=match):
            load_stream(bad, 4000, 2)
    _, idx = encode_mask(torch.zeros(64, 64, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True), "indices")
    with pytest.raises(CodecError, match="mask indices"):
        decode_mask("indices", torch.cat([idx, idx]), 64, 64)
