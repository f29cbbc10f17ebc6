"""deltadq, dare and topk-ternary: exact reference decodes, sizes, group-size procedure, bad params."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.codecs import EncodeInput, get_codec
from deltahub.codecs.deltadq import (PRESETS, auto_candidates, choose_group_size, group_size_errors, keep_count,
                                     max_nbytes)
from deltahub.errors import CodecError, InvalidCodecParamsError

from test_rng_masks import ref_decode_indices, ref_u, ref_unpack

pytestmark = pytest.mark.usefixtures("decode_impl")  # native kernels and numpy paths alike


def make_input(rows: int, cols: int, seed: int = 0, name: str = "model.layers.0.mlp.up_proj.weight",
               std: float = 1e-3, calib_tokens: int = 0) -> EncodeInput:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    ft = base + torch.randn(rows, cols, generator=g) * std
    calib = torch.randn(calib_tokens, cols, generator=g) if calib_tokens else None
    return EncodeInput(name, ft, base, calibration=calib)


def encode(name: str, inp: EncodeInput, **params):
    codec = get_codec(name)
    enc = codec.encode(inp, codec.validate_params(params))
    return codec, enc


def ref_group_mask(seed: int, stream: int, rows: int, cols: int, g: int, keep: int) -> np.ndarray:
    mask = np.zeros(rows * cols, dtype=bool)
    for g0 in range(0, rows * cols, g):
        keys = sorted((ref_u(seed, stream, g0 + j) * g + j, j) for j in range(g))
        for _, j in keys[:keep]:
            mask[g0 + j] = True
    return mask.reshape(rows, cols)


def ref_stream(stored: torch.Tensor, n: int, bits: int) -> list[int]:
    raw_len = (n * bits + 7) // 8
    blob = stored.numpy().tobytes()
    assert len(blob) <= raw_len
    if len(blob) < raw_len:
        blob = zstandard.ZstdDecompressor().decompress(blob)
    return ref_unpack(blob, n, bits)


def ref_codes(stored: dict[str, torch.Tensor], n: int, bits: int, parts: int) -> np.ndarray:
    pb = int(math.log2(parts))
    lb = bits - pb
    part = np.array(ref_stream(stored["part"], n, pb) if pb else [0] * n, dtype=np.int64)
    low = np.zeros(n, dtype=np.int64)
    if lb:
        for j in range(parts):
            sel = part == j
            low[sel] = ref_stream(stored[f"low{j}"], int(sel.sum()), lb)
    return part << lb | low


# --- deltadq -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer,bits,parts,p,g", [
    ("kmeans", 2, 1, 0.5, 8), ("kmeans", 2, 2, 0.75, 16), ("kmeans", 3, 2, 0.875, 32),
    ("kmeans", 4, 4, 0.5, 4), ("kmeans", 2, 4, 0.9375, 16), ("uniform", 2, 2, 0.75, 8),
    ("uniform", 4, 2, 0.5, 32), ("uniform", 3, 1, 0.0, 64), ("kmeans", 1, 1, 0.5, 2),
])
def test_deltadq_exact_reference(quantizer: str, bits: int, parts: int, p: float, g: int) -> None:
    rows, cols = 12, 64
    inp = make_input(rows, cols, seed=bits * 10 + parts)
    codec, enc = encode("deltadq", inp, preset=None, p=p, bits=bits, parts=parts, quantizer=quantizer,
                        group_size=g, qgroup=24, seed=77)
    prm = enc.params
    assert prm["group_size"] == g and prm["seed"] == 77 and prm["stream"] is not None
    keep = keep_count(p, g)
    mask = ref_group_mask(77, prm["stream"], rows, cols, g, keep)
    n = int(mask.sum())
    assert n == rows * cols // g * keep
    codes = ref_codes(enc.tensors, n, bits, parts)
    if quantizer == "kmeans":
        cb = enc.tensors["codebook"].numpy()
        assert cb.dtype == np.float32 and cb.shape == (1 << bits,) and np.all(np.diff(cb) >= 0)
        values = cb[codes]
    else:
        idx = np.arange(n) // 24
        mn = enc.tensors["qmin"].numpy().astype(np.float32)[idx]
        step = enc.tensors["qstep"].numpy().astype(np.float32)[idx]
        norm = enc.tensors["norm"].numpy()[0]
        values = (mn + step * codes.astype(np.float32)) * norm
        assert enc.tensors["qmin"].dtype == torch.float16 and enc.tensors["norm"].dtype == torch.float32
    ref = np.zeros((rows, cols), dtype=np.float32)
    ref[mask] = values
    out = codec.decode_delta(enc.tensors, prm, (rows, cols))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(ref))
    # the kept values approximate the rescaled delta: the quantizer's job, not a format property
    d = inp.delta.numpy()[mask] * (g / keep)
    assert np.abs(values - d).max() <= np.abs(d).max() * (1.0 if bits == 1 else 0.6)


def test_deltadq_separate_quantization_is_lossless_layout() -> None:
    """Splitting codes into parts changes the storage, never the decoded delta."""
    inp = make_input(16, 128, seed=3)
    outs, sizes = [], []
    for parts in (1, 2, 4, 8):
        codec, enc = encode("deltadq", inp, preset=None, p=0.75, bits=3, parts=parts, group_size=16, entropy="none")
        outs.append(codec.decode_delta(enc.tensors, enc.params, (16, 128)))
        roles = set(enc.tensors)
        assert ("part" in roles) == (parts > 1)
        assert {r for r in roles if r.startswith("low")} == ({f"low{j}" for j in range(parts)} if parts < 8 else set())
        sizes.append(enc.nbytes)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("quantizer,bits,parts,entropy", [
    ("kmeans", 2, 1, "none"), ("kmeans", 3, 1, "none"), ("uniform", 4, 1, "none"),
    ("kmeans", 2, 2, "none"), ("uniform", 3, 4, "none"), ("kmeans", 2, 2, "zstd"), ("kmeans", 4, 1, "zstd"),
])
def test_deltadq_sizes_match_spec(quantizer: str, bits: int, parts: int, entropy: str) -> None:
    rows, cols, p, g = 24, 96, 0.75, 16
    codec, enc = encode("deltadq", make_input(rows, cols, seed=5), preset=None, p=p, bits=bits, parts=parts,
                        quantizer=quantizer, group_size=g, qgroup=32, entropy=entropy)
    n = rows * cols * keep_count(p, g) // g
    pb = int(math.log2(parts))
    lb = bits - pb
    side = 4 * 2**bits if quantizer == "kmeans" else 4 + 4 * math.ceil(n / 32)  # codebook | norm + (min, step) fp16
    assert enc.nbytes <= max_nbytes((rows, cols), enc.params)
    assert enc.nbytes <= side + math.ceil(n * pb / 8) + math.ceil(n * lb / 8) + parts - 1
    if entropy == "none":
        codes = ref_codes(enc.tensors, n, bits, parts)
        counts = [int(((codes >> lb) == j).sum()) for j in range(parts)]
        spec = side + math.ceil(n * pb / 8) + sum(math.ceil(c * lb / 8) for c in counts)
        assert enc.nbytes == spec
        if parts == 1:  # data-independent: bits per weight = (1 - p) * bits + side / numel
            assert enc.nbytes == codec.expected_nbytes((rows, cols), enc.params) == side + math.ceil(n * bits / 8)
    else:
        assert codec.expected_nbytes((rows, cols), enc.params) is None


def test_deltadq_presets() -> None:
    codec = get_codec("deltadq")
    assert {"16x", "32x", "64x", "128x"} <= set(PRESETS)
    inp = make_input(32, 256, seed=9)
    for name, preset in PRESETS.items():
        ratio = float(name.rstrip("x"))
        assert 16 / ((1 - preset["p"]) * preset["bits"]) == ratio
        enc = codec.encode(inp, codec.validate_params({"preset": name}))
        # nominal bytes (numel * 2 / ratio) + codebook + at most one partial byte per stream
        assert enc.nbytes <= inp.delta.numel() * 2 / ratio + 4 * 2 ** preset["bits"] + preset["parts"] + 1
    # explicit keys override the preset, and the default preset is 16x
    assert codec.validate_params({})["p"] == PRESETS["16x"]["p"]
    assert codec.validate_params({"preset": "64x", "bits": 3})["bits"] == 3


def test_group_size_expectation_is_exact() -> None:
    """The closed form equals the exact expectation over every possible mask (enumerated)."""
    g = torch.Generator().manual_seed(1)
    rows, cols, gs, keep = 2, 8, 4, 2
    d = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(5, cols, generator=g, dtype=torch.float64)
    p = 1 - keep / gs
    choices = list(itertools.combinations(range(gs), keep))
    total, count = 0.0, 0
    for combo in itertools.product(choices, repeat=rows * cols // gs):
        m = torch.zeros(rows * cols, dtype=torch.bool)
        for b, c in enumerate(combo):
            m[[b * gs + j for j in c]] = True
        dh = torch.where(m.view(rows, cols), d * gs / keep, torch.zeros((), dtype=torch.float64))
        total += float(((x @ (dh - d).T) ** 2).sum())
        count += 1
    assert group_size_errors(d, p, [gs], x)[gs] == pytest.approx(total / count, rel=1e-9)
    assert group_size_errors(d, p, [gs], None)[gs] == pytest.approx(
        group_size_errors(d, p, [gs], torch.ones(1, cols, dtype=torch.float64))[gs], rel=1e-9)
    # isotropic inputs make every group size equal: p / (1 - p) * ||D||^2
    assert group_size_errors(d, p, [gs], torch.eye(cols, dtype=torch.float64))[gs] == pytest.approx(
        p / (1 - p) * float((d * d).sum()), rel=1e-9)
    # groups larger than the token count take the X route; both equal the direct sum over z = x * D
    big = torch.randn(4, 64, generator=g, dtype=torch.float64)
    for tokens, gs in ((40, 32), (10, 32), (10, 8)):
        xb = torch.randn(tokens, 64, generator=g, dtype=torch.float64)
        z = (xb[:, None, :] * big[None]).view(tokens, 4, 64 // gs, gs)
        spread = float(((z - z.mean(-1, keepdim=True)) ** 2).sum())
        n = keep_count(0.75, gs)
        assert group_size_errors(big, 0.75, [gs], xb)[gs] == pytest.approx(
            gs * (gs - n) / (n * (gs - 1)) * spread, rel=1e-9)


def test_group_size_auto() -> None:
    assert auto_candidates(576, 0.75) == [4, 8, 16, 32, 64, 576]
    assert auto_candidates(576, 0.9375) == [16, 32, 64, 576]
    assert auto_candidates(7, 0.5) == [7]
    # a delta whose intermediate results are balanced within 4-column blocks: small groups win
    g = torch.Generator().manual_seed(2)
    d = torch.randn(16, 1, generator=g).repeat(1, 64) * torch.randn(1, 16, generator=g).repeat_interleave(4, 1)
    assert choose_group_size(d, 0.5, None) == 4
    inp = make_input(8, 96, seed=4, calib_tokens=20)
    codec, enc = encode("deltadq", inp, preset="32x")
    assert 96 % enc.params["group_size"] == 0
    with pytest.raises(CodecError, match="calibration"):
        group_size_errors(inp.delta, 0.5, [4], torch.zeros(3, 5))


@pytest.mark.parametrize("params,match", [
    ({"preset": None, "p": 1.0, "bits": 2}, "p=1.0"), ({"preset": None, "p": -0.1, "bits": 2}, "p=-0.1"),
    ({"bits": 0}, "bits=0"), ({"bits": 9}, "bits=9"), ({"parts": 3}, "power of two"),
    ({"bits": 2, "parts": 8}, "parts=8"), ({"preset": "1000x"}, "unknown preset"),
    ({"preset": None, "p": 0.5}, "p and bits"), ({"quantizer": "lloyd"}, "quantizer"),
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"entropy": "lz4"}, "entropy"),
    ({"qgroup": 0, "quantizer": "uniform"}, "qgroup"), ({"group_size": 0}, "group_size"),
    ({"preset": "128x", "group_size": 4}, "keeps no element"), ({"gamma": 1}, "does not take"),
    ({"p": "0.5"}, "must be a number"), ({"preset": None, "p": float("nan"), "bits": 2}, "p=nan"),
    ({"stream": 2**32}, "stream"), ({"group_size": "big"}, "group_size must be an integer"),
    ({"group_size": 8.0}, "group_size must be an integer"), ({"bits": 2.0}, "bits must be an integer"),
])
def test_deltadq_bad_params(params: dict, match: str) -> None:
    with pytest.raises(InvalidCodecParamsError, match=match):
        get_codec("deltadq").validate_params(params)


def test_deltadq_group_size_must_divide() -> None:
    codec = get_codec("deltadq")
    with pytest.raises(InvalidCodecParamsError, match="does not divide the last dimension"):
        codec.encode(make_input(4, 60), codec.validate_params({"group_size": 16}))
    _, enc = encode("deltadq", make_input(4, 60), preset="16x")  # auto falls back to a divisor
    assert 60 % enc.params["group_size"] == 0


def test_deltadq_decode_errors_and_1d() -> None:
    codec, enc = encode("deltadq", make_input(8, 32), preset="16x", group_size=8)
    bad = dict(enc.tensors, codebook=torch.zeros(3))
    with pytest.raises(CodecError, match="codebook"):
        codec.decode_delta(bad, enc.params, (8, 32))
    with pytest.raises(CodecError, match="does not divide"):
        codec.decode_delta(enc.tensors, enc.params, (8, 36))
    for bad_g in (0, -4, 4.0, None):  # a corrupt manifest: a typed error, not ZeroDivisionError / TypeError
        with pytest.raises(CodecError, match="positive integer"):
            codec.decode_delta(enc.tensors, dict(enc.params, group_size=bad_g), (8, 32))
    for bad_p in (-1.0, 1.0):
        with pytest.raises(CodecError, match="keeps"):
            codec.decode_delta(enc.tensors, dict(enc.params, p=bad_p), (8, 32))
    inp = EncodeInput("norm.weight", torch.ones(64) + 1e-3, torch.ones(64))
    codec, enc = encode("deltadq", inp, preset="16x")
    assert codec.decode_delta(enc.tensors, enc.params, (64,)).shape == (64,)
    nan = EncodeInput("x", torch.full((4, 8), float("nan")), torch.zeros(4, 8))
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(nan, codec.validate_params({}))


# --- dare ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,dtype", [(0.9, "float16"), (0.5, "bfloat16"), (0.0, "float16")])
def test_dare_exact_reference(p: float, dtype: str) -> None:
    rows, cols = 10, 40
    inp = make_input(rows, cols, seed=6, std=1e-5)
    codec, enc = encode("dare", inp, p=p, seed=5, dtype=dtype)
    stream = enc.params["stream"]
    threshold = int((1.0 - p) * 4294967296.0)
    mask = np.array([ref_u(5, stream, i) < threshold for i in range(rows * cols)])
    vals = enc.tensors["values"].to(torch.float32).numpy()
    norm = enc.tensors["norm"].numpy()[0]
    assert vals.shape == (mask.sum(),) and enc.tensors["values"].dtype == getattr(torch, dtype)
    ref = np.zeros(rows * cols, dtype=np.float32)
    ref[mask] = vals * norm
    assert torch.equal(codec.decode_delta(enc.tensors, enc.params, (rows, cols)), torch.from_numpy(ref).view(rows, cols))
    assert enc.nbytes == codec.expected_nbytes((rows, cols), enc.params) == 2 * int(mask.sum()) + 4
    # kept values are the rescaled delta to 16-bit precision, even for deltas of 1e-5
    kept = inp.delta.reshape(-1).numpy()[mask] / (1 - p)
    tol = 2**-10 if dtype == "float16" else 2**-7
    assert np.allclose(ref[mask], kept, rtol=tol, atol=np.abs(kept).max() * 2**-14)


@pytest.mark.parametrize("params,match", [({"p": 1.0}, "p=1.0"), ({"p": -0.5}, "p=-0.5"),
                                          ({"dtype": "float32"}, "dtype"), ({"seed": 1.5}, "seed"),
                                          ({"p": float("nan")}, "p=nan"), ({"stream": -1}, "stream")])
def test_dare_bad_params(params: dict, match: str) -> None:
    with pytest.raises(InvalidCodecParamsError, match=match):
        get_codec("dare").validate_params(params)


# --- topk-ternary -------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 50), density=st.floats(0.001, 1.0),
       enc_mode=st.sampled_from(["auto", "bitmap", "indices"]), seed=st.integers(0, 99))
def test_topk_exact_reference(rows: int, cols: int, density: float, enc_mode: str, seed: int) -> None:
    inp = make_input(rows, cols, seed=seed)
    codec, enc = encode("topk-ternary", inp, density=density, mask_encoding=enc_mode)
    numel = rows * cols
    k = int(density * numel + 0.5)
    used = enc.params["mask_encoding"]
    blob = enc.tensors["mask"]
    if used == "bitmap":
        mask = np.array(ref_unpack(blob.numpy().tobytes(), rows * ((cols + 7) // 8) * 8, 1), dtype=bool)
        mask = mask.reshape(rows, -1)[:, :cols].reshape(-1)
    else:
        mask = ref_decode_indices(blob.numpy().tobytes(), numel)
    a = inp.delta.abs().reshape(-1).numpy()
    order = np.lexsort((np.arange(numel), -a))  # largest |delta| first, ties: lower index
    expect = np.zeros(numel, dtype=bool)
    expect[order[:k]] = True
    assert np.array_equal(mask, expect)
    signs = np.array(ref_unpack(enc.tensors["sign"].numpy().tobytes(), k, 1), dtype=bool)
    scale = enc.tensors["scale"].numpy()[0]
    ref = np.zeros(numel, dtype=np.float32)
    ref[mask] = np.where(signs, scale, -scale)
    assert torch.equal(codec.decode_delta(enc.tensors, enc.params, (rows, cols)), torch.from_numpy(ref).view(rows, cols))
    assert np.array_equal(signs, inp.delta.reshape(-1).numpy()[mask] >= 0)
    bitmap_bytes = rows * ((cols + 7) // 8) + (k + 7) // 8 + 4
    if used == "bitmap":
        assert enc.nbytes == bitmap_bytes
    if enc_mode == "bitmap":
        assert codec.expected_nbytes((rows, cols), enc.params) == enc.nbytes
    if enc_mode == "auto":
        assert enc.nbytes <= bitmap_bytes


def test_topk_ties_and_scale() -> None:
    d = torch.tensor([[1.0, -1.0, 1.0, 0.5], [-1.0, 0.0, 2.0, 0.25]])
    inp = EncodeInput("t", d, torch.zeros_like(d))
    codec, enc = encode("topk-ternary", inp, density=0.5)  # 4 of 8: 2.0 and the first three |1.0|
    out = codec.decode_delta(enc.tensors, enc.params, (2, 4))
    s = (2.0 + 1 + 1 + 1) / 4
    assert torch.equal(out, torch.tensor([[s, -s, s, 0.0], [0.0, 0.0, s, 0.0]]))


@pytest.mark.parametrize("params,match", [({"density": 0.0}, "density=0.0"), ({"density": 1.5}, "density=1.5"),
                                          ({"density": float("nan")}, "density=nan"),
                                          ({"mask_encoding": "rle"}, "mask_encoding")])
def test_topk_bad_params(params: dict, match: str) -> None:
    with pytest.raises(InvalidCodecParamsError, match=match):
        get_codec("topk-ternary").validate_params(params)


@settings(max_examples=10, deadline=None)
# cols >= 2: deltadq's default preset (p = 0.75) keeps no element of a 1-column row (refused, tested above)
@given(name=st.sampled_from(["deltadq", "dare", "topk-ternary"]), rows=st.integers(1, 6), cols=st.integers(2, 40),
       seed=st.integers(0, 50))
def test_reconstruct_shapes(name: str, rows: int, cols: int, seed: int) -> None:
    inp = make_input(rows, cols, seed=seed)
    codec, enc = encode(name, inp)
    w = codec.reconstruct(enc.tensors, enc.params, inp.base, (rows, cols), torch.bfloat16)
    assert w.shape == (rows, cols) and w.dtype == torch.bfloat16
    for t in enc.tensors.values():
        assert t.dtype in (torch.uint8, torch.float16, torch.bfloat16, torch.float32) and t.is_contiguous()


def test_deltadq_auto_group_refuses_rows_too_short_to_keep_anything() -> None:
    # p = 0.75 keeps floor(0.25 * g + 0.5) of g: nothing of a 1-column row, so no group size works
    with pytest.raises(InvalidCodecParamsError, match="no group size keeps"):
        encode("deltadq", make_input(3, 1), preset="16x")
    _, enc = encode("deltadq", make_input(3, 2), preset="16x")  # g = 2 keeps 1
    assert enc.params["group_size"] == 2


@pytest.mark.parametrize("params", [{}, {"quantizer": "uniform"}, {"preset": "64x"}])
def test_encode_reports_the_error_it_would_measure(params: dict) -> None:
    """deltadq's closed-form stats (dropped energy + quantisation error of the kept values) equal the
    error measured on the decoded delta, so compress need not decode to report it."""
    c = get_codec("deltadq")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 256, generator=g)
    ft = base + 0.01 * torch.randn(64, 256, generator=g)
    inp = EncodeInput("model.layers.0.mlp.up_proj.weight", ft, base)
    enc = c.encode(inp, c.validate_params(params))
    approx = c.decode_delta(enc.tensors, enc.params, (64, 256))
    measured = float((approx - inp.delta).pow(2).sum(dtype=torch.float64)) ** 0.5
    assert enc.stats["error_l2"] == pytest.approx(measured, rel=1e-9)
    assert enc.stats["delta_l2"] == pytest.approx(float(inp.delta.norm()), rel=1e-6)
    dot = float(((approx - inp.delta) * inp.delta).sum(dtype=torch.float64))
    assert enc.stats["error_dot"] == pytest.approx(dot, rel=1e-9, abs=1e-9 * measured ** 2)
