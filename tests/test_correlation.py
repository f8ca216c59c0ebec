"""Correlation maths: Gaussian target, symmetric KL, entropy, sigma range (hand-computed values)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalib_fod.models.fod.correlation import LOG_EPS, entropy, gaussian_target, sigma_from_logits, symmetric_kl
from anomalib_fod.models.fod.transformer import grid_coordinates, squared_distances


def paper_gaussian(sigma: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The paper's formula written out element by element, then divided by its row sum.

    ``g(i, j) = exp(-dy / (2 sy^2) - dx / (2 sx^2)) / (2 pi sy sx)`` with ``dy``/``dx`` the squared
    row/column distance between query token ``i`` and key token ``j`` on a row-major grid.
    """
    batch, heads, length, _ = sigma.shape
    out = torch.zeros(batch, heads, length, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                sy, sx = float(sigma[b, h, i, 0]), float(sigma[b, h, i, 1])
                row = []
                for j in range(length):
                    dy = float((i // width - j // width) ** 2)
                    dx = float((i % width - j % width) ** 2)
                    row.append(math.exp(-dy / (2 * sy**2) - dx / (2 * sx**2)) / (2 * math.pi * sy * sx))
                total = sum(row)
                out[b, h, i] = torch.tensor([v / total for v in row], dtype=torch.float64)
    return out


def test_log_eps_is_the_papers():
    assert LOG_EPS == 1e-4


def test_grid_and_distances():
    coords = grid_coordinates(2, 3)
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    dy, dx = squared_distances(coords, coords)
    assert dy.shape == dx.shape == (6, 6)
    # token 0 = (0, 0), token 5 = (1, 2)
    assert dy[0, 5] == 1.0
    assert dx[0, 5] == 4.0
    assert torch.equal(dy, dy.T)
    assert torch.all(dy.diagonal() == 0) and torch.all(dx.diagonal() == 0)


def test_gaussian_target_matches_paper_formula():
    torch.manual_seed(0)
    height, width = 3, 4
    sigma = 0.3 + 1.7 * torch.rand(2, 3, height * width, 2)  # (B, H, L, 2) in [0.3, 2]
    coords = grid_coordinates(height, width)
    target = gaussian_target(sigma, *squared_distances(coords, coords))
    assert target.shape == (2, 3, height * width, height * width)
    expected = paper_gaussian(sigma, height, width)
    torch.testing.assert_close(target.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 3, height * width))


def test_gaussian_target_is_anisotropic():
    coords = grid_coordinates(3, 3)
    sigma = torch.tensor([0.5, 2.0]).expand(1, 1, 9, 2)  # narrow in y, wide in x
    target = gaussian_target(sigma, *squared_distances(coords, coords))
    centre = target[0, 0, 4]  # token (1, 1)
    # one step in x (token 3 / 5) gets far more mass than one step in y (token 1 / 7)
    assert centre[3] > 5 * centre[1]  # exp(-1/8) vs exp(-2): ratio 6.5
    torch.testing.assert_close(centre[3], centre[5])
    torch.testing.assert_close(centre[1], centre[7])


def test_gaussian_target_cross_distances():
    """Query and key grids may differ (inter branch: image tokens to reference tokens)."""
    queries = grid_coordinates(2, 2)
    keys = grid_coordinates(3, 1)
    sigma = torch.ones(2, 1, 4, 2)
    target = gaussian_target(sigma, *squared_distances(queries, keys))
    assert target.shape == (2, 1, 4, 3)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 1, 4))


@settings(max_examples=30, deadline=None)
@given(
    log_sigma=st.lists(st.floats(min_value=-12.0, max_value=3.0), min_size=2, max_size=2),
    height=st.integers(1, 4),
    width=st.integers(1, 4),
)
def test_gaussian_target_rows_sum_to_one_for_any_sigma(log_sigma, height, width):
    sigma = torch.tensor(log_sigma).exp().expand(1, 2, height * width, 2)
    coords = grid_coordinates(height, width)
    target = gaussian_target(sigma, *squared_distances(coords, coords))
    assert torch.isfinite(target).all()
    assert (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(1, 2, height * width))


def test_sigma_from_logits_range():
    logits = torch.cat([torch.linspace(-1e4, 1e4, 2001), torch.tensor([-math.inf, math.inf, 0.0])])
    sigma = sigma_from_logits(logits)
    assert torch.isfinite(sigma).all()
    assert (sigma > 0).all()
    # 3 ** (sigmoid + 1e-5) - 1 saturates at 3 ** 1.00001 - 1 = 2.000033 (the paper's formula); "(0, 2]"
    # therefore holds up to that 1e-5 shift.
    assert sigma.max() <= 3.0 ** (1.0 + 1e-5) - 1.0 + 1e-6
    assert sigma.max() > 1.999
    assert sigma.min() < 1e-4
    torch.testing.assert_close(sigma_from_logits(torch.tensor(0.0)), torch.tensor(3.0 ** (0.5 + 1e-5) - 1.0))
    ordered = sigma_from_logits(torch.linspace(-2, 2, 50))
    assert (ordered.diff() > 0).all()


def test_sigma_from_logits_keeps_pairs():
    logits = torch.randn(2, 3, 5, 2)
    assert sigma_from_logits(logits).shape == logits.shape


def test_symmetric_kl_hand_computed():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    eps = 1e-4
    expected = sum(
        (pi - qi) * (math.log(pi + eps) - math.log(qi + eps)) for pi, qi in zip(p.tolist(), q.tolist(), strict=True)
    )
    # (0.25 * ln(0.5001 / 0.2501)) * 2 + (-0.5) * ln(0.0001 / 0.5001)
    assert expected == pytest.approx(0.5 * math.log(0.5001 / 0.2501) + 0.5 * math.log(0.5001 / 0.0001))
    result = symmetric_kl(p.view(1, 1, 1, 3), q.view(1, 1, 1, 3))
    assert result.shape == (1, 1)
    assert result.item() == pytest.approx(expected, rel=1e-6)
    assert result.item() == pytest.approx(4.60517, abs=1e-4)


def test_symmetric_kl_disjoint_one_hot():
    """Point masses on different keys: 2 * ln((1 + eps) / eps) = 2 ln(10001) (finite thanks to eps)."""
    p = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    q = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert symmetric_kl(p, q).item() == pytest.approx(2 * math.log(10001), rel=1e-6)
    assert symmetric_kl(p, q).item() == pytest.approx(18.42088, abs=1e-4)


def test_symmetric_kl_sums_keys_averages_heads_and_is_symmetric():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)
    q = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)
    result = symmetric_kl(p, q)
    assert result.shape == (2, 4)
    manual = torch.zeros(2, 4, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for i in range(4):
                manual[b, i] += sum(
                    (float(p[b, h, i, j]) - float(q[b, h, i, j]))
                    * (math.log(float(p[b, h, i, j]) + 1e-4) - math.log(float(q[b, h, i, j]) + 1e-4))
                    for j in range(5)
                ) / 3
    torch.testing.assert_close(result.double(), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(symmetric_kl(q, p), result)
    assert (result >= 0).all()
    assert symmetric_kl(p, p).abs().max() == 0


def test_symmetric_kl_broadcasts_target():
    p = torch.softmax(torch.randn(3, 2, 4, 6), dim=-1)
    q = torch.softmax(torch.randn(1, 2, 4, 6), dim=-1)
    torch.testing.assert_close(symmetric_kl(p, q), symmetric_kl(p, q.expand_as(p)))


def test_entropy_hand_computed():
    uniform = torch.full((1, 1, 1, 4), 0.25)
    # -4 * 0.25 * ln(0.25 + 1e-4) = -ln(0.2501)
    assert entropy(uniform).item() == pytest.approx(-math.log(0.2501), rel=1e-6)
    assert entropy(uniform).item() == pytest.approx(1.38589, abs=1e-5)
    one_hot = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3)
    assert entropy(one_hot).item() == pytest.approx(-math.log(1.0001), abs=1e-7)
    p = torch.tensor([0.7, 0.2, 0.1])
    expected = -sum(v * math.log(v + 1e-4) for v in p.tolist())
    assert entropy(p.view(1, 1, 1, 3)).item() == pytest.approx(expected, rel=1e-6)


def test_entropy_averages_heads():
    # head 0 uniform over 2 keys, head 1 one-hot: mean of the two entropies
    maps = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).view(1, 2, 1, 2)
    expected = (-math.log(0.5001) + -math.log(1.0001)) / 2
    result = entropy(maps)
    assert result.shape == (1, 1)
    assert result.item() == pytest.approx(expected, rel=1e-6)
