"""Resident routing of full fine-tunes: per-row embeddings, norms, LM head and Linear deltas; generate; Hub ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_pair
from torch import nn

from deltahub.compression import compress
from deltahub.delta import Delta
from deltahub.policy import Policy, Rule
from deltahub.resident import (
    DeltaEmbedding,
    DeltaLinear,
    MixedAdapterError,
    RawRouted,
    active_adapter,
    attach_delta,
    delete_adapter,
    delta_memory,
    disable_adapters,
    forward,
    generate,
    load_resident,
    resident_state,
    set_adapter,
    unload,
    use_adapters,
)
from deltahub.testing.fixtures import hub_env, hub_server, hub_server_factory  # noqa: F401

DQ = {"p": 0.75, "bits": 2, "parts": 2, "quantizer": "kmeans", "group_size": 8, "seed": 3}


def _full_finetune(base_dir: Path, out: Path, seed: int) -> Path:
    """A fine-tune that changes every tensor: Linears, the tied embedding and the norms."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = 0.05 if "norm" in name else 0.01
            p.add_(torch.randn(p.shape, generator=g) * std)
    m.save_pretrained(out)
    return out


def _two_finetunes(config: Any, root: Path, pol: Policy, ids: torch.Tensor) -> tuple[Path, dict[str, Path], dict[str, torch.Tensor]]:
    """A random base of ``config``, two full fine-tunes of it compressed with ``pol``: (base, deltas, rebuilt logits)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_dir = root / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    deltas = {}
    for tag, seed in (("a", 1), ("b", 2)):
        ft = _full_finetune(base_dir, root / f"ft_{tag}", seed)
        deltas[tag] = root / f"d_{tag}"
        compress(base_dir, ft, deltas[tag], policy=pol, progress=False)
    return base_dir, deltas, {n: _logits(Delta(p).to_model(base_dir), ids) for n, p in deltas.items()}


@pytest.fixture(scope="module")
def ft_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("routing")
    base, _ = make_tiny_pair(root, seed=0)
    deltas = {}
    # a: DeltaDQ everywhere (codebook resident form, embedding too), norms exact; b: BitDelta (row), norms exact
    pol_a = Policy(codec="deltadq", params=DQ, rules=[Rule("re:norm", "raw")], whole_model=True)
    pol_b = Policy(codec="bitdelta", params={"granularity": "row"}, rules=[Rule("re:norm", "raw")], whole_model=True)
    for tag, pol, seed in (("a", pol_a, 1), ("b", pol_b, 2)):
        ft = _full_finetune(base, root / f"ft_{tag}", seed)
        deltas[tag] = root / f"d_{tag}"
        compress(base, ft, deltas[tag], policy=pol, progress=False)
    return {"root": root, "base": base, "deltas": deltas}


def _base(path: Path, dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()


def _ids(rows: int = 4) -> torch.Tensor:
    return torch.randint(0, 128, (rows, 7), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_mixed_batch_of_full_finetunes_matches_rebuilds(ft_pair: dict[str, Any]) -> None:
    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    ids = _ids()
    want = {n: _logits(Delta(p).to_model(base_dir), ids) for n, p in deltas.items()}
    base_logits = _logits(_base(base_dir), ids)
    model = load_resident(base_dir, {"a": deltas["a"], "b": deltas["b"]})
    assert not any(p.requires_grad for p in model.parameters()) and not model.training  # a frozen, serving base
    emb = model.get_input_embeddings()
    assert isinstance(emb, DeltaEmbedding) and isinstance(model.lm_head, DeltaLinear)
    assert model.lm_head.adapters["a"] is emb.adapters["a"]  # tied head: one compressed copy
    assert isinstance(model.model.norm, RawRouted)
    assert type(emb.adapters["a"]).__name__ == "_CodebookAdapter"
    for n in ("a", "b"):
        set_adapter(model, n)
        torch.testing.assert_close(_logits(model, ids), want[n], rtol=1e-5, atol=1e-5)
    names = ["a", "b", "__base__", "b"]
    mixed = forward(model, input_ids=ids, adapter_names=names).logits
    for i, n in enumerate(names):
        ref = base_logits if n == "__base__" else want[n]
        torch.testing.assert_close(mixed[i], ref[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1])
    with pytest.raises(MixedAdapterError, match="unknown"):
        forward(model, input_ids=ids, adapter_names=["a", "zz", "b", "a"])
    with pytest.raises(MixedAdapterError, match="rows"):
        forward(model, input_ids=ids, adapter_names=["a", "b"])  # only generate() expands names
    with pytest.raises(ValueError, match="__base__"):
        attach_delta(model, deltas["a"], "__base__")


def test_mixed_batch_float64_exact(ft_pair: dict[str, Any]) -> None:
    """float64: each row equals x(W + Δ̂)ᵀ with exact embeddings / norms, to 1e-10."""
    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    ids = _ids()
    model = load_resident(base_dir, dict(deltas)).to(torch.float64)
    refs = {}
    for n, p in deltas.items():
        ref = _base(base_dir).to(torch.float64)
        d = Delta(p)
        sd, base_sd = ref.state_dict(), _base(base_dir).state_dict()
        with torch.no_grad():
            for name, e in d.manifest.tensors.items():
                if e.codec == "raw":
                    sd[name].copy_(d.reconstruct(name, base_sd[name]))
                elif e.codec != "unchanged":
                    sd[name] += d.delta_tensor(name).to(torch.float64)
        refs[n] = _logits(ref, ids)
    with use_adapters(model, ["b", "a", None, "a"]):
        mixed = _logits(model, ids)
    for i, n in enumerate(["b", "a", None, "a"]):
        ref = refs[n] if n else _logits(_base(base_dir).to(torch.float64), ids)
        torch.testing.assert_close(mixed[i], ref[i], rtol=1e-10, atol=1e-10)



def test_mixed_batch_with_linear_biases(tmp_path: Path) -> None:
    """Qwen2-style attention biases: two fine-tunes that changed q/k/v biases share one mixed batch, each row
    with its own bias (routed per row group, not refused), and deleting one adapter unwraps cleanly."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    ids = torch.randint(0, 96, (4, 6), generator=torch.Generator().manual_seed(5))
    pol = Policy(codec="deltadq", params=DQ, rules=[Rule("re:norm", "raw")], whole_model=True)
    base_dir, deltas, want = _two_finetunes(cfg, tmp_path, pol, ids)
    assert AutoModelForCausalLM.from_pretrained(base_dir).model.layers[0].self_attn.q_proj.bias is not None
    base_logits = _logits(_base(base_dir), ids)
    model = load_resident(base_dir, dict(deltas))
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, DeltaLinear) and set(q.raw_bias) == {"a", "b"}
    names = ["b", "__base__", "a", "b"]
    mixed = forward(model, input_ids=ids, adapter_names=names).logits
    for i, n in enumerate(names):
        ref = base_logits if n == "__base__" else want[n]
        torch.testing.assert_close(mixed[i], ref[i], rtol=1e-5, atol=1e-5)
    set_adapter(model, "a")  # one adapter for every row: its bias is swapped in
    torch.testing.assert_close(_logits(model, ids), want["a"], rtol=1e-5, atol=1e-5)
    delete_adapter(model, "a")
    assert set(model.model.layers[0].self_attn.q_proj.raw_bias) == {"b"}
    mixed = forward(model, input_ids=ids, adapter_names=["b", "__base__", "b", "b"]).logits
    torch.testing.assert_close(mixed[1], base_logits[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[0], want["b"][0], rtol=1e-5, atol=1e-5)
    delete_adapter(model, "b")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # unwrapped: the base layer again
    torch.testing.assert_close(_logits(model, ids), base_logits, rtol=0, atol=0)


@pytest.mark.parametrize("codec,params", [("deltadq", DQ), ("bitdelta", {"granularity": "row"}),
                                          ("lowrank", {"rank": 4})])
def test_gpt2_conv1d_deltas_stay_compressed(tmp_path: Path, codec: str, params: dict[str, Any]) -> None:
    """GPT-2's Conv1D layers (weights stored [in, out]) are resident deltas too, not full exact copies:
    a mixed batch of two fine-tunes matches each rebuild, merge gives the rebuild, memory stays compressed."""
    import warnings

    from transformers import GPT2Config

    from deltahub.resident import merge_adapter, unmerge_adapter

    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(5))
    pol = Policy(codec=codec, params=params, rules=[Rule("re:(ln_|bias)", "raw")], whole_model=True)
    base_dir, deltas, want = _two_finetunes(cfg, tmp_path, pol, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "kept as full exact tensors" fallback
        model = load_resident(base_dir, dict(deltas))
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, DeltaLinear) and attn.fan_in_fan_out and attn.in_features == 32 and attn.out_features == 96
    assert attn.get_delta_weight("a").shape == attn.weight.shape
    assert isinstance(model.transformer.wpe, DeltaEmbedding)  # learned positions: ids arrive as one row
    names = ["b", "a", "__base__"]
    mixed = forward(model, input_ids=ids, adapter_names=names).logits
    base_logits = _logits(_base(base_dir), ids)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], (base_logits if n == "__base__" else want[n])[i], rtol=1e-5, atol=1e-5)
    common = {"max_new_tokens": 4, "pad_token_id": 0, "num_beams": 2, "num_return_sequences": 2}
    beams = generate(model, input_ids=ids, adapter_names=names, **common)  # cached positions: one-row ids each step
    for i, n in enumerate(names):
        set_adapter(model, n)
        assert torch.equal(beams[2 * i:2 * i + 2], model.generate(input_ids=ids[i:i + 1], **common)), n
    merge_adapter(model, "a")
    torch.testing.assert_close(_logits(model, ids), want["a"], rtol=1e-5, atol=1e-5)
    unmerge_adapter(model)
    set_adapter(model, None)
    torch.testing.assert_close(_logits(model, ids), base_logits, rtol=0, atol=0)
    mem = delta_memory(model)
    full = sum(p.numel() * p.element_size() for p in _base(base_dir).parameters())
    assert mem["a"]["total"] < full / 2, mem["a"]


def test_base_served_in_bf16(ft_pair: dict[str, Any], tmp_path: Path) -> None:
    """A float32 delta whose norms are exact XORs against the float32 base attaches to a base loaded in
    bfloat16 (how most users serve): those tensors are rebuilt from the checkpoint's own bits (sha256 checked,
    through the digest cache) and cast, with no 'cannot check' warning; a changed checkpoint is refused."""
    import shutil
    import warnings

    from deltahub.errors import BaseMismatchError

    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    assert any(e.codec == "raw" and e.params.get("mode") == "xor" for e in Delta(deltas["a"]).manifest.tensors.values())
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_resident(base_dir, {"a": deltas["a"]}, torch_dtype=torch.bfloat16)
    got = _logits(model, ids).float()
    want = _logits(load_resident(base_dir, {"a": deltas["a"]}), ids)
    assert got.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())  # bf16 rounding, not a wrong norm
    norm = next(n for n, e in Delta(deltas["a"]).manifest.tensors.items() if e.codec == "raw")
    exact = Delta(deltas["a"]).reconstruct(norm, _base(base_dir).state_dict()[norm]).to(torch.bfloat16)
    assert torch.equal(resident_state(model).adapters["a"].raw[norm], exact)
    # the base checkpoint on disk no longer matches the delta's recorded base: refused
    moved = tmp_path / "base"
    shutil.copytree(base_dir, moved)
    from safetensors.torch import load_file, save_file

    sd = load_file(moved / "model.safetensors")
    sd[norm] = sd[norm] + 1.0
    save_file(sd, moved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseMismatchError):
        load_resident(moved, {"a": deltas["a"]}, torch_dtype=torch.bfloat16)


def test_failed_merge_restores_the_base(ft_pair: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode that fails part-way through merge_adapter leaves no weight merged: every base bit comes back."""
    from deltahub.resident import merge_adapter

    model = load_resident(ft_pair["base"], {"a": ft_pair["deltas"]["a"]})
    set_adapter(model, None)
    before = _state_bits(model)
    layers = [m for m in model.modules() if isinstance(m, DeltaLinear) and "a" in m.adapters]
    victim = layers[len(layers) // 2].adapters["a"]
    monkeypatch.setattr(victim, "dense", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("decode failed")))
    with pytest.raises(RuntimeError, match="decode failed"):
        merge_adapter(model, "a")
    assert resident_state(model).merged is None and not resident_state(model).merge_undo
    set_adapter(model, None)
    assert _state_bits(model) == before

@pytest.mark.parametrize("kw", [{"num_beams": 2, "num_return_sequences": 2},
                                {"do_sample": True, "num_return_sequences": 2, "top_k": 5}])
def test_generate_with_adapter_names(ft_pair: dict[str, Any], kw: dict[str, Any]) -> None:
    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    ids = _ids(3)
    model = load_resident(base_dir, dict(deltas))
    names = ["a", "__base__", "b"]
    common = {"max_new_tokens": 5, "pad_token_id": 0, **kw}
    torch.manual_seed(0)
    mixed = generate(model, input_ids=ids, adapter_names=names, **common)
    assert mixed.shape[0] == 6
    for i, n in enumerate(names):
        set_adapter(model, n)
        torch.manual_seed(0)
        alone = model.generate(input_ids=ids[i:i + 1], **common)
        if "num_beams" in kw:  # beam search is deterministic: rows equal the adapter's own generation
            assert torch.equal(mixed[2 * i:2 * i + 2], alone)
        else:
            assert alone.shape == mixed[2 * i:2 * i + 2].shape


def test_delta_memory_and_unload_keep_base(ft_pair: dict[str, Any]) -> None:
    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    model = _base(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_delta(model, deltas["a"], "a")
    attach_delta(model, deltas["b"], "b")
    mem = delta_memory(model)
    emb = model.get_input_embeddings().weight
    vocab_bytes = emb.numel() * emb.element_size()
    # b: 1 bit per weight of every Linear + the embedding (counted once for the tied head), + row scales
    assert mem["b"]["delta_modules"] - mem["b"]["scales"] == mem["b"]["covered_weights"] // 32
    assert mem["b"]["raw"] < vocab_bytes / 10  # only the norms are exact
    # codebook form: 1 bit (non-zero map) + 1/4 * 4 bits (codes) per weight, + 8 bytes per row (pointers)
    rows = sum(m.weight.shape[0] + 1 for m in model.modules() if isinstance(m, (DeltaLinear, DeltaEmbedding)) and "a" in m.adapters)
    assert mem["a"]["delta_modules"] <= mem["a"]["covered_weights"] * 2 // 32 + 8 * rows + 64 * 16
    delete_adapter(model, "a")
    assert "a" not in delta_memory(model)
    unload(model)
    assert not any(isinstance(m, (DeltaLinear, DeltaEmbedding, RawRouted)) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_get_delta_weight_and_base_layer(ft_pair: dict[str, Any]) -> None:
    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    model = load_resident(base_dir, {"b": deltas["b"]})
    q = model.model.layers[0].self_attn.q_proj
    d = Delta(deltas["b"])
    want = d.delta_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(q.get_delta_weight("b"), want)
    assert isinstance(q.get_base_layer(), nn.Linear)
    assert torch.equal(model.get_input_embeddings().get_delta_weight("b"), d.delta_tensor("model.embed_tokens.weight"))


@pytest.mark.slow
def test_hub_ids_pin_the_base(ft_pair: dict[str, Any], hub_env: Any, tmp_path: Path) -> None:  # noqa: F811
    """Deltas named by Hub id: the base is fetched at the commit they pin, checked once, all attached."""
    from huggingface_hub import HfApi

    from deltahub import AutoDeltaModel
    from deltahub.errors import BaseMismatchError
    from deltahub.hub import push_to_hub

    api = HfApi(endpoint=hub_env.url)
    api.create_repo("org/base")
    sha = api.upload_folder(folder_path=ft_pair["base"], repo_id="org/base").oid
    root = ft_pair["root"]
    pol = Policy(codec="bitdelta", params={"granularity": "row"}, rules=[Rule("re:norm", "raw")], whole_model=True)
    for tag in ("a", "b"):
        m = compress("org/base", root / f"ft_{tag}", tmp_path / tag, policy=pol, progress=False, endpoint=hub_env.url)
        assert m.base.revision == sha
        push_to_hub(tmp_path / tag, f"me/{tag}", endpoint=hub_env.url)
    ids = _ids()
    want = {t: _logits(Delta(tmp_path / t).to_model(ft_pair["base"]), ids) for t in ("a", "b")}
    model = load_resident(None, {"a": "me/a", "b": "me/b@main"}, endpoint=hub_env.url)
    with use_adapters(model, ["b", "a", "a", "__base__"]):
        mixed = _logits(model, ids)
    torch.testing.assert_close(mixed[0], want["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], want["a"][1], rtol=1e-5, atol=1e-5)
    attach_delta(model, "me/b", "b2", endpoint=hub_env.url)
    set_adapter(model, "b2")
    torch.testing.assert_close(_logits(model, ids), want["b"], rtol=1e-5, atol=1e-5)
    auto = AutoDeltaModel.from_pretrained("me/a", mode="resident", endpoint=hub_env.url)
    assert isinstance(auto.get_input_embeddings(), DeltaEmbedding)
    torch.testing.assert_close(_logits(auto, ids), want["a"], rtol=1e-5, atol=1e-5)
    other, ft_o = make_tiny_pair(tmp_path / "other", seed=9)
    compress(other, ft_o, tmp_path / "o", codec="bitdelta", progress=False)
    with pytest.raises(BaseMismatchError, match="different bases"):
        load_resident(None, {"a": "me/a", "o": tmp_path / "o"}, endpoint=hub_env.url)


def test_codebook_adapter_rows_and_ranges() -> None:
    """The 4-bit codebook form decodes bit-exactly: any row subset, any contiguous range (odd offsets), matmul."""
    from deltahub.codecs import EncodeInput, get_codec
    from deltahub.resident.layers import _CodebookAdapter, make_adapter

    torch.manual_seed(0)
    w = torch.randn(13, 24)
    codec = get_codec("deltadq")
    params = codec.validate_params({**DQ, "group_size": 8})
    enc = codec.encode(EncodeInput("w", w + torch.randn(13, 24) * 0.01, w), params)
    dense = codec.decode_delta(enc.tensors, enc.params, (13, 24)).reshape(13, 24)
    a = make_adapter("deltadq", enc.tensors, enc.params, (13, 24), "float32")
    assert isinstance(a, _CodebookAdapter) and bool((dense == 0).any())
    assert torch.equal(a.dense(), dense)
    idx = torch.tensor([12, 0, 5, 5, 7])
    assert torch.equal(a.rows(idx), dense[idx])
    for r0, r1 in ((1, 2), (3, 11), (0, 13), (7, 7)):
        assert torch.equal(a.row_range(r0, r1), dense[r0:r1])
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(a.delta_matmul(x, chunk_rows=5), x @ dense.to(torch.float64).T, rtol=1e-12, atol=1e-12)



def test_codebook_adapter_from_stored_codebook() -> None:
    """At attach the DeltaDQ codebook form takes its table from the stored codebook (no sort of the delta):
    still bit-exact when the table has a zero entry or entries no kept value uses, and a non-finite table
    (a hostile delta) keeps the generic form, which decodes exactly what apply would."""
    from deltahub.codecs import EncodeInput, get_codec
    from deltahub.resident.layers import _CodebookAdapter, _GenericAdapter, make_adapter

    torch.manual_seed(1)
    w = torch.randn(16, 32)
    codec = get_codec("deltadq")
    params = codec.validate_params({**DQ, "group_size": 8})
    enc = codec.encode(EncodeInput("w", w + torch.randn(16, 32) * 0.01, w), params)
    for edit in ("zero", "unused", "nan"):
        book = enc.tensors["codebook"].clone()
        if edit == "zero":
            book[0] = 0.0  # kept values coded 0 decode to 0: not in the non-zero map
        elif edit == "unused":
            book[-1] = 123.0  # only this table entry changes; values that use it change with it
        else:
            book[1] = float("nan")
        stored = {**enc.tensors, "codebook": book}
        dense = codec.decode_delta(stored, enc.params, (16, 32)).reshape(16, 32)
        a = make_adapter("deltadq", stored, enc.params, (16, 32), "float32")
        if edit == "nan":
            assert isinstance(a, _GenericAdapter)
            continue
        assert isinstance(a, _CodebookAdapter)
        assert torch.equal(a.dense(), dense), edit
        assert torch.equal(a.rows(torch.tensor([3, 15, 0])), dense[[3, 15, 0]]), edit

def _state_bits(model: nn.Module) -> dict[str, bytes]:
    from deltahub.resident.model import _walk_tensors

    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in _walk_tensors(model).items()}


@pytest.mark.parametrize("dtype", [torch.float32])
def test_merge_adapter_is_the_rebuild_and_unmerges_exactly(ft_pair: dict[str, Any], dtype: torch.dtype) -> None:
    """merge_adapter writes dtype(float32(W) + Δ̂) into the shared weights (the plain layers then run, no
    delta matmul): logits equal the rebuilt fine-tune's; switching adapters, a mixed batch, disabling or
    unmerging restores every base bit."""
    from deltahub.resident import merge_adapter, unmerge_adapter

    base_dir, deltas = ft_pair["base"], ft_pair["deltas"]
    ids = _ids()
    model = load_resident(base_dir, {"a": deltas["a"], "b": deltas["b"]}, torch_dtype=dtype)
    set_adapter(model, None)
    pristine = _state_bits(model)
    want = {}
    for n in ("a", "b"):
        set_adapter(model, n)
        want[n] = _logits(model, ids)
    set_adapter(model, None)
    base_logits = _logits(model, ids)
    for n in ("a", "b", "a"):
        merge_adapter(model, n)
        assert resident_state(model).merged == n
        # W is rebuilt as dtype(float32(W_merged) - Δ̂) except where rounding differs: those elements are kept
        assert all(u.index.numel() < u.weight.numel() for u in resident_state(model).merge_undo)
        rebuilt = Delta(deltas[n]).to_model(base_dir, torch_dtype=dtype)
        assert torch.equal(model.lm_head.weight, rebuilt.lm_head.weight)  # the tied embedding, merged once
        assert torch.equal(model.model.layers[0].mlp.up_proj.weight, rebuilt.model.layers[0].mlp.up_proj.weight)
        torch.testing.assert_close(_logits(model, ids), want[n], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=5e-2 if dtype == torch.bfloat16 else 1e-5)
    mixed = forward(model, input_ids=ids, adapter_names=["a", "b", "__base__", "b"]).logits  # unmerges first
    assert resident_state(model).merged is None
    torch.testing.assert_close(mixed[2], base_logits[2])
    set_adapter(model, None)  # the base's own norms back in
    assert _state_bits(model) == pristine
    merge_adapter(model, "b")
    with disable_adapters(model):
        assert torch.equal(_logits(model, ids), base_logits)
    merge_adapter(model, "b")
    undo = sum(t.numel() * t.element_size() for u in resident_state(model).merge_undo for t in (u.index, u.values))
    assert delta_memory(model, "b")["caches"] == undo > 0 and delta_memory(model, "a")["caches"] == 0
    unmerge_adapter(model)
    assert delta_memory(model, "b")["caches"] == 0
    assert active_adapter(model) == "b" and resident_state(model).merged is None
    set_adapter(model, None)
    assert _state_bits(model) == pristine
    merge_adapter(model, "a")
    unload(model)
    assert _state_bits(model) == pristine


@pytest.mark.parametrize("codec,params", [("lowrank", {"rank": 4}), ("lowrank-mp", {"bands": [[1, 8], [3, 3]]})])
def test_low_rank_deltas_stay_factors(ft_pair: dict[str, Any], tmp_path: Path, codec: str, params: dict[str, Any]) -> None:
    """lowrank / lowrank-mp deltas are kept resident as their factors (two thin matmuls per layer, embedding rows
    from the factors) and give the rebuilt fine-tune's logits; the decoded delta equals the codec's decode."""
    from deltahub.codecs import get_codec
    from deltahub.resident.layers import _LowRankAdapter

    base_dir = ft_pair["base"]
    ft = _full_finetune(base_dir, tmp_path / "ft", seed=5)
    pol = Policy(codec=codec, params=params, rules=[Rule("re:norm", "raw")], whole_model=True)
    compress(base_dir, ft, tmp_path / "d", policy=pol, progress=False)
    ids = _ids()
    want = _logits(Delta(tmp_path / "d").to_model(base_dir), ids)
    model = load_resident(base_dir, {"lr": tmp_path / "d"})
    set_adapter(model, "lr")
    layer = model.model.layers[0].mlp.up_proj
    adapter = layer.adapters["lr"]
    assert isinstance(adapter, _LowRankAdapter) and isinstance(model.get_input_embeddings().adapters["lr"], _LowRankAdapter)
    d = Delta(tmp_path / "d")
    entry = d.manifest.tensors["model.layers.0.mlp.up_proj.weight"]
    decoded = get_codec(codec).decode_delta(d.files.stored(entry.stored), entry.params, tuple(entry.shape))
    assert torch.equal(adapter.dense(), decoded)
    idx = torch.tensor([3, 0, 7])
    torch.testing.assert_close(adapter.rows(idx), decoded[idx], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    mixed = forward(model, input_ids=ids, adapter_names=["lr", "__base__", "lr", "__base__"]).logits
    torch.testing.assert_close(mixed[2], want[2], rtol=1e-5, atol=1e-5)
