"""The low-rank codec family (lowrank, lowrank-mp, lowrank-residual): first-principles error bounds, untrusted
params and stored shapes, and the allocation / auto picking them for a truly low-rank delta."""

from __future__ import annotations

import math

import pytest
import torch

from deltahub.allocation import allocate
from deltahub.autoselect import choose, default_candidates, model_candidates
from deltahub.codecs import EncodeInput, get_codec
from deltahub.codecs._quant import packed_nbytes
from deltahub.errors import CodecError, InvalidCodecParamsError

SHAPE = (48, 40)


def _pair(rank: int, noise: float, shape: tuple[int, int] = SHAPE, seed: int = 0) -> EncodeInput:
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    d = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / rank + noise * torch.randn(rows, cols, generator=g)
    base = torch.randn(rows, cols, generator=g)
    return EncodeInput("model.layers.0.mlp.up_proj.weight", base + d, base)


def _roundtrip(name: str, params: dict, inp: EncodeInput) -> tuple[torch.Tensor, dict, object]:
    codec = get_codec(name)
    enc = codec.encode(inp, codec.validate_params(dict(params)))
    shape = tuple(inp.finetuned.shape)
    codec.check_decode(enc.params, {r: (t.dtype, tuple(t.shape)) for r, t in enc.tensors.items()}, shape, torch.float32)
    assert codec.expected_nbytes(shape, codec.validate_params(dict(params))) == enc.nbytes
    return codec.decode_delta(enc.tensors, enc.params, shape), enc.params, enc


@pytest.mark.parametrize("rank", [1, 5, 40])
def test_lowrank_error_is_the_discarded_energy(rank: int) -> None:
    inp = _pair(8, 0.05)
    approx, params, enc = _roundtrip("lowrank", {"rank": rank}, inp)
    assert params["rank"] == rank and enc.nbytes == rank * (48 + 40) * 2 + 4 * rank
    s = torch.linalg.svdvals(inp.delta.double())
    tail = float(s[rank:].pow(2).sum().sqrt())
    err = float((approx.double() - inp.delta.double()).norm())
    # Eckart-Young optimum plus the fp16 rounding of the factors (relative 2^-11 per entry).
    assert err <= tail + 4 * 2.0**-11 * float(s.norm()) + 1e-6
    assert err >= tail - 1e-4


def test_lowrank_of_a_rank_r_delta_is_near_exact_and_clips_rank() -> None:
    inp = _pair(3, 0.0)
    approx, params, _ = _roundtrip("lowrank", {"rank": 500, "dtype": "bfloat16"}, inp)
    assert params["rank"] == 40  # min(rank, rows, cols) is recorded
    rel = float((approx - inp.delta).norm() / inp.delta.norm())
    assert rel < 2 * 2.0**-8  # bfloat16 factors: 8 significant bits


def test_mp_error_bounded_by_truncation_plus_quantization_step() -> None:
    inp = _pair(6, 0.02)
    bands = [[2, 8], [4, 4], [6, 2]]
    approx, params, enc = _roundtrip("lowrank-mp", {"bands": bands, "qgroup": 16}, inp)
    assert params == {"bands": bands, "qgroup": 16}
    s = torch.linalg.svdvals(inp.delta.double())
    err = float((approx.double() - inp.delta.double()).norm())
    # ||D - Uq S Vq|| <= tail + sum_k s_k (||u_k - uq_k|| + ||v_k - vq_k|| + product): each quantized unit vector
    # is off by at most half a step per element, step <= 2 * 1 / (2^bits - 1) (range of a unit vector's entries).
    bound = float(s[12:].pow(2).sum().sqrt())
    for (n, k), start in zip(bands, (0, 2, 6)):
        per = 0.5 * 2 / (2**k - 1)
        eu, ev = per * math.sqrt(48), per * math.sqrt(40)
        bound += float(s[start:start + n].sum()) * (eu + ev + eu * ev)
    assert err <= bound
    # mixed precision keeps all 6 directions where plain low rank of about the same bytes keeps 5
    lr, _, lr_enc = _roundtrip("lowrank", {"rank": 5}, inp)
    assert lr_enc.nbytes >= enc.nbytes and err < float((lr - inp.delta).norm())


def test_mp_sizes_and_layout() -> None:
    codec = get_codec("lowrank-mp")
    inp = _pair(4, 0.01)
    _, params, enc = _roundtrip("lowrank-mp", {"preset": "r4"}, inp)
    assert params["bands"] == [[1, 8], [4, 3], [18, 2]]
    runs = [(48, 8), (40, 8), (4 * 48, 3), (4 * 40, 3), (18 * 48, 2), (18 * 40, 2)]
    assert enc.tensors["codes"].numel() == sum(packed_nbytes(n, k) for n, k in runs)
    assert enc.tensors["qmin"].numel() == sum(math.ceil(n / 128) for n, _ in runs)
    assert enc.tensors["norm"].numel() == 6 and enc.tensors["s"].numel() == 23
    # bands longer than the matrix shrink from the end
    small = _pair(2, 0.0, shape=(6, 5))
    _, p2, _ = _roundtrip("lowrank-mp", {"bands": [[3, 8], [4, 2]]}, small)
    assert p2["bands"] == [[3, 8], [2, 2]]
    with pytest.raises(InvalidCodecParamsError, match="unknown preset"):
        codec.validate_params({"preset": "r5"})


def test_residual_beats_both_parts_and_error_stat_is_exact() -> None:
    inp = _pair(4, 0.3)
    approx, params, enc = _roundtrip("lowrank-residual", {"rank": 4}, inp)
    err = float((approx.double() - inp.delta.double()).norm())
    assert enc.stats["error_l2"] == pytest.approx(err, rel=1e-4)
    lr, _, _ = _roundtrip("lowrank", {"rank": 4}, inp)
    bd, _, _ = _roundtrip("bitdelta", {"granularity": "row"}, inp)
    assert err < float((lr - inp.delta).norm()) and err < float((bd - inp.delta).norm())


@pytest.mark.parametrize("name, params, exc, match", [
    ("lowrank", {"rank": 0}, InvalidCodecParamsError, "rank"),
    ("lowrank", {"rank": 2.0}, InvalidCodecParamsError, "rank"),
    ("lowrank", {"dtype": "float32"}, InvalidCodecParamsError, "dtype"),
    ("lowrank-residual", {"rank": True}, InvalidCodecParamsError, "rank"),
    ("lowrank-mp", {"bands": [[2, 9]]}, InvalidCodecParamsError, "bits"),
    ("lowrank-mp", {"bands": [[0, 2]]}, InvalidCodecParamsError, "count"),
    ("lowrank-mp", {"bands": [[2, 2, 2]]}, InvalidCodecParamsError, "pair"),
    ("lowrank-mp", {"bands": []}, InvalidCodecParamsError, "non-empty"),
    ("lowrank-mp", {"preset": None}, InvalidCodecParamsError, "preset or bands"),
    ("lowrank-mp", {"qgroup": 0}, InvalidCodecParamsError, "qgroup"),
])
def test_bad_writer_params(name: str, params: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        get_codec(name).validate_params(params)


def _specs(enc) -> dict:
    return {r: (t.dtype, tuple(t.shape)) for r, t in enc.tensors.items()}


@pytest.mark.parametrize("name, params", [("lowrank", {"rank": 3}), ("lowrank-residual", {"rank": 3}),
                                          ("lowrank-mp", {"bands": [[1, 8], [2, 2]], "qgroup": 16})])
def test_tampered_entries_are_refused(name: str, params: dict) -> None:
    codec = get_codec(name)
    enc = codec.encode(_pair(3, 0.01), codec.validate_params(params))
    specs = _specs(enc)
    for bad in ({**enc.params, "rank": 41}, {**enc.params, "rank": -1}, {**enc.params, "bands": [[41, 2]]},
                {**enc.params, "bands": [[1, 0]]}, {**enc.params, "qgroup": "16"}, {**enc.params, "dtype": "float32"},
                {**enc.params, "extra": 1} if name == "lowrank-mp" else {**enc.params, "rank": "3"}):
        if bad == enc.params:
            continue
        with pytest.raises(InvalidCodecParamsError):
            codec.check_decode(bad, specs, SHAPE, torch.float32)
    role = "s"
    dtype, shape = specs[role]
    with pytest.raises(CodecError, match="stored 's'"):
        codec.check_decode(enc.params, {**specs, role: (dtype, (shape[0] + 1,))}, SHAPE, torch.float32)
    with pytest.raises(CodecError, match="stored roles"):
        codec.check_decode(enc.params, {k: v for k, v in specs.items() if k != role}, SHAPE, torch.float32)
    with pytest.raises(CodecError):  # stored tensors that do not fit, passed straight to the decoder
        codec.decode_delta({**enc.tensors, "s": torch.zeros(7)}, enc.params, SHAPE)


def test_nan_delta_is_refused() -> None:
    inp = _pair(2, 0.0)
    inp.finetuned[0, 0] = float("nan")
    for name in ("lowrank", "lowrank-mp", "lowrank-residual"):
        with pytest.raises(CodecError, match="NaN"):
            get_codec(name).encode(EncodeInput(inp.name, inp.finetuned, inp.base), get_codec(name).validate_params({}))


@pytest.mark.slow  # ~5 s alone, SVDs of a 1024x512 matrix
def test_auto_and_allocation_pick_lowrank_for_a_low_rank_delta() -> None:
    import deltahub.compression as comp

    inp = _pair(2, 0.0, shape=(1024, 512))
    assert any(c.startswith("lowrank") for c, _ in model_candidates(inp.name, (1024, 512)))
    assert not any(c.startswith("lowrank") for c, _ in model_candidates("model.embed_tokens.weight", (1024, 512)))
    name, _, _, _ = choose(inp, default_candidates(), target_ratio=50)
    assert name.startswith("lowrank")

    class Job:  # the allocation's view of a compress job
        auto_metric = "aligned"
        codecs = comp._Codecs()
        picks = None  # row samples as fresh arrays

        @staticmethod
        def candidates_for(n: str, shape: tuple) -> list:
            return model_candidates(n, shape)

    curve = comp._curve(Job(), EncodeInput(inp.name, inp.finetuned, inp.base), (1024, 512), torch.float32)
    noisy = comp._curve(Job(), _pair(2, 1.0, shape=(1024, 512), seed=1), (1024, 512), torch.float32)
    assert any(p.codec == "lowrank" for p in curve.points)
    assert not any(p.codec.startswith("lowrank") for p in noisy.points)  # flat spectrum: gated out
    choice = allocate([curve], 1024 * 512 * 2 / 50)
    assert choice[inp.name].codec.startswith("lowrank")
