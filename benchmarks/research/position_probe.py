"""How much of a normal token's look does its position tell? A label-free statistic of the training images.

Research probe (frozen features of the training images only). A per-position Gaussian spends its parameters on
where a look is seen; the nearest-token distance forgets position. Which one models a product's normal tokens
better depends on how much of a token's variation its grid position explains: per level, in the shared whitening
of the training tokens (gain 1.0),

    share = between-position variance of the per-position means / total variance,

with the between-position part corrected for the sampling noise of a mean of N images (``W / N``). Near 0 for a
texture (every position sees every look), near 1 for an aligned part whose look is fixed by where it is.

    python benchmarks/research/position_probe.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 256 256 \\
        --out results/research/position_256.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nearest_probe import shared_whitening  # noqa: E402
from selection_probe import FeatureProbe, probe_parser, run_datasets  # noqa: E402


def position_share(tokens: torch.Tensor) -> dict[str, float]:
    """Share of the ``(N, L, C)`` tokens' whitened variance that their position explains, corrected for the noise of
    N-image means, with its two parts (per channel, so whitened total is about 1)."""
    count, _, channels = tokens.shape
    white = (tokens.flatten(0, 1) @ shared_whitening(tokens.flatten(0, 1))).double().reshape(tokens.shape)
    means = white.mean(dim=0)  # (L, C)
    within = float(((white - means) ** 2).sum(dim=2).mean() * count / (count - 1)) / channels
    between = float(((means - means.mean(dim=0)) ** 2).sum(dim=1).mean()) / channels - within / count
    return {"share": between / (between + within), "between": between, "within": within}


def run_one(args: Any, name: str, root: Path, category: str) -> list[dict[str, Any]]:  # noqa: ANN401
    probe = FeatureProbe(args, root, category)
    rows = []
    for level, tokens in enumerate(probe.plain["tokens"]):
        row = {"dataset": name, "level": level, "grid": list(probe.grids[level]), "images": probe.count,
               "image_size": list(probe.size), **position_share(tokens)}
        print(f"{name} level {level}: share {row['share']:.3f} (between {row['between']:.3f}, within "
              f"{row['within']:.3f}, {probe.count} images)", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "unused (the statistic draws nothing)")
    parser.set_defaults(gains=[1.0])
    return run_datasets(parser, argv, run_one)


if __name__ == "__main__":
    raise SystemExit(main())
