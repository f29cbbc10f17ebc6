"""Truncated SVD of a delta matrix: the one home for low-rank factorisation (low-rank codecs, LoRA export).

Small or nearly full-rank requests use the exact ``torch.linalg.svd``; large matrices with a small
rank use a randomised range finder (Halko, Martinsson & Tropp 2011, with power iterations and a
fixed-seed Gaussian sketch) so the result is deterministic: the same delta always gives the same
factors, and so the same compressed bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import EncodeInput

#: Matrices with at most this many elements always take the exact SVD.
EXACT_NUMEL = 1 << 20
#: Extra sketch columns of the randomised range finder.
OVERSAMPLE = 10
#: Power iterations of the randomised range finder (2 is ample for the fast-decaying spectra of deltas).
POWER_ITERS = 2
#: Seed of the Gaussian sketch (fixed: factorisation is deterministic).
SEED = 0


def truncated_svd(m: torch.Tensor, rank: int, *, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` singular triplets of the 2-D ``m`` in float32, largest first.

    Returns ``(U, S, Vh)`` with ``U`` of shape ``[rows, r]``, ``S`` of shape ``[r]`` and ``Vh`` of shape
    ``[r, cols]`` where ``r = min(rank, rows, cols)``, so ``U @ diag(S) @ Vh`` is the best rank-``r``
    approximation (exactly for the exact path, to randomised-SVD accuracy otherwise).  ``exact``
    forces the choice; by default the exact SVD is used for small matrices or ranks above 1/4 of
    the smaller side.
    """
    if m.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(m.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    a = m.to(torch.float32)
    rows, cols = a.shape
    r = min(rank, rows, cols)
    if exact is None:
        exact = a.numel() <= EXACT_NUMEL or 4 * (r + OVERSAMPLE) >= min(rows, cols)
    if exact:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()
    return _randomized(a, r)


def _randomized(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised SVD with a seeded sketch: Q spans A's top range, then the small SVD of Qᵀ A."""
    rows, cols = a.shape
    q = _range(a, min(r + OVERSAMPLE, rows, cols), POWER_ITERS)
    b = q.T @ a
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()


def _range(a: torch.Tensor, k: int, power_iters: int) -> torch.Tensor:
    """Orthonormal ``[rows, k]`` basis of ``a``'s range from the seeded Gaussian sketch ``a @ Ω``, refined by
    ``power_iters`` subspace iterations."""
    gen = torch.Generator().manual_seed(SEED)
    q, _ = torch.linalg.qr(a @ torch.randn(a.shape[1], k, generator=gen, dtype=torch.float32))
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    return q


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` (0 < energy <= 1) of ``sum(s**2)``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def delta_svd(inp: EncodeInput, rank: int, *, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` triplets of ``inp``'s delta (as its 2-D matrix view), cached on ``inp``.

    A cached factorisation of at least ``rank`` triplets is sliced, so the allocation factorises each
    tensor once (at the largest rank of its candidates) for every low-rank candidate.
    """
    from .base import matrix_view_shape

    cached = inp._svd
    rows, cols = matrix_view_shape(inp.delta.shape)
    if cached is None or cached[1].numel() < min(rank, rows, cols):
        cached = truncated_svd(inp.delta.reshape(rows, cols), rank, exact=exact)
        inp._svd = cached
    u, s, vh = cached
    r = min(rank, s.numel())
    return u[:, :r], s[:r], vh[:r]


def sketch_energy(m: torch.Tensor, rank: int) -> float:
    """Share of ``‖m‖²`` in a ``rank``-dimensional randomised range of ``m`` (seeded Gaussian sketch, no power
    iteration): a cheap lower estimate of the top-``rank`` energy ``Σ_(k<rank) σ_k² / Σ σ²``, exact when ``m``
    has rank ``<= rank``. Two products with a ``[cols, rank]`` sketch and a thin QR, no SVD."""
    a = m.to(torch.float32).contiguous()
    total = float(torch.dot(a.view(-1), a.view(-1)))  # float32 BLAS sums: ample for a share compared with 0.7
    rows, cols = a.shape
    k = min(rank, rows, cols)
    if total == 0.0 or k == 0:
        return 1.0 if total == 0.0 else 0.0
    q = _range(a, k, 0)
    p = (q.T @ a).reshape(-1)
    return min(float(torch.dot(p, p)) / total, 1.0)
