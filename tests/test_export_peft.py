"""``deltahub export peft``: a delta as a PEFT LoRA adapter that PEFT itself loads.

PEFT's ``PeftModel.from_pretrained`` loads the export and reproduces deltahub's own float32 low-rank
rebuild up to the fp16 rounding of the factors; at full rank (plus ``modules_to_save``) it reproduces
the delta's full rebuild. Rank / energy / byte-budget modes keep their promises; bad input is one typed
line; the output is atomic and never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub.cli import app
from deltahub.compression import compress
from deltahub.delta import Delta
from deltahub.errors import ExportError, MissingFileError, OutputExistsError, UnsafeOutputError
from deltahub.export import export_peft, lowrank_state_dict
from deltahub.policy import Policy, Rule
from deltahub.testing.fixtures import hub_env, hub_server, hub_server_factory  # noqa: F401

peft = pytest.importorskip("peft")
runner = CliRunner()
FP16_EPS = 2.0**-11  # fp16 unit roundoff


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tied Llama pair whose final norm also changed; its default delta and one with an exact (raw) q_proj."""
    root = tmp_path_factory.mktemp("export")
    base, ft = make_tiny_pair(root)
    sd = load_file(ft / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] * 1.05
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    compress(base, ft, root / "delta", progress=False)
    policy = Policy(codec="bitdelta", rules=[Rule.parse("*.q_proj.*=raw")])
    compress(base, ft, root / "delta_raw", policy=policy, progress=False)
    return {"root": root, "base": base, "ft": ft, "delta": root / "delta", "delta_raw": root / "delta_raw"}


def _model(path: Path, sd: dict[str, torch.Tensor] | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if sd is not None:
        model.load_state_dict(sd, strict=False)
    return model.eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(48).remainder(128).reshape(2, 24)
    with torch.no_grad():
        return model(ids).logits.float()


def _peft(base: Path, adapter: Path) -> Any:
    return peft.PeftModel.from_pretrained(_model(base), adapter).eval()


def test_peft_loads_export_and_matches_lowrank_rebuild(pair: dict[str, Path], tmp_path: Path) -> None:
    res = export_peft(pair["delta"], tmp_path / "lora", base=pair["base"], rank=4)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {} and cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == str(pair["base"]) and set(cfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert stored["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (4, 32)
    assert stored["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (64, 4)
    assert {v.dtype for v in stored.values()} == {torch.float16}
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card

    peft_model = _peft(pair["base"], tmp_path / "lora")
    lowrank = _logits(_model(pair["base"], lowrank_state_dict(pair["delta"], pair["base"], res.ranks)))
    base = _logits(_model(pair["base"]))
    effect = float((lowrank - base).abs().max())
    err = float((_logits(peft_model) - lowrank).abs().max())
    # fp16 factors: each product term carries <= ~2 eps relative error; a wrong scaling or transpose is O(effect).
    assert effect > 0.05 and err <= 16 * FP16_EPS * effect
    # the embedding (changed, a vocabulary matrix) and the final norm are reported, not carried
    assert [n for n, _ in res.not_carried] == ["model.norm.weight", "model.embed_tokens.weight"] or \
        {n for n, _ in res.not_carried} == {"model.norm.weight", "model.embed_tokens.weight"}
    norm_rel = dict(res.not_carried)["model.norm.weight"]
    assert norm_rel == pytest.approx(0.05, rel=1e-3)


def test_full_rank_with_modules_to_save_reproduces_the_delta(pair: dict[str, Path], tmp_path: Path) -> None:
    """At full rank, with the (tied) embedding saved whole, only the final norm is missing: fix it and it is the rebuild."""
    res = export_peft(pair["delta"], tmp_path / "full", base=pair["base"], rank=64, modules_to_save=["embed_tokens"])
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens"] and cfg["ensure_weight_tying"] is True
    assert [n for n, _ in res.not_carried] == ["model.norm.weight"] and res.saved_tensors == ["model.embed_tokens.weight"]
    assert max(res.rel_errors.values()) < 2e-3  # from ‖Δ‖² - Σσ²: the floor is sqrt(fp32 eps) ~ 3e-4
    peft_model = _peft(pair["base"], tmp_path / "full")
    d = Delta(pair["delta"])
    rebuilt = d.to_model(pair["base"], torch_dtype=torch.float32, progress=False)
    d.close()
    with torch.no_grad():  # the one tensor LoRA does not carry, put back by hand
        peft_model.base_model.model.model.norm.weight.copy_(rebuilt.model.norm.weight)
    want, base = _logits(rebuilt), _logits(_model(pair["base"]))
    assert float((_logits(peft_model) - want).abs().max()) <= 16 * FP16_EPS * float((want - base).abs().max())


def test_raw_coded_linear_is_factorised_too(pair: dict[str, Path], tmp_path: Path) -> None:
    d = Delta(pair["delta_raw"])
    assert d.manifest.tensors["model.layers.0.self_attn.q_proj.weight"].codec == "raw"
    d.close()
    res = export_peft(pair["delta_raw"], tmp_path / "raw", base=pair["base"], rank=32)
    assert res.rel_errors["model.layers.0.self_attn.q_proj"] < 2e-3  # full rank of a 32x32 exact delta
    _peft(pair["base"], tmp_path / "raw")


def _abs_error(delta: Path, res: Any) -> float:
    d = Delta(delta)
    try:
        return math.fsum((res.rel_errors[m] ** 2) * float(d.delta_tensor(f"{m}.weight").double().pow(2).sum()) for m in res.ranks)
    finally:
        d.close()


def test_rank_energy_and_byte_budget(pair: dict[str, Path], tmp_path: Path) -> None:
    uniform = export_peft(pair["delta"], tmp_path / "r100", base=pair["base"], rank=100)
    d = Delta(pair["delta"])
    sides = {m: min(d.manifest.tensors[f"{m}.weight"].shape) for m in uniform.ranks}
    d.close()
    assert uniform.ranks == sides and set(sides.values()) == {16, 32}  # capped by each matrix's smaller side
    by_energy = {}
    for e in (0.5, 0.9):
        res = export_peft(pair["delta"], tmp_path / f"e{e}", base=pair["base"], energy=e)
        assert all(err**2 <= 1 - e + 1e-6 for err in res.rel_errors.values())
        by_energy[e] = res.ranks
    lo, hi = by_energy[0.5], by_energy[0.9]
    assert all(hi[m] >= lo[m] for m in lo) and sum(hi.values()) > sum(lo.values())
    errors = []
    for budget in (20_000, 32_000, 48_000):  # full rank everywhere: ~64 kB
        res = export_peft(pair["delta"], tmp_path / f"b{budget}", base=pair["base"], max_bytes=budget)
        files = sum((tmp_path / f"b{budget}" / f).stat().st_size for f in ("adapter_model.safetensors", "adapter_config.json"))
        assert res.nbytes == files <= budget and files > 0.8 * budget
        assert len(set(res.ranks.values())) > 1  # per-layer ranks from measured error
        errors.append(_abs_error(pair["delta"], res))
    assert errors[0] > errors[1] > errors[2]
    # per-layer ranks (rank_pattern / alpha_pattern, r = lora_alpha): PEFT applies each layer at scaling 1
    ranks = export_peft(pair["delta"], tmp_path / "mixed", base=pair["base"], max_bytes=20_000).ranks
    lowrank = _logits(_model(pair["base"], lowrank_state_dict(pair["delta"], pair["base"], ranks)))
    effect = float((lowrank - _logits(_model(pair["base"]))).abs().max())
    assert float((_logits(_peft(pair["base"], tmp_path / "mixed")) - lowrank).abs().max()) <= 16 * FP16_EPS * effect


def test_bad_inputs_are_one_typed_line(pair: dict[str, Path], tmp_path: Path) -> None:
    d, b = str(pair["delta"]), str(pair["base"])
    for args in (["--rank", "0"], ["--energy", "1.5"], ["--energy", "0"], ["--rank", "4", "--energy", "0.5"], [],
                 ["--max-bytes", "1kB"], ["--rank", "4", "--modules-to-save", "nope"]):
        r = runner.invoke(app, ["export", "peft", d, "-b", b, "-o", str(tmp_path / "x"), *args])
        assert r.exit_code == 1 and r.output.count("error:") == 1 and "Traceback" not in r.output, (args, r.output)
    with pytest.raises(ExportError, match="rank must be"):
        export_peft(d, tmp_path / "x", base=b, rank=0)
    with pytest.raises(MissingFileError):  # a model directory is not a delta
        export_peft(b, tmp_path / "x", base=b, rank=4)
    assert not (tmp_path / "x").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_output_is_atomic_and_not_overwritten(pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export_peft(pair["delta"], out, base=pair["base"], rank=2)
    assert (out / "keep.txt").read_text() == "mine"
    r = runner.invoke(app, ["export", "peft", str(pair["delta"]), "-b", str(pair["base"]), "-o", str(out), "-r", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "model.embed_tokens.weight" in r.output  # the not-carried table
    with pytest.raises(UnsafeOutputError):
        export_peft(pair["delta"], pair["delta"] / "lora", base=pair["base"], rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_gpt2_conv1d_exports_with_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2's transposed Conv1D layers (weight [in, out]): the factors are those of Δ̂ᵀ and the config says
    fan_in_fan_out; PEFT loads it and matches deltahub's low-rank rebuild."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    base = GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    base.save_pretrained(tmp_path / "ft")
    compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d", codec="bitdelta", progress=False)
    res = export_peft(tmp_path / "d", tmp_path / "lora", base=tmp_path / "base", rank=3)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert stored["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (3, 32)  # [r, in]
    assert stored["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 3)  # [out, r]
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        ref.load_state_dict(lowrank_state_dict(tmp_path / "d", tmp_path / "base", res.ranks), strict=False)
        got = peft.PeftModel.from_pretrained(plain, tmp_path / "lora").eval()(input_ids=ids).logits
        want = ref(input_ids=ids).logits
        effect = float((want - AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()(input_ids=ids).logits).abs().max())
    assert effect > 0 and float((got - want).abs().max()) <= 16 * FP16_EPS * effect + 1e-6


def test_delta_from_the_hub_exports_against_the_pinned_base(hub_env: Any, pair: dict[str, Path], tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    from deltahub.hub import push_to_hub

    api = HfApi(endpoint=hub_env.url, token=False)
    shas = {}
    for repo, folder in (("org/base", pair["base"]), ("org/ft", pair["ft"])):
        api.create_repo(repo, exist_ok=True)
        shas[repo] = api.upload_folder(folder_path=folder, repo_id=repo).oid
    compress("org/base", "org/ft", tmp_path / "delta", progress=False, cache_dir=tmp_path / "c0", endpoint=hub_env.url)
    push_to_hub(tmp_path / "delta", "me/delta", endpoint=hub_env.url)
    res = export_peft("me/delta", tmp_path / "lora", rank=4, cache_dir=tmp_path / "c1", endpoint=hub_env.url)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("org/base", shas["org/base"]) == (res.base_model_name_or_path, res.revision)
    assert "base_model: org/base" in (tmp_path / "lora" / "README.md").read_text()
    _peft(pair["base"], tmp_path / "lora")
