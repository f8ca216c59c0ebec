"""``benchmarks/research/feature_distance.py``: the label-free shrinkage choice and the level scalings."""

from __future__ import annotations


import pytest
import torch

from feature_distance import WEIGHTS, held_out_weight, scale_levels  # noqa: E402


def _tokens(scales: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``(count, L, C)`` Gaussian tokens, position ``l`` scaled channel-wise by ``scales[l]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *scales.shape, generator=generator) * scales


def test_held_out_weight_follows_how_much_positions_differ() -> None:
    channels, positions = 4, 16
    # Every position has its own dominant channel, 30x the others: one shared covariance fits none.
    distinct = torch.ones(positions, channels)
    distinct[torch.arange(positions), torch.arange(positions) % channels] = 30.0
    assert held_out_weight(_tokens(distinct, 200, 0)) == min(WEIGHTS)
    # The same distribution everywhere: pooling all positions predicts held-out images best.
    same = torch.linspace(1.0, 3.0, channels).expand(positions, channels)
    assert held_out_weight(_tokens(same, 40, 1)) == max(WEIGHTS)


def test_scale_levels() -> None:
    scores = [torch.tensor([[1.0, 3.0]]), torch.tensor([[10.0, 30.0]])]
    train = [torch.tensor([[1.0, 3.0]]), torch.tensor([[10.0, 30.0]])]
    assert scale_levels(scores, train, "none") is scores
    z = scale_levels(scores, train, "z")
    torch.testing.assert_close(z[0], z[1])  # each level in its own training z-units
    assert scale_levels(scores, train, "level1") == [scores[1]]
    weighted = scale_levels(scores, train, "weight0.75")
    # The model averages the levels: 0.75 / 0.25 of their sum after this scaling.
    torch.testing.assert_close(torch.stack(weighted).mean(0), 0.75 * scores[0] + 0.25 * scores[1])
    with pytest.raises(ValueError, match="unknown level scaling"):
        scale_levels(scores, train, "median")
