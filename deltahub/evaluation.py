"""Quality metrics for reconstructed models: held-out loss, per-token KL, relative L2 error.

Eval loss alone cannot tell codecs apart at demo fine-tune strength (see shared/README.md), so
every comparison also reports KL(reference ‖ model) per predicted token and the relative L2
error of each delta.  Everything works batch by batch so memory stays bounded by one batch of
logits per model, never by the whole evaluation set.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ShapeMismatchError

__all__ = [
    "evaluate_models",
    "heldout_loss",
    "mean_token_kl",
    "relative_l2",
]

# Elements per chunk in relative_l2: bounds the float64 temporaries to ~32 MiB.
_L2_CHUNK = 1 << 22


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put models in eval mode under no_grad, restoring each one's training flag afterwards."""
    previous = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, was_training in zip(models, previous):
            m.train(was_training)


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_blocks(blocks: torch.Tensor) -> None:
    """Reject anything that is not a [n, L>=2] integer tensor of token ids."""
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ShapeMismatchError(f"blocks must be [n_blocks, block_len >= 2], got {tuple(blocks.shape)}")
    if blocks.dtype not in (torch.int64, torch.int32):
        raise ShapeMismatchError(f"blocks must hold integer token ids, got {blocks.dtype}")


def _batches(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield consecutive [<=batch_size, L] slices of blocks as int64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, blocks.shape[0], batch_size):
        yield blocks[start : start + batch_size].long()


def _log_probs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the logits at the positions that have a next token: [B, L-1, V]."""
    batch = batch.to(_device_of(model))
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _nll_sum(log_probs: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed negative log-likelihood of the next tokens, accumulated in float64."""
    targets = batch[:, 1:].to(log_probs.device)
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll.double().sum())


def _kl_sum(ref_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Σ over tokens of KL(ref ‖ model): each token's vocab sum in float32, the token sum in float64."""
    ref_log_probs = ref_log_probs.to(log_probs.device)
    p = ref_log_probs.exp()
    per_token = (p * (ref_log_probs - log_probs)).sum(-1)
    if torch.isnan(per_token).any():
        # p == 0 where ref_log_probs == -inf gives 0 * -inf = nan; such terms are exactly 0.
        terms = torch.where(p > 0, p * (ref_log_probs - log_probs), torch.zeros((), device=p.device))
        per_token = terms.sum(-1)
    return float(per_token.double().sum())


def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of every block.

    Token-weighted, so it equals the model's own ``labels=`` loss on the whole set at once.
    """
    _check_blocks(blocks)
    total, count = 0.0, 0
    with _eval_mode(model):
        for batch in _batches(blocks, batch_size):
            batch = batch.to(_device_of(model))
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            total += float(loss.double().sum())
            count += targets.numel()
    return total / count


def mean_token_kl(
    reference_model: torch.nn.Module,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int = 4,
) -> float:
    """Mean over predicted tokens of KL(reference ‖ model), from float32 log-softmax, batch by batch.

    Only positions that have a next token in the block count, matching ``heldout_loss``.
    """
    _check_blocks(blocks)
    total, count = 0.0, 0
    with _eval_mode(reference_model, model):
        for batch in _batches(blocks, batch_size):
            ref = _log_probs(reference_model, batch)
            total += _kl_sum(ref, _log_probs(model, batch))
            del ref
            count += batch.shape[0] * (batch.shape[1] - 1)
    return total / count


def evaluate_models(
    models: Mapping[str, torch.nn.Module],
    blocks: torch.Tensor,
    reference: str,
    batch_size: int = 4,
) -> dict[str, dict[str, Any]]:
    """Loss, perplexity and KL(reference ‖ model) of every model, one forward per model per batch.

    The reference's log-probs are kept for the current batch only, so memory is bounded by one
    batch of logits per model.  Returns ``{name: {"loss", "perplexity", "kl", "top1_agreement", "tokens"}}``
    (``top1_agreement``: the share of predicted tokens whose argmax equals the reference's).
    """
    if reference not in models:
        raise KeyError(f"reference model {reference!r} is not among {sorted(models)}")
    _check_blocks(blocks)
    nll = {name: 0.0 for name in models}
    kl = {name: 0.0 for name in models}
    agree = {name: 0 for name in models}
    count = 0
    with _eval_mode(*models.values()):
        for batch in _batches(blocks, batch_size):
            ref = _log_probs(models[reference], batch)
            nll[reference] += _nll_sum(ref, batch)
            ref_top = ref.argmax(-1)
            agree[reference] += ref_top.numel()
            for name, model in models.items():
                if name == reference:
                    continue
                lp = _log_probs(model, batch)
                nll[name] += _nll_sum(lp, batch)
                kl[name] += _kl_sum(ref, lp)
                agree[name] += int((lp.argmax(-1) == ref_top.to(lp.device)).sum())
                del lp
            del ref
            count += batch.shape[0] * (batch.shape[1] - 1)
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        loss = nll[name] / count
        results[name] = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "kl": kl[name] / count,
            "top1_agreement": agree[name] / count,
            "tokens": count,
        }
    return results


def relative_l2(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact||, values taken as float32 and squares accumulated in float64.

    Returns 0.0 when both are all zero and ``inf`` when only ``exact`` is; works in chunks so a
    large embedding matrix never needs a full float64 copy.
    """
    if approx.shape != exact.shape:
        raise ShapeMismatchError(f"relative_l2: shapes differ, {tuple(approx.shape)} vs {tuple(exact.shape)}")
    a = approx.detach().reshape(-1)
    e = exact.detach().reshape(-1)
    err_sq = 0.0
    ref_sq = 0.0
    for start in range(0, e.numel(), _L2_CHUNK):
        ec = e[start : start + _L2_CHUNK].float().double()
        ac = a[start : start + _L2_CHUNK].to(ec.device).float().double()
        err_sq += float(torch.sum((ac - ec) ** 2))
        ref_sq += float(torch.sum(ec * ec))
    if ref_sq == 0.0:
        return 0.0 if err_sq == 0.0 else math.inf
    return math.sqrt(err_sq / ref_sq)
