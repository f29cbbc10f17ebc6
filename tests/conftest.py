"""Shared fixtures: tiny real transformers models made on the fly (no network)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DELTAHUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "DELTAHUB_DIGEST_CACHE" not in os.environ:  # base digests cached per test session, never in the user's cache
    os.environ["DELTAHUB_DIGEST_CACHE"] = _DIGESTS = tempfile.mkdtemp(prefix="deltahub-digests-")
    atexit.register(shutil.rmtree, _DIGESTS, True)


def make_tiny_pair(root: Path, *, dtype: torch.dtype = torch.float32, tie: bool = True, seed: int = 0,
                   delta_std: float = 1e-2, vocab: int = 128, max_shard_size: str | None = None) -> tuple[Path, Path]:
    """Save a tiny random Llama as base and a perturbed copy as fine-tune (every tensor changed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    base = LlamaForCausalLM(cfg).to(dtype)
    ft = LlamaForCausalLM(cfg).to(dtype)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "norm" in name:
                continue  # norms stay identical: exercises the "unchanged" path
            p.add_((torch.randn_like(p, dtype=torch.float32) * delta_std).to(dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base.save_pretrained(root / "base", **kw)
    ft.save_pretrained(root / "ft", **kw)
    return root / "base", root / "ft"


@pytest.fixture
def tiny_pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_tiny_pair(tmp_path)


@pytest.fixture(params=["native", "numpy"])
def decode_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with the native decode kernels and once with the numpy paths
    (``DELTAHUB_NATIVE``); the native run is skipped where the extension was not built."""
    from deltahub.codecs._accel import native_available

    if request.param == "native" and not native_available():
        pytest.skip("the native kernels were not built (no C compiler at install)")
    monkeypatch.setenv("DELTAHUB_NATIVE", "1" if request.param == "native" else "0")
    return request.param
