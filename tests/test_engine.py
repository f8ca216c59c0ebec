"""anomalib Engine end to end: fit, test and predict on the embedded real data and the dummy data.

Each run is checked by what it predicts: the post-processed scores, labels and masks against the raw
outputs and the learnt thresholds, and the raw outputs' ranking of defects (exact AUROC).
"""

from __future__ import annotations

import math

import pytest
import torch
from fod_helpers import DUMMY_COUNTS, DUMMY_SIZE, EMBEDDED_DATA_ROOT, EVAL_BATCH, TINY, make_datamodule, make_engine
from lightning.pytorch import seed_everything

from anomalib_fod import Fod
from anomalib_fod.evaluation import collect_predictions, exact_metrics, raw_post_processing

METRIC_KEYS = {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"}


def check_metrics(results: list[dict]) -> None:
    """anomalib's test metrics are all there and computed (a NaN threshold or an empty split gives NaN)."""
    assert len(results) == 1
    metrics = results[0]
    assert METRIC_KEYS <= metrics.keys()
    assert all(math.isfinite(metrics[key]) for key in METRIC_KEYS), metrics


def raw_predictions(engine, model, datamodule) -> list:  # noqa: ANN001
    """``Engine.predict`` without the post-processor's normalisation: the model's own scores and maps."""
    with raw_post_processing(model):
        return engine.predict(model, datamodule=datamodule)


def check_predictions(predictions, raw, post, n_images: int, batch_size: int, size: tuple[int, int]) -> None:  # noqa: ANN001
    """Batching and shapes, then what the post-processor made of the raw outputs: scores min-max normalised
    around the learnt thresholds, and labels and masks that are the thresholds' verdicts on the raw values."""
    assert predictions is not None
    sizes = [len(batch.pred_score) for batch in predictions]
    assert sum(sizes) == n_images
    assert sizes == [batch_size] * (n_images // batch_size) + ([n_images % batch_size] if n_images % batch_size else [])
    for batch, count in zip(predictions, sizes, strict=True):
        assert batch.pred_score.shape == (count,)
        assert tuple(batch.anomaly_map.shape[-2:]) == size
        assert batch.anomaly_map.numel() == count * size[0] * size[1]  # one map per image
        assert batch.pred_label.shape == (count,)
        assert batch.pred_mask.shape[-2:] == size
    for kind, score, label in (("image", "pred_score", "pred_label"), ("pixel", "anomaly_map", "pred_mask")):
        threshold, low, high = (float(getattr(post, f"{kind}_{name}")) for name in ("threshold", "min", "max"))
        assert math.isfinite(threshold) and low < high, (kind, threshold, low, high)
        values = torch.cat([getattr(batch, score).flatten() for batch in raw])
        assert torch.isfinite(values).all()
        expected = ((values - threshold) / (high - low) + 0.5).clamp(0, 1)
        torch.testing.assert_close(torch.cat([getattr(b, score).flatten() for b in predictions]), expected)
        labels = torch.cat([getattr(batch, label).flatten() for batch in predictions]).bool()
        decided = (values - threshold).abs() > 1e-6 * (high - low)  # a value on the threshold may round either way
        assert torch.equal(labels[decided], (values > threshold)[decided]), kind


def check_ranking(raw, min_image_auroc: float, min_pixel_auroc: float) -> None:  # noqa: ANN001
    """The raw outputs rank the defective images and pixels above the normal ones (exact AUROC)."""
    outputs = collect_predictions(raw)
    metrics = exact_metrics(outputs["scores"], outputs["labels"], outputs["maps"], outputs["masks"])
    assert metrics["image_auroc"] >= min_image_auroc, metrics
    assert metrics["pixel_auroc"] >= min_pixel_auroc, metrics


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
    raw = raw_predictions(engine, model, datamodule)
    check_predictions(predictions, raw, model.post_processor, n_images=128, batch_size=20, size=(size, size))
    # measured 0.987 / 0.823 (seeds 0 and 1): the whitened residual ranks welds after one epoch
    check_ranking(raw, min_image_auroc=0.95, min_pixel_auroc=0.75)


@pytest.mark.slow
def test_dummy_test_and_predict(trained_dummy):
    """The shared fitted model: 10 test images in batches of 4 (last: 2)."""
    engine, model, datamodule = trained_dummy.engine, trained_dummy.model, trained_dummy.datamodule
    check_metrics(engine.test(model, datamodule=datamodule))
    predictions = engine.predict(model, datamodule=datamodule)
    raw = raw_predictions(engine, model, datamodule)
    n_test = DUMMY_COUNTS["n_test_good"] + DUMMY_COUNTS["n_test_bad"]
    check_predictions(predictions, raw, model.post_processor, n_test, EVAL_BATCH, (DUMMY_SIZE, DUMMY_SIZE))
    check_ranking(raw, min_image_auroc=0.95, min_pixel_auroc=0.9)  # measured 1.0 / 0.972 (seeds 0 and 1)


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
    raw = raw_predictions(engine, model, datamodule)
    check_predictions(predictions, raw, model.post_processor, n_test, batch_size=4, size=(DUMMY_SIZE, DUMMY_SIZE))


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
    check_ranking(raw_predictions(engine, model, datamodule), min_image_auroc=0.95, min_pixel_auroc=0.9)


@pytest.mark.parametrize(
    ("max_epochs", "check_val", "validations_at_step"), [(50, 1, [12]), (2, 1, [10]), (2, 3, [])]
)
def test_a_step_budget_validates_once_in_the_epoch_it_ends_in(
    dummy_dataset, tmp_path, monkeypatch, max_epochs, check_val, validations_at_step  # noqa: ANN001
) -> None:
    """10 images at batch 2 are 5 steps an epoch: a 12-step budget ends in the third epoch, which alone validates
    (and alone fits the residual statistics); a trainer that stops first validates in its own last epoch; a trainer
    whose validation interval exceeds its epochs never validates. The trainer keeps its own validation interval."""
    from lightning.pytorch import Callback

    from anomalib_fod.models.fod import callbacks

    fits: list[int] = []
    original = callbacks.fit_residual_statistics
    monkeypatch.setattr(callbacks, "fit_residual_statistics", lambda *a, **k: (fits.append(1), original(*a, **k)))

    class CountValidations(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_validation_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            del pl_module
            self.steps.append(trainer.global_step)

    seed_everything(0)
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, train_batch_size=2, eval_batch_size=EVAL_BATCH)
    model = Fod(pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)), visualizer=False,
                training_steps=12, **TINY)
    counter = CountValidations()
    engine = make_engine(tmp_path, max_epochs=max_epochs, callbacks=[counter], check_val_every_n_epoch=check_val)
    engine.fit(model, datamodule=datamodule)
    assert counter.steps == validations_at_step
    assert len(fits) == 1  # the statistics are fitted once, with or without a validation
    assert engine.trainer.check_val_every_n_epoch == check_val
    if validations_at_step:
        assert math.isfinite(float(model.post_processor.image_threshold))


def test_raw_predictions_draw_no_pictures(tmp_path):
    """Raw maps are not in the [0, 1] a visualiser draws (a picture of them wraps the values around into rings and
    overwrites the one drawn from the normalised map): while the outputs are raw the visualiser draws nothing,
    afterwards it draws again."""
    from anomalib.post_processing import PostProcessor
    from anomalib.visualization import ImageVisualizer

    drawn = []

    class Recording(ImageVisualizer):
        def on_predict_batch_end(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            drawn.append(args)

    model = torch.nn.Module()
    model.post_processor, model.visualizer = PostProcessor(), Recording(output_dir=tmp_path)
    with raw_post_processing(model):
        assert not model.post_processor.enable_normalization
        model.visualizer.on_predict_batch_end("trainer", "module", "outputs", "batch", 0)
        # no real batch: drawing would fail
        model.visualizer.on_test_batch_end("trainer", "module", "outputs", "batch", 0)
    assert drawn == []
    assert model.post_processor.enable_normalization
    model.visualizer.on_predict_batch_end("trainer", "module", "outputs", "batch", 0)
    assert len(drawn) == 1
    assert not list(tmp_path.iterdir())
