"""The backbone-feature cache: served only for deterministic data, on the CPU, and training equals training without it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from anomalib.pre_processing import PreProcessor
from fod_helpers import PAPER_SCORE, TINY, TRAIN_BATCH, make_datamodule, make_engine
from lightning.pytorch import Callback, seed_everything
from torchvision.transforms import v2

from anomalib_fod import Fod
from anomalib_fod.models.fod.feature_cache import FeatureCache, is_deterministic

EPOCHS = 3
NORMALISE = v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def test_only_known_deterministic_transforms_count_as_deterministic() -> None:
    assert is_deterministic(None)
    assert is_deterministic(v2.Compose([v2.Resize((64, 64)), NORMALISE]))
    assert not is_deterministic(v2.Compose([v2.Resize((64, 64)), v2.RandomHorizontalFlip(), NORMALISE]))
    assert not is_deterministic(v2.Compose([v2.Compose([v2.ColorJitter(0.2)]), NORMALISE]))  # nested
    assert not is_deterministic(v2.Lambda(lambda x: x))  # unknown: could be random


def test_cache_keeps_features_on_the_cpu_and_serves_only_complete_batches() -> None:
    calls = []

    def extract(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(images.shape[0])
        return [images.mean(dim=1, keepdim=True), images[:, :2, ::2, ::2]]

    cache = FeatureCache()
    images = torch.rand(3, 3, 8, 8)
    first = cache.get_or_compute(["a", "b", "c"], images, extract)
    assert len(cache) == 3 and calls == [3]
    assert all(t.device.type == "cpu" for feats in cache._store.values() for t in feats)  # noqa: SLF001
    assert cache.nbytes == 3 * (1 * 8 * 8 + 2 * 4 * 4) * 4
    served = cache.get_or_compute(["c", "a"], torch.empty(2, 3, 8, 8), extract)
    assert calls == [3], "a fully cached batch must not run the extractor"
    for level_served, level_first in zip(served, first, strict=True):
        torch.testing.assert_close(level_served, level_first[[2, 0]], rtol=0, atol=0)
    cache.get_or_compute(["a", "new"], torch.rand(2, 3, 8, 8), extract)
    assert calls == [3, 2] and len(cache) == 4


class StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def _fit(dataset: Path, root: Path, cache_features: bool, **model_args) -> tuple[Fod, list[float], int]:  # noqa: ANN003
    """Fit a tiny FOD; return it, its step losses and how often its backbone ran."""
    seed_everything(3)
    # The paper's score: the default's statistics fits add backbone passes these tests would have to count.
    model = Fod(pre_trained=False, visualizer=False, cache_features=cache_features, **PAPER_SCORE, **TINY, **model_args)
    calls = []
    extract = model.model.extract_features

    def counting(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(images.shape[0])
        return extract(images)

    model.model.extract_features = counting
    losses = StepLosses()
    datamodule = make_datamodule(dataset.parent, dataset.name, TRAIN_BATCH, 4)
    # No validation: it would run the backbone too, and the counts are about training.
    engine = make_engine(root, max_epochs=EPOCHS, callbacks=[losses], check_val_every_n_epoch=EPOCHS + 1)
    engine.fit(model, datamodule=datamodule)
    return model, losses.losses, len(calls)


@pytest.mark.slow
def test_cached_training_equals_uncached_training(dummy_dataset: Path, tmp_path: Path) -> None:
    """Same losses over several epochs with the cache on and off; with it on the backbone runs twice per image."""
    cached, cached_losses, cached_calls = _fit(dummy_dataset, tmp_path / "on", cache_features=True, image_size=64)
    fresh, fresh_losses, fresh_calls = _fit(dummy_dataset, tmp_path / "off", cache_features=False, image_size=64)
    batches_per_epoch = math.ceil(len(cached.trainer.datamodule.train_data) / TRAIN_BATCH)
    assert len(cached_losses) == len(fresh_losses) == EPOCHS * batches_per_epoch
    # References and the cache fill: one pass each. Without the cache: references, then every step.
    assert cached_calls == 2 * batches_per_epoch
    assert fresh_calls == (1 + EPOCHS) * batches_per_epoch
    # Equal up to rounding: a conv computes an image's features in another batch (composition, size) than
    # the cache's ordered pass did (measured: 8 of 12 steps bit-identical, the others within 4e-6 of ~17).
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(fresh_losses), rtol=1e-6, atol=1e-5)
    # Adam moves a weight by about the learning rate per step whatever its gradient, so a rounding-level
    # gradient difference can grow to that much per step (measured: at most 5e-4 after 12 steps).
    bound = 2 * len(fresh_losses) * cached.learning_rate
    for want, got in zip(fresh.model.parameters(), cached.model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=bound)


@pytest.mark.slow
def test_random_pre_processing_is_never_served_from_the_cache(dummy_dataset: Path, tmp_path: Path) -> None:
    """A random transform in the model's PreProcessor switches the cache off: every step runs the backbone."""
    transform = v2.Compose([v2.Resize((64, 64)), v2.RandomHorizontalFlip(p=0.5), NORMALISE])
    model, losses, calls = _fit(dummy_dataset, tmp_path, cache_features=True, pre_processor=PreProcessor(transform))
    assert not model._use_cache and len(model._feature_cache) == 0  # noqa: SLF001
    assert calls == len(losses) + math.ceil(len(model.trainer.datamodule.train_data) / TRAIN_BATCH)


@pytest.mark.slow
def test_random_training_augmentations_are_never_served_from_the_cache(dummy_dataset: Path, tmp_path: Path) -> None:
    seed_everything(3)
    model = Fod(pre_trained=False, visualizer=False, image_size=64, **TINY)
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, TRAIN_BATCH, 4)
    datamodule.train_augmentations = v2.RandomVerticalFlip(p=0.5)
    make_engine(tmp_path, max_epochs=1).fit(model, datamodule=datamodule)
    assert not model._use_cache and len(model._feature_cache) == 0  # noqa: SLF001
