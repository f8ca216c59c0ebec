"""``benchmarks/research/map_probe.py`` rebuilds the model's map and image score from cached token scores exactly."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from anomalib_fod import Fod

from anomalib_fod.models.fod.fitting import KeptLevels, fit_statistics
from anomalib_fod.models.fod.nearest import fit_nearest
from fod_helpers import TINY

from map_probe import combine, evaluate  # noqa: E402


def test_cached_token_scores_give_the_models_map_image_scores_and_metrics() -> None:
    torch.manual_seed(0)
    # The default score and weights, the nearest-token score taking part whatever the position share; the probe
    # scores cached tokens, so the map-only levels (which read the images) stay out.
    fod = Fod(pre_trained=False, image_size=64, visualizer=False, nearest_position_limit=1.0, fine_map_weight=0.0,
              aligned_map_weight=0.0, **TINY).model
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    features = fod.extract_features(images)
    fod.set_mean_reference([f.mean(0) for f in features])
    generator = fod.anomaly_map_generator
    kept = KeptLevels([], [], [])
    fit_statistics(fod, [features], keep=kept)
    fit_nearest(generator.nearest, generator.statistics, kept.tokens, kept.residuals, (1.0,), 64, torch.device("cpu"))
    assert generator.nearest_active
    fod.eval()
    with torch.no_grad():
        result, run = fod.forward_features(features, (64, 64)), fod.run_levels(features)
        # what map_probe.cache_cell keeps: the scores the generator combines
        scores = generator.level_scores(run.tokens, run.levels, run.grids)
    maps = [score.numpy() for score in scores.map]
    position = [score.numpy() for score in scores.image]
    grids = np.array(run.grids)
    weights, sigma, align = list(generator.map_level_weights), fod.settings.blur_sigma, generator.align_corners
    anomaly_map, _ = combine(maps, grids, (64, 64), weights, sigma, (64, 64), align)
    np.testing.assert_allclose(anomaly_map, result.anomaly_map[:, 0].numpy(), rtol=1e-5, atol=1e-6)
    _, scores = combine(position, grids, (64, 64), [1.0, 1.0], sigma, (64, 64), align)
    np.testing.assert_allclose(scores, result.pred_score.numpy(), rtol=1e-5, atol=1e-6)
    # masks of another size: the harness resizes the maps to them (bilinear, corners not aligned)
    resized, _ = combine(maps, grids, (64, 64), weights, sigma, (96, 80), align)
    expected = F.interpolate(result.anomaly_map, size=(96, 80), mode="bilinear", align_corners=False)[:, 0]
    np.testing.assert_allclose(resized, expected.numpy(), rtol=1e-5, atol=1e-6)

    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((6, 64, 64), dtype=bool)
    masks[3:, 20:40, 10:30] = True
    cache = {"grids": grids, "image_size": np.array([64, 64]), "mask_shape": np.array(masks.shape),
             "masks": np.packbits(masks), "labels": labels, "blur_sigma": np.array(sigma),
             "map_level_weights": np.array(weights), "align_corners": np.array(align), "map0": maps[0], "map1": maps[1],
             "position0": position[0], "position1": position[1]}
    from anomalib_fod.evaluation import image_auroc, pixel_auroc  # noqa: PLC0415

    own = evaluate(cache, {})
    assert own["image_auroc"] == image_auroc(result.pred_score.numpy(), labels)
    # equal up to a swap of two pixels whose scores differ by float rounding
    assert own["pixel_auroc"] == pytest.approx(pixel_auroc(result.anomaly_map[:, 0].numpy(), masks), abs=1e-6)
    mean = evaluate(cache, {"map_weights": [1.0, 1.0]})
    assert mean["image_auroc"] == own["image_auroc"]  # the map's weights never reach the image score
    assert abs(mean["pixel_auroc"] - own["pixel_auroc"]) > 1e-4
    corners = evaluate(cache, {"align_corners": True})
    assert abs(corners["pixel_auroc"] - own["pixel_auroc"]) > 1e-5  # the upsampling reaches the map
    del cache["align_corners"]  # caches from before the setting: corner-aligned, the only rule then
    assert evaluate(cache, {}) == corners
