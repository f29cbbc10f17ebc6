"""compress -> delta dir -> apply / load_model on tiny real transformers models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_pair
from deltahub.codecs import get_codec
from deltahub.compression import compress
from deltahub.delta import Delta, apply_delta, load_model
from deltahub.errors import BaseMismatchError, OutputExistsError
from deltahub.format.io import Checkpoint, checkpoint_fingerprint
from deltahub.policy import Policy, Rule
from deltahub.format.spec import FORMAT_VERSION


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _expected(base: dict[str, torch.Tensor], delta_dir: Path, name: str) -> torch.Tensor:
    """Reference rebuild of one tensor, straight from the spec: dtype(float32(base) + decoded delta)."""
    m = json.loads((delta_dir / "delta_config.json").read_text())["tensors"][name]
    stored = {}
    for f in delta_dir.glob("delta*.safetensors"):
        sd = load_file(f)
        stored.update({r: sd[k] for r, k in m["stored"].items() if k in sd})
    codec = get_codec(m["codec"])
    return codec.reconstruct(stored, m["params"], base.get(name), tuple(m["shape"]), getattr(torch, m["dtype"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_default_policy(tmp_path: Path, dtype: torch.dtype) -> None:
    base, ft = make_tiny_pair(tmp_path, dtype=dtype)
    m = compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    codecs = {n: e.codec for n, e in m.tensors.items()}
    assert codecs["model.layers.0.self_attn.q_proj.weight"] == "bitdelta"
    assert codecs["model.embed_tokens.weight"] == "raw"  # embeddings stay exact
    assert codecs["model.norm.weight"] == "unchanged"  # the fixture leaves norms alone
    assert "lm_head.weight" not in codecs  # tied: not in the checkpoint
    out = apply_delta(tmp_path / "delta", base, tmp_path / "out", progress=False)
    rebuilt, ft_w, base_w = _weights(out), _weights(ft), _weights(base)
    assert set(rebuilt) == set(ft_w)
    for name, t in rebuilt.items():
        assert t.dtype == ft_w[name].dtype and t.shape == ft_w[name].shape
        if codecs[name] in ("raw", "unchanged"):
            assert torch.equal(t.view(torch.uint8), ft_w[name].view(torch.uint8)), name
        assert torch.equal(t, _expected(base_w, tmp_path / "delta", name)), name
    # The directory is a complete model that transformers loads, with tied embeddings intact.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The in-memory loader gives the same model as apply + from_pretrained.
    direct = load_model(tmp_path / "delta", base, progress=False)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(direct(x).logits, model(x).logits)


def test_all_raw_is_lossless_end_to_end(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path, dtype=torch.bfloat16)
    compress(base, ft, tmp_path / "delta", policy=Policy(codec="raw"), progress=False)
    out = apply_delta(tmp_path / "delta", base, tmp_path / "out", progress=False)
    a, b = _weights(out), _weights(ft)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in b)


def test_bitdelta_is_closer_to_finetune_than_base(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path)
    compress(base, ft, tmp_path / "delta", params={"granularity": "row"}, codec="bitdelta", progress=False)
    rec = load_model(tmp_path / "delta", base, progress=False)
    ref, b = AutoModelForCausalLM.from_pretrained(ft), AutoModelForCausalLM.from_pretrained(base)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        lf, lr, lb = ref(x).logits, rec(x).logits, b(x).logits
    assert (lr - lf).norm() < (lb - lf).norm()


def test_sharded_inputs_and_outputs(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path, max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").exists() and (ft / "model.safetensors.index.json").exists()
    m = compress(base, ft, tmp_path / "delta", max_shard_size=3000, codec="bitdelta", progress=False)
    assert (tmp_path / "delta" / "delta.safetensors.index.json").exists()
    assert len(list((tmp_path / "delta").glob("delta-*-of-*.safetensors"))) > 1
    out = apply_delta(tmp_path / "delta", base, tmp_path / "out", max_shard_size=20_000, progress=False)
    assert (out / "model.safetensors.index.json").exists()
    AutoModelForCausalLM.from_pretrained(out)
    # The fingerprint does not depend on sharding.
    unsharded = tmp_path / "unsharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(unsharded)
    assert checkpoint_fingerprint(Checkpoint(unsharded))[0] == m.base.fingerprint
    # Every delta file carries format version and codec summary in its header.
    d = Delta(tmp_path / "delta")
    for meta in d.files.metadata():
        assert meta["format"] == "deltahub" and meta["format_version"] == FORMAT_VERSION
        assert set(json.loads(meta["codecs"])) <= {"bitdelta", "raw"}


def test_resized_vocabulary_is_stored_in_full(tmp_path: Path) -> None:
    base, _ = make_tiny_pair(tmp_path / "a", vocab=128)
    _, ft = make_tiny_pair(tmp_path / "b", vocab=136)
    m = compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    e = m.tensors["model.embed_tokens.weight"]
    assert e.codec == "raw" and e.params["mode"] == "full" and e.shape == [136, 32]
    # Other weights differ wholesale (different seed) but shapes match, so they are deltas.
    out = apply_delta(tmp_path / "delta", base, tmp_path / "out", progress=False)
    assert torch.equal(_weights(out)["model.embed_tokens.weight"], _weights(ft)["model.embed_tokens.weight"])


def test_untied_lm_head_and_rules(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path, tie=False)
    policy = Policy(codec="bitdelta", rules=[Rule.parse("lm_head.weight=bitdelta:granularity=row"),
                                             Rule.parse("*.mlp.*=raw")], exclude=["*.v_proj.*"])
    m = compress(base, ft, tmp_path / "delta", policy=policy, progress=False)
    assert m.tensors["lm_head.weight"].codec == "bitdelta"
    assert m.tensors["lm_head.weight"].params == {"granularity": "row"}
    assert m.tensors["model.layers.1.mlp.up_proj.weight"].codec == "raw"
    assert m.tensors["model.layers.1.self_attn.v_proj.weight"].codec == "raw"
    assert m.tensors["model.layers.1.self_attn.k_proj.weight"].codec == "bitdelta"


def test_output_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, ft = make_tiny_pair(tmp_path)
    codec = get_codec("bitdelta")
    calls = {"n": 0}
    real = type(codec).encode

    def failing(self, inp, params):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, inp, params)

    monkeypatch.setattr(type(codec), "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    assert not (tmp_path / "delta").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".delta")]
    monkeypatch.undo()
    compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    with pytest.raises(OutputExistsError):
        compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    compress(base, ft, tmp_path / "delta", overwrite=True, codec="bitdelta", progress=False)


def test_wrong_base_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path / "p")
    other, _ = make_tiny_pair(tmp_path / "q", seed=1)  # same architecture, other weights
    compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    with pytest.raises(BaseMismatchError, match="sha256") as exc:
        apply_delta(tmp_path / "delta", other, tmp_path / "out", progress=False)
    assert str(other) in str(exc.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # Experts may force it: the result is other-base + delta.
    apply_delta(tmp_path / "delta", other, tmp_path / "out", check_base=False, progress=False)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_base_with_other_tensors_is_refused_from_headers(tmp_path: Path) -> None:
    base, ft = make_tiny_pair(tmp_path)
    compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    untied, _ = make_tiny_pair(tmp_path / "u", tie=False)  # has an extra lm_head.weight
    with pytest.raises(BaseMismatchError, match="unexpected"):
        apply_delta(tmp_path / "delta", untied, tmp_path / "out", progress=False)
