"""Screen ways of combining FOD's per-level token scores into a map, on trained checkpoints, in seconds per variant.

``rescore.py`` refits the statistics and predicts the test set once per variant (minutes per checkpoint).
Variants that only change how the per-level token scores become the map and the image score (level weights,
blur) need neither: this script predicts each finished harness cell's test set once with the model's own
settings, keeps every level's token scores (the anomaly map's distances and the per-position distances the
image score reads), then rebuilds the map and the image score for each variant exactly as
``AnomalyMapGenerator`` does (bilinear upsampling, weighted mean over levels, Gaussian
blur, maximum) and measures them exactly as the harness does. The empty variant ``{}`` is the model's own
rule: its figures must equal the model's own predictions' (each row carries those as ``predicted``).

    python benchmarks/research/map_probe.py --harness benchmarks/shared_datasets_256.yaml --datasets "[bottle]" \
        --variants '{"default": {}, "3/4 stride 8": {"map_weights": [0.75, 0.25]}, "blur 2": {"blur_sigma": 2}}'

Variant keys: ``map_weights`` (per-level weights of the anomaly map, default the model's), ``image_weights`` (of
the image score's map, default equal), ``blur_sigma`` and ``align_corners`` (of the upsampling; default: the
model's; caches made before the setting existed hold ``True``, the only rule then). Token scores are cached under
``<run>/map_probe/<settings' hash>/`` (one ``.npz`` per cell), so new variants cost no prediction. One JSON line
per cell and variant goes to ``--out``; a table of mean and spread over seeds is printed at the end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


def cache_cell(checkpoint: Path, datamodule: Any, path: Path, settings: dict[str, Any]) -> None:  # noqa: ANN401
    """Predict the test set with ``checkpoint`` and ``settings`` and save every level's token scores to ``path``."""
    import torch  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.evaluation import exact_metrics  # noqa: PLC0415
    from rescore import predict_raw  # noqa: PLC0415

    fod = Fod.load_from_checkpoint(checkpoint, **settings)
    fod.fit_residual_statistics(datamodule)
    generator = fod.model.anomaly_map_generator
    kept: dict[str, list[torch.Tensor]] = {}

    def keep(_module: torch.nn.Module, args: tuple[Any, ...], _output: Any) -> None:  # noqa: ANN401
        tokens, outputs, grids, image_size = args
        # The scores the generator combines (with the nearest-token or context score where the model adds one).
        scores = generator.level_scores(tokens, outputs, grids)
        for level, score in enumerate(scores.map):
            kept.setdefault(f"map{level}", []).append(score.cpu())
        for level, score in enumerate(scores.image or []):
            kept.setdefault(f"position{level}", []).append(score.cpu())
        kept["grids"] = [torch.tensor(grids)]
        kept["image_size"] = [torch.tensor(image_size)]

    handle = generator.register_forward_hook(keep)
    try:
        raw = predict_raw(fod, datamodule)
    finally:
        handle.remove()
    arrays = {name: torch.cat(parts).numpy() if name.startswith(("map", "position")) else parts[0].numpy()
              for name, parts in kept.items()}
    predicted = exact_metrics(raw["scores"], raw["labels"], raw["maps"], raw["masks"])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=raw["labels"], masks=np.packbits(raw["masks"]),
                        mask_shape=np.array(raw["masks"].shape), blur_sigma=np.array(fod.model.settings.blur_sigma),
                        predicted=np.array([predicted["image_auroc"], predicted["pixel_auroc"]]),
                        map_level_weights=np.array(generator.map_level_weights or [1.0] * len(kept["grids"][0])),
                        align_corners=np.array(generator.align_corners),
                        **arrays)


def combine(token_scores: list[np.ndarray], grids: np.ndarray, image_size: tuple[int, int], weights: list[float],
            blur_sigma: float, mask_size: tuple[int, int], align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """``AnomalyMapGenerator.combine_levels`` with these level weights, blur and upsampling, then the harness's resize
    to the masks.

    Returns ``(N, H_mask, W_mask)`` maps and ``(N,)`` image scores (the maximum before the resize, as the model).
    """
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415

    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator  # noqa: PLC0415
    from anomalib_fod.models.fod.settings import FodSettings  # noqa: PLC0415

    generator = AnomalyMapGenerator(FodSettings(blur_sigma=blur_sigma, map_align_corners=align_corners))
    levels = [torch.from_numpy(scores) for scores in token_scores]
    anomaly_map, image_scores = generator.combine_levels(levels, [tuple(map(int, g)) for g in grids], image_size,
                                                         weights)
    if tuple(anomaly_map.shape[-2:]) != tuple(mask_size):
        anomaly_map = F.interpolate(anomaly_map, size=mask_size, mode="bilinear", align_corners=False)
    return anomaly_map[:, 0].numpy(), image_scores.numpy()


def evaluate(cache: dict[str, np.ndarray], variant: dict[str, Any]) -> dict[str, float]:
    """Image and pixel AUROC of one variant on one cell's cached token scores."""
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415

    unknown = set(variant) - {"map_weights", "image_weights", "blur_sigma", "align_corners"}
    if unknown:
        msg = f"unknown variant keys {sorted(unknown)}"
        raise ValueError(msg)
    levels = len(cache["grids"])
    equal = [1.0] * levels
    own = cache["map_level_weights"].tolist() if "map_level_weights" in cache else equal
    sigma = float(variant.get("blur_sigma", cache["blur_sigma"]))
    align = bool(variant.get("align_corners", cache.get("align_corners", True)))
    shape = tuple(int(x) for x in cache["mask_shape"])
    masks = np.unpackbits(cache["masks"], count=int(np.prod(shape))).reshape(shape).astype(bool)
    size = tuple(int(x) for x in cache["image_size"])
    maps, scores = combine([cache[f"map{i}"] for i in range(levels)], cache["grids"], size,
                           variant.get("map_weights", own), sigma, shape[-2:], align)
    image_map = "position" if "position0" in cache else "map"
    if image_map == "position" or {"image_weights", "blur_sigma", "align_corners"} & set(variant):
        scores = combine([cache[f"{image_map}{i}"] for i in range(levels)], cache["grids"], size,
                         variant.get("image_weights", equal), sigma, shape[-2:], align)[1]
    return {"image_auroc": image_auroc(scores, cache["labels"]), "pixel_auroc": pixel_auroc(maps, masks)}


def main(
    harness: Path = Path("benchmarks/shared_datasets_256.yaml"),
    variants: dict[str, dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
    model: str = "Fod",
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    run: Path | None = None,
    out: Path | None = None,
    threads: int = 1,
) -> None:
    """Cache the token scores of every finished ``<dataset>__<model>__seed<k>`` cell, then score each variant.

    Args:
        harness: the harness config the run was made with (its datasets are rebuilt from it).
        variants: name -> ``map_weights`` / ``image_weights`` / ``blur_sigma`` / ``align_corners``.
        settings: keyword arguments of ``Fod.load_from_checkpoint`` the token scores are made with (default:
            ``{"intensity_gains": [0.9, 1.0, 1.1]}``, today's default, which checkpoints saved before it lack).
        model: the harness model name whose cells are probed.
        datasets: dataset names (default: every dataset of the config with checkpoints).
        seeds: seeds (default: all).
        run: the harness run folder (default: the config's ``output_dir``).
        out: JSON-lines file of the results (default: ``<run>/map_probe.jsonl``; rows there are skipped).
        threads: torch threads.
    """
    import torch  # noqa: PLC0415

    from anomalib_fod.benchmark.data import build_datamodule  # noqa: PLC0415
    from rescore import finished_cells, open_run, table  # noqa: PLC0415

    if not variants:
        msg = 'give --variants, e.g. \'{"default": {}, "blur 2": {"blur_sigma": 2}}\''
        raise SystemExit(msg)
    settings = {"intensity_gains": [0.9, 1.0, 1.1]} if settings is None else settings
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    torch.set_num_threads(threads)
    specs, run, out, done = open_run(harness, run, out, "map_probe.jsonl")
    for dataset, seed, checkpoint in finished_cells(run, model, datasets or list(specs), seeds):
        if all((dataset, seed, name) in done for name in variants):
            continue
        path = run / "map_probe" / tag / f"{dataset}__{model}__seed{seed}.npz"
        if not path.exists():
            datamodule = build_datamodule(specs[dataset])
            datamodule.setup()
            cache_cell(checkpoint, datamodule, path, settings)
            (path.parent / "settings.json").write_text(json.dumps(settings))
        cache = dict(np.load(path))
        predicted = dict(zip(("image_auroc", "pixel_auroc"), cache["predicted"].tolist(), strict=True))
        for name, variant in variants.items():
            if (dataset, seed, name) in done:
                continue
            row = {"dataset": dataset, "seed": seed, "variant": name, "settings": variant, "model_settings": settings,
                   **evaluate(cache, variant), "predicted": predicted}
            print(json.dumps(row), flush=True)
            with out.open("a") as file:
                file.write(json.dumps(row) + "\n")
    table(out, variants)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
