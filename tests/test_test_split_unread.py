"""Nothing a fitted model keeps comes from the test split.

anomalib validates on the test split by default (``val_split_mode="same_as_test"``), so a fit does read test
images: for its thresholds and the progress metrics. The model itself (Transformer weights, reference features,
residual statistics, the context predictors and their units) must come from the training images alone, or a
benchmark would tune on the data it reports. Two fits with the same seed, one on a dataset whose test images and
masks were replaced by noise, must keep identical models; their thresholds must differ, which shows that the
poisoned images were read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fod_helpers import DUMMY_SIZE, EVAL_BATCH, TINY, TRAIN_BATCH, make_datamodule, make_engine
from PIL import Image

from anomalib_fod import Fod


def poison_test_split(category: Path, seed: int = 1) -> None:
    """Replace every test image of ``category`` by noise and invert every mask, in place."""
    rng = np.random.default_rng(seed)
    for path in sorted((category / "test").rglob("*.png")):
        shape = np.asarray(Image.open(path)).shape
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    for path in sorted((category / "ground_truth").rglob("*.png")):
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)


def fitted(root: Path, category: str, work: Path, **settings) -> Fod:  # noqa: ANN003
    from lightning.pytorch import seed_everything

    seed_everything(0, workers=True)
    model = Fod(pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)), visualizer=False, training_steps=3,
                **TINY, **settings)
    make_engine(work, max_epochs=10).fit(model, datamodule=make_datamodule(root, category, TRAIN_BATCH, EVAL_BATCH))
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings", [{}, {"context_score": True, "context_steps": 10, "context_radius": 1}], ids=["default", "context"],
)
def test_a_model_fitted_beside_a_poisoned_test_split_is_the_same_model(
    dummy_dataset: Path, tmp_path: Path, settings: dict,
) -> None:
    poisoned = tmp_path / "poisoned" / dummy_dataset.name
    shutil.copytree(dummy_dataset, poisoned)
    poison_test_split(poisoned)

    clean = fitted(dummy_dataset.parent, dummy_dataset.name, tmp_path / "clean", **settings)
    other = fitted(poisoned.parent, poisoned.name, tmp_path / "poisoned_run", **settings)

    kept, kept_too = clean.model.state_dict(), other.model.state_dict()
    assert kept.keys() == kept_too.keys()
    for name, tensor in kept.items():
        torch.testing.assert_close(kept_too[name], tensor, rtol=0, atol=0, msg=f"{name} depends on the test split")
    thresholds = clean.post_processor.state_dict(), other.post_processor.state_dict()
    assert any(not torch.equal(value, thresholds[1][name]) for name, value in thresholds[0].items()), (
        "the poisoned test images did not reach the validation: this test would prove nothing"
    )
