"""The shared truncated SVD (deltahub/codecs/_svd.py): optimal on the exact path, close on the randomised one, deterministic."""

import pytest
import torch

from deltahub.codecs._svd import rank_for_energy, truncated_svd


def _low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return a + noise * torch.randn(rows, cols, generator=g)


def test_exact_path_is_the_eckart_young_optimum() -> None:
    m = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    u, s, vh = truncated_svd(m, 5)
    assert u.shape == (40, 5) and s.shape == (5,) and vh.shape == (5, 30)
    s_all = torch.linalg.svdvals(m)
    err = torch.linalg.norm(m - u @ torch.diag(s) @ vh)
    assert err == pytest.approx(float(s_all[5:].pow(2).sum().sqrt()), rel=1e-4)


def test_randomized_path_is_near_optimal_and_deterministic() -> None:
    m = _low_rank_plus_noise(1500, 1200, 16, 0.01)
    u, s, vh = truncated_svd(m, 16, exact=False)
    best = float(torch.linalg.svdvals(m)[16:].pow(2).sum().sqrt())
    err = float(torch.linalg.norm(m - u @ torch.diag(s) @ vh))
    assert err <= 1.01 * best
    u2, s2, vh2 = truncated_svd(m, 16, exact=False)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
    assert torch.allclose(u.T @ u, torch.eye(16), atol=1e-4)


def test_rank_is_capped_by_the_matrix() -> None:
    u, s, vh = truncated_svd(torch.ones(3, 7), 50)
    assert s.shape == (3,)


def test_rank_for_energy() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(torch.zeros(4), 0.5) == 1
    with pytest.raises(ValueError):
        rank_for_energy(s, 0.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        truncated_svd(torch.ones(3), 1)
    with pytest.raises(ValueError):
        truncated_svd(torch.ones(3, 3), 0)
