"""Can the training images choose the covariance? Held-out Gaussian likelihood against real defects.

Research probe for a label-free choice. FOD's default score (which equals the whitened distance of the backbone
features, see ``feature_distance.py``) is a mean of two Mahalanobis distances: under one covariance per level and
under each position's own (shrunk towards the shared one by a fixed ``C / (N + C)``). Both are members of one
family per level,

    mean_p(b) = (1 - b) m_p + b m,        cov_p(a, b) = (1 - a) S_p(b) + a S(b),

from per-position Gaussians (``a = 0, b = 0``) to one Gaussian for the whole image (``a = 1, b = 1``), where
``S_p(b)`` is position ``p``'s scatter around ``mean_p(b)`` and ``S(b)`` its mean over positions. A textured
product (every position alike) should want ``a`` and ``b`` near 1, an aligned object near 0, and how near depends
on the number of training images. The **cross-validated log-likelihood** of held-out normal tokens picks ``(a, b)``
per level from the training images alone: the training images in ``--folds`` folds (an image's exposure copies in
its own fold), the Gaussian fitted on the others from sufficient statistics, the held-out fold's likelihood summed.

Every ``(a, b)`` of the grid is then also scored on the test set (exact AUROC on raw scores) next to the default's
blend, so the table shows where the likelihood's pick falls among the real results. Nothing reads a test label to
choose.

    python benchmarks/research/likelihood_probe.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 256 256 \\
        --out results/research/likelihood_256.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from selection_probe import FeatureProbe, Statistics, append_rows, metrics, probe_parser  # noqa: E402

SHARE_COV = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0)
SHARE_MEAN = (0.0, 1.0)
RIDGE = 0.01  # of the mean eigenvalue, as the model's shared covariance


class Moments:
    """Per-position sufficient statistics of ``(N, L, C)`` tokens: count, ``(L, C)`` sums, ``(L, C, C)`` products."""

    def __init__(self, tokens: torch.Tensor) -> None:
        tokens = tokens.double()
        self.count = tokens.shape[0]
        self.sum = tokens.sum(dim=0)
        self.outer = torch.einsum("nlc,nld->lcd", tokens, tokens)

    def __add__(self, other: Moments) -> Moments:
        out = object.__new__(Moments)
        out.count, out.sum, out.outer = self.count + other.count, self.sum + other.sum, self.outer + other.outer
        return out

    def scatter(self, centre: torch.Tensor) -> torch.Tensor:
        """``(L, C, C)`` sums of ``(x - centre_p)(x - centre_p)^T``."""
        mean = self.sum / self.count
        own = self.outer - self.count * torch.einsum("lc,ld->lcd", mean, mean)
        shift = mean - centre
        return own + self.count * torch.einsum("lc,ld->lcd", shift, shift)


def gaussian(moments: Moments, share_cov: float, share_mean: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, C)`` means and ``(L, C, C)`` precisions of the family member ``(share_cov, share_mean)``."""
    per_position = moments.sum / moments.count
    mean = (1 - share_mean) * per_position + share_mean * per_position.mean(dim=0, keepdim=True)
    own = moments.scatter(mean) / max(1, moments.count - 1)
    cov = (1 - share_cov) * own + share_cov * own.mean(dim=0, keepdim=True)
    channels = cov.shape[-1]
    ridge = RIDGE * own.mean(dim=0).trace() / channels
    cov = cov + ridge * torch.eye(channels, dtype=cov.dtype)
    return mean, torch.linalg.inv(cov)


def held_out_likelihood(fit: Moments, held: Moments, share_cov: float, share_mean: float) -> float:
    """Mean Gaussian log-likelihood per held-out token (without the constant)."""
    mean, precision = gaussian(fit, share_cov, share_mean)
    scatter = held.scatter(mean)
    quadratic = torch.einsum("lcd,ldc->l", precision, scatter)
    logdet = torch.linalg.slogdet(precision).logabsdet
    positions = precision.shape[0]
    return float((0.5 * (held.count * logdet - quadratic)).sum() / (held.count * positions))


def distances(tokens: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` Mahalanobis distances of ``(N, L, C)`` tokens."""
    centred = tokens - mean.float()
    return torch.einsum("nlc,lcd,nld->nl", centred, precision.float(), centred).clamp_min(0).sqrt()


def run_one(args: argparse.Namespace, name: str, root: Path, category: str) -> list[dict[str, Any]]:
    start = time.perf_counter()
    probe = FeatureProbe(args, root, category)
    gained, test, size, generator, grids, count = (
        probe.gained, probe.test, probe.size, probe.generator, probe.grids, probe.count)
    levels = range(len(grids))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(args.seed))
    folds = [order[i :: args.folds] for i in range(args.folds)]
    family = list(itertools.product(SHARE_COV, SHARE_MEAN))

    rows = []
    picks = []
    for level in levels:
        fold_moments = [
            sum((Moments(g["tokens"][level][fold]) for g in gained[1:]), Moments(gained[0]["tokens"][level][fold]))
            for fold in folds
        ]
        likelihood = {}
        for share_cov, share_mean in family:
            values = []
            for k, held in enumerate(fold_moments):
                fit = sum((m for j, m in enumerate(fold_moments) if j != k and j != (k + 1) % args.folds),
                          fold_moments[(k + 1) % args.folds])
                values.append(held_out_likelihood(fit, held, share_cov, share_mean))
            likelihood[(share_cov, share_mean)] = float(np.mean(values))
        picks.append(max(likelihood, key=likelihood.get))
        rows.extend({"dataset": name, "seed": args.seed, "level": level, "share_cov": a, "share_mean": b,
                     "held_out_loglik": v, "kind": "likelihood"} for (a, b), v in likelihood.items())

    everything = [sum((Moments(g["tokens"][level]) for g in gained[1:]), Moments(gained[0]["tokens"][level]))
                  for level in levels]
    test_distances = {
        member: [distances(test["tokens"][level], *gaussian(everything[level], *member)) for level in levels]
        for member in family
    }

    def real(per_level: list[torch.Tensor]) -> dict[str, float]:
        maps, _ = generator.combine_levels(per_level, grids, size, (0.875, 0.125))
        _, image = generator.combine_levels(per_level, grids, size)
        image_auroc, pixel_auroc = metrics((image.numpy(), maps[:, 0].numpy()), test["labels"], test["masks"])
        return {"image_auroc": image_auroc, "pixel_auroc": pixel_auroc}

    for member in family:
        rows.append({"dataset": name, "seed": args.seed, "kind": "member", "share_cov": member[0],
                     "share_mean": member[1], **real(test_distances[member])})
    rows.append({"dataset": name, "seed": args.seed, "kind": "pick", "picks": [list(p) for p in picks],
                 **real([test_distances[p][level] for level, p in enumerate(picks)])})

    stats = Statistics([torch.cat([g["tokens"][level] for g in gained]) for level in levels])
    default_levels = [stats.distances(test["tokens"], level) for level in levels]
    maps, _ = generator.combine_levels([d["blend"] for d in default_levels], grids, size, (0.875, 0.125))
    _, image = generator.combine_levels([d["position"] for d in default_levels], grids, size)
    image_auroc, pixel_auroc = metrics((image.numpy(), maps[:, 0].numpy()), test["labels"], test["masks"])
    rows.append({"dataset": name, "seed": args.seed, "kind": "default", "image_auroc": image_auroc,
                 "pixel_auroc": pixel_auroc, "seconds": time.perf_counter() - start})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "orders the folds")
    parser.add_argument("--folds", type=int, default=4)
    args = parser.parse_args(argv)
    for name, root, category in args.data:
        rows = run_one(args, name, root, category)
        append_rows(args.out, rows)
        pick = next(r for r in rows if r["kind"] == "pick")
        default = next(r for r in rows if r["kind"] == "default")
        best = max((r for r in rows if r["kind"] == "member"), key=lambda r: r["image_auroc"] + r["pixel_auroc"])
        print(f"{name}: likelihood picks {pick['picks']}: {pick['image_auroc']:.4f} / {pick['pixel_auroc']:.4f}; "
              f"default {default['image_auroc']:.4f} / {default['pixel_auroc']:.4f}; best member "
              f"({best['share_cov']}, {best['share_mean']}) {best['image_auroc']:.4f} / {best['pixel_auroc']:.4f}; "
              f"{default['seconds']:.0f} s", flush=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
