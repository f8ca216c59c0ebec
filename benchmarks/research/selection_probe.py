"""Can the training images choose the scoring? Synthetic defects on held-out normal images against real defects.

Research probe for label-free choices. On the whitened distance of the backbone features (which FOD's default
score equals, see ``feature_distance.py``), every scoring configuration below is measured twice:

- **synthetic**: the training images split in two folds; the statistics fitted on one fold (at Fod's exposure
  gains), the other fold scored as it is and with synthetic defects (CDO's Perlin generator, one copy per image,
  seeded): image and pixel AUROC of normal against defective held-out images, averaged over the two folds. This is
  what a model could compute by itself on a user's normal images;
- **real**: the statistics fitted on every training image, the test set scored (exact AUROC on raw scores).

A configuration is a covariance (``shared``, ``position``, ``blend``), the map's level weights (the mean, or 7/8
on the stride-8 level), the image score (the map's maximum, or the per-position distances' map with the levels
averaged) and whether each distance is put in its position's training z-units. If the configuration the synthetic
measure picks is (near) the best real one on every dataset, the choice can be made by the model; if not, the
synthetic defects do not stand for real ones. Nothing here reads a test label to choose.

    python benchmarks/research/selection_probe.py --data bottle=<datasets>/mvtec_ad:bottle --image-size 256 256 \\
        --out results/research/selection_256.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from screen import _mahalanobis, _position_mahalanobis, _precision, mvtec_datamodule, parse_data, scaled  # noqa: E402

COVARIANCES = ("shared", "position", "blend")
MAP_WEIGHTS = {"mean": None, "7/8": (0.875, 0.125)}
IMAGE_SCORES = ("map", "position")


def tokens(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level ``(N, C, h, w)`` -> ``(N, L, C)``."""
    return [f.flatten(2).transpose(1, 2).contiguous() for f in features]


class Statistics:
    """Per-level Gaussians of ``(N, L, C)`` training tokens (per-position mean, shared and per-position covariance)
    and the training tokens' own distances' per-position moments (for the z-units)."""

    def __init__(self, levels: list[torch.Tensor]) -> None:
        self.mean, self.shared, self.position, self.moments = [], [], [], []
        for level in levels:
            count, _, channels = level.shape
            mean = level.mean(dim=0)
            centred = level - mean
            precision = _precision(centred.flatten(0, 1))
            shared_cov = torch.linalg.inv(precision.double())
            own = torch.einsum("nlc,nld->lcd", centred.double(), centred.double()) / max(1, count - 1)
            weight = channels / (count + channels)
            position = torch.linalg.inv((1 - weight) * own + weight * shared_cov).float()
            self.mean.append(mean)
            self.shared.append(precision)
            self.position.append(position)
        self.moments = [
            {cov: (d.mean(dim=0), d.std(dim=0) + 1e-6) for cov, d in self.distances(levels, i).items()}
            for i in range(len(levels))
        ]

    def distances(self, levels: list[torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """``(N, L)`` distances of level ``i``'s tokens under each covariance."""
        centred = levels[i] - self.mean[i]
        shared = _mahalanobis(centred, self.shared[i])
        position = _position_mahalanobis(centred, self.position[i])
        return {"shared": shared, "position": position, "blend": 0.5 * (shared + position)}


def score(
    generator: Any, stats: Statistics, levels: list[torch.Tensor], grids: list[tuple[int, int]],  # noqa: ANN401
    size: tuple[int, int],
) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Image scores ``(N,)`` and maps ``(N, H, W)`` of every configuration."""
    per_level = [stats.distances(levels, i) for i in range(len(levels))]
    out = {}
    for z in (False, True):
        def level_scores(cov: str, z: bool = z) -> list[torch.Tensor]:
            if not z:
                return [d[cov] for d in per_level]
            return [(d[cov] - m[cov][0]) / m[cov][1] for d, m in zip(per_level, stats.moments, strict=True)]

        position_image = generator.combine_levels(level_scores("position"), grids, size)[1]
        for cov, (weights_name, weights) in itertools.product(COVARIANCES, MAP_WEIGHTS.items()):
            maps, map_image = generator.combine_levels(level_scores(cov), grids, size, weights)
            for image_score in IMAGE_SCORES:
                image = map_image if image_score == "map" else position_image
                out[(cov, weights_name, image_score, z)] = (image.numpy(), maps[:, 0].numpy())
    return out


@torch.no_grad()
def collect(model: Any, loader: Any, defects: Any = None) -> dict[str, Any]:  # noqa: ANN401
    """Pooled features, labels and masks of every batch (with synthetic defects when ``defects`` is given)."""
    from anomalib_fod.benchmark.curve import preprocess_as_test  # noqa: PLC0415

    features, labels, masks = [], [], []
    for batch in loader:
        batch = preprocess_as_test(model, batch)
        images = batch.image
        if defects is not None:
            images, mask = defects(images)
            masks.append(mask[:, 0] > 0.5)
            labels.append(masks[-1].flatten(1).any(dim=1).int())
        else:
            labels.append(batch.gt_label.flatten().int())
            if batch.gt_mask is not None:
                masks.append(batch.gt_mask.reshape(images.shape[0], *images.shape[-2:]).bool())
        features.append(model.model.extract_features(images))
    levels = [torch.cat([f[i] for f in features]) for i in range(len(features[0]))]
    return {"tokens": tokens(levels), "grids": [tuple(f.shape[-2:]) for f in levels],
            "labels": torch.cat(labels).numpy(), "masks": torch.cat(masks).numpy() if masks else None}


def metrics(result: tuple[np.ndarray, np.ndarray], labels: np.ndarray, masks: np.ndarray | None) -> tuple[float, float]:
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415

    image, maps = result
    return image_auroc(image, labels), (pixel_auroc(maps, masks) if masks is not None else float("nan"))


class FeatureProbe:
    """What the feature probes share: the model's features of the training images at each exposure gain and of the
    test images, with the map generator, grids and output size."""

    def __init__(self, args: argparse.Namespace, root: Path, category: str) -> None:
        from anomalib_fod import Fod  # noqa: PLC0415

        torch.manual_seed(args.seed)
        model = Fod(image_size=tuple(args.image_size), visualizer=False).eval()
        datamodule = mvtec_datamodule(root, category)
        self.gained = [collect(model, scaled(datamodule.train_dataloader(), gain)) for gain in args.gains]
        self.plain = self.gained[list(args.gains).index(1.0)] if 1.0 in args.gains else self.gained[0]
        self.test = collect(model, datamodule.test_dataloader())
        self.size = tuple(args.image_size)
        self.generator = model.model.anomaly_map_generator
        self.grids = self.plain["grids"]
        self.count = len(self.plain["labels"])


def probe_parser(doc: str, seed_help: str) -> argparse.ArgumentParser:
    """The feature probes' common options: data, image size, seed, exposure gains, output rows."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=parse_data, action="append", required=True, help="NAME=ROOT:CATEGORY")
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 256))
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--gains", type=float, nargs="+", default=[0.9, 1.0, 1.1])
    parser.add_argument("--out", type=Path, required=True)
    return parser


def run_datasets(parser: argparse.ArgumentParser, argv: list[str] | None, run_one: Any) -> int:  # noqa: ANN401
    """Parse ``argv`` (with ``--seeds``: several seeds on the same features, default ``--seed``) and append the rows
    of ``run_one(args, name, root, category)`` for every ``--data`` to ``--out``."""
    parser.add_argument("--seeds", type=int, nargs="+", help="several seeds on the same features (default: --seed)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    for name, root, category in args.data:
        append_rows(args.out, run_one(args, name, root, category))
    return 0


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def run_one(args: argparse.Namespace, name: str, root: Path, category: str) -> list[dict[str, Any]]:

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.models.cdo.synthetic import make_anomaly_generator  # noqa: PLC0415

    torch.manual_seed(args.seed)
    model = Fod(image_size=tuple(args.image_size), visualizer=False).eval()
    datamodule = mvtec_datamodule(root, category)
    train = collect(model, datamodule.train_dataloader())
    gained = [train if gain == 1 else collect(model, scaled(datamodule.train_dataloader(), gain)) for gain in args.gains]
    torch.manual_seed(args.seed)
    synthetic = collect(model, datamodule.train_dataloader(), make_anomaly_generator(args.defects))
    test = collect(model, datamodule.test_dataloader())
    size = tuple(args.image_size)
    generator = model.model.anomaly_map_generator
    grids = train["grids"]
    count = len(train["labels"])
    order = torch.randperm(count, generator=torch.Generator().manual_seed(args.seed))
    folds = [order[i::2] for i in range(2)]
    levels = range(len(grids))

    def fit(index: torch.Tensor) -> Statistics:
        return Statistics([torch.cat([g["tokens"][i][index] for g in gained]) for i in levels])

    synthetic_metrics: dict[tuple, list[tuple[float, float]]] = {}
    for held, kept in ((folds[0], folds[1]), (folds[1], folds[0])):
        stats = fit(kept)
        normal = [train["tokens"][i][held] for i in levels]
        bad = [synthetic["tokens"][i][held] for i in levels]
        labels = np.concatenate([np.zeros(len(held), dtype=int), synthetic["labels"][held.numpy()]])
        masks = np.concatenate([np.zeros((len(held), *size), dtype=bool), synthetic["masks"][held.numpy()]])
        results = score(generator, stats, [torch.cat([n, b]) for n, b in zip(normal, bad, strict=True)], grids, size)
        for config, result in results.items():
            synthetic_metrics.setdefault(config, []).append(metrics(result, labels, masks))
    real = score(generator, fit(torch.arange(count)), test["tokens"], grids, size)
    rows = []
    for config, result in real.items():
        image, pixel = metrics(result, test["labels"], test["masks"])
        syn = np.mean(synthetic_metrics[config], axis=0)
        cov, weights, image_score, z = config
        rows.append({"dataset": name, "seed": args.seed, "image_size": list(size), "defects": args.defects,
                     "covariance": cov, "map_weights": weights, "image_score": image_score, "z": z,
                     "synthetic_image_auroc": float(syn[0]), "synthetic_pixel_auroc": float(syn[1]),
                     "image_auroc": image, "pixel_auroc": pixel})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, "the folds and the synthetic defects")
    parser.add_argument("--defects", choices=["perlin", "white_noise"], default="perlin")
    args = parser.parse_args(argv)
    for name, root, category in args.data:
        rows = run_one(args, name, root, category)
        append_rows(args.out, rows)
        best = max(rows, key=lambda r: r["synthetic_image_auroc"] + r["synthetic_pixel_auroc"])
        print(f"{name}: synthetic picks {best['covariance']}, {best['map_weights']}, {best['image_score']}, "
              f"z={best['z']}: real {best['image_auroc']:.4f} / {best['pixel_auroc']:.4f}", flush=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
