"""The model-level byte allocator (deltahub.allocation): feasibility and optimality against brute force."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from deltahub.allocation import Curve, Point, allocate, total
from deltahub.errors import CodecError


def _curves(rng: random.Random, tensors: int, points: int) -> list[Curve]:
    out = []
    for t in range(tensors):
        pts = []
        for _ in range(points):
            b = rng.randint(1, 1000)
            pts.append(Point("c", {}, b, rng.uniform(0, 10) / b))  # more bytes, less distortion, roughly
        out.append(Curve(f"t{t}", 1, pts))
    return out


def _brute(curves: list[Curve], budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(*(c.points for c in curves)):
        if sum(p.nbytes for p in combo) <= budget:
            best = min(best, sum(p.distortion for p in combo))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_allocation_fits_and_is_optimal_at_lagrangian_budgets(seed: int) -> None:
    rng = random.Random(seed)
    curves = _curves(rng, tensors=4, points=5)
    smallest = sum(min(p.nbytes for p in c.points) for c in curves)
    # Any budget: the result fits and is no worse than the all-smallest allocation.
    for budget in (smallest, smallest + rng.randint(0, 3000), 10**9):
        choice = allocate(curves, budget)
        nbytes, dist = total(choice)
        assert nbytes <= budget and set(choice) == {c.name for c in curves}
        assert dist <= sum(min(c.points, key=lambda p: (p.nbytes, p.distortion)).distortion for c in curves) + 1e-12
        assert dist >= _brute(curves, budget) - 1e-12
    # A budget that some Lagrange multiplier hits exactly is solved optimally.
    for lam in (1e-4, 1e-3, 1e-2, 1e-1):
        pick = [min(c.points, key=lambda p: (p.distortion + lam * p.nbytes, p.nbytes)) for c in curves]
        budget = sum(p.nbytes for p in pick)
        assert total(allocate(curves, budget))[1] <= _brute(curves, budget) + 1e-9


def test_unlimited_budget_takes_the_least_distortion_and_too_small_a_budget_is_a_typed_error() -> None:
    curves = [Curve("a", 1, [Point("c", {}, 10, 5.0), Point("c", {}, 100, 1.0), Point("raw", {}, 1000, 0.0)]),
              Curve("b", 1, [Point("c", {}, 20, 2.0), Point("c", {}, 30, 2.5)])]  # a dominated point
    choice = allocate(curves, float("inf"))
    assert choice["a"].distortion == 0.0 and choice["b"].nbytes == 20
    assert allocate(curves, 30)["a"].nbytes == 10
    assert allocate(curves, 120)["a"].nbytes == 100
    with pytest.raises(CodecError, match="smallest setting of every tensor takes 30 bytes"):
        allocate(curves, 29)
    with pytest.raises(CodecError, match="no candidate"):
        allocate([Curve("empty", 1, [])], 100)


def test_manifest_json_size_is_the_indented_dumps_size() -> None:
    """Candidate entries are sized from the compact encoding plus indentation: the same count as json.dumps(indent=2)
    nested two levels deeper, for any JSON shape (empty containers inline, escapes, floats)."""
    import json
    import random

    from deltahub.compression import _manifest_json_size

    rng = random.Random(0)

    def value(depth: int = 0) -> object:
        r = rng.random()
        if depth < 4 and r < 0.3:
            return {f'k{i}"\\é': value(depth + 1) for i in range(rng.randint(0, 4))}
        if depth < 4 and r < 0.5:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return rng.choice([1, 2.5, "x", None, True, 1e-300, "a\nb", -3, 0.12345678901234567])

    for _ in range(500):
        obj = {"model.layers.0.w": value()}
        text = json.dumps(obj, indent=2)
        assert _manifest_json_size(obj) == len(text) + 4 * text.count("\n")


@pytest.mark.parametrize("codec,params", [("deltadq", {"preset": "16x"}), ("deltadq", {"p": 0.5, "bits": 4, "parts": 2}),
                                          ("bitdelta", {"granularity": "row"}), ("raw", {}), ("rowsparse", {"preset": "32x"}),
                                          ("lowrank", {"rank": 4}), ("unchanged", {})])
@pytest.mark.parametrize("label", ["", "deltadq:preset=16x"])
def test_entry_overhead_is_the_written_entry_size(codec: str, params: dict, label: str) -> None:
    """A candidate's manifest and header bytes, sized from a template plus its params, equal those of the whole
    entry written out (json indent 2, nested two levels) for every codec's params and byte counts, and for names
    json writes as they are (the template is shared by names of one length) or escapes."""
    import json
    from types import SimpleNamespace

    from deltahub.codecs import EncodeInput, get_codec
    from deltahub.compression import _PLACEHOLDER_DIGEST, _PLACEHOLDER_FLOAT, _entry_overhead
    from deltahub.format.manifest import TensorEntry

    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 96, generator=g)
    ft = base + torch.randn(64, 96, generator=g) * 1e-2 if codec != "unchanged" else base.clone()
    c = get_codec(codec)
    enc = c.encode(EncodeInput("model.layers.7.self_attn.q_proj.weight", ft, base), c.validate_params(params))
    names = ("model.layers.7.self_attn.q_proj.weight", "model.layers.17.self_attn.q_proj.weight", "x.layers.7.self_attn.q_pro.weight",
             "modèle.w", 'a"b\\c.w', "tab\there.w", "ü" * 3)
    for nbytes, name in itertools.product((enc.nbytes, 7, 12345678901), names):  # the count's digits vary with the size
        enc = SimpleNamespace(tensors=enc.tensors, params=enc.params, nbytes=nbytes)
        stats = {"delta_l2": _PLACEHOLDER_FLOAT, "error_l2": _PLACEHOLDER_FLOAT}
        if label:
            stats.update(auto_choice=label, auto_metric="aligned_output", auto_error=_PLACEHOLDER_FLOAT)
        entry = TensorEntry(codec=codec, shape=[64, 96], dtype="float32", params=enc.params,
                            stored={r: f"{name}.{r}" for r in enc.tensors}, stored_bytes=enc.nbytes, base_sha256="0" * 64,
                            stats=stats, digests=dict.fromkeys(enc.tensors, _PLACEHOLDER_DIGEST))
        text = json.dumps({name: entry.to_dict()}, indent=2)
        header = sum(len(json.dumps(f"{name}.{r}")) + 64 + 8 * t.dim() for r, t in enc.tensors.items())
        assert _entry_overhead(name, codec, enc, (64, 96), torch.float32, label) == len(text) + 4 * text.count("\n") + header


@pytest.mark.parametrize("params", [{"t": True, "f": False, "n": None, "x": 1e-300, "i": -5, "big": 12345678901234567890},
                                    {"s": 'q"uote', "b": "back\\slash", "u": "é", "c": "tab\there"},
                                    {"inf": float("inf"), "nan": float("nan")}, {"é": 1},
                                    {"nested": {"x": [1, 2.5, "y"]}, "empty": {}, "list": []}, {"p": 0.1 + 0.2}])
def test_entry_overhead_sizes_any_params_as_written(params: dict) -> None:
    """Flat scalar params are sized without json's encoder; escapes, non-finite floats and nested values fall back
    to it: either way the count is that of the entry as written."""
    import json
    from types import SimpleNamespace

    from deltahub.compression import _PLACEHOLDER_DIGEST, _PLACEHOLDER_FLOAT, _entry_overhead
    from deltahub.format.manifest import TensorEntry

    name = "model.layers.0.mlp.up_proj.weight"
    tensors = {"signs": torch.zeros(4, 8, dtype=torch.uint8), "scale": torch.zeros(4)}
    enc = SimpleNamespace(tensors=tensors, params=params, nbytes=1234)
    entry = TensorEntry(codec="bitdelta", shape=[4, 64], dtype="float32", params=params,
                        stored={r: f"{name}.{r}" for r in tensors}, stored_bytes=1234, base_sha256="0" * 64,
                        stats={"delta_l2": _PLACEHOLDER_FLOAT, "error_l2": _PLACEHOLDER_FLOAT},
                        digests=dict.fromkeys(tensors, _PLACEHOLDER_DIGEST))
    text = json.dumps({name: entry.to_dict()}, indent=2)
    header = sum(len(json.dumps(f"{name}.{r}")) + 64 + 8 * t.dim() for r, t in tensors.items())
    assert _entry_overhead(name, "bitdelta", enc, (4, 64), torch.float32, "") == len(text) + 4 * text.count("\n") + header
