"""Reference features: the callback's per-position mean, checkpoints, offline reload, coreset mode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from fod_helpers import TINY

import anomalib_fod.backbone
from anomalib_fod import Fod
from anomalib_fod.models.fod.callbacks import ReferenceFeatureCallback
from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.torch_model import FodModel
from anomalib_fod.models.fod.transformer import grid_coordinates


def all_images(dataset) -> torch.Tensor:
    """Every image of an anomalib dataset (as the datamodule resizes it), stacked."""
    return torch.stack([dataset[index].image for index in range(len(dataset))])


@torch.no_grad()
def direct_mean_reference(model: Fod, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-position mean of the 3x3-pooled backbone features over ``images``, per level ``(C, h, w)``."""
    normalised = model.pre_processor.transform(images)
    features = model.model.feature_extractor(normalised)
    return [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1).double().mean(dim=0).float() for f in features]


@pytest.mark.slow
def test_references_are_the_mean_over_the_whole_training_set(trained_dummy):
    model = trained_dummy.model
    train_data = trained_dummy.datamodule.train_data
    assert len(train_data) == 10  # batches of 3: the partial last batch must count too
    expected = direct_mean_reference(model, all_images(train_data))
    assert model.model.has_reference
    for level, mean in zip(model.model.levels, expected, strict=True):
        channels, height, width = mean.shape
        assert level.ref_features.shape == (height * width, channels)
        torch.testing.assert_close(level.ref_features, mean.flatten(1).T, rtol=0, atol=1e-5)
        torch.testing.assert_close(level.ref_positions, grid_coordinates(height, width), rtol=0, atol=0)
        assert level.ref_grid.tolist() == [height, width]


@pytest.mark.slow
def test_checkpoint_round_trip_is_exact_and_offline(trained_dummy, tmp_path, monkeypatch):
    model = trained_dummy.model
    assert model.hparams.pre_trained  # trained with the offline ImageNet weights
    path = tmp_path / "fod.ckpt"
    trained_dummy.engine.trainer.save_checkpoint(path)

    def no_weights(*args, **kwargs):
        msg = "load_from_checkpoint must not load backbone weights from anywhere but the checkpoint"
        raise AssertionError(msg)

    monkeypatch.setattr(anomalib_fod.backbone, "_load_pretrained", no_weights)
    reloaded = Fod.load_from_checkpoint(path)  # weights_only default
    assert reloaded.hparams.pre_trained is False

    for level, original in zip(reloaded.model.levels, model.model.levels, strict=True):
        for name in ("ref_features", "ref_positions", "ref_grid"):
            assert torch.equal(getattr(level, name), getattr(original, name)), name
    state, original_state = reloaded.state_dict(), model.state_dict()
    assert state.keys() == original_state.keys()
    for key, value in original_state.items():
        assert torch.equal(state[key], value), key

    images = all_images(trained_dummy.datamodule.test_data)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        raw_before = model.model(model.pre_processor.transform(images))
        raw_after = reloaded.model(reloaded.pre_processor.transform(images))
        full_before = model(images)  # pre-processor -> model -> post-processor
        full_after = reloaded(images)
    assert torch.equal(raw_after.pred_score, raw_before.pred_score)
    assert torch.equal(raw_after.anomaly_map, raw_before.anomaly_map)
    assert torch.equal(full_after.pred_score, full_before.pred_score)
    assert torch.equal(full_after.pred_label, full_before.pred_label)
    assert torch.equal(full_after.anomaly_map, full_before.anomaly_map)


class _Batch(SimpleNamespace):
    image: torch.Tensor


def run_callback(model: FodModel, batches: list[torch.Tensor], mode: str) -> None:
    trainer = SimpleNamespace(
        train_dataloader=[_Batch(image=b) for b in batches],
        ckpt_path=None,
        world_size=1,
        is_global_zero=False,
    )
    module = SimpleNamespace(model=model, pre_processor=None, device=torch.device("cpu"))
    model.train()
    ReferenceFeatureCallback(mode).on_train_start(trainer, module)
    assert model.training  # the callback restores the mode


def test_mean_callback_without_a_trainer():
    torch.manual_seed(0)
    model = FodModel(FodSettings(pre_trained=False, **TINY))
    batches = [torch.randn(3, 3, 64, 64), torch.randn(1, 3, 64, 64)]  # unequal batches
    run_callback(model, batches, "mean")
    with torch.no_grad():
        pooled = [model.extract_features(b) for b in batches]
    for index, level in enumerate(model.levels):
        everything = torch.cat([p[index] for p in pooled])
        torch.testing.assert_close(level.ref_features, everything.mean(0).flatten(1).T, rtol=0, atol=1e-5)


def test_coreset_callback_keeps_real_tokens_at_their_positions():
    torch.manual_seed(0)
    model = FodModel(FodSettings(pre_trained=False, **TINY))
    batches = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)]
    run_callback(model, batches, "coreset")
    with torch.no_grad():
        pooled = [model.extract_features(b) for b in batches]
    for index, level in enumerate(model.levels):
        maps = torch.cat([p[index] for p in pooled])  # (N, C, h, w)
        _, channels, height, width = maps.shape
        assert level.ref_grid.tolist() == [height, width]
        assert level.ref_features.shape == (height * width, channels)
        for token, (row, col) in zip(level.ref_features, level.ref_positions.long().tolist(), strict=True):
            candidates = maps[:, :, row, col]  # the training tokens at that position
            assert torch.isclose(candidates, token, rtol=0, atol=1e-6).all(dim=1).any()


def test_callback_skips_models_without_the_inter_branch():
    model = FodModel(FodSettings(pre_trained=False, with_inter=False, **TINY))
    run_callback(model, [], "mean")  # not even an empty training set is a problem
    assert model.has_reference
    assert all(level.ref_features.numel() == 0 for level in model.levels)


def test_callback_needs_training_images():
    model = FodModel(FodSettings(pre_trained=False, **TINY))
    with pytest.raises(RuntimeError, match="training set is empty"):
        run_callback(model, [], "mean")


def test_callback_rejects_unknown_modes():
    with pytest.raises(ValueError, match="reference"):
        ReferenceFeatureCallback("median")
