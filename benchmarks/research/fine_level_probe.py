"""A map-only stride-4 level added to trained ``Fod()`` maps, end to end (nearest-token maps included).

``feature_distance.py`` measured the finer level on the whitened feature distance alone; where ``Fod()`` adds the
nearest-token score its map is a sum of z-scores, not that distance. Here each finished harness cell's checkpoint
is loaded and its statistics refitted as the harness did (``Fod.fit_residual_statistics``, training images in file
order); its unblurred map (the model's own levels, nearest-token score and all) is put in z-units of the training
images' maps, and the finer level (an unpooled backbone stage, per-position mean, blended covariance, fitted on the
training images at the model's intensity gains) in z-units of its training images' maps. The map is then
``(1 - w) * model + w * finer``, blurred as the model blurs (``w = 0`` is the refitted model's own map); the rows
``raw w`` mix the two maps in their own units instead (the model's map is a whitened distance where the nearest-token
score stays out, as the finer level's is). Training images only are used to fit; the test labels only to measure.

    python benchmarks/research/fine_level_probe.py --harness benchmarks/shared_datasets_256.yaml \
        --model FodAuto --run results/benchmarks/auto_256 --weights "[0.125, 0.25, 0.5]"

One JSON line per cell and weight goes to ``--out`` (default ``<run>/fine_level.jsonl``; a killed run resumes).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

sys.path.insert(0, str(Path(__file__).parent))


def z_units(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over every pixel of ``maps`` ``(N, 1, H, W)`` (the training images')."""
    return maps.mean(), maps.std()


def combined_map(
    z_model: torch.Tensor,
    z_finer: torch.Tensor,
    weight: float,
    blur: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """``(1 - weight) * z_model + weight * z_finer``, both ``(N, 1, H, W)``, blurred as the model blurs."""
    combined = (1 - weight) * z_model + weight * z_finer
    return combined if blur is None else blur(combined)


def pixel_auroc_at_masks(maps: torch.Tensor, masks: Sequence[torch.Tensor]) -> float:
    """Pixel AUROC of ``maps`` ``(N, 1, H, W)`` against per-batch masks ``(B_k, h, w)``, each batch's maps resized to
    its masks as the harness measures (``collect_predictions``)."""
    from anomalib_fod.evaluation import pixel_auroc  # noqa: PLC0415

    pixels, labels, start = [], [], 0
    for mask in masks:
        part = maps[start : start + len(mask)]
        start += len(mask)
        pixels.append(F.interpolate(part, size=mask.shape[-2:], mode="bilinear", align_corners=False).flatten())
        labels.append(mask.flatten().bool())
    if start != len(maps):
        msg = f"{len(maps)} maps but {start} masks"
        raise ValueError(msg)
    return pixel_auroc(torch.cat(pixels).numpy(), torch.cat(labels).numpy())


def passes(
    loader: Any, transform: Any, finer: Any, gains: Sequence[float] = (1.0,)  # noqa: ANN401
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
    """``(batch, transformed images, finer features (B, C, h, w))`` of every batch of ``loader`` at every gain."""
    for batch in loader:
        for gain in gains:
            images = transform((batch.image * gain).clamp(0, 1))
            with torch.no_grad():
                yield batch, images, finer(images)[0]


def maps(
    loader: Any, fod: Any, transform: Any, finer: Any, statistics: Any  # noqa: ANN401
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The model's unblurred maps and the finer level's distance maps ``(N, 1, H, W)`` of ``loader``'s images, and
    the masks of each batch that has them."""
    model_maps, finer_maps, masks = [], [], []
    for batch, images, features in passes(loader, transform, finer):
        with torch.no_grad():
            model_maps.append(fod.model(images).anomaly_map.float())
            distance = statistics(features.flatten(2).transpose(1, 2)).reshape(-1, 1, *features.shape[-2:])
            finer_maps.append(F.interpolate(distance, size=images.shape[-2:], mode="bilinear"))
        if batch.gt_mask is not None:
            masks.append(batch.gt_mask.reshape(len(images), *batch.gt_mask.shape[-2:]))
    return torch.cat(model_maps), torch.cat(finer_maps), masks


def frozen_stage(trained: torch.nn.Module, finer: torch.nn.Module) -> torch.nn.Module:
    """``finer`` (a feature extractor of an earlier stage of the same backbone) with ``trained``'s backbone weights, in
    eval mode. A checkpoint's settings say ``pre_trained=False`` (it carries its weights), so a new extractor built from
    them would be random: every one of ``finer``'s tensors must come from ``trained``."""
    missing, _ = finer.load_state_dict(trained.state_dict(), strict=False)
    if missing:
        msg = f"the checkpoint's backbone lacks {missing[:3]}..."
        raise ValueError(msg)
    return finer.eval()


def main(
    harness: Path = Path("benchmarks/shared_datasets_256.yaml"),
    model: str = "FodAuto",
    run: Path | None = None,
    layer: str = "blocks.1",
    weights: list[float] | None = None,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    out: Path | None = None,
    threads: int = 1,
) -> None:
    """Print and append pixel AUROC per cell and weight (``w 0.0``: the refitted model's own map)."""
    from rescore import finished_cells, load_seeded, open_run, with_blur  # noqa: PLC0415

    from anomalib_fod.backbone import FeatureExtractor  # noqa: PLC0415
    from anomalib_fod.benchmark.data import build_datamodule  # noqa: PLC0415
    from anomalib_fod.models.blur import gaussian_blur  # noqa: PLC0415
    from anomalib_fod.models.fod.callbacks import training_transform  # noqa: PLC0415
    from anomalib_fod.models.fod.fitting import in_file_order  # noqa: PLC0415
    from anomalib_fod.models.fod.residual_statistics import ResidualAccumulator, ResidualStatistics  # noqa: PLC0415

    torch.set_num_threads(threads)
    weights = [0.0, *(weights or [0.25])]
    specs, run, out, done = open_run(harness, run, out, "fine_level.jsonl")
    for dataset, seed, checkpoint in finished_cells(run, model, datasets or list(specs), seeds):
        if (dataset, seed, f"raw w {weights[-1]}") in done:  # a cell's last row
            continue
        datamodule = build_datamodule(specs[dataset])
        datamodule.setup()
        fod = load_seeded(checkpoint, seed)
        fod.fit_residual_statistics(datamodule)
        with_blur(fod, 0.0)
        fod.eval()
        settings = fod.model.settings
        stage = FeatureExtractor(settings.backbone, [layer], pre_trained=False)
        finer = frozen_stage(fod.model.feature_extractor, stage)
        transform = training_transform(fod)
        train_loader = in_file_order(datamodule.train_dataloader())
        accumulator = ResidualAccumulator(per_position=True)
        for _, _, features in passes(train_loader, transform, finer, settings.intensity_gains):
            accumulator.add(features.flatten(2).transpose(1, 2))
        statistics = ResidualStatistics("blend")
        statistics.set(*accumulator.finish())

        train_model, train_finer, _ = maps(train_loader, fod, transform, finer, statistics)
        test_model, test_finer, masks = maps(datamodule.test_dataloader(), fod, transform, finer, statistics)
        (model_mean, model_std), (finer_mean, finer_std) = z_units(train_model), z_units(train_finer)
        z_model, z_finer = (test_model - model_mean) / model_std, (test_finer - finer_mean) / finer_std
        blur = gaussian_blur(settings.blur_sigma)
        units = {"w": (z_model, z_finer), "raw w": (test_model, test_finer)}
        for name, (model_map, finer_map) in units.items():
            for weight in weights if name == "w" else weights[1:]:
                row = {"dataset": dataset, "seed": seed, "variant": f"{name} {weight}", "layer": layer,
                       "pixel_auroc": pixel_auroc_at_masks(combined_map(model_map, finer_map, weight, blur), masks)}
                if name == "w":
                    row["units"] = {"model": [float(model_mean), float(model_std)],
                                    "finer": [float(finer_mean), float(finer_std)]}
                print(json.dumps(row), flush=True)
                with out.open("a") as file:
                    file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
