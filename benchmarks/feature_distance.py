"""The whitened distance of the backbone features themselves: the ceiling FOD's whitened residual reaches.

FOD's reconstruction is nearly the same at every position, so its whitened residual
(``reconstruction_term="mahalanobis"``) ranks tokens almost exactly as the input features' own
Mahalanobis distance does (issue 17's screen: within 0.003 AUROC). That distance needs no training and
no seed, so it can be measured at 256 px on every dataset in minutes, scored and combined exactly as the
model does (per-position mean, one shrunk covariance per level, upsampling, level mean, blur, image
score = map maximum). Statistics from the training images only.

    python benchmarks/feature_distance.py --sizes "[[256, 256]]" --blurs "[4]" --covariances "[shared, position]"
    python benchmarks/feature_distance.py --datasets "[battery_weld]" --sizes "[[128, 192], [192, 304], [256, 400]]" --blurs "[2, 4, 8]"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DATASETS = {
    "battery_weld": ("anomalib_fod/data", "battery_weld"),
    "bottle": ("datasets/mvtec_ad", "bottle"),
    "screw": ("datasets/mvtec_ad", "screw"),
    "bsdata_pitting": ("datasets", "bsdata_pitting"),
}


def main(
    datasets: list[str] | None = None,
    sizes: list[tuple[int, int]] | None = None,
    blurs: list[float] | None = None,
    covariances: list[str] | None = None,
    threads: int = 1,
) -> None:
    """Print exact image / pixel AUROC of the whitened feature distance per dataset, size and blur.

    Args:
        datasets: names of ``DATASETS`` (default: all; MVTec layout under ``./datasets``).
        sizes: input (height, width) pairs.
        blurs: Gaussian blur sigmas of the map (the model's default is 4).
        covariances: ``"shared"`` (one covariance per level, as the model keeps) and/or ``"position"``
            (one per token position, shrunk towards the shared one as PaDiM-style models need with
            few images: issue 17's candidate for PaDiM's pixel advantage).
        threads: torch threads.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415
    from convergence_probe import cache_features  # noqa: PLC0415
    from screen import _mahalanobis, _position_mahalanobis, _position_precision, _precision  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415
    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator  # noqa: PLC0415
    from anomalib_fod.models.fod.settings import FodSettings  # noqa: PLC0415

    torch.set_num_threads(threads)
    for name in datasets or list(DATASETS):
        root, category = DATASETS[name]
        for size in sizes or [(256, 256)]:
            model = Fod(image_size=tuple(size), visualizer=False)
            data = MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=0,
                           val_split_mode="same_as_test")
            data.setup()
            # In file order, not the shuffled training loader: the float32 sums then run in one order and
            # repeated runs print the same figures (shuffled, battery_weld's moved by up to 0.004 at 256 px).
            ordered = DataLoader(data.train_data, batch_size=16, shuffle=False, collate_fn=data.train_data.collate_fn)
            train = cache_features(model, ordered, f"{name}: training images")
            test = cache_features(model, data.test_dataloader(), f"{name}: test images")
            grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in train["features"]]
            levels = []  # per level: training tokens centred on their position means, test ones, shared precision
            for train_level, test_level in zip(train["features"], test["features"], strict=True):
                normal = train_level.flatten(2).transpose(1, 2)  # (N, L, C)
                mean = normal.mean(dim=0)
                centred_normal = normal - mean
                centred_test = test_level.flatten(2).transpose(1, 2) - mean
                levels.append((centred_normal, centred_test, _precision(centred_normal.flatten(0, 1))))
            for covariance in covariances or ["shared"]:
                scores = [
                    _position_mahalanobis(centred, _position_precision(normal, torch.linalg.inv(precision.double())))
                    if covariance == "position"
                    else _mahalanobis(centred, precision)
                    for normal, centred, precision in levels
                ]
                for sigma in blurs or [4.0]:
                    maps, image_scores = AnomalyMapGenerator(FodSettings(blur_sigma=sigma)).combine_levels(
                        scores, grids, test["size"]
                    )
                    print(
                        f"{name} {size[0]}x{size[1]} {covariance} covariance, blur {sigma:g}: image AUROC "
                        f"{image_auroc(image_scores.numpy(), test['labels'].numpy()):.4f}, pixel AUROC "
                        f"{pixel_auroc(maps[:, 0].numpy(), test['masks'].numpy()):.4f}",
                        flush=True,
                    )


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
