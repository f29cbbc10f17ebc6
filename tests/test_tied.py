"""Tied weights stored under two names (format 1.3 ``alias`` entries): coded once, rebuilt under both names.

The pairs here are tiny Llamas whose checkpoints store ``lm_head.weight`` with the bytes of
``model.embed_tokens.weight`` (base and fine-tune), as older / non-transformers checkpoints do: once with
``tie_word_embeddings`` (the loaded model ties them) and once without (two parameters, equal values).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import make_tiny_pair
from deltahub.allocation import Curve, Point, allocate
from deltahub.cli import app
from deltahub.compression import _tied_curve, compress
from deltahub.delta import Delta, apply_delta
from deltahub.errors import BaseMismatchError
from deltahub.policy import Policy, Rule
from deltahub.report import group_rows, storage_rows
from deltahub.ties import TieFinder

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
#: Embedding and LM head coded lossily (1 bit, row scales), so both have a delta adapter when resident.
LOSSY_VOCAB = dict(policy=Policy(codec="bitdelta", params={"granularity": "row"},
                                 rules=[Rule.parse("*embed_tokens*=bitdelta:granularity=row"),
                                        Rule.parse("lm_head*=bitdelta:granularity=row")]))

torch.set_num_threads(2)


def _store_head_twice(model_dir: Path) -> None:
    """Rewrite the checkpoint with ``lm_head.weight`` = a copy of the embedding's bytes (a separate tensor)."""
    sd = load_file(str(model_dir / "model.safetensors"))
    sd[HEAD] = sd[EMB].clone()
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def _tied_pair(root: Path, *, tie: bool) -> tuple[Path, Path]:
    base, ft = make_tiny_pair(root, tie=tie, vocab=256)
    for d in (base, ft):
        _store_head_twice(d)
    return base, ft


@pytest.fixture(scope="module", params=[True, False], ids=["tied-config", "untied-config"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _tied_pair(tmp_path_factory.mktemp("tied"), tie=request.param)


def _no_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compress as before format 1.3: every name coded on its own."""
    monkeypatch.setattr(TieFinder, "target", lambda self, *a, **k: None)
    monkeypatch.setattr(TieFinder, "decide", lambda self, *a, **k: None)


def _alias_and_target(d: Delta) -> tuple[str, str]:
    (alias, target), = d.manifest.aliases().items()
    return alias, target


KINDS = {"auto": {}, "bitdelta paper policy (raw vocab)": dict(codec="bitdelta"), "lossy vocab": LOSSY_VOCAB,
         "raw": dict(policy=Policy(codec="raw"))}


@pytest.mark.parametrize("kind", list(KINDS))
def test_coded_once_and_rebuilt_under_both_names(pair: tuple[Path, Path], tmp_path: Path, kind: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, ft = pair
    kw = KINDS[kind]
    m = compress(base, ft, tmp_path / "tied", progress=False, **kw)
    d = Delta(tmp_path / "tied")
    alias, target = _alias_and_target(d)
    assert {alias, target} == {EMB, HEAD} and list(m.tensors).index(target) < list(m.tensors).index(alias)
    e = m.tensors[alias]
    assert (e.codec, e.params, e.stored, e.stored_bytes, e.digests) == ("alias", {"target": target}, {}, 0, {})
    assert e.base_sha256 == m.tensors[target].base_sha256 is not None
    assert m.format_version == "1.3"
    out = apply_delta(tmp_path / "tied", base, tmp_path / "rebuilt", progress=False)
    sd = load_file(str(out / "model.safetensors"))
    assert torch.equal(sd[EMB].view(torch.uint8), sd[HEAD].view(torch.uint8))
    if kind == "auto":
        return  # the allocation spends the saved bytes elsewhere: the rebuilds differ by design
    # Coded twice (before 1.3): the pair costs twice the bytes, and the single-coded rebuild is the same.
    with monkeypatch.context() as mp:
        _no_ties(mp)
        m2 = compress(base, ft, tmp_path / "twice", progress=False, **kw)
    assert "alias" not in {x.codec for x in m2.tensors.values()}
    target_bytes = m2.tensors[target].stored_bytes
    assert target_bytes > 0 and m2.tensors[alias].stored_bytes == target_bytes
    assert m2.totals["stored_bytes"] - m.totals["stored_bytes"] == target_bytes  # the pair's bytes halved
    assert (tmp_path / "twice" / "delta.safetensors").stat().st_size - (tmp_path / "tied" / "delta.safetensors").stat().st_size \
        >= target_bytes
    sd2 = load_file(str(apply_delta(tmp_path / "twice", base, tmp_path / "rebuilt2", progress=False) / "model.safetensors"))
    for name in sd:
        assert torch.equal(sd[name].view(torch.uint8), sd2[name].view(torch.uint8)), name


def test_auto_allocation_counts_the_pair_once(pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: the directory fits the budget, the alias costs only its manifest entry, and the tied tensor gets at
    least the bytes it gets when coded twice (its error counts for both names, its bytes once)."""
    base, ft = pair
    budget = 40_000
    m = compress(base, ft, tmp_path / "d", max_bytes=budget, progress=False)
    assert sum(p.stat().st_size for p in (tmp_path / "d").iterdir()) <= budget
    alias, target = _alias_and_target(Delta(tmp_path / "d"))
    assert m.tensors[alias].stored_bytes == 0 and m.tensors[target].stored_bytes > 0
    _no_ties(monkeypatch)
    m2 = compress(base, ft, tmp_path / "twice", max_bytes=budget, progress=False)
    assert sum(p.stat().st_size for p in (tmp_path / "twice").iterdir()) <= budget
    assert m.tensors[target].stored_bytes >= max(m2.tensors[target].stored_bytes, m2.tensors[alias].stored_bytes)


def test_tied_curve_doubles_distortion_not_bytes() -> None:
    """The allocation's rule for a tensor coded once for two names: one byte cost, twice the error; with a budget
    for one upgrade, the tied tensor gets it over an untied one of the same curve."""
    pts = [Point("c", {"k": 1}, 100, 10.0), Point("c", {"k": 2}, 200, 4.0)]
    tied = _tied_curve(Curve("tied", 64, list(pts)), 2)
    assert [(p.nbytes, p.distortion) for p in tied.points] == [(100, 20.0), (200, 8.0)]
    assert _tied_curve(Curve("x", 64, list(pts)), 1).points == pts
    choice = allocate([tied, Curve("other", 64, [Point("c", {"k": 1}, 100, 12.0), Point("c", {"k": 2}, 200, 4.0)])], 300)
    assert choice["tied"].nbytes == 200 and choice["other"].nbytes == 100


def test_not_aliased_when_bases_differ_policy_differs_or_unchanged(tmp_path: Path) -> None:
    """Identical fine-tune bytes are not enough: the base tensors must be identical too (else the deltas differ),
    the policy must code both names alike, and a tensor equal to its base (0 bytes) is left 'unchanged'."""
    base, ft = make_tiny_pair(tmp_path / "p", vocab=256)
    _store_head_twice(ft)
    sd = load_file(str(base / "model.safetensors"))
    sd[HEAD] = sd[EMB] + 1e-3  # the base's head differs from its embedding
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    m = compress(base, ft, tmp_path / "a", codec="bitdelta", progress=False)
    assert not m.aliases() and m.tensors[HEAD].stored_bytes > 0 and m.tensors[EMB].stored_bytes > 0

    base2, ft2 = _tied_pair(tmp_path / "q", tie=True)
    split = Policy(codec="bitdelta", rules=[Rule.parse("*embed_tokens*=bitdelta:granularity=row")])  # head stays raw
    m = compress(base2, ft2, tmp_path / "b", policy=split, progress=False)
    assert not m.aliases() and {m.tensors[EMB].codec, m.tensors[HEAD].codec} == {"bitdelta", "raw"}

    # Norms equal to their base and to each other (same bytes, same base bytes): 'unchanged', no alias.
    m = compress(base2, ft2, tmp_path / "c", codec="bitdelta", progress=False)
    norms = [n for n, e in m.tensors.items() if "norm" in n]
    assert len(norms) >= 2 and all(m.tensors[n].codec == "unchanged" for n in norms)
    assert set(m.aliases()) <= {EMB, HEAD}


def test_three_names_alias_the_first(tmp_path: Path) -> None:
    """A tensor stored three times: two aliases, both of the first name (no chains)."""
    base, ft = _tied_pair(tmp_path, tie=False)
    for d in (base, ft):
        sd = load_file(str(d / "model.safetensors"))
        sd["zz_extra.weight"] = sd[EMB].clone()  # stored last
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    m = compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    first = next(n for n in m.tensors if n in (EMB, HEAD))
    assert m.aliases() == {n: first for n in (EMB, HEAD, "zz_extra.weight") if n != first}
    sd = Delta(tmp_path / "d").state_dict(base, progress=False)
    assert torch.equal(sd[EMB], sd[HEAD]) and torch.equal(sd[EMB], sd["zz_extra.weight"])


def test_alias_base_tensor_is_checked(tmp_path: Path) -> None:
    """The alias's own base tensor is part of the base: a base whose head no longer matches is refused
    (naming it), and applies when the check is skipped, both names still identical."""
    base, ft = _tied_pair(tmp_path, tie=True)
    compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    alias, _ = _alias_and_target(Delta(tmp_path / "d"))
    sd = load_file(str(base / "model.safetensors"))
    sd[alias] = sd[alias] + 1.0
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BaseMismatchError, match=alias.replace(".", r"\.")):
        apply_delta(tmp_path / "d", base, tmp_path / "out", progress=False)
    out = apply_delta(tmp_path / "d", base, tmp_path / "out", progress=False, check_base=False)
    rebuilt = load_file(str(out / "model.safetensors"))
    assert torch.equal(rebuilt[EMB], rebuilt[HEAD])  # decoded against the target's base tensor


def test_info_shows_the_alias_with_zero_bytes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, ft = pair
    compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    d = Delta(tmp_path / "d")
    alias, target = _alias_and_target(d)
    rows = {r["codec"]: r for r in storage_rows(d.manifest)}
    assert rows["alias"]["tensors"] == 1 and rows["alias"]["stored_bytes"] == 0
    total = rows["total"]
    assert total["stored_bytes"] == sum(e.stored_bytes for e in d.manifest.tensors.values())
    assert total["parameters"] == sum(math.prod(e.shape) for e in d.manifest.tensors.values())  # both names' parameters
    vocab = next(r for r in group_rows(d.manifest) if r["group"] == "embeddings / LM head")
    assert vocab["tensors"] == 2 and vocab["bytes"] == d.manifest.tensors[target].stored_bytes  # bytes once
    r = CliRunner().invoke(app, ["info", str(tmp_path / "d"), "--tensors"])
    assert r.exit_code == 0, r.output
    assert f"alias of {target}" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["info", str(tmp_path / "d"), "--json"])
    codecs = {row["codec"]: row for row in json.loads(r.output)["codecs"]}
    assert codecs["alias"]["stored_bytes"] == 0


# ------------------------------------------------------------------------------------------ resident


def _base_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_resident_alias_shares_the_target_adapter(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Resident: the alias uses its target's adapter (one object; counted once in delta_memory), and the
    logits are the full rebuild's; for a raw-coded pair, the two names share one exact tensor."""
    from deltahub.resident import attach_delta, delta_memory
    from deltahub.resident.layers import DeltaLinear

    base, ft = pair
    compress(base, ft, tmp_path / "lossy", progress=False, **LOSSY_VOCAB)
    compress(base, ft, tmp_path / "raw", codec="bitdelta", progress=False)  # vocab raw (paper policy)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    model = _base_model(base)
    tied_in_model = model.lm_head.weight is model.model.embed_tokens.weight
    attach_delta(model, tmp_path / "lossy", "L")
    attach_delta(model, tmp_path / "raw", "R")
    head, emb = model.lm_head, model.model.embed_tokens
    assert isinstance(head, DeltaLinear) and head.adapters["L"] is emb.adapters["L"]  # one adapter, both roles
    target_entry = Delta(tmp_path / "lossy").manifest.coded(HEAD)[1]
    assert delta_memory(model, "L")["delta_modules"] - sum(
        m.adapters["L"].sign.numel() + 4 * m.adapters["L"].scale.numel()
        for n, m in model.named_modules() if isinstance(m, DeltaLinear) and "layers" in n and "L" in m.adapters
    ) == target_entry.stored_bytes  # the pair's signs and scales counted once
    assert delta_memory(model, "R")["raw"] == 256 * 32 * 4  # one exact tensor for both names (tied in the model or not)
    if not tied_in_model:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    for name, path in (("L", tmp_path / "lossy"), ("R", tmp_path / "raw")):
        from deltahub.resident import set_adapter

        set_adapter(model, name)
        full = Delta(path).to_model(base, progress=False)
        torch.testing.assert_close(_logits(model, ids), _logits(full, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ distill and export


def test_distill_trains_the_pair_as_one_tensor(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The student's alias is its target's trainable weight: a change of the target's trained parameter shows in
    both roles (the logits equal a model whose embedding and head both hold it); distilling keeps the alias."""
    from deltahub.distill import Student, distill

    base, ft = pair
    out = tmp_path / "d"
    compress(base, ft, out, progress=False, **LOSSY_VOCAB)
    alias, target = _alias_and_target(Delta(out))
    student = Student(out, base, torch.device("cpu"))
    assert target in student.coded and alias not in student.coded and student.tied == {alias: target}
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    full = Delta(out).to_model(base, progress=False)
    assert torch.equal(student.logits(ids), _logits(full, ids))
    with torch.no_grad():
        student.coded[target].u["scale"].add_(0.5)  # scale x (1 + 0.5 sigma / scale): both roles must see it
        w = student.coded[target].weight()
        sd = full.state_dict()
        sd[EMB].copy_(w)
        sd[HEAD].copy_(w)
        full.load_state_dict(sd)
        assert torch.allclose(student.logits(ids), _logits(full, ids), rtol=1e-5, atol=1e-5)
    before = load_file(str(out / "delta.safetensors"))[f"{target}.scale"]
    m = distill(out, base, ft, torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(2)),
                steps=3, lr=1e-2, batch_size=2, device="cpu", progress=False)
    assert m.aliases() == {alias: target} and m.distillation is not None
    assert not torch.equal(load_file(str(out / "delta.safetensors"))[f"{target}.scale"], before)
    rebuilt = Delta(out).state_dict(base, progress=False)
    assert torch.equal(rebuilt[EMB], rebuilt[HEAD])


def test_export_peft_reads_the_alias(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """export peft: the alias is rebuilt for modules_to_save / the not-carried report like its target."""
    from deltahub.export import export_peft

    base, ft = pair
    compress(base, ft, tmp_path / "d", codec="bitdelta", progress=False)
    res = export_peft(tmp_path / "d", tmp_path / "lora", base=base, rank=2, progress=False)
    carried = dict(res.not_carried)
    assert carried[EMB] == carried[HEAD] > 0
    res = export_peft(tmp_path / "d", tmp_path / "lora2", base=base, rank=2, modules_to_save=["embed_tokens", "lm_head"],
                      progress=False)
    saved = load_file(str(tmp_path / "lora2" / "adapter_model.safetensors"))
    keys = {k for k in saved if "embed_tokens" in k or "lm_head" in k}
    assert len(keys) == 2 and torch.equal(*(saved[k] for k in sorted(keys)))
