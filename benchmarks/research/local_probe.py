"""Several looks per position: the nearest training token among those at (about) the same position.

Research probe (frozen features, no training). ``Fod()``'s Gaussian per position merges a position's looks into one
ellipsoid; the nearest-token option keeps the looks apart but forgets position, and costs bsdata_pitting, an
aligned part, image AUROC. The distance to the nearest training token (every training image and exposure gain)
whose position lies within ``radius`` cells of the query's keeps both: several looks, each where it was seen.
Candidates, per level, all whitened by the training tokens' shared covariance:

- ``default``: ``Fod()``'s score (as in ``nearest_probe.py``);
- ``sum_z``: the Gaussian plus the global nearest token of a random 40 000-token bank, in held-out z-units (the
  nearest-token option's score, for reference in the same run);
- ``local_rR``: the position-restricted nearest token alone (map levels 7/8 : 1/8, image score the map's max);
- ``sum_local_rR``: the Gaussian plus ``local_rR``, in held-out z-units (two folds, as ``sum_z``);
- with ``--ks``: the same with the k-th nearest token's distance (``local_rR_kK``: a look must have been seen k
  times, so one odd training token does not make its like normal);
- with ``--position-units``: each distance in its own position's held-out z-units (``default_pz``: the Gaussian's;
  ``sum_pz``: both; ``sum_gpz``: the Gaussian's per position plus the nearest token's level-wide).

Nothing reads a test label to choose; every candidate is reported.

    python benchmarks/research/local_probe.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 128 128 \\
        --radii 1 2 --out results/research/local_128.jsonl
    python benchmarks/research/nearest_probe.py --report results/research/local_128.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nearest_probe import MAP_WEIGHTS, NearestToken, held_out_values, shared_whitening  # noqa: E402
from selection_probe import FeatureProbe, Statistics, metrics, probe_parser, run_datasets  # noqa: E402

POSITION_CHUNK = 64


def local_nearest(
    queries: torch.Tensor, bank: torch.Tensor, grid: tuple[int, int], radius: int, k: int = 1,
) -> torch.Tensor:
    """``(Q, L)`` distance of each ``(Q, L, C)`` query token to its ``k``-th nearest ``(M, L, C)`` bank token among
    those whose grid position is at most ``radius`` cells away in each direction (``L = h * w``, row-major)."""
    h, w = grid
    q = queries.reshape(len(queries), h, w, -1)
    b = bank.reshape(len(bank), h, w, -1)
    best = torch.full((len(queries), h, w, k), float("inf"))
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
            yb, xb = slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx))
            if ys.start >= ys.stop or xs.start >= xs.stop:
                continue
            qp = q[:, ys, xs].flatten(1, 2).transpose(0, 1)  # (P, Q, C)
            bp = b[:, yb, xb].flatten(1, 2).transpose(0, 1)  # (P, M, C)
            d = torch.cat([torch.cdist(qp[s : s + POSITION_CHUNK], bp[s : s + POSITION_CHUNK])
                           .topk(k, dim=2, largest=False).values
                           for s in range(0, len(qp), POSITION_CHUNK)])  # (P, Q, k)
            region = best[:, ys, xs]
            merged = torch.cat([region, d.transpose(0, 1).reshape(region.shape)], dim=-1)
            best[:, ys, xs] = merged.topk(k, dim=-1, largest=False).values
    return best[..., -1].flatten(1)


class LocalNearest:
    """Per level, every ``(N, L, C)`` training token in the shared whitening, searched within ``radius`` cells."""

    def __init__(self, levels: list[torch.Tensor], grids: list[tuple[int, int]], radius: int, k: int = 1) -> None:
        self.transforms = [shared_whitening(level.flatten(0, 1)) for level in levels]
        self.banks = [level @ t for level, t in zip(levels, self.transforms, strict=True)]
        self.grids, self.radius, self.k = grids, radius, k

    def __call__(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [local_nearest(level @ t, bank, grid, self.radius, self.k)
                for level, t, bank, grid in zip(levels, self.transforms, self.banks, self.grids, strict=True)]


def local_moments(probe: FeatureProbe, radius: int, k: int, seed: int) -> list[tuple[float, float]]:
    """Per level, mean and std of the local nearest distance over held-out training tokens (the folds of
    ``held_out_moments`` for the same seed)."""
    order = torch.randperm(probe.count, generator=torch.Generator().manual_seed(seed))
    folds = [order[0::2], order[1::2]]
    levels = range(len(probe.grids))
    values: list[list[torch.Tensor]] = [[] for _ in levels]
    for fit, held in (folds, folds[::-1]):
        local = LocalNearest([torch.cat([g["tokens"][i][fit] for g in probe.gained]) for i in levels],
                             probe.grids, radius, k)
        for i, distance in enumerate(local([probe.plain["tokens"][i][held] for i in levels])):
            values[i].append(distance.flatten())
    return [(float(torch.cat(v).mean()), float(torch.cat(v).std())) for v in values]


def run_one(args: argparse.Namespace, name: str, root: Path, category: str) -> list[dict[str, Any]]:
    probe = FeatureProbe(args, root, category)
    levels = range(len(probe.grids))
    train_levels = [torch.cat([g["tokens"][i] for g in probe.gained]) for i in levels]
    stats = Statistics(train_levels)
    gaussian = [stats.distances(probe.test["tokens"], i) for i in levels]
    variants = [(r, k) for r in args.radii for k in args.ks]
    local = {v: LocalNearest(train_levels, probe.grids, *v)(probe.test["tokens"]) for v in variants}

    def combined(map_levels: list[torch.Tensor], image_levels: list[torch.Tensor] | None) -> tuple:
        maps, image = probe.generator.combine_levels(map_levels, probe.grids, probe.size, MAP_WEIGHTS)
        if image_levels is not None:
            image = probe.generator.combine_levels(image_levels, probe.grids, probe.size)[1]
        return image.numpy(), maps[:, 0].numpy()

    def z(values: torch.Tensor, moments: tuple) -> torch.Tensor:
        return (values - moments[0]) / moments[1]

    def summed(extra: list[torch.Tensor], gauss_m: list[dict], extra_m: list[tuple[float, float]]) -> tuple:
        return combined([z(g["blend"], gauss_m[i]["blend"]) + z(extra[i], extra_m[i]) for i, g in enumerate(gaussian)],
                        [z(g["position"], gauss_m[i]["position"]) + z(extra[i], extra_m[i])
                         for i, g in enumerate(gaussian)])

    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        held = held_out_values(probe.gained, probe.plain, probe.count, args.bank, seed)
        moments = [{name: (float(v.mean()), float(v.std())) for name, v in level.items()} for level in held]
        # Per-position units: each position's own held-out mean and spread, (L,) each.
        per_position = [{name: (v.mean(dim=0), v.std(dim=0) + 1e-6) for name, v in level.items()} for level in held]
        knn = NearestToken(train_levels, args.bank, seed, whiten=True)(probe.test["tokens"])
        candidates = {
            "default": combined([g["blend"] for g in gaussian], [g["position"] for g in gaussian]),
            "sum_z": summed(knn, moments, [m["knn"] for m in moments]),
        }
        if args.position_units:
            pz = [{name: z(g[name], per_position[i][name]) for name in ("blend", "position")}
                  for i, g in enumerate(gaussian)]
            knn_pz = [z(k, per_position[i]["knn"]) for i, k in enumerate(knn)]
            knn_z = [z(k, moments[i]["knn"]) for i, k in enumerate(knn)]
            candidates["default_pz"] = combined([g["blend"] for g in pz], [g["position"] for g in pz])
            candidates["sum_pz"] = combined([g["blend"] + k for g, k in zip(pz, knn_pz, strict=True)],
                                            [g["position"] + k for g, k in zip(pz, knn_pz, strict=True)])
            candidates["sum_gpz"] = combined([g["blend"] + k for g, k in zip(pz, knn_z, strict=True)],
                                             [g["position"] + k for g, k in zip(pz, knn_z, strict=True)])
        for r, k in variants:
            name_rk = f"r{r}" + (f"_k{k}" if k > 1 else "")
            candidates[f"local_{name_rk}"] = combined(local[r, k], None)
            candidates[f"sum_local_{name_rk}"] = summed(local[r, k], moments, local_moments(probe, r, k, seed))
        for candidate, result in candidates.items():
            image_auroc, pixel_auroc = metrics(result, probe.test["labels"], probe.test["masks"])
            rows.append({"dataset": name, "seed": seed, "candidate": candidate, "bank": args.bank, "coreset": False,
                         "image_size": list(probe.size), "image_auroc": image_auroc, "pixel_auroc": pixel_auroc,
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name} seed {seed} {candidate}: {image_auroc:.4f} / {pixel_auroc:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "the folds and the global bank")
    parser.add_argument("--bank", type=int, default=40000, help="training tokens of the global bank per level")
    parser.add_argument("--radii", type=int, nargs="*", default=[1, 2], help="search radii in grid cells")
    parser.add_argument("--position-units", action="store_true",
                        help="also each distance in its position's held-out z-units (default_pz, sum_pz, sum_gpz)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1], help="the k-th nearest token's distance")
    return run_datasets(parser, argv, run_one)


if __name__ == "__main__":
    raise SystemExit(main())
