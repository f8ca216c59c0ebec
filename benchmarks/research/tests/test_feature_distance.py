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


def test_weighted_scalings_of_any_number_of_levels() -> None:
    scores = [torch.tensor([[1.0, 3.0]]), torch.tensor([[10.0, 30.0]]), torch.tensor([[2.0, 2.0]])]
    train = [torch.tensor([[1.0, 3.0]]), torch.tensor([[10.0, 30.0]]), torch.tensor([[1.0, 3.0]])]
    weighted = scale_levels(scores, train, "w:0.5,0.4375,0.0625")
    # The model averages the levels: these weights (normalised) of their sum after this scaling.
    expected = 0.5 * scores[0] + 0.4375 * scores[1] + 0.0625 * scores[2]
    torch.testing.assert_close(torch.stack(weighted).mean(0), expected)
    # A zero weight leaves that level out: the model's two-level map beside a third level.
    torch.testing.assert_close(
        torch.stack(scale_levels(scores, train, "w:0,1,1")).mean(0), 0.5 * (scores[1] + scores[2])
    )
    z = scale_levels(scores, train, "z")
    z_weighted = scale_levels(scores, train, "zw:1,1,2")
    torch.testing.assert_close(torch.stack(z_weighted).mean(0), 0.25 * z[0] + 0.25 * z[1] + 0.5 * z[2])


def test_pooled_levels_pool_the_finest_level_apart_and_copy_it_unpooled() -> None:
    from feature_distance import pooled_levels  # noqa: PLC0415

    class Model:
        pool = torch.nn.AvgPool2d(3, stride=1, padding=1)

        @staticmethod
        def feature_extractor(images: torch.Tensor) -> list[torch.Tensor]:
            return [images, images[..., ::2, ::2]]

    images = torch.randn(2, 4, 8, 8)
    default = pooled_levels(Model, None, False)(images)
    torch.testing.assert_close(default[0], Model.pool(images))
    unpooled = pooled_levels(Model, 1, False)(images)
    torch.testing.assert_close(unpooled[0], images)
    torch.testing.assert_close(unpooled[1], Model.pool(images[..., ::2, ::2]))
    copied = pooled_levels(Model, None, True)(images)
    assert len(copied) == 3
    torch.testing.assert_close(copied[0], images)
    torch.testing.assert_close(copied[1], Model.pool(images))


def test_scale_to_larger_keeps_the_scale_a_defect_shows_at() -> None:
    from feature_distance import scale_to_larger  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    grids = [(4, 4), (4, 4), (2, 2)]
    train = [torch.randn(20, h * w, generator=generator).abs() for h, w in grids]
    quiet = [torch.full((1, h * w), float(t.mean())) for t, (h, w) in zip(train, grids, strict=True)]
    fine = [level.clone() for level in quiet]
    fine[0][0, 5] += 10 * float(train[0].std())  # one cell far out on the first level alone
    quiet_map = scale_to_larger(quiet, train, grids, (4, 4))
    fine_map = scale_to_larger(fine, train, grids, (4, 4))
    assert fine_map.shape == (1, 16)
    assert fine_map[0, 5] > quiet_map[0, 5] + 5  # the first level's z-score wins where it is the larger
    torch.testing.assert_close(fine_map[0, 10:], quiet_map[0, 10:])  # and nowhere its bilinear reach ends
