"""The whitened distance of the backbone features themselves: the ceiling FOD's whitened residual reaches.

FOD's reconstruction is nearly the same at every position, so its whitened residual
(``reconstruction_term="mahalanobis"``) ranks tokens almost exactly as the input features' own
Mahalanobis distance does (the score screen: within 0.003 AUROC). That distance needs no training and
no seed, so it can be measured at 256 px on every dataset in minutes, scored and combined exactly as the
model does (per-position mean, one shrunk covariance per level, upsampling, level mean, blur, image
score = map maximum). Statistics from the training images only.

    python benchmarks/research/feature_distance.py --sizes "[[256, 256]]" --blurs "[4]" --covariances "[shared, position]"
    python benchmarks/research/feature_distance.py --sizes "[[256, 256]]" --covariances "[shared, auto]" \
        --level_scalings "[none, level0, level1, weight0.75]"
    python benchmarks/research/feature_distance.py --datasets "[battery_weld]" \
        --sizes "[[128, 192], [192, 304], [256, 400]]" --blurs "[2, 4, 8]"
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
    "piped_paper_tl": ("datasets", "piped_paper_tl"),
}


WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


def held_out_weight(normal: torch.Tensor, folds: int = 4) -> float:
    """The shared-covariance weight whose Gaussians best predict held-out training images (lowest NLL).

    ``normal``: ``(N, L, C)`` training tokens. Images are split into ``folds``; each fold is scored
    under per-position means and covariances fitted on the others. Training images only.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from screen import _precision, position_covariance, shrink_towards  # noqa: PLC0415

    count = normal.shape[0]
    nll = torch.zeros(len(WEIGHTS), dtype=torch.float64)
    for fold in range(folds):
        held = torch.arange(count) % folds == fold
        fit = normal[~held].double()
        mean = fit.mean(dim=0)
        centred = fit - mean
        per_position = position_covariance(centred)
        shared = torch.linalg.inv(_precision(centred.flatten(0, 1).float()).double())
        test = normal[held].double() - mean
        for i, weight in enumerate(WEIGHTS):
            chol, info = torch.linalg.cholesky_ex(shrink_towards(per_position, shared, weight))
            if bool(info.any()):
                nll[i] = float("inf")
                continue
            logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (L,)
            solved = torch.cholesky_solve(test.permute(1, 2, 0), chol)  # (L, C, n)
            maha = (test.permute(1, 2, 0) * solved).sum(1)  # (L, n)
            nll[i] += (logdet[:, None] + maha).sum()
    return WEIGHTS[int(nll.argmin())]


def scale_levels(scores: list[torch.Tensor], train_scores: list[torch.Tensor], scaling: str) -> list[torch.Tensor]:
    """Per-level test distances put on a common scale (see ``main``'s ``level_scalings``)."""
    if scaling == "none":
        return scores
    if scaling == "z":
        return [(score - train.mean()) / train.std() for score, train in zip(scores, train_scores, strict=True)]
    if scaling.startswith("level"):
        return [scores[int(scaling.removeprefix("level"))]]
    if scaling.startswith("w:"):  # "w:0.5,0.4375,0.0625": a weighted mean of any number of levels, finest first
        weights = [float(w) for w in scaling.removeprefix("w:").split(",")]
        return [len(scores) * w / sum(weights) * s for w, s in zip(weights, scores, strict=True)]
    if scaling.startswith("zw:"):  # the same weights on the levels' z-units
        weights = [float(w) for w in scaling.removeprefix("zw:").split(",")]
        z = scale_levels(scores, train_scores, "z")
        return [len(scores) * w / sum(weights) * s for w, s in zip(weights, z, strict=True)]
    if scaling.startswith("weight"):  # "weight0.75": that share of the finest level, the rest on the other
        share = float(scaling.removeprefix("weight"))
        return [2 * share * scores[0], 2 * (1 - share) * scores[1]]
    msg = f"unknown level scaling {scaling!r}"
    raise ValueError(msg)


def main(
    datasets: list[str] | None = None,
    sizes: list[tuple[int, int]] | None = None,
    blurs: list[float] | None = None,
    covariances: list[str] | None = None,
    level_scalings: list[str] | None = None,
    means: list[str] | None = None,
    centerings: list[str] | None = None,
    baselines: list[str] | None = None,
    gains: list[str] | None = None,
    joint: bool = False,
    augment_gains: list[float] | None = None,
    pool: int = 3,
    finest_pool: int | None = None,
    unpooled_copy: bool = False,
    fine_join: bool = False,
    unpooled_second: bool = False,
    layers: list[str] | None = None,
    threads: int = 1,
) -> None:
    """Print exact image / pixel AUROC of the whitened feature distance per dataset, size and blur.

    Args:
        datasets: names of ``DATASETS`` (default: all; MVTec layout under ``./datasets``).
        sizes: input (height, width) pairs.
        blurs: Gaussian blur sigmas of the map (the model's default is 4).
        covariances: ``"shared"`` (one covariance per level, as the model keeps), ``"position"``
            (one per token position, shrunk towards the shared one with weight ``C / (N + C)`` as
            PaDiM-style models need with few images: the candidate for PaDiM's pixel advantage),
            ``"auto"`` (the same with the weight that best predicts held-out training images,
            ``held_out_weight``) and/or ``"blend"`` (the mean of the ``auto`` and ``shared`` distances) and/or
            ``"blend_position"`` (the mean of the ``position`` and ``shared`` distances); ``position_w3`` and
            ``blend_position_w3`` (any odd window) pool each position's covariance over its 3x3 neighbours
            (``neighbourhood_precision``).
        level_scalings: how the levels' distances are put on one scale before their mean: ``"none"``
            (as the model does), ``"z"`` (each level in z-units of its training tokens' distances) or
            ``"level0"`` / ``"level1"`` (one level alone) or ``"weight0.75"`` (that weight on the finest
            level and the rest on the other: a weighted mean of the two levels), ``"w:a,b,c"`` (a weighted mean
            of any number of levels; ``"zw:a,b,c"`` the same in z-units) or, with three levels, ``"zmax"`` (the
            larger of the first level's z-score and the model's map of the other two: ``scale_to_larger``).
        means: ``"position"`` (one mean per token position, as the model keeps) and/or ``"global"`` (one
            mean per level for every position: no assumption that parts are aligned).
        centerings: ``"none"`` and/or ``"median"`` (each image's tokens minus that image's per-channel
            median token, training and test alike: a global shift of an image, such as its brightness,
            then moves no token).
        baselines: ``"none"`` and/or ``"median"`` (each image's map minus its own median, so an image whose
            tokens are all a little farther from normal, e.g. darker, is not scored higher for it) and/or
            ``"median_image"`` (the same for the image score only, the map as it is) and/or ``"median_excess"``
            (the image score minus only the part of the image's map median above the highest median of the
            training images' maps: a global level that training images never show is not scored).
        gains: ``"none"`` and/or ``"mean"`` (every image, training and test alike, scaled before the backbone
            so that its mean intensity equals the training images' mean: an exposure or lighting gain then
            changes no feature) and/or ``"clamp"`` (only images whose mean intensity lies outside the training
            images' range, scaled to its nearest end).
        joint: score one level instead of two: the coarser levels' features upsampled (bilinear) to the
            finest grid and concatenated to its channels, as PaDiM and PatchCore build their embeddings, so
            the covariance holds the correlations between levels.
        augment_gains: fit the statistics on the training images seen at each of these intensity gains
            (before ImageNet normalisation; e.g. ``[0.9, 1.0, 1.1]``), so the covariance holds the change a
            global exposure or lighting drift makes; test images are scored as they are.
        pool: kernel of the average pooling of the backbone features (the model's is 3; 1: none, as PaDiM).
        finest_pool: another kernel for the first (finest) level alone, e.g. 1 for an unpooled stride-4 level
            beside the model's pooled two.
        unpooled_copy: score the finest level twice, unpooled (first) and pooled: a map-only level of the
            stride-8 features as PaDiM sees them, in front of the model's two.
        fine_join: with ``layers`` of three stages, the first (map-only) level carries the second stage's
            features as well, unpooled and upsampled to its grid (PaDiM's embedding of its two finest stages).
        unpooled_second: with ``layers`` of three stages, the second stage's features once more, unpooled, as a
            level after the first: e.g. a stride-4 and an unpooled stride-8 level in front of the model's two.
        layers: backbone layers, one level each (default: the model's two, stride 8 and 16); e.g.
            ``[blocks.1, blocks.2, blocks.4]`` adds a stride-4 level to the map.
        threads: torch threads.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415
    from convergence_probe import cache_features  # noqa: PLC0415
    from anomalib_fod import Fod  # noqa: PLC0415

    torch.set_num_threads(threads)
    for name in datasets or list(DATASETS):
        root, category = DATASETS[name]
        for size in sizes or [(256, 256)]:
            shapes = {"layers": tuple(layers), "d_models": (64,) * len(layers)} if layers else {}
            model = Fod(image_size=tuple(size), visualizer=False, map_level_weights=None, **shapes)
            model.model.pool = torch.nn.AvgPool2d(kernel_size=pool, stride=1, padding=pool // 2)
            if finest_pool is not None or unpooled_copy or fine_join or unpooled_second:
                model.model.extract_features = pooled_levels(
                    model.model, finest_pool, unpooled_copy, fine_join, unpooled_second
                )
            data = MVTecAD(root=root, category=category, train_batch_size=16, eval_batch_size=16, num_workers=0,
                           val_split_mode="same_as_test")
            data.setup()
            # In file order, not the shuffled training loader: the float32 sums then run in one order and
            # repeated runs print the same figures (shuffled, battery_weld's moved by up to 0.004 at 256 px).
            ordered = DataLoader(data.train_data, batch_size=16, shuffle=False, collate_fn=data.train_data.collate_fn)
            extract = model.model.extract_features
            for gain in gains or ["none"]:
                if gain in ("mean", "clamp"):
                    model.model.extract_features = equal_gain(extract, model, ordered, clamp=gain == "clamp")
                elif gain != "none":
                    msg = f"unknown gain {gain!r}"
                    raise ValueError(msg)
                test = cache_features(model, data.test_dataloader(), f"{name}: test images")
                if augment_gains:
                    current, seen = model.model.extract_features, []
                    for factor in augment_gains:  # each on top of the gain above, if any
                        model.model.extract_features = scaled_intensity(current, model, factor)
                        seen.append(cache_features(model, ordered, f"{name}: training images x{factor:g}"))
                    levels = zip(*(s["features"] for s in seen), strict=True)
                    train = {**seen[0], "features": [torch.cat(level) for level in levels]}
                else:
                    train = cache_features(model, ordered, f"{name}: training images")
                model.model.extract_features = extract
                if joint:
                    train["features"], test["features"] = [joined(train["features"])], [joined(test["features"])]
                grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in train["features"]]
                for mean_kind, centering in ((m, c) for m in means or ["position"] for c in centerings or ["none"]):
                    levels = level_statistics(train["features"], test["features"], mean_kind, centering)
                    variant = f"{name} {size[0]}x{size[1]} gain {gain}, mean {mean_kind}, centering {centering},"
                    report(variant, levels, grids, test, covariances, level_scalings, blurs, baselines)


def pooled_levels(  # noqa: ANN201
    model,  # noqa: ANN001
    finest_pool: int | None,
    unpooled_copy: bool,
    fine_join: bool = False,
    unpooled_second: bool = False,
):
    """A feature extractor for ``model`` (a ``FodModel``) whose finest level is pooled with ``finest_pool`` (None:
    the model's pooling) and, with ``unpooled_copy``, preceded by an unpooled copy of it; with ``fine_join`` the
    finest level carries the next level's unpooled features too, upsampled (bilinear) to its grid and
    concatenated (PaDiM's embedding of two stages); with ``unpooled_second`` the second stage's unpooled features
    follow the finest level as a level of their own."""
    pool = model.pool
    finest = pool if finest_pool is None else torch.nn.AvgPool2d(finest_pool, stride=1, padding=finest_pool // 2)

    @torch.no_grad()
    def extract(images: torch.Tensor) -> list[torch.Tensor]:
        levels = model.feature_extractor(images)
        pooled = [finest(levels[0]), *(pool(level) for level in levels[1:])]
        if fine_join:
            coarser = torch.nn.functional.interpolate(levels[1], size=levels[0].shape[-2:], mode="bilinear", align_corners=False)
            pooled[0] = torch.cat([pooled[0], coarser], dim=1)
        if unpooled_second:
            pooled.insert(1, levels[1])
        return [levels[0], *pooled] if unpooled_copy else pooled

    return extract


def joined(levels: list[torch.Tensor]) -> torch.Tensor:
    """``(N, sum C, H, W)``: every level upsampled (bilinear) to the first level's ``(H, W)`` and concatenated."""
    size = levels[0].shape[-2:]
    upsampled = [torch.nn.functional.interpolate(f, size=size, mode="bilinear") for f in levels[1:]]
    return torch.cat([levels[0], *upsampled], dim=1)


def equal_gain(extract, model, loader, clamp: bool = False):  # noqa: ANN001, ANN201
    """``extract`` applied to images rescaled in intensity (before ImageNet normalisation): to the training
    images' mean intensity or, with ``clamp``, into the range of the training images' mean intensities."""
    from anomalib_fod.benchmark.curve import preprocess_as_test  # noqa: PLC0415
    from anomalib_fod.models.cdo.lightning_model import normalisation_of  # noqa: PLC0415

    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalisation_of(model.pre_processor))
    levels = torch.cat([(preprocess_as_test(model, batch).image * std + mean).mean(dim=(1, 2, 3)) for batch in loader])
    low, high, target = levels.min(), levels.max(), levels.mean()

    def rescaled(images: torch.Tensor) -> torch.Tensor:
        raw = images * std + mean
        level = raw.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        raw = raw * ((level.clamp(low, high) if clamp else target) / level)
        return extract((raw - mean) / std)

    return rescaled


def scaled_intensity(extract, model, factor: float):  # noqa: ANN001, ANN201
    """``extract`` applied to images whose intensity (before ImageNet normalisation) is multiplied by
    ``factor`` (clipped to ``[0, 1]`` as a sensor saturates)."""
    from anomalib_fod.models.cdo.lightning_model import normalisation_of  # noqa: PLC0415

    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in normalisation_of(model.pre_processor))

    def rescaled(images: torch.Tensor) -> torch.Tensor:
        return extract((((images * std + mean) * factor).clamp(0, 1) - mean) / std)

    return rescaled


def level_statistics(
    train_features: list[torch.Tensor],
    test_features: list[torch.Tensor],
    mean_kind: str,
    centering: str,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per level: training tokens ``(N, L, C)`` and test tokens centred on the mean, and the shared precision."""
    sys.path.insert(0, str(Path(__file__).parent))
    from screen import _precision  # noqa: PLC0415

    levels = []
    for train_level, test_level in zip(train_features, test_features, strict=True):
        normal = train_level.flatten(2).transpose(1, 2)  # (N, L, C)
        tested = test_level.flatten(2).transpose(1, 2)
        if centering == "median":
            normal = normal - normal.median(dim=1, keepdim=True).values
            tested = tested - tested.median(dim=1, keepdim=True).values
        elif centering != "none":
            msg = f"unknown centering {centering!r}"
            raise ValueError(msg)
        mean = normal.mean(dim=0) if mean_kind == "position" else normal.mean(dim=(0, 1))
        centred_normal = normal - mean
        levels.append((centred_normal, tested - mean, _precision(centred_normal.flatten(0, 1))))
    return levels


def scale_to_larger(
    scores: list[torch.Tensor],
    train_scores: list[torch.Tensor],
    grids: list[tuple[int, int]],
    size: tuple[int, int],
    weights: tuple[float, float] = (0.875, 0.125),
) -> torch.Tensor:
    """``(N, H * W)``: at every pixel the larger of the first level's z-score and the model's map of the other two
    (``weights``, z-units), each upsampled to ``size`` as the model upsamples: a defect counts at the scale it shows
    at, each scale in units of its own normal spread."""
    z = scale_levels(scores, train_scores, "z")
    upsampled = [
        torch.nn.functional.interpolate(level.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)
        for level, grid in zip(z, grids, strict=True)
    ]
    others = weights[0] * upsampled[1] + weights[1] * upsampled[2]
    return torch.maximum(upsampled[0], others).flatten(1)


def neighbourhood_precision(
    centred: torch.Tensor, shared: torch.Tensor, grid: tuple[int, int], window: int
) -> torch.Tensor:
    """``(L, C, C)`` precisions of each position's covariance pooled over its ``window x window`` neighbours.

    Every position keeps its own mean (``centred`` is ``(N, L, C)`` around it); only the scatter about those
    means is averaged over the neighbourhood, so a position borrows ``window**2`` times the samples of a
    per-position covariance, and is shrunk towards ``shared`` with ``C / (N * k + C)``, ``k`` the neighbours
    it has (fewer at the borders).
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from screen import position_covariance  # noqa: PLC0415

    count, positions, channels = centred.shape
    own = position_covariance(centred)  # (L, C, C) float64
    height, width = grid
    planes = own.reshape(height, width, channels * channels).permute(2, 0, 1)[None]
    pooled = torch.nn.functional.avg_pool2d(planes, window, stride=1, padding=window // 2, count_include_pad=False)
    pooled = pooled[0].permute(1, 2, 0).reshape(positions, channels, channels)
    ones = torch.ones(1, 1, height, width, dtype=own.dtype)
    neighbours = torch.nn.functional.avg_pool2d(ones, window, stride=1, padding=window // 2, divisor_override=1)
    weight = (channels / (count * neighbours.flatten() + channels))[:, None, None]
    return torch.linalg.inv((1 - weight) * pooled + weight * shared.double()).float()


def report(  # noqa: PLR0913
    variant: str,
    levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    grids: list[tuple[int, int]],
    test: dict[str, torch.Tensor],
    covariances: list[str] | None,
    level_scalings: list[str] | None,
    blurs: list[float] | None,
    baselines: list[str] | None = None,
) -> None:
    """Print image / pixel AUROC of every covariance, level scaling, blur and baseline for one set of statistics."""
    sys.path.insert(0, str(Path(__file__).parent))
    from screen import _mahalanobis, _position_mahalanobis, _position_precision  # noqa: PLC0415

    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415
    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator  # noqa: PLC0415
    from anomalib_fod.models.fod.settings import FodSettings  # noqa: PLC0415

    for covariances_of_levels in covariances or ["shared"]:
        # "a/b/c": one covariance per level, finest first; a single name: the same for every level
        kinds = covariances_of_levels.split("/")
        kinds = kinds * len(levels) if len(kinds) == 1 else kinds
        scores, train_scores = [], []  # per level: test (N, L) and training (N_train, L) distances
        for (normal, centred, precision), covariance in zip(levels, kinds, strict=True):
            if covariance == "shared":
                scores.append(_mahalanobis(centred, precision))
                train_scores.append(_mahalanobis(normal, precision))
                continue
            shared = torch.linalg.inv(precision.double())
            kind, _, window = covariance.partition("_w")
            if window:
                position = neighbourhood_precision(normal, shared, grids[len(scores)], int(window))
            else:
                weight = None if kind in ("position", "blend_position") else held_out_weight(normal)
                if weight is not None:
                    print(f"  {covariance}: shared-covariance weight {weight:g}", flush=True)
                position = _position_precision(normal, shared, weight)
            test_distance = _position_mahalanobis(centred, position)
            train_distance = _position_mahalanobis(normal, position)
            if kind in ("blend", "blend_position"):
                test_distance = 0.5 * (test_distance + _mahalanobis(centred, precision))
                train_distance = 0.5 * (train_distance + _mahalanobis(normal, precision))
            scores.append(test_distance)
            train_scores.append(train_distance)
        for scaling in level_scalings or ["none"]:
            if scaling == "zmax":
                scaled, used = [scale_to_larger(scores, train_scores, grids, test["size"])], [test["size"]]
            else:
                scaled = scale_levels(scores, train_scores, scaling)
                used = [grids[int(scaling.removeprefix("level"))]] if scaling.startswith("level") else grids
            _, unblurred_scores = AnomalyMapGenerator(FodSettings(blur_sigma=0.0)).combine_levels(
                scaled, used, test["size"]
            )
            for sigma in blurs or [4.0]:
                maps, image_scores = AnomalyMapGenerator(FodSettings(blur_sigma=sigma)).combine_levels(
                    scaled, used, test["size"]
                )
                for baseline in baselines or ["none"]:
                    shown_maps, shown_scores, unblurred = maps, image_scores, unblurred_scores
                    if baseline == "median_excess":
                        # only the part of an image's median above every training image's median is removed
                        train_maps, _ = AnomalyMapGenerator(FodSettings(blur_sigma=sigma)).combine_levels(
                            scale_levels(train_scores, train_scores, scaling), used, test["size"]
                        )
                        ceiling = train_maps.flatten(1).median(dim=1).values.max()
                        excess = (maps.flatten(1).median(dim=1).values - ceiling).clamp_min(0)
                        shown_scores, unblurred = image_scores - excess, unblurred_scores - excess
                    elif baseline != "none":
                        median = maps.flatten(1).median(dim=1).values
                        shown_scores = image_scores - median
                        unblurred = unblurred_scores - median
                        if baseline == "median":
                            shown_maps = maps - median[:, None, None, None]
                    print(
                        f"{variant} {covariances_of_levels} covariance, levels {scaling}, blur {sigma:g}, baseline {baseline}: "
                        f"image AUROC {image_auroc(shown_scores.numpy(), test['labels'].numpy()):.4f}, pixel AUROC "
                        f"{pixel_auroc(shown_maps[:, 0].numpy(), test['masks'].numpy()):.4f}; image AUROC of the "
                        f"unblurred map's maximum {image_auroc(unblurred.numpy(), test['labels'].numpy()):.4f}",
                        flush=True,
                    )


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
