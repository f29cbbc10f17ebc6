"""BitDelta, raw and unchanged: decode(encode(x)) equals the spec's formula bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.codecs import EncodeInput, available_codecs, get_codec
from deltahub.errors import CodecError, InvalidCodecParamsError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pair(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, std: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    ft = (base.float() + torch.randn(shape, generator=g) * std).to(dtype)
    return base, ft


def _reference_bitdelta(delta: torch.Tensor, granularity: str, g: int) -> torch.Tensor:
    """Independent reference: loops over scale groups (tests only), sign >= 0 -> +."""
    rows = math.prod(delta.shape[:-1]) if delta.dim() else 1
    cols = delta.shape[-1] if delta.dim() else 1
    d = delta.reshape(rows, cols)
    out = torch.empty_like(d)
    if granularity == "tensor":
        spans = [(slice(None), slice(None))]
    elif granularity == "row":
        spans = [(r, slice(None)) for r in range(rows)]
    else:
        spans = [(r, slice(c, c + g)) for r in range(rows) for c in range(0, cols, g)]
    for sl in spans:
        block = d[sl]
        s = block.abs().double().mean().float()
        out[sl] = torch.where(block >= 0, s, -s)
    return out.reshape(delta.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity,g", [("tensor", 0), ("row", 0), ("group", 4), ("group", 5), ("group", 64)])
@pytest.mark.parametrize("shape", [(7, 13), (3, 2, 9), (16,), (4, 8)])
def test_bitdelta_decode_is_scale_times_sign_exactly(dtype: torch.dtype, granularity: str, g: int, shape: tuple[int, ...]) -> None:
    codec = get_codec("bitdelta")
    base, ft = _pair(shape, dtype)
    params = codec.validate_params({"granularity": granularity, **({"group_size": g} if g else {})})
    inp = EncodeInput("w", ft, base)
    enc = codec.encode(inp, params)
    decoded = codec.decode_delta(enc.tensors, enc.params, shape)
    ref = _reference_bitdelta(inp.delta, granularity, g)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, ref, rtol=1e-6, atol=0)  # scales: float64 vs float32 mean
    # Bit-exact against the stored scales: +s where the bit says >= 0, -s elsewhere.
    s_abs = decoded.abs()
    assert torch.equal(decoded, torch.where(inp.delta >= 0, s_abs, -s_abs))
    rebuilt = codec.reconstruct(enc.tensors, enc.params, base, shape, dtype)
    assert rebuilt.dtype == dtype
    assert torch.equal(rebuilt, (base.float() + decoded).to(dtype))
    assert enc.nbytes == codec.expected_nbytes(shape, params)


def test_bitdelta_scales_are_l2_optimal() -> None:
    """For fixed signs, mean|Δ| minimizes ||Δ - s·sign||; nudging the scale only increases the error."""
    codec = get_codec("bitdelta")
    base, ft = _pair((32, 48), torch.float32, seed=3)
    inp = EncodeInput("w", ft, base)
    enc = codec.encode(inp, codec.validate_params({"granularity": "tensor"}))
    s = enc.tensors["scale"].item()
    sign = torch.where(inp.delta >= 0, 1.0, -1.0)
    err = lambda k: float((inp.delta - k * s * sign).pow(2).sum())  # noqa: E731
    assert err(1.0) < err(1.01) and err(1.0) < err(0.99)


def test_bitdelta_zero_delta_maps_to_plus() -> None:
    codec = get_codec("bitdelta")
    base = torch.zeros(2, 9)
    enc = codec.encode(EncodeInput("w", base.clone(), base), codec.validate_params({}))
    assert enc.tensors["sign"].tolist() == [[0xFF, 0x01], [0xFF, 0x01]]
    assert enc.tensors["scale"].tolist() == [0.0]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), g=st.integers(1, 50), seed=st.integers(0, 10_000))
def test_bitdelta_group_sizes_property(rows: int, cols: int, g: int, seed: int) -> None:
    codec = get_codec("bitdelta")
    base, ft = _pair((rows, cols), torch.float32, seed=seed)
    params = codec.validate_params({"granularity": "group", "group_size": g})
    inp = EncodeInput("w", ft, base)
    enc = codec.encode(inp, params)
    assert tuple(enc.tensors["scale"].shape) == (rows, math.ceil(cols / g))
    torch.testing.assert_close(codec.decode_delta(enc.tensors, params, (rows, cols)), _reference_bitdelta(inp.delta, "group", g), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.int64])
@pytest.mark.parametrize("mode", ["auto", "xor", "full"])
@pytest.mark.parametrize("level,shuffle", [(0, False), (3, False), (1, True)])
def test_raw_is_bit_exact(dtype: torch.dtype, mode: str, level: int, shuffle: bool) -> None:
    codec = get_codec("raw")
    if dtype.is_floating_point:
        base, ft = _pair((33, 17), dtype)
        ft.view(-1)[0] = float("nan")
        ft.view(-1)[1] = float("-inf")
        ft.view(-1)[2] = -0.0
    else:
        base = torch.arange(50, dtype=dtype)
        ft = base * 3 - 7
    params = codec.validate_params({"mode": mode, "zstd_level": level, "shuffle": shuffle})
    enc = codec.encode(EncodeInput("w", ft, base), params)
    out = codec.reconstruct(enc.tensors, enc.params, None if enc.params["mode"] == "full" else base, tuple(ft.shape), dtype)
    assert out.dtype == dtype
    assert torch.equal(out.contiguous().view(torch.uint8), ft.contiguous().view(torch.uint8))
    assert enc.params["mode"] == ("full" if mode == "full" else "xor")


def test_raw_full_for_resized_tensor_and_xor_refused() -> None:
    codec = get_codec("raw")
    base, ft = torch.randn(10, 4), torch.randn(12, 4)
    enc = codec.encode(EncodeInput("emb", ft, base), codec.validate_params({}))
    assert enc.params["mode"] == "full"
    assert torch.equal(codec.reconstruct(enc.tensors, enc.params, None, (12, 4), torch.float32), ft)
    with pytest.raises(CodecError, match="same shape and dtype"):
        codec.encode(EncodeInput("emb", ft, base), codec.validate_params({"mode": "xor"}))


def test_raw_xor_compresses_small_changes() -> None:
    codec = get_codec("raw")
    base, ft = _pair((256, 256), torch.bfloat16, std=1e-3)
    enc = codec.encode(EncodeInput("w", ft, base), codec.validate_params({}))
    assert "zstd" in enc.tensors and enc.nbytes < ft.numel() * 2 * 0.8


def test_unchanged_round_trip_and_refusal() -> None:
    codec = get_codec("unchanged")
    base = torch.randn(3, 4)
    enc = codec.encode(EncodeInput("w", base.clone(), base), {})
    assert enc.nbytes == 0
    assert codec.reconstruct({}, {}, base, (3, 4), torch.float32) is base
    with pytest.raises(CodecError):
        codec.encode(EncodeInput("w", base + 1, base), {})


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("bitdelta", {"granularity": "column"}, "granularity"),
        ("bitdelta", {"granularity": "group", "group_size": 0}, "group_size"),
        ("bitdelta", {"scale": 1}, "does not take"),
        ("raw", {"zstd_level": 40}, "zstd_level"),
        ("raw", {"mode": "lz4"}, "mode"),
    ],
)
def test_bad_params_are_typed_errors(name: str, params: dict, match: str) -> None:
    with pytest.raises(InvalidCodecParamsError, match=match):
        get_codec(name).validate_params(params)


def test_unknown_codec_lists_known_ones() -> None:
    with pytest.raises(CodecError, match="bitdelta"):
        get_codec("nope")
    assert {"bitdelta", "raw", "unchanged"} <= set(available_codecs())


def test_get_codec_imports_only_the_named_codec() -> None:
    """Rebuilding a delta loads the codecs it names; a name from a manifest is imported only when it is one of
    the package's codec modules (never a path, a private module or ``base``)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from deltahub.codecs import get_codec\n"
        "from deltahub.errors import CodecError\n"
        "assert get_codec('lowrank-mp').name == 'lowrank-mp'\n"
        "assert 'deltahub.codecs.bitdelta' not in sys.modules and 'deltahub.codecs.deltadq' not in sys.modules\n"
        "for bad in ('../raw', 'base', '_native', 'os', 'deltadq.x', '', None, ['raw']):\n"
        "    try:\n"
        "        get_codec(bad)\n"
        "    except CodecError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "assert 'os' not in [m.rsplit('.', 1)[-1] for m in sys.modules if m.startswith('deltahub.codecs.')]\n"
        "assert get_codec('deltadq').name == 'deltadq'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nan_delta_is_refused_by_bitdelta() -> None:
    codec = get_codec("bitdelta")
    base = torch.zeros(2, 2)
    ft = torch.tensor([[0.0, float("nan")], [1.0, 2.0]])
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(EncodeInput("w", ft, base), codec.validate_params({}))


@pytest.mark.parametrize("granularity,g", [("tensor", 0), ("row", 0), ("group", 5)])
def test_bitdelta_error_stats_match_direct_measurement(granularity: str, g: int) -> None:
    codec = get_codec("bitdelta")
    base, ft = _pair((12, 23), torch.float32, seed=7)
    params = codec.validate_params({"granularity": granularity, **({"group_size": g} if g else {})})
    inp = EncodeInput("w", ft, base)
    enc = codec.encode(inp, params)
    err = (codec.decode_delta(enc.tensors, params, (12, 23)) - inp.delta).double().norm().item()
    assert enc.stats["delta_l2"] == pytest.approx(inp.delta.double().norm().item(), rel=1e-12)  # summed in float64
    assert enc.stats["error_l2"] == pytest.approx(err, rel=1e-4)
    # sum((approx - delta) * delta): what lets the allocation score BitDelta without decoding it
    approx = codec.decode_delta(enc.tensors, params, (12, 23)).double()
    dot = ((approx - inp.delta.double()) * inp.delta.double()).sum().item()
    assert enc.stats["error_dot"] == pytest.approx(dot, rel=1e-5)
