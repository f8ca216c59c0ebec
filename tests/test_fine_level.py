"""The fine map level: the backbone's finer stage, read from the same pass, mixed into the anomaly map in units of the
training images' maps, carried by state dicts and exported graphs, and leaving the image score's own map alone."""

from __future__ import annotations

import pytest
import torch

from anomalib_fod import Fod
from anomalib_fod.backbone import FeatureExtractor
from anomalib_fod.models.fod.fitting import TrainingImages, fit_residual_statistics
from anomalib_fod.models.fod.settings import FodSettings

from fod_helpers import TINY, assert_exports_reproduce, save_from_before

SIZE = 64


def training_images(count: int = 8) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def fitted(weight: float | None, images: torch.Tensor | None = None, seed: int = 0) -> Fod:
    """A tiny model with references, statistics and (with ``weight``, or ``None``: the model's default) the fine
    level fitted on ``images``."""
    torch.manual_seed(seed)
    model = Fod(image_size=(SIZE, SIZE), visualizer=False, fine_map_weight=weight, nearest_tokens=0,
                aligned_map_weight=0.0, **TINY)
    images = training_images() if images is None else images
    model.model.set_mean_reference([f.mean(0) for f in model.model.extract_features(images)])
    fit_residual_statistics(model.model, TrainingImages(list(images.split(3)), None, torch.device("cpu"), False))
    model.model.eval()
    return model


def map_deviations(model: Fod, images: torch.Tensor) -> torch.Tensor:
    """The standard deviations of the model's unblurred map and of the fine level's map over ``images``' pixels."""
    fod, generator = model.model, model.model.anomaly_map_generator
    levels, stage, _ = fod.extract_map_features(images)
    run = fod.run_levels(levels)
    scores = generator.level_scores(run.tokens, run.levels, run.grids)
    weights = generator.map_level_weights
    model_maps = generator.combine_levels(scores.map, run.grids, (SIZE, SIZE), weights, blur=False)[0]
    fine_maps = generator.fine.distance_map(stage, (SIZE, SIZE), generator.align_corners)
    return torch.stack([model_maps.std(), fine_maps.std()])


def test_the_finer_stage_comes_from_the_same_pass_and_leaves_the_levels_alone() -> None:
    torch.manual_seed(0)
    plain = FeatureExtractor("tf_efficientnet_lite0", pre_trained=False)
    finer = FeatureExtractor("tf_efficientnet_lite0", pre_trained=False, finer_stage=True)
    finer.load_state_dict(plain.state_dict())  # the same modules: a checkpoint of either loads into the other
    images = torch.rand(2, 3, SIZE, SIZE)
    levels, stage = finer.forward_with_finer_stage(images)
    for one, two in zip(plain(images), levels, strict=True):
        torch.testing.assert_close(two, one)
    assert (finer.channels, finer.strides) == (plain.channels, plain.strides) == ([40, 112], [8, 16])
    assert finer.map_layer == "blocks.1"
    assert stage.shape == (2, finer.map_channels, SIZE // 4, SIZE // 4)
    with pytest.raises(RuntimeError, match="without finer_stage"):
        plain.forward_with_finer_stage(images)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"fine_map_weight": 1.0}, r"in \[0, 1\)"),
        ({"fine_map_weight": -0.1}, r"in \[0, 1\)"),
        ({"fine_map_weight": 0.25, "reconstruction_term": "mse_cos"}, "reconstruction_term='mahalanobis'"),
    ],
)
def test_bad_fine_map_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FodSettings(**settings)


def test_left_to_the_model_it_takes_a_quarter_where_the_scoring_and_the_backbone_allow() -> None:
    from anomalib_fod.models.fod.settings import DEFAULT_FINE_MAP_WEIGHT

    def weight(**settings) -> tuple[float, bool]:  # noqa: ANN003
        fod = Fod(image_size=(SIZE, SIZE), visualizer=False, pre_trained=False, nearest_tokens=0, **TINY, **settings)
        return fod.model.settings.fine_map_weight, fod.model.anomaly_map_generator.fine is not None

    assert weight() == (DEFAULT_FINE_MAP_WEIGHT, True)
    assert FodSettings().fine_map_weight is None  # the settings leave it to the model; the model makes it concrete
    # the paper's scoring fits no residual statistics: the level stays out instead of refusing the settings
    assert weight(scoring="rec_div", reconstruction_term="mse_cos") == (0.0, False)
    assert weight(scoring="div") == (0.0, False)
    # a finest level at Lite0's stride 2 leaves no stage at half its stride: out, unless asked for
    assert weight(layers=("blocks.0", "blocks.2")) == (0.0, False)
    with pytest.raises(ValueError, match="no stage with stride 1"):
        weight(layers=("blocks.0", "blocks.2"), fine_map_weight=0.25)
    assert weight(fine_map_weight=0.0) == (0.0, False)


def test_a_checkpoint_from_before_the_default_keeps_its_map(tmp_path) -> None:  # noqa: ANN001
    """Saved when the level was off unless asked for (no ``fine_map_weight`` among its hyper-parameters): it loads
    and predicts without the level, as it was fitted, instead of failing on an unfitted one."""
    plain = fitted(0.0)
    path = save_from_before(plain, tmp_path / "older.ckpt", "fine_map_weight", "fine")
    older = Fod.load_from_checkpoint(path, weights_only=False)
    older.eval()
    assert older.model.anomaly_map_generator.fine is None
    assert older.model.settings.fine_map_weight == 0.0
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(older.model(test).anomaly_map, plain.model(test).anomaly_map)
    # asked for at load, the level is built (its fit comes next, as for any checkpoint without it)
    asked = Fod.load_from_checkpoint(path, weights_only=False, fine_map_weight=0.25)
    assert asked.model.anomaly_map_generator.fine is not None
    assert not asked.model.anomaly_map_generator.fine.fitted


def test_a_fitted_level_can_be_reweighted_or_left_out_but_not_added() -> None:
    model, plain = fitted(0.25), fitted(0.0)
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        at_quarter, without = model.model(test).anomaly_map, plain.model(test).anomaly_map
        model.set_scoring(fine_map_weight=0.5)  # its units do not depend on its share: no refit
        at_half = model.model(test).anomaly_map
        # the part it adds is three times the quarter's: (0.5 / 0.5) / (0.25 / 0.75)
        torch.testing.assert_close(at_half - without, 3 * (at_quarter - without), rtol=1e-4, atol=1e-5)
        model.set_scoring(fine_map_weight=0.0)
        torch.testing.assert_close(model.model(test).anomaly_map, without)
    assert model.hparams["fine_map_weight"] == 0.0
    with pytest.raises(ValueError, match="cannot take one after the fact"):
        plain.set_scoring(fine_map_weight=0.25)


def test_the_map_adds_the_fine_level_in_units_of_the_training_maps_and_the_image_score_stays() -> None:
    model, plain = fitted(0.25), fitted(0.0)
    fod, generator = model.model, model.model.anomaly_map_generator
    fine = generator.fine
    # the same Transformers and statistics: only the fine level differs
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                  [v for k, v in fod.state_dict().items() if ".fine." not in k],
                                                  strict=True))
    # its units are the standard deviations of both unblurred maps over the training images' pixels
    torch.testing.assert_close(fine.units, map_deviations(model, training_images()), rtol=1e-4, atol=0)
    # a test image's map: the model's map plus the fine one at (w / (1 - w)) s_M / s_F, then the blur
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        output, without = fod(test), plain.model(test)
        _, test_stage, _ = fod.extract_map_features(test)
        scale = 0.25 / 0.75 * fine.units[0] / fine.units[1]
        unblurred = plain.model.anomaly_map_generator.blur
        plain.model.anomaly_map_generator.blur = None
        expected = unblurred(plain.model(test).anomaly_map + scale * fine.distance_map(test_stage, (SIZE, SIZE), False))
    torch.testing.assert_close(output.anomaly_map, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(output.anomaly_map, without.anomaly_map, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(output.pred_score, without.pred_score)  # the image score reads its own map


def test_its_units_are_measured_on_evenly_spread_batches(monkeypatch) -> None:  # noqa: ANN001
    from anomalib_fod.models.fod import fitting

    monkeypatch.setattr(fitting, "UNIT_BATCHES", 2)  # 8 images in batches of 3: the first and the third batch
    model = fitted(0.25)
    expected = map_deviations(model, training_images()[[0, 1, 2, 6, 7]])
    torch.testing.assert_close(model.model.anomaly_map_generator.fine.units, expected, rtol=1e-4, atol=0)


def test_it_survives_a_state_dict_and_an_older_one_loads_unfitted() -> None:
    model = fitted(0.25)
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    fresh = Fod(
        image_size=(SIZE, SIZE), visualizer=False, fine_map_weight=0.25, nearest_tokens=0, aligned_map_weight=0.0,
        **TINY,
    )
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(test).anomaly_map, model.model(test).anomaly_map)
    switched_off = Fod(
        image_size=(SIZE, SIZE), visualizer=False, fine_map_weight=0.0, nearest_tokens=0, aligned_map_weight=0.0,
        **TINY,
    )
    switched_off.load_state_dict(model.state_dict())  # its fine level is left behind
    switched_off.eval()
    with torch.no_grad():
        torch.testing.assert_close(switched_off.model(test).anomaly_map, fitted(0.0).model(test).anomaly_map)
    older = {k: v for k, v in model.state_dict().items() if ".fine." not in k}
    unfitted = Fod(
        image_size=(SIZE, SIZE), visualizer=False, fine_map_weight=0.25, nearest_tokens=0, aligned_map_weight=0.0,
        **TINY,
    )
    unfitted.load_state_dict(older)
    unfitted.eval()
    assert not unfitted.model.anomaly_map_generator.fine.fitted
    with pytest.raises(RuntimeError, match="fit_residual_statistics"):
        unfitted.model(test)


def test_its_fit_reads_the_training_images_alone() -> None:
    """Fitted twice on the same training images, once after other images went through the model: the same."""
    first = fitted(0.25)
    with torch.no_grad():
        first.model(torch.rand(4, 3, SIZE, SIZE))
    second = fitted(0.25)
    for one, two in zip(first.model.anomaly_map_generator.fine.state_dict().values(),
                        second.model.anomaly_map_generator.fine.state_dict().values(), strict=True):
        torch.testing.assert_close(two, one)
    other = fitted(0.25, images=training_images(8).flip(-1))
    units = [model.model.anomaly_map_generator.fine.units for model in (other, first)]
    assert not torch.allclose(*units)


def test_its_gaussian_summed_in_the_statistics_pass_equals_a_pass_of_its_own() -> None:
    from anomalib_fod.models.fod.residual_statistics import ResidualAccumulator

    model = fitted(0.25)
    fod = model.model
    own = ResidualAccumulator(per_position=True)
    for batch in training_images().split(3):
        for gain in fod.settings.intensity_gains:
            _, stage = fod.feature_extractor.forward_with_finer_stage((batch * gain).clamp(0, 1))
            own.add(stage.flatten(2).transpose(1, 2))
    mean, precision, position_precision = own.finish()
    statistics = fod.anomaly_map_generator.fine.statistics
    for name, expected in (("mean", mean), ("precision", precision), ("position_precision", position_precision)):
        torch.testing.assert_close(getattr(statistics, name), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_the_exported_graph_carries_the_fine_level(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("onnxscript")
    model = fitted(0.25)
    path = model.to_onnx(tmp_path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    assert_exports_reproduce(model, path, images, {"rtol": 1e-4, "atol": 1e-4}, 1e-4)


@pytest.mark.slow
def test_a_fit_with_the_fine_level_reloads_from_its_checkpoint(dummy_dataset, tmp_path, caplog) -> None:  # noqa: ANN001
    """The default's level, fitted through ``Engine``, says so once on the console and comes back with the checkpoint
    (``fit_and_reload`` checks that the reloaded model predicts the same maps)."""
    import logging

    from fod_helpers import fit_and_reload

    with caplog.at_level(logging.INFO):
        model, reloaded = fit_and_reload(dummy_dataset, tmp_path, SIZE)
    assert model.model.anomaly_map_generator.fine.fitted
    assert reloaded.model.settings.fine_map_weight == 0.25
    said = [r.getMessage() for r in caplog.records if "map-only level at half" in r.getMessage()]
    assert len(said) == 1 and "share of 0.25 to the backbone's blocks.1" in said[0]


def test_its_covariances_count_in_the_per_position_budget_before_training(monkeypatch) -> None:  # noqa: ANN001
    from anomalib_fod.models.fod import callbacks
    from anomalib_fod.models.fod.residual_statistics import per_position_bytes

    from fod_helpers import assert_budget_is_the_boundary

    model, plain = fitted(0.25), fitted(0.0)
    grids = [tuple(int(v) for v in level.ref_grid) for level in model.model.levels]
    levels = per_position_bytes(grids, model.model.feature_extractor.channels)
    fine = per_position_bytes([(2 * grids[0][0], 2 * grids[0][1])], [model.model.feature_extractor.map_channels])
    callback = callbacks.ResidualStatisticsCallback()
    assert_budget_is_the_boundary(
        monkeypatch, "PER_POSITION_BUDGET_BYTES", levels + fine, lambda: callback.on_train_start(None, model),
        "fine_map_weight=0",
    )
    callback.on_train_start(None, plain)  # without the fine level the levels' share alone fits
    # left to the model, the level steps aside instead: the levels alone still fit, as they would without it
    default = fitted(None)
    assert default.model.anomaly_map_generator.fine is not None
    with pytest.warns(UserWarning, match="made without it"):
        callback.on_train_start(None, default)
    assert default.model.anomaly_map_generator.fine is None
    assert default.hparams["fine_map_weight"] == 0.0  # saved so: the checkpoint reloads without it


def test_explain_shows_the_fine_level_s_part_of_the_map(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    from anomalib_fod.explain import explain_image, figure_size, render_explanation

    path = tmp_path / "image.png"
    pixels = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(7))
    Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(path)
    model, plain = fitted(0.25), fitted(0.0)
    with_level, without = explain_image(model, path), explain_image(plain, path)
    assert without.fine_map is None
    assert with_level.fine_map.shape == (SIZE, SIZE)
    # the blur is linear: the two maps differ by the blurred part the explanation shows
    blur = model.model.anomaly_map_generator.blur
    shown = blur(torch.from_numpy(with_level.fine_map)[None, None])[0, 0].numpy()
    torch.testing.assert_close(torch.from_numpy(with_level.anomaly_map - without.anomaly_map),
                               torch.from_numpy(shown), rtol=1e-4, atol=1e-4)
    written = render_explanation(with_level, tmp_path / "fine.png")
    with Image.open(written) as png:
        assert png.size == figure_size(with_level)
    assert figure_size(with_level)[1] > figure_size(without)[1]  # a third row of panels
