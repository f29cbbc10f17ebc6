"""autoselect.choose: lowest error within the byte budget, report, errors."""

from __future__ import annotations

import pytest
import torch

from deltahub.autoselect import choose, default_candidates, relative_error
from deltahub.codecs import EncodeInput, get_codec
from deltahub.errors import CodecError, InvalidCodecParamsError


def gaussian_input(rows: int = 64, cols: int = 128, seed: int = 0, calib: bool = False) -> EncodeInput:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    x = torch.randn(48, cols, generator=g) if calib else None
    return EncodeInput("model.layers.3.self_attn.q_proj.weight", base + torch.randn(rows, cols, generator=g) * 1e-3,
                       base, calibration=x)


CANDIDATES = [("bitdelta", {"granularity": "tensor"}), ("deltadq", {"preset": "16x"}),
              ("topk-ternary", {"density": 0.1}), ("topk-ternary", {"density": 0.01})]


def test_choose_lowest_error_within_budget() -> None:
    inp = gaussian_input()
    name, params, enc, report = choose(inp, CANDIDATES, target_ratio=15, metric="rel")  # 1 bit/weight + scale fits
    budget = inp.delta.numel() * 2 / 15
    assert report["budget_bytes"] == int(budget) and report["metric"] == "rel_l2"
    scored = [r for r in report["candidates"] if "error" in r]
    assert all(r["bytes"] <= budget for r in scored)
    best = min(scored, key=lambda r: r["error"])
    assert report["candidates"][report["chosen"]] is best
    assert (name, params["granularity"]) == ("bitdelta", "tensor")  # 1-bit sign wins on L2 for gaussian deltas
    assert enc.nbytes <= budget
    # the returned encoding decodes to the error reported
    approx = get_codec(name).decode_delta(enc.tensors, enc.params, tuple(inp.delta.shape))
    assert relative_error(inp.delta, approx, None)[1] == pytest.approx(best["error"])


def test_choose_tight_budget_skips_without_encoding() -> None:
    inp = gaussian_input()
    name, _, enc, report = choose(inp, CANDIDATES, target_ratio=100)
    bit = report["candidates"][0]
    assert bit["skipped"] == "over budget" and "error" not in bit  # predicted size, never encoded
    assert name == "topk-ternary" and enc.nbytes <= inp.delta.numel() * 2 / 100
    _, _, enc2, _ = choose(inp, CANDIDATES, max_bytes=enc.nbytes)
    assert enc2.nbytes <= enc.nbytes


def test_choose_output_error_with_calibration() -> None:
    inp = gaussian_input(calib=True)
    _, _, _, report = choose(inp, CANDIDATES, metric="rel")
    assert report["metric"] == "rel_output" and report["budget_bytes"] is None
    x = inp.calibration
    for row in report["candidates"]:
        codec = get_codec(row["codec"])
        enc = codec.encode(inp, codec.validate_params(row["params"]))
        approx = codec.decode_delta(enc.tensors, enc.params, tuple(inp.delta.shape))
        e = approx - inp.delta
        assert row["error"] == pytest.approx(float((x @ e.T).norm() / (x @ inp.delta.T).norm()), rel=1e-5)
    # calibration passed as an argument is used too (and given to the codecs)
    plain = gaussian_input()
    _, _, _, rep2 = choose(plain, CANDIDATES[:2], calibration=x)
    assert rep2["metric"] == "aligned_output"


def test_choose_ties_prefer_fewer_bytes() -> None:
    z = torch.zeros(32, 64)
    inp = EncodeInput("w", z.clone(), z)
    name, params, enc, report = choose(inp, CANDIDATES)
    assert all(r["error"] == 0.0 for r in report["candidates"])
    assert enc.nbytes == min(r["bytes"] for r in report["candidates"])


def test_choose_errors() -> None:
    inp = gaussian_input()
    with pytest.raises(CodecError, match="no candidate fits"):
        choose(inp, CANDIDATES, max_bytes=10)
    with pytest.raises(InvalidCodecParamsError, match="target_ratio"):
        choose(inp, CANDIDATES, target_ratio=0)
    with pytest.raises(InvalidCodecParamsError, match="max_bytes"):
        choose(inp, CANDIDATES, max_bytes=-1)
    with pytest.raises(InvalidCodecParamsError, match="p=2"):
        choose(inp, [("dare", {"p": 2})])
    with pytest.raises(CodecError, match="unknown codec"):
        choose(inp, [("nope", {})])
    # a candidate that cannot code this tensor is skipped with its reason, not fatal
    odd = gaussian_input(8, 60)
    name, _, _, report = choose(odd, [("deltadq", {"preset": "16x", "group_size": 16}), ("bitdelta", {})])
    assert name == "bitdelta" and "does not divide" in report["candidates"][0]["skipped"]


def test_default_candidates_are_valid() -> None:
    cands = default_candidates()
    names = {n for n, _ in cands}
    assert {"bitdelta", "deltadq", "dare", "topk-ternary"} <= names
    for name, params in cands:
        get_codec(name).validate_params(dict(params))
    inp = gaussian_input(16, 64)
    name, _, enc, report = choose(inp, cands, target_ratio=32)
    assert enc.nbytes <= inp.delta.numel() * 2 / 32 and len(report["candidates"]) == len(cands)


def test_aligned_metric_weights_lost_delta_fully_and_orthogonal_noise_little() -> None:
    from deltahub.autoselect import NOISE_WEIGHT

    g = torch.Generator().manual_seed(1)
    d = torch.randn(32, 64, generator=g)
    n = torch.randn(32, 64, generator=g)
    n -= (n * d).sum() / (d * d).sum() * d  # orthogonal to d
    assert relative_error(d, 0.5 * d, None, "aligned") == ("aligned_l2", pytest.approx(0.5))
    name, err = relative_error(d, d + n, None, "aligned")
    assert err == pytest.approx((NOISE_WEIGHT * float((n * n).sum() / (d * d).sum())) ** 0.5, rel=1e-4)
    assert relative_error(d, d + n, None, "rel")[1] == pytest.approx(float(n.norm() / d.norm()), rel=1e-5)
    # with calibration the split happens on the outputs X D^T
    x = torch.randn(16, 64, generator=g)
    assert relative_error(d, 0.25 * d, x, "aligned") == ("aligned_output", pytest.approx(0.75))
    with pytest.raises(InvalidCodecParamsError, match="metric"):
        relative_error(d, d, None, "mse")


def test_aligned_metric_prefers_unbiased_dropout_over_shrinking_topk() -> None:
    inp = gaussian_input()
    cands = [("deltadq", {"preset": "16x"}), ("topk-ternary", {"density": 0.05})]
    name_rel, *_ = choose(inp, cands, metric="rel")
    name_al, _, _, report = choose(inp, cands)
    assert report["metric"] == "aligned_l2"
    assert (name_rel, name_al) == ("topk-ternary", "deltadq")
    with pytest.raises(InvalidCodecParamsError, match="metric"):
        choose(inp, cands, metric="mse")
