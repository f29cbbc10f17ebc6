"""rowsparse: which rows are kept, error bounds of the row quantizer, exact sizes, untrusted-input checks,
and resized vocabularies through compress -> apply."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_pair
from deltahub.codecs import EncodeInput, get_codec
from deltahub.codecs._bits import pack_bits
from deltahub.codecs.rowsparse import BITS, kept_rows
from deltahub.compression import compress
from deltahub.delta import Delta, apply_delta
from deltahub.errors import CodecError, InvalidCodecParamsError, ShapeMismatchError
from deltahub.policy import Policy, Rule

RS = get_codec("rowsparse")
EMB = "model.embed_tokens.weight"


def _pair(rows: int = 40, cols: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and fine-tune whose delta rows have very different norms (like a vocabulary matrix)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    row_scale = torch.rand(rows, 1, generator=g) ** 3 * 0.1
    return base, base + torch.randn(rows, cols, generator=g) * row_scale


def _encode(base: torch.Tensor, ft: torch.Tensor, **params: Any) -> tuple[Any, torch.Tensor]:
    enc = RS.encode(EncodeInput("w", ft, base), RS.validate_params(params))
    return enc, RS.decode_delta(enc.tensors, enc.params, tuple(ft.shape))


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {r: (t.dtype, tuple(t.shape)) for r, t in tensors.items()}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 7])
def test_kept_rows_are_the_largest_and_dropped_rows_are_zero(bits: int, group_size: int | None) -> None:
    base, ft = _pair()
    delta = ft - base
    enc, dec = _encode(base, ft, density=0.3, bits=bits, group_size=group_size)
    k = kept_rows(0.3, 40)
    order = torch.sort(-delta.norm(dim=1), stable=True).indices
    kept = torch.zeros(40, dtype=torch.bool)
    kept[order[:k]] = True
    assert torch.equal(dec[~kept], torch.zeros(40 - k, 24))
    assert bool((dec[kept] != 0).any(dim=1).all())
    # Each kept element is the nearest of the levels s * (2c - top): within s (half a step) of the
    # delta unless clipped, and a clipped one is the extreme level with the delta's sign.
    top = (1 << bits) - 1
    scale = enc.tensors["scale"].reshape(k, -1)
    s = scale.repeat_interleave(7, dim=1)[:, :24] if group_size else scale.expand(k, 24)
    d, e = delta[kept], dec[kept]
    inside = d.abs() <= s * top
    assert bool(((e - d).abs()[inside] <= s[inside] * (1 + 1e-5) + 1e-12).all())
    assert torch.equal(e[~inside].abs(), (s * top)[~inside]) and bool((e[~inside] * d[~inside] > 0).all())
    assert enc.stats["error_l2"] == pytest.approx(float((dec - delta).norm()), rel=1e-4)


def test_one_bit_is_bitdelta_row_wise() -> None:
    """bits=1, density 1: sign x the least-squares scale mean |delta| of each row, i.e. BitDelta per row."""
    base, ft = _pair()
    _, dec = _encode(base, ft, density=1.0, bits=1)
    bd = get_codec("bitdelta")
    enc = bd.encode(EncodeInput("w", ft, base), bd.validate_params({"granularity": "row"}))
    torch.testing.assert_close(dec, bd.decode_delta(enc.tensors, enc.params, (40, 24)), rtol=1e-5, atol=0)


def test_mse_scales_never_lose_to_absmax_and_eight_bits_is_near_exact() -> None:
    base, ft = _pair()
    delta = ft - base
    for bits in (2, 3, 4, 8):
        _, mse = _encode(base, ft, bits=bits)
        _, amax = _encode(base, ft, bits=bits, scale_fit="absmax")
        # the MSE fit starts from the absmax scale and only accepts improvements, row by row
        assert bool(((mse - delta) ** 2).sum(1).le(((amax - delta) ** 2).sum(1) * (1 + 1e-5) + 1e-20).all())
    # absmax, 8 bits: no clipping, so every element is within half a step = max|row| / 255
    bound = delta.abs().amax(dim=1, keepdim=True) / 255
    assert bool(((amax - delta).abs() <= bound * (1 + 1e-5)).all())
    assert float((amax - delta).norm() / delta.norm()) < 0.01


@pytest.mark.parametrize("params", [{"density": 0.5, "bits": 2, "mask_encoding": "bitmap"},
                                    {"density": 0.1, "bits": 3, "group_size": 5, "mask_encoding": "bitmap"}])
def test_expected_nbytes_is_exact(params: dict[str, Any]) -> None:
    base, ft = _pair(rows=200, cols=20)
    enc, _ = _encode(base, ft, **params)
    assert RS.expected_nbytes((200, 20), RS.validate_params(params)) == enc.nbytes == \
        RS.expected_nbytes((200, 20), enc.params)


def test_mask_encoding_auto_keeps_the_smaller() -> None:
    base, ft = _pair(rows=4000, cols=8)
    sparse, _ = _encode(base, ft, density=0.005, bits=1)
    dense, _ = _encode(base, ft, density=0.5, bits=1)
    assert sparse.params["mask_encoding"] == "indices" and sparse.tensors["mask"].numel() < 500
    assert dense.params["mask_encoding"] == "bitmap" and tuple(dense.tensors["mask"].shape) == (1, 500)


def test_zstd_codes_decode_identically() -> None:
    base, ft = _pair(rows=300, cols=64)
    plain, dec = _encode(base, ft, bits=4)
    packed, dec_z = _encode(base, ft, bits=4, entropy="zstd")
    assert torch.equal(dec, dec_z) and packed.tensors["codes"].numel() <= plain.tensors["codes"].numel()


def test_params_are_validated() -> None:
    assert RS.validate_params({"preset": "64x"}) | {"density": 0.234375, "bits": 1} == RS.validate_params({"preset": "64x"})
    assert RS.validate_params({"preset": "64x", "bits": 2})["bits"] == 2
    for bad in ({"bits": 5}, {"bits": True}, {"density": 0}, {"density": 1.5}, {"group_size": 0},
                {"preset": "3x"}, {"mask_encoding": "rle"}, {"entropy": "gzip"}, {"scale_fit": "max"}, {"colour": 1}):
        with pytest.raises(InvalidCodecParamsError):
            RS.validate_params(bad)


# --------------------------------------------------------------------------------------------- untrusted input


def _stored_case() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    base, ft = _pair()
    enc, _ = _encode(base, ft, density=0.5, bits=2, mask_encoding="bitmap")
    return dict(enc.params), dict(enc.tensors)


@pytest.mark.parametrize("change", [
    {"bits": 5}, {"bits": 2.0}, {"density": 2**70}, {"density": float("nan")}, {"base_rows": 41}, {"base_rows": 0},
    {"base_rows": 2**63}, {"group_size": 0}, {"group_size": "8"}, {"mask_encoding": "auto"}, {"entropy": None},
    {"extra": 1}, {"group_size": ...},
])
def test_check_decode_rejects_params(change: dict[str, Any]) -> None:
    params, tensors = _stored_case()
    params.update(change)
    if change.get("group_size", 0) is ...:
        del params["group_size"]
    with pytest.raises(InvalidCodecParamsError):
        RS.check_decode(params, _specs(tensors), (40, 24), torch.float32)


@pytest.mark.parametrize("role,spec", [
    ("scale", (torch.float16, (20,))), ("scale", (torch.float32, (21,))), ("codes", (torch.uint8, (241,))),
    ("mask", (torch.uint8, (1, 6))), ("mask", (torch.int8, (1, 5))), ("new_rows", (torch.float32, (2, 24))),
])
def test_check_decode_rejects_stored_tensors(role: str, spec: tuple[torch.dtype, tuple[int, ...]]) -> None:
    params, tensors = _stored_case()
    specs = _specs(tensors)
    specs[role] = spec
    with pytest.raises(CodecError):
        RS.check_decode(params, specs, (40, 24), torch.float32)


def test_decode_rejects_a_mask_of_the_wrong_popcount_and_out_of_range_indices() -> None:
    params, tensors = _stored_case()
    RS.check_decode(params, _specs(tensors), (40, 24), torch.float32)
    wrong = torch.ones(1, 40, dtype=torch.bool)
    with pytest.raises(CodecError, match="keeps 40 rows"):
        RS.decode_delta({**tensors, "mask": pack_bits(wrong)}, params, (40, 24))
    from deltahub.codecs._masks import encode_mask

    many = torch.zeros(1, 80, dtype=torch.bool)
    many[0, 60:80] = True  # 20 rows as the density wants, but indices >= 40
    _, idx = encode_mask(many, "indices")
    with pytest.raises(CodecError, match="outside"):
        RS.decode_delta({**tensors, "mask": idx}, {**params, "mask_encoding": "indices"}, (40, 24))


def test_resized_entry_needs_two_dims_and_exact_new_rows() -> None:
    base, ft = _pair()
    ft = torch.cat([ft, torch.randn(3, 24)])
    enc = RS.encode(EncodeInput("w", ft, base), RS.validate_params({"bits": 2}))
    assert enc.params["base_rows"] == 40 and tuple(enc.tensors["new_rows"].shape) == (3, 24)
    RS.check_decode(enc.params, _specs(enc.tensors), (43, 24), torch.float32)
    with pytest.raises(InvalidCodecParamsError):
        RS.check_decode(enc.params, _specs(enc.tensors), (43, 1, 24), torch.float32)
    with pytest.raises(CodecError):  # new_rows must be in the entry's dtype
        RS.check_decode(enc.params, _specs(enc.tensors), (43, 24), torch.bfloat16)
    with pytest.raises(CodecError, match="no delta"):
        RS.decode_delta(enc.tensors, enc.params, (43, 24))
    out = RS.reconstruct(enc.tensors, enc.params, base, (43, 24), torch.float32)
    assert torch.equal(out[40:], ft[40:])
    with pytest.raises(CodecError, match="base shape"):
        RS.reconstruct(enc.tensors, enc.params, torch.cat([base, base[:3]]), (43, 24), torch.float32)


# --------------------------------------------------------------------------------------------- compress -> apply


@pytest.mark.parametrize("rule", ["rowsparse:density=0.5,bits=8", "bitdelta:granularity=row"])
def test_resized_vocabulary_round_trip(tmp_path: Path, rule: str) -> None:
    """Base rows delta-coded (within the quantizer's bound), added rows bit-exact; the apply path
    accepts the base's fewer rows for this entry only."""
    base, _ = make_tiny_pair(tmp_path / "a", vocab=128, dtype=torch.bfloat16)
    _, ft = make_tiny_pair(tmp_path / "b", vocab=136, dtype=torch.bfloat16)
    policy = Policy(codec="bitdelta", rules=[Rule.parse(f"{EMB}={rule}")])
    m = compress(base, ft, tmp_path / "delta", policy=policy, progress=False)
    e = m.tensors[EMB]
    assert e.codec == "rowsparse" and e.shape == [136, 32] and e.params["base_rows"] == 128
    assert e.params["bits"] == (8 if rule.startswith("rowsparse") else RS.validate_params({})["bits"])
    out = load_file(apply_delta(tmp_path / "delta", base, tmp_path / "out", progress=False) / "model.safetensors")[EMB]
    ft_w, base_w = load_file(ft / "model.safetensors")[EMB], load_file(base / "model.safetensors")[EMB]
    assert out.dtype == torch.bfloat16 and torch.equal(out[128:], ft_w[128:])
    manifest = json.loads((tmp_path / "delta" / "delta_config.json").read_text())
    assert manifest["tensors"][EMB]["stored"]["new_rows"]
    if rule.startswith("rowsparse"):
        delta = ft_w[:128].float() - base_w.float()
        d_hat = out[:128].float() - base_w.float()
        # 8 bits: half a step of an MSE-fitted scale plus one bfloat16 rounding of the result
        kept = d_hat.ne(0).any(dim=1) | delta.eq(0).all(dim=1)
        assert int(kept.sum()) == 64
        err = (d_hat - delta)[kept].abs()
        assert bool((err <= delta[kept].abs().amax(dim=1, keepdim=True) / 255 * 2 + ft_w[:128][kept].float().abs() / 128).all())


def test_resized_base_must_have_the_recorded_rows(tmp_path: Path) -> None:
    base, _ = make_tiny_pair(tmp_path / "a", vocab=128)
    _, ft = make_tiny_pair(tmp_path / "b", vocab=136)
    other, _ = make_tiny_pair(tmp_path / "c", vocab=120)
    policy = Policy(codec="bitdelta", rules=[Rule.parse(f"{EMB}=rowsparse:bits=1")])
    compress(base, ft, tmp_path / "delta", policy=policy, progress=False)
    with pytest.raises(ShapeMismatchError, match=r"\[128, 32\]"):
        apply_delta(tmp_path / "delta", other, tmp_path / "out", progress=False, check_base=False)
    assert not (tmp_path / "out").exists()
    assert Delta(tmp_path / "delta").manifest.tensors[EMB].codec == "rowsparse"


def test_raw_keeps_a_resized_vocabulary_exact_and_auto_codes_its_base_rows(tmp_path: Path) -> None:
    """``raw`` keeps a grown vocabulary exact; the default (whole-model auto) allocates it among row-sparse
    settings: base rows delta-coded, added rows bit-exact."""
    base, _ = make_tiny_pair(tmp_path / "a", vocab=4096)
    _, ft = make_tiny_pair(tmp_path / "b", vocab=4104)
    m = compress(base, ft, tmp_path / "delta0", policy=Policy(codec="bitdelta", rules=[Rule.parse(f"{EMB}=raw")]), progress=False)
    assert m.tensors[EMB].codec == "raw" and m.tensors[EMB].params["mode"] == "full"
    m = compress(base, ft, tmp_path / "delta1", target_ratio=4, progress=False)
    e = m.tensors[EMB]
    assert e.codec in ("rowsparse", "raw") and e.stats["auto_choice"].split(":")[0] == e.codec
    assert e.codec == "rowsparse" and e.params["base_rows"] == 4096  # exact would not fit 4x
    out = load_file(apply_delta(tmp_path / "delta1", base, tmp_path / "out", progress=False) / "model.safetensors")[EMB]
    assert torch.equal(out[4096:], load_file(ft / "model.safetensors")[EMB][4096:])
    assert sum(p.stat().st_size for p in (tmp_path / "delta1").iterdir()) <= 2 * sum(
        t.numel() for t in load_file(ft / "model.safetensors").values()) / 4


def test_presets_fit_their_ratio_at_576_columns() -> None:
    from deltahub.codecs.rowsparse import PRESETS, max_nbytes

    shape = (49152, 576)
    for name, preset in PRESETS.items():
        nbytes = max_nbytes(shape, {**preset, "group_size": None})
        assert 2 * 49152 * 576 / nbytes == pytest.approx(float(name.rstrip("x")), rel=0.01), name


@pytest.mark.parametrize("shape", [(40, 33), (7, 1), (100, 256)])
def test_one_bit_row_fast_path_is_the_row_quantizer_optimum(shape: tuple[int, int]) -> None:
    """1-bit rows with a scale per row (every preset) take a closed form: the sign codes and mean |delta| that the
    general quantizer's refits reach, and the error it would measure."""
    from deltahub.codecs._quant import load_stream
    from deltahub.codecs.rowsparse import decode_rows, quantize_rows

    g = torch.Generator().manual_seed(shape[0])
    base = torch.randn(shape, generator=g)
    delta = torch.randn(shape, generator=g) * 1e-2
    delta[0] = 0.0  # a zero row: scale 0, codes 1
    c = get_codec("rowsparse")
    p = c.validate_params({"density": 1.0, "bits": 1})
    enc = c.encode(EncodeInput("w", base + delta, base), p)
    rows, cols = shape
    d = (base + delta) - base
    codes = load_stream(enc.tensors["codes"], rows * cols, 1).reshape(rows, cols)
    ref_codes, ref_scale = quantize_rows(d, 1, "mse")
    assert torch.equal(codes.to(torch.int64), ref_codes)
    assert torch.allclose(enc.tensors["scale"], ref_scale, rtol=1e-6, atol=0)
    err = float(((decode_rows(codes, enc.tensors["scale"], rows, cols, 1, None) - d) ** 2).sum(dtype=torch.float64))
    assert enc.stats["error_l2"] == pytest.approx(math.sqrt(err), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,cols", [(1, None, 24), (1, None, 21), (2, None, 24), (3, 5, 23), (4, 8, 24), (8, None, 9)])
def test_in_place_rebuild_has_the_bits_of_reconstruct(dtype: torch.dtype, bits: int, group_size: int | None, cols: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """reconstruct_ (into the base buffer, a block of rows at a time, or BitDelta's sign-add for 1-bit rows) gives
    the bits of reconstruct, including dropped rows (``-0.0 + 0.0`` is ``+0.0``) and blocks that start inside a
    kept row's packed code word."""
    import deltahub.codecs.rowsparse as rs

    monkeypatch.setattr(rs, "REBUILD_BLOCK", 3 * cols)  # blocks of 8 rows: several, unaligned with the codes
    base, ft = _pair(rows=67, cols=cols, seed=3)
    base, ft = base.to(dtype), ft.to(dtype)
    enc = RS.encode(EncodeInput("w", ft, base), RS.validate_params({"density": 0.4, "bits": bits, "group_size": group_size}))
    base[:, 0] = -0.0  # in kept and dropped rows
    base[6, 2] = float("nan")
    want = RS.reconstruct(enc.tensors, enc.params, base.clone(), (67, cols), dtype)
    for buf in (base.clone(), base.to(torch.float32)):
        got = RS.reconstruct_(enc.tensors, enc.params, buf, (67, cols), dtype)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8) if dtype != torch.float32 else got.view(torch.int32),
                                                  want.view(torch.uint8) if dtype != torch.float32 else want.view(torch.int32))


@pytest.mark.parametrize("params", [{"density": 0.3}, {"density": 1.0}, {"density": 0.5, "bits": 2},
                                    {"density": 0.5, "group_size": 16}])
def test_encode_from_delta_rows_has_the_bytes_of_the_whole_delta(params: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Given the delta a block of rows at a time (compress streams a large one), rowsparse stores the same bytes
    and stats as from the whole delta; settings that need it whole get it assembled from the rows."""
    import deltahub.codecs.base as cbase
    import deltahub.codecs.rowsparse as rs

    monkeypatch.setattr(cbase, "ROW_BLOCK", 7 * 64)  # blocks of 7 rows: the last one short
    g = torch.Generator().manual_seed(2)
    base = torch.randn(53, 64, generator=g).to(torch.bfloat16)
    ft = (base.float() + torch.randn(53, 64, generator=g) * torch.rand(53, 1, generator=g) * 1e-2).to(torch.bfloat16)
    c = get_codec("rowsparse")
    p = c.validate_params(params)
    want = c.encode(EncodeInput("w", ft, base), p)
    calls: list[tuple[int, int]] = []
    delta = ft.float() - base.float()

    def rows_of(r0: int, r1: int) -> torch.Tensor:
        calls.append((r0, r1))
        return delta[r0:r1].clone()

    meta = (torch.empty(ft.shape, dtype=ft.dtype, device="meta"), torch.empty(base.shape, dtype=base.dtype, device="meta"))
    got = c.encode(EncodeInput("w", *meta, _delta_rows=rows_of), p)
    assert got.params == want.params and got.tensors.keys() == want.tensors.keys()
    for role, t in want.tensors.items():
        assert torch.equal(got.tensors[role].view(torch.uint8), t.view(torch.uint8)), role
    assert got.stats == pytest.approx(want.stats, rel=1e-9)
    assert max(r1 - r0 for r0, r1 in calls) <= 7  # never more than a block of rows at a time
    assert rs.streams_rows(p, (53, 64)) == (p["bits"] == 1 and p["group_size"] is None)
