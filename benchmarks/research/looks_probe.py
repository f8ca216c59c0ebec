"""Normal images in several looks: does centring each image on its own look's mean help the whitened distance?

Research probe. A product often comes in several looks (paper types, lots, colours); one Gaussian per position
then holds the spread between the looks as well as the spread within one, and a defect that moves a token along
the between-look directions is weighed as normal. Here the training images are clustered (k-means on each image's
mean stride-16 token, standardised) into ``k`` looks; every token is centred on its look's per-position mean, and
the default's covariances (shared, per position, their blended distance) are fitted on those within-look
deviations, pooled over the looks, so every covariance still sees every training image. A test image takes the
nearest look. ``k = 1`` is the default.

Two label-free criteria for ``k`` are logged beside the test AUROC: the silhouette of the image clusters and the
held-out (4-fold) Gaussian log-likelihood of the stride-16 tokens under the pooled within-look model. Nothing
reads a test label to choose.

    python benchmarks/research/looks_probe.py --data piped_paper_tl=<datasets>:piped_paper_tl --image-size 256 256 \\
        --out results/research/looks_256.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from likelihood_probe import Moments, held_out_likelihood  # noqa: E402
from selection_probe import FeatureProbe, Statistics, append_rows, metrics, probe_parser  # noqa: E402


def descriptors(levels: list[torch.Tensor]) -> np.ndarray:
    """``(N, C)`` per-image mean of the coarsest level's ``(N, L, C)`` tokens."""
    return levels[-1].mean(dim=1).double().numpy()


def looks(train: np.ndarray, k: int, seed: int) -> tuple[Any, np.ndarray]:  # noqa: ANN401 - a fitted KMeans
    from sklearn.cluster import KMeans  # noqa: PLC0415

    centre, scale = train.mean(axis=0), train.std(axis=0) + 1e-9
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit((train - centre) / scale)
    return (kmeans, centre, scale), kmeans.labels_


def assign(model: tuple, values: np.ndarray) -> np.ndarray:
    kmeans, centre, scale = model
    return kmeans.predict((values - centre) / scale)


def look_means(tokens: torch.Tensor, labels: np.ndarray, k: int) -> torch.Tensor:
    """``(k, L, C)`` per-position means of each look."""
    label = torch.as_tensor(labels)
    return torch.stack([tokens[label == c].mean(dim=0) for c in range(k)])


def recentre(tokens: torch.Tensor, labels: np.ndarray, means: torch.Tensor, overall: torch.Tensor) -> torch.Tensor:
    """Tokens moved from their look's mean to the overall mean: ``x - m_look + m``."""
    return tokens - means[torch.as_tensor(labels)] + overall


def run_one(args: argparse.Namespace, name: str, root: Path, category: str) -> list[dict[str, Any]]:
    from sklearn.metrics import silhouette_score  # noqa: PLC0415

    start = time.perf_counter()
    probe = FeatureProbe(args, root, category)
    gained, plain, test, size, generator, grids, count = (
        probe.gained, probe.plain, probe.test, probe.size, probe.generator, probe.grids, probe.count)
    levels = range(len(grids))
    train_descriptors = descriptors(plain["tokens"])
    test_descriptors = descriptors(test["tokens"])
    order = torch.randperm(count, generator=torch.Generator().manual_seed(args.seed))
    folds = [order[i :: 4] for i in range(4)]

    rows = []
    for k in args.looks:
        if k >= count // 4:
            continue
        clusters, labels = looks(train_descriptors, k, args.seed)
        test_labels = assign(clusters, test_descriptors)
        sizes = np.bincount(labels, minlength=k).tolist()
        silhouette = float(silhouette_score(train_descriptors, labels)) if k > 1 else float("nan")
        train_levels, test_levels = [], []
        for level in levels:
            means = look_means(plain["tokens"][level], labels, k)
            overall = plain["tokens"][level].mean(dim=0)
            train_levels.append(torch.cat([recentre(g["tokens"][level], labels, means, overall) for g in gained]))
            test_levels.append(recentre(test["tokens"][level], test_labels, means, overall))
        # the held-out likelihood of the coarse level's tokens: looks and their means refitted without the fold
        values = []
        for held in folds:
            kept = torch.ones(count, dtype=torch.bool)
            kept[held] = False
            kept_index = torch.nonzero(kept).flatten()
            sub_clusters, sub_labels = looks(train_descriptors[kept_index.numpy()], k, args.seed)
            held_labels = assign(sub_clusters, train_descriptors[held.numpy()])
            coarse = plain["tokens"][-1]
            means = look_means(coarse[kept_index], sub_labels, k)
            overall = coarse[kept_index].mean(dim=0)
            fit = Moments(recentre(coarse[kept_index], sub_labels, means, overall))
            out = Moments(recentre(coarse[held], held_labels, means, overall))
            values.append(held_out_likelihood(fit, out, 1.0, 0.0))
        stats = Statistics(train_levels)
        per_level = [stats.distances(test_levels, level) for level in levels]
        maps, _ = generator.combine_levels([d["blend"] for d in per_level], grids, size, (0.875, 0.125))
        _, image = generator.combine_levels([d["position"] for d in per_level], grids, size)
        image_auroc, pixel_auroc = metrics((image.numpy(), maps[:, 0].numpy()), test["labels"], test["masks"])
        rows.append({"dataset": name, "seed": args.seed, "looks": k, "sizes": sizes, "silhouette": silhouette,
                     "held_out_loglik": float(np.mean(values)), "image_auroc": image_auroc,
                     "pixel_auroc": pixel_auroc, "seconds": time.perf_counter() - start})
        print(f"{name} k={k}: {image_auroc:.4f} / {pixel_auroc:.4f}, silhouette {silhouette:.3f}, held-out "
              f"log-likelihood {np.mean(values):.3f}, sizes {sizes}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "k-means and the folds")
    parser.add_argument("--looks", type=int, nargs="+", default=[1, 2, 3, 5, 7, 10])
    args = parser.parse_args(argv)
    for name, root, category in args.data:
        append_rows(args.out, run_one(args, name, root, category))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
