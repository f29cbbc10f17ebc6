"""Resident deltas: one base in memory, several fine-tunes attached as compressed delta modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import make_tiny_pair
from deltahub.codecs import EncodeInput, get_codec
from deltahub.compression import compress
from deltahub.delta import Delta
from deltahub.errors import BaseMismatchError, ShapeMismatchError
from deltahub.resident import (
    DeltaLinear,
    MixedAdapterError,
    adapter_nbytes,
    attach_delta,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_resident,
    merge_and_unload,
    set_adapter,
    unload,
    use_adapters,
)

GRANULARITIES = ("tensor", "row", "group")


def _params(g: str) -> dict[str, Any]:
    return {"granularity": g, "group_size": 8} if g == "group" else {"granularity": g}


# ---------------------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_delta_linear_exact_float64(granularity: str) -> None:
    """x Wᵀ + b + x Δ̂ᵀ == x (W + Δ̂)ᵀ + b, odd shapes (cols % 8 != 0, short last group), several row chunks."""
    torch.manual_seed(0)
    out_f, in_f = 13, 21
    base = nn.Linear(in_f, out_f).to(torch.float64)
    ft_w = base.weight.detach().to(torch.float32) + torch.randn(out_f, in_f) * 0.01
    codec = get_codec("bitdelta")
    params = codec.validate_params({"granularity": granularity, "group_size": 5})
    enc = codec.encode(EncodeInput("w", ft_w, base.weight.detach().to(torch.float32)), params)
    dhat = codec.decode_delta(enc.tensors, enc.params, (out_f, in_f)).to(torch.float64)
    layer = DeltaLinear(base, chunk_rows=4)
    layer.add_adapter("a", "bitdelta", enc.tensors, enc.params)
    layer.set_adapter("a")
    x = torch.randn(3, 5, in_f, dtype=torch.float64)
    want = x @ (base.weight.detach() + dhat).T + base.bias.detach()
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight("a", torch.float64), dhat, rtol=0, atol=0)
    with layer.disable_adapters():
        assert torch.equal(layer(x), base(x))


def test_delta_linear_generic_codec() -> None:
    """Codecs other than BitDelta keep their stored tensors and decode with the codec (or a cache)."""
    torch.manual_seed(1)
    base = nn.Linear(16, 12, bias=False).to(torch.float64)
    ft_w = base.weight.detach().to(torch.float32) + torch.randn(12, 16) * 0.01
    codec = get_codec("topk-ternary")
    params = codec.validate_params({"density": 0.25})
    enc = codec.encode(EncodeInput("w", ft_w, base.weight.detach().to(torch.float32)), params)
    dhat = codec.decode_delta(enc.tensors, enc.params, (12, 16)).to(torch.float64)
    x = torch.randn(4, 16, dtype=torch.float64)
    for cache in (False, True):
        layer = DeltaLinear(base)
        layer.add_adapter("t", "topk-ternary", enc.tensors, enc.params, cache_decoded=cache)
        layer.set_adapter("t")
        torch.testing.assert_close(layer(x), x @ (base.weight.detach() + dhat).T, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- whole models


def _perturb_linears(base_dir: Path, out: Path, seed: int, std: float = 1e-2) -> Path:
    """A fine-tune that changes only the transformer blocks' Linear weights (embeddings/norms stay: 'unchanged')."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g) * std)
    m.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resident")
    base, ft_c = make_tiny_pair(root, seed=0)  # ft_c changes the (tied) embedding too -> raw
    ft_a = _perturb_linears(base, root / "ft_a", seed=1)
    ft_b = _perturb_linears(base, root / "ft_b", seed=2)
    deltas: dict[str, Path] = {}
    for g in GRANULARITIES:
        for tag, ft in (("A", ft_a), ("B", ft_b)):
            deltas[f"{tag}_{g}"] = root / f"d_{tag}_{g}"
            compress(base, ft, deltas[f"{tag}_{g}"], params=_params(g), codec="bitdelta", progress=False)
    deltas["C"] = root / "d_C"
    compress(base, ft_c, deltas["C"], params={"granularity": "row"}, codec="bitdelta", progress=False)
    return {"root": root, "base": base, "deltas": deltas}


def _base_model(path: Path, dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    return m.eval()


def _ids(rows: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (rows, 9), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@torch.no_grad()
def _exact_reference(base_dir: Path, delta_dir: Path) -> nn.Module:
    """float64 model with W_base + Δ̂ (no float32 rounding of the sum) and exact raw tensors."""
    ref = _base_model(base_dir).to(torch.float64)
    d = Delta(delta_dir)
    sd = ref.state_dict()
    for name, e in d.manifest.tensors.items():
        if e.codec == "bitdelta":
            sd[name] += d.delta_tensor(name).to(torch.float64)
        elif e.codec == "raw":
            sd[name].copy_(d.reconstruct(name, _base_model(base_dir).state_dict()[name]))
    d.close()
    return ref


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_two_adapters_match_full_rebuilds(pair: dict[str, Any], granularity: str) -> None:
    base_dir, deltas = pair["base"], pair["deltas"]
    da, db = deltas[f"A_{granularity}"], deltas[f"B_{granularity}"]
    ids = _ids()
    base_logits = _logits(_base_model(base_dir), ids)
    full = {n: _logits(Delta(p).to_model(base_dir), ids) for n, p in (("A", da), ("B", db))}

    model = _base_model(base_dir)
    ptrs = {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    attach_delta(model, da, "A")
    attach_delta(model, Delta(db), "B")
    assert list_adapters(model) == ["A", "B"]

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLinear)]
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for n, m in wrapped:  # one shared base weight per layer, never copied
        assert set(m.adapters) == {"A", "B"}
        assert m.base_layer.weight.data_ptr() == ptrs[n]

    # float32: equal to the full rebuild up to the rebuild's one float32 rounding of W + Δ̂
    outs: dict[str | None, torch.Tensor] = {}
    for name in ("A", "B"):
        set_adapter(model, name)
        outs[name] = _logits(model, ids)
        torch.testing.assert_close(outs[name], full[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["A"], outs["B"])
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base_logits)
    set_adapter(model, None)
    outs[None] = _logits(model, ids)
    assert torch.equal(outs[None], base_logits)

    # mixed batch: each row equals its adapter's own result (row i of ids in every case)
    names: list[str | None] = ["A", "B", None]
    with use_adapters(model, names):
        mixed = _logits(model, ids)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], outs[n][i], rtol=1e-6, atol=1e-6)
    with pytest.raises(MixedAdapterError, match="rows"), use_adapters(model, ["A", "B"]):
        _logits(model, ids)

    # float64: tight agreement with x (W + Δ̂)ᵀ computed exactly
    model.to(torch.float64)
    for name, p in (("A", da), ("B", db)):
        set_adapter(model, name)
        ref = _exact_reference(base_dir, p)
        torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-10, atol=1e-10)


def test_memory_of_bitdelta_adapter(pair: dict[str, Any]) -> None:
    model = _base_model(pair["base"])
    for g in GRANULARITIES:
        attach_delta(model, pair["deltas"][f"A_{g}"], f"A{g}")
        nb = adapter_nbytes(model, f"A{g}")
        assert nb["raw"] == 0  # embeddings / norms unchanged: nothing per adapter beyond the deltas
        assert nb["delta_modules"] <= nb["covered_weights"] / 30 + nb["scales"]
        assert nb["delta_modules"] - nb["scales"] == nb["covered_weights"] // 32  # 1 bit per fp32 weight


def test_raw_tensors_swapped_per_adapter(pair: dict[str, Any]) -> None:
    """Fine-tune C changes the tied embedding (raw): swapped in exactly, routed per row in mixed batches."""
    base_dir, deltas = pair["base"], pair["deltas"]
    ids = _ids()
    full_c = _logits(Delta(deltas["C"]).to_model(base_dir), ids)
    model = _base_model(base_dir)
    emb = model.get_input_embeddings().weight
    base_ptr = emb.data_ptr()
    attach_delta(model, deltas["A_row"], "A")
    attach_delta(model, deltas["C"], "C")
    assert adapter_nbytes(model, "C")["raw"] == emb.numel() * emb.element_size()
    set_adapter(model, "C")
    assert emb.data_ptr() != base_ptr and model.lm_head.weight is emb  # tied: one swap serves both
    torch.testing.assert_close(_logits(model, ids), full_c, rtol=1e-5, atol=1e-5)
    own = {n: _logits(model, ids) for n in ("C",)}
    set_adapter(model, "A")
    own["A"] = _logits(model, ids)
    with use_adapters(model, ["A", "C", None]):  # different embeddings: routed per row
        mixed = _logits(model, ids)
    torch.testing.assert_close(mixed[0], own["A"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], own["C"][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[2], _logits(_base_model(base_dir), ids)[2], rtol=1e-6, atol=1e-6)
    with use_adapters(model, ["C", "C", "C"]):
        torch.testing.assert_close(_logits(model, ids), full_c, rtol=1e-5, atol=1e-5)
    set_adapter(model, "A")
    assert emb.data_ptr() == base_ptr
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), _logits(_base_model(base_dir), ids))
    delete_adapter(model, "C")
    unload(model)
    assert not any(isinstance(m, DeltaLinear) for m in model.modules())
    assert emb.data_ptr() == base_ptr


def test_merge_and_unload_is_bit_exact(pair: dict[str, Any]) -> None:
    base_dir, deltas = pair["base"], pair["deltas"]
    ids = _ids()
    full = Delta(deltas["C"]).to_model(base_dir)
    model = load_resident(base_dir, {"A": deltas["A_group"], "C": deltas["C"]})
    merged = merge_and_unload(model, "C")
    assert not any(isinstance(m, DeltaLinear) for m in merged.modules())
    sd_full = full.state_dict()
    for k, v in merged.state_dict().items():
        assert torch.equal(v, sd_full[k]), k
    assert torch.equal(_logits(merged, ids), _logits(full, ids))


def test_wrong_base_is_refused(pair: dict[str, Any]) -> None:
    root, deltas = pair["root"], pair["deltas"]
    other, _ = make_tiny_pair(root / "other", seed=5)
    model = _base_model(other)
    with pytest.raises(BaseMismatchError, match="sha256"):
        attach_delta(model, deltas["A_row"], "A")
    assert not any(isinstance(m, DeltaLinear) for m in model.modules())  # nothing half-attached
    attach_delta(model, deltas["A_row"], "A", check_base=False)  # forced: shapes fit

    small, _ = make_tiny_pair(root / "small", seed=0, vocab=64)
    with pytest.raises(ShapeMismatchError, match="shape"):
        attach_delta(_base_model(small), deltas["A_row"], "A")

    # another dtype: checked on the checkpoint the model was loaded from (its name_or_path), no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m64 = attach_delta(_base_model(pair["base"], torch.float64), deltas["A_row"], "A")
    assert isinstance(m64.model.layers[0].mlp.up_proj, DeltaLinear)
    # ... and without a checkpoint on disk: shapes only, with a warning
    orphan = _base_model(pair["base"], torch.float64)
    orphan.name_or_path = ""
    with pytest.warns(UserWarning, match="sha256"):
        attach_delta(orphan, deltas["A_row"], "A")
