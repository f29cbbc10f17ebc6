"""Tests of deltahub.evaluation on a tiny random Llama: KL, loss and relative L2 against brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from deltahub.evaluation import evaluate_models, heldout_loss, mean_token_kl, relative_l2

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-32, vocab-128 LlamaForCausalLM with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    # Default init is tiny (std 0.02), which makes every distribution nearly uniform; widen it.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def _perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A deep copy of model with gaussian noise added to every weight."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    """5 blocks of 16 tokens: an odd count so the last batch is partial."""
    gen = torch.Generator().manual_seed(42)
    return torch.randint(0, 128, (5, 16), generator=gen)


def _brute_force_kl(ref: torch.nn.Module, model: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean per-token KL(ref ‖ model) in float64, one block at a time, with explicit loops over tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            lp = torch.log_softmax(ref(input_ids=block[None]).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(model(input_ids=block[None]).logits[0, :-1].double(), -1)
            for t in range(lp.shape[0]):
                total += float((lp[t].exp() * (lp[t] - lq[t])).sum())
                count += 1
    return total / count


def test_kl_of_model_with_itself_is_zero(blocks: torch.Tensor) -> None:
    model = _tiny_llama()
    assert abs(mean_token_kl(model, model, blocks, batch_size=2)) <= 1e-6
    assert abs(mean_token_kl(model, copy.deepcopy(model), blocks, batch_size=3)) <= 1e-6


def test_kl_matches_float64_brute_force(blocks: torch.Tensor) -> None:
    ref = _tiny_llama()
    model = _perturbed(ref)
    expected = _brute_force_kl(ref, model, blocks)
    assert expected > 1e-4  # the perturbation is large enough to be a real test
    for batch_size in (1, 2, 4, 8):
        got = mean_token_kl(ref, model, blocks, batch_size=batch_size)
        assert got > 0
        assert got == pytest.approx(expected, rel=1e-4)


def test_kl_is_not_symmetric_and_uses_reference_first(blocks: torch.Tensor) -> None:
    ref = _tiny_llama()
    model = _perturbed(ref, scale=0.2)
    forward = mean_token_kl(ref, model, blocks)
    assert forward == pytest.approx(_brute_force_kl(ref, model, blocks), rel=1e-4)
    assert mean_token_kl(model, ref, blocks) == pytest.approx(_brute_force_kl(model, ref, blocks), rel=1e-4)


def test_heldout_loss_matches_labels_loss(blocks: torch.Tensor) -> None:
    model = _tiny_llama()
    with torch.no_grad():
        expected = float(model(input_ids=blocks, labels=blocks).loss)
        per_block = [float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks]
    for batch_size in (1, 2, 4, 5, 16):
        assert heldout_loss(model, blocks, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    # Equal-length blocks: the token-weighted mean equals the mean of per-block losses.
    assert heldout_loss(model, blocks) == pytest.approx(sum(per_block) / len(per_block), rel=1e-5)


def test_heldout_loss_restores_training_mode(blocks: torch.Tensor) -> None:
    model = _tiny_llama().train()
    heldout_loss(model, blocks)
    assert model.training
    model.eval()
    heldout_loss(model, blocks)
    assert not model.training


def test_evaluate_models_agrees_with_single_metrics(blocks: torch.Tensor) -> None:
    ref = _tiny_llama()
    a = _perturbed(ref, scale=0.05, seed=1)
    b = _perturbed(ref, scale=0.2, seed=2)
    results = evaluate_models({"ref": ref, "a": a, "b": b}, blocks, reference="ref", batch_size=2)
    assert set(results) == {"ref", "a", "b"}
    assert results["ref"]["kl"] == 0.0
    for name, model in (("ref", ref), ("a", a), ("b", b)):
        r = results[name]
        assert r["tokens"] == blocks.shape[0] * (blocks.shape[1] - 1)
        assert r["loss"] == pytest.approx(heldout_loss(model, blocks), rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
        if name != "ref":
            assert r["kl"] == pytest.approx(mean_token_kl(ref, model, blocks), rel=1e-5)
    assert 0 < results["a"]["kl"] < results["b"]["kl"]


def test_evaluate_models_unknown_reference(blocks: torch.Tensor) -> None:
    with pytest.raises(KeyError):
        evaluate_models({"a": _tiny_llama()}, blocks, reference="missing")


def test_kl_with_zero_probabilities() -> None:
    """Tokens the reference gives probability exactly 0 (log-prob -inf) contribute nothing, not nan."""
    from deltahub.evaluation import _kl_sum

    ref = torch.log_softmax(torch.tensor([[[0.0, 1.0, -float("inf")]]]), -1)
    other = torch.log_softmax(torch.tensor([[[1.0, 0.0, 2.0]]]), -1)
    expected = float((ref[..., :2].exp() * (ref[..., :2] - other[..., :2])).sum())
    assert _kl_sum(ref, other) == pytest.approx(expected, rel=1e-6)


def test_rejects_bad_blocks() -> None:
    model = _tiny_llama()
    with pytest.raises(ValueError):
        heldout_loss(model, torch.zeros((2, 8), dtype=torch.long), batch_size=0)
    from deltahub.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError):
        heldout_loss(model, torch.zeros((2, 1), dtype=torch.long))
    with pytest.raises(ShapeMismatchError):
        heldout_loss(model, torch.zeros((8,), dtype=torch.long))


def test_relative_l2_values() -> None:
    exact = torch.tensor([3.0, 4.0])
    assert relative_l2(exact.clone(), exact) == 0.0
    assert relative_l2(torch.zeros(2), exact) == pytest.approx(1.0)
    assert relative_l2(exact * 1.1, exact) == pytest.approx(0.1, rel=1e-6)
    assert relative_l2(torch.tensor([3.0, 5.0]), exact) == pytest.approx(0.2, rel=1e-6)  # |(0,1)|/5
    assert relative_l2(torch.zeros(3, 4), torch.zeros(3, 4)) == 0.0
    assert relative_l2(torch.ones(3), torch.zeros(3)) == math.inf


def test_relative_l2_dtypes_and_chunking() -> None:
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(3_000, 2_000, generator=gen)  # 6M elements: more than one chunk
    noise = torch.randn(exact.shape, generator=gen) * 1e-3
    expected = float((noise.double()).norm() / exact.double().norm())
    assert relative_l2(exact + noise, exact) == pytest.approx(expected, rel=1e-4)
    # bf16 inputs are compared at their exact values.
    e16 = exact[:100].bfloat16()
    a16 = (exact[:100] * 0.5).bfloat16()
    ref = float((a16.double() - e16.double()).norm() / e16.double().norm())
    assert relative_l2(a16, e16) == pytest.approx(ref, rel=1e-12)


def test_relative_l2_shape_mismatch() -> None:
    from deltahub.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError):
        relative_l2(torch.zeros(3), torch.zeros(4))
