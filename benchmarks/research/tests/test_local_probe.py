"""``benchmarks/research/local_probe.py`` and ``position_probe.py``: the position-restricted nearest token and the
position share of the training tokens."""

from __future__ import annotations

import torch

from local_probe import local_nearest  # noqa: E402
from position_probe import position_share  # noqa: E402


def test_the_local_nearest_is_the_brute_force_kth_distance_within_the_window() -> None:
    generator = torch.Generator().manual_seed(0)
    h, w, channels = 5, 6, 3
    queries = torch.randn(4, h * w, channels, generator=generator)
    bank = torch.randn(7, h * w, channels, generator=generator)
    for radius, k in ((0, 1), (1, 1), (1, 3), (2, 5)):
        expected = torch.zeros(4, h * w)
        for i in range(h * w):
            window = [j for j in range(h * w) if abs(j // w - i // w) <= radius and abs(j % w - i % w) <= radius]
            distances = torch.cdist(queries[:, i], bank[:, window].transpose(0, 1).reshape(-1, channels))
            expected[:, i] = distances.sort(dim=1).values[:, k - 1]
        torch.testing.assert_close(local_nearest(queries, bank, (h, w), radius, k), expected)


def test_the_position_share_is_high_when_position_tells_the_token_and_low_when_not() -> None:
    generator = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 40, 5, generator=generator)
    noise = torch.randn(300, 40, 5, generator=generator)
    assert position_share(pattern + 0.1 * noise)["share"] > 0.95
    assert position_share(noise)["share"] < 0.02
