"""``benchmarks/research/nearest_probe.py``: the nearest-token distance and its bank."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nearest_probe import NearestToken, nearest, report  # noqa: E402


def test_nearest_is_the_brute_force_minimum_in_chunks() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(50, 3, generator=generator), torch.randn(20, 3, generator=generator)
    expected = (queries[:, None] - bank[None]).norm(dim=-1).amin(dim=1)
    torch.testing.assert_close(nearest(queries, bank, chunk=7), expected)


def test_a_training_token_is_at_distance_zero_and_whitening_weighs_channels_equally() -> None:
    # (N, L=1, C=2) tokens on a grid: the first channel spans [-1, 1], the second ten times as much
    quiet, loud = torch.meshgrid(torch.linspace(-1, 1, 11), torch.linspace(-10, 10, 11), indexing="ij")
    train = torch.stack((quiet.flatten(), loud.flatten()), dim=-1)[:, None]
    whitened = NearestToken([train], size=10_000, seed=0, whiten=True)
    raw = NearestToken([train], size=10_000, seed=0, whiten=False)
    assert float(whitened([train])[0].abs().max()) < 1e-3
    # The same raw step of 3 beyond the training range along either channel: equal in raw units, but along the
    # quiet channel it is ten of the loud channel's steps once each channel is in its own units.
    beyond_quiet, beyond_loud = torch.tensor([[[4.0, 0.0]]]), torch.tensor([[[0.0, 13.0]]])
    torch.testing.assert_close(raw([beyond_quiet])[0], raw([beyond_loud])[0])
    assert float(whitened([beyond_quiet])[0]) > 9 * float(whitened([beyond_loud])[0])


def test_the_bank_keeps_size_tokens_chosen_by_the_seed() -> None:
    train = torch.randn(10, 8, 3, generator=torch.Generator().manual_seed(2))
    first, again = NearestToken([train], 16, seed=5, whiten=False), NearestToken([train], 16, seed=5, whiten=False)
    other = NearestToken([train], 16, seed=6, whiten=False)
    assert first.banks[0].shape == (16, 3)
    torch.testing.assert_close(first.banks[0], again.banks[0])
    assert not torch.equal(first.banks[0], other.banks[0])


def test_a_coreset_bank_covers_rare_looks_that_a_random_bank_misses() -> None:
    generator = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0], [-20.0, 0.0]])
    sizes = [500, 2, 2, 2, 2]  # one common look, four rare ones
    train = torch.cat([c + 0.1 * torch.randn(n, 2, generator=generator) for c, n in zip(centres, sizes, strict=True)])
    train = train[:, None]  # (N, L=1, C=2)
    coreset = NearestToken([train], 5, seed=0, whiten=False, coreset=True)
    random = NearestToken([train], 5, seed=0, whiten=False)
    assert coreset.banks[0].shape == (5, 2)
    # every bank row is a training token
    assert float((coreset.banks[0][:, None] - train[None, :, 0]).norm(dim=-1).amin(dim=1).max()) < 1e-6
    assert float(coreset([train])[0].max()) < 1.0  # one centre per look
    assert float(random([train])[0].max()) > 10.0


def test_report_averages_seeds_and_compares_with_the_default(tmp_path: Path) -> None:
    rows = [
        {"dataset": d, "seed": seed, "candidate": c, "bank": 10, "coreset": False, "image_size": [64, 64],
         "image_auroc": value + 0.01 * seed, "pixel_auroc": value}
        for d, offset in (("a", 0.0), ("b", 0.1))
        for c, value in (("default", 0.5 + offset), ("sum_z", 0.6 + offset))
        for seed in (0, 2)
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = report(path)
    assert "64x64 px, bank 10 (random tokens)" in table
    row = next(line for line in table.splitlines() if line.startswith("| `sum_z`"))
    cells = [cell.strip() for cell in row.split("|")[2:-1]]
    assert cells == ["0.6100 ± 0.0141 / 0.6000 ± 0.0000 (n 2)", "0.7100 ± 0.0141 / 0.7000 ± 0.0000 (n 2)",
                     "+0.1000 / +0.1000"]
