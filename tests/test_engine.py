"""anomalib Engine end to end: fit, test and predict on the embedded real data and the dummy data."""

from __future__ import annotations

import math

import pytest
import torch
from fod_helpers import DUMMY_COUNTS, DUMMY_SIZE, EMBEDDED_DATA_ROOT, EVAL_BATCH, TINY, make_datamodule, make_engine
from lightning.pytorch import seed_everything

from anomalib_fod import Fod

METRIC_KEYS = {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}


def check_metrics(results: list[dict]) -> None:
    assert len(results) == 1
    metrics = results[0]
    assert METRIC_KEYS <= metrics.keys()
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


def check_predictions(predictions, n_images: int, batch_size: int, size: tuple[int, int]) -> None:
    assert predictions is not None
    sizes = [len(batch.pred_score) for batch in predictions]
    assert sum(sizes) == n_images
    assert sizes == [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    for batch, count in zip(predictions, sizes, strict=True):
        assert batch.pred_score.shape == (count,)
        assert torch.isfinite(batch.pred_score).all()
        assert batch.anomaly_map.shape[0] == count
        assert tuple(batch.anomaly_map.shape[-2:]) == size
        assert batch.anomaly_map.numel() == count * size[0] * size[1]  # one map per image
        assert batch.pred_label.shape == (count,)
        assert batch.pred_mask.shape[-2:] == size
        # normalised by the post-processor
        assert (batch.pred_score >= 0).all() and (batch.pred_score <= 1).all()


@pytest.mark.slow
def test_battery_weld_fit_test_predict(tmp_path):
    """Embedded real data at 96 px: 37 train images in batches of 5 (last: 2), 128 test in 20s (last: 8)."""
    seed_everything(0)
    size = 96
    datamodule = make_datamodule(EMBEDDED_DATA_ROOT, "battery_weld", train_batch_size=5, eval_batch_size=20)
    model = Fod(pre_processor=Fod.configure_pre_processor((size, size)), visualizer=False, **TINY)
    engine = make_engine(tmp_path, max_epochs=1)
    engine.fit(model, datamodule=datamodule)
    assert model.model.has_reference
    assert model.model.levels[0].ref_grid.tolist() == [size // 8, size // 8]
    check_metrics(engine.test(model, datamodule=datamodule))
    predictions = engine.predict(model, datamodule=datamodule)
    check_predictions(predictions, n_images=128, batch_size=20, size=(size, size))
    labels = torch.cat([batch.gt_label for batch in predictions])
    assert int(labels.sum()) == 93  # the defective images, all predicted


@pytest.mark.slow
def test_dummy_test_and_predict(trained_dummy):
    """The shared fitted model: 10 test images in batches of 4 (last: 2)."""
    engine, model, datamodule = trained_dummy.engine, trained_dummy.model, trained_dummy.datamodule
    check_metrics(engine.test(model, datamodule=datamodule))
    predictions = engine.predict(model, datamodule=datamodule)
    n_test = DUMMY_COUNTS["n_test_good"] + DUMMY_COUNTS["n_test_bad"]
    check_predictions(predictions, n_images=n_test, batch_size=EVAL_BATCH, size=(DUMMY_SIZE, DUMMY_SIZE))
    # the post-processor learnt a threshold and min-max from validation
    post = model.post_processor
    assert math.isfinite(float(post.image_threshold))
    assert float(post.image_min) < float(post.image_max)


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"with_intra": False, "with_inter": False, "scoring": "rec"},
        {"with_inter": False},
        {"with_intra": False},
        {"reference": "coreset"},
        {"with_entropy": False},
        {"out_projection": True},
    ],
    ids=["patch-only", "intra-only", "inter-only", "coreset", "no-entropy", "out-projection"],
)
def test_variants_train_and_predict(dummy_dataset, tmp_path, settings):
    seed_everything(0)
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, train_batch_size=4, eval_batch_size=4)
    model = Fod(
        pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)),
        visualizer=False,
        pre_trained=False,
        **{**TINY, **settings},
    )
    engine = make_engine(tmp_path, max_epochs=1)
    engine.fit(model, datamodule=datamodule)
    if model.model.with_inter:
        assert model.model.has_reference
    predictions = engine.predict(model, datamodule=datamodule)
    n_test = DUMMY_COUNTS["n_test_good"] + DUMMY_COUNTS["n_test_bad"]
    check_predictions(predictions, n_images=n_test, batch_size=4, size=(DUMMY_SIZE, DUMMY_SIZE))


@pytest.mark.parametrize(
    ("covariance", "image_score"),
    [("shared", "map"), ("shared", "position"), ("position", "map"), ("blend", "position")],
)
def test_step_budget_stops_training_and_fits_the_residual_statistics(
    dummy_dataset, tmp_path, covariance, image_score  # noqa: ANN001
) -> None:
    """``training_steps`` ends the fit mid-epoch whatever max_epochs says; the whitened score is ready to test."""
    seed_everything(0)
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, train_batch_size=2, eval_batch_size=EVAL_BATCH)
    model = Fod(
        pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)),
        visualizer=False,
        training_steps=3,
        reconstruction_term="mahalanobis",
        residual_covariance=covariance,
        image_score=image_score,
        scoring="rec",
        **TINY,
    )
    engine = make_engine(tmp_path, max_epochs=50)
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.global_step == 3
    statistics = model.model.anomaly_map_generator.statistics
    assert all(s.fitted for s in statistics)
    assert all(s.precision.dim() == 2 for s in statistics)  # noqa: PLR2004
    per_position = covariance != "shared" or image_score == "position"  # the image score reads them too
    assert all((s.position_precision.numel() > 0) == per_position for s in statistics)
    # fitted on the final weights: refitting now changes nothing
    before = [s.mean.clone() for s in statistics]
    model.fit_residual_statistics(datamodule)
    for s, b in zip(statistics, before, strict=True):
        torch.testing.assert_close(s.mean, b, rtol=1e-5, atol=1e-5)
    check_metrics(engine.test(model, datamodule=datamodule))
