"""``benchmarks/research/fine_level_probe.py``: the mixed map and its pixel AUROC against masks of another size."""

from __future__ import annotations

import pytest
import torch

from anomalib_fod.models.blur import gaussian_blur

from fine_level_probe import combined_map, pixel_auroc_at_masks, z_units  # noqa: E402


def test_weight_zero_is_the_models_own_map_blurred() -> None:
    torch.manual_seed(0)
    model, finer = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    blur = gaussian_blur(4.0)
    torch.testing.assert_close(combined_map(model, finer, 0.0, blur), blur(model))
    torch.testing.assert_close(combined_map(model, finer, 0.25, None), 0.75 * model + 0.25 * finer)
    mean, std = z_units(model)
    assert abs(float(((model - mean) / std).std()) - 1) < 1e-5


def test_maps_are_measured_at_each_batchs_mask_size() -> None:
    maps = torch.zeros(3, 1, 32, 32)
    maps[1, :, 8:16, 8:16] = 1.0  # the defect, bright in the map
    masks = torch.zeros(3, 64, 64)
    masks[1, 16:32, 16:32] = 1  # the same square at twice the size
    assert pixel_auroc_at_masks(maps, [masks[:2], masks[2:]]) > 0.99
    assert pixel_auroc_at_masks(-maps, [masks[:2], masks[2:]]) < 0.01
    with pytest.raises(ValueError, match="3 maps but 2 masks"):
        pixel_auroc_at_masks(maps, [masks[:2]])


def test_the_finer_stage_takes_the_checkpoints_backbone_weights() -> None:
    from anomalib_fod.backbone import FeatureExtractor

    from fine_level_probe import frozen_stage  # noqa: E402

    torch.manual_seed(0)
    trained = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], pre_trained=False)
    torch.manual_seed(1)
    finer = frozen_stage(trained, FeatureExtractor("tf_efficientnet_lite0", ["blocks.1"], pre_trained=False))
    weights = dict(trained.named_parameters())
    for name, value in finer.named_parameters():
        torch.testing.assert_close(value, weights[name])
    assert not finer.training
