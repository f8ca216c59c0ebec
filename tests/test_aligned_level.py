"""The aligned map level: the finest stage unpooled, a Gaussian per position, taking part where the training images'
grid position tells a token's look (decided on them, stored with the model), mixed into the anomaly map in units of
the training images' maps, carried by state dicts and exported graphs, and leaving the image score alone."""

from __future__ import annotations

import pytest
import torch

from anomalib_fod import Fod
from anomalib_fod.models.fod.aligned_level import position_share_of
from anomalib_fod.models.fod.context import fit_whitening
from anomalib_fod.models.fod.fitting import TrainingImages, fit_residual_statistics
from anomalib_fod.models.fod.nearest import position_share
from anomalib_fod.models.fod.residual_statistics import ResidualAccumulator

from fod_helpers import TINY, assert_exports_reproduce, save_from_before

SIZE = 64


def aligned_images(count: int = 8) -> torch.Tensor:
    """One scene, every image with a little noise: position tells what a token looks like."""
    generator = torch.Generator().manual_seed(1)
    scene = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    return (scene + 0.05 * torch.randn(count, 3, SIZE, SIZE, generator=generator)).clamp(0, 1)


def unaligned_images(count: int = 8) -> torch.Tensor:
    """Independent noise images: every position sees the same looks."""
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def fitted(images: torch.Tensor, aligned: float | None = None, fine: float = 0.0, seed: int = 0) -> Fod:
    """A tiny model with references and statistics fitted on ``images`` (``aligned``: ``aligned_map_weight``)."""
    torch.manual_seed(seed)
    model = Fod(
        image_size=(SIZE, SIZE), visualizer=False, nearest_tokens=0, fine_map_weight=fine, aligned_map_weight=aligned,
        **TINY,
    )
    model.model.set_mean_reference([f.mean(0) for f in model.model.extract_features(images)])
    fit_residual_statistics(model.model, TrainingImages(list(images.split(3)), None, torch.device("cpu"), False))
    model.model.eval()
    return model


def test_the_share_from_summed_tokens_is_the_share_of_the_tokens() -> None:
    generator = torch.Generator().manual_seed(0)
    for spread in (0.0, 0.5, 2.0):  # from no position effect to a strong one
        tokens = spread * torch.randn(1, 16, 6, generator=generator) + torch.randn(20, 16, 6, generator=generator)
        sums = ResidualAccumulator(per_position=True)
        sums.add(tokens)
        expected = position_share(tokens, *fit_whitening(tokens.flatten(0, 1)))
        assert position_share_of(sums.sum, sums.outer, sums.count) == pytest.approx(expected, abs=1e-5)


def test_left_to_the_model_it_takes_part_on_aligned_images_only() -> None:
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    on_aligned = fitted(aligned_images())
    level = on_aligned.model.anomaly_map_generator.aligned
    assert float(level.position_share) >= 0.5
    assert not level.declined
    assert level.statistics.position_precision.shape[0] == (SIZE // 8) ** 2  # one covariance per unpooled position
    with torch.no_grad():
        assert not torch.allclose(
            on_aligned.model(test).anomaly_map, fitted(aligned_images(), aligned=0.0).model(test).anomaly_map
        )
    on_noise = fitted(unaligned_images())
    level = on_noise.model.anomaly_map_generator.aligned
    assert float(level.position_share) < 0.5
    assert level.declined
    with torch.no_grad():  # declined, it scores exactly as a model built without it
        torch.testing.assert_close(
            on_noise.model(test).anomaly_map, fitted(unaligned_images(), aligned=0.0).model(test).anomaly_map
        )
    # asked for, it takes part whatever the images
    assert not fitted(unaligned_images(), aligned=0.5).model.anomaly_map_generator.aligned.declined


def map_parts(model: Fod, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's unblurred map (without the map-only levels) and the aligned level's map of ``images``."""
    fod, generator = model.model, model.model.anomaly_map_generator
    features = fod.extract_map_features(images)
    run = fod.run_levels(features.levels)
    scores = generator.level_scores(run.tokens, run.levels, run.grids)
    model_map = generator.combine_levels(scores.map, run.grids, (SIZE, SIZE), generator.map_level_weights, blur=False)
    return model_map[0], generator.aligned.distance_map(features.finest, (SIZE, SIZE), generator.align_corners)


def test_the_map_adds_it_in_units_of_the_training_maps_and_the_image_score_stays() -> None:
    model = fitted(aligned_images())
    level = model.model.anomaly_map_generator.aligned
    with torch.no_grad():
        model_map, aligned_map = map_parts(model, aligned_images())
        torch.testing.assert_close(level.units, torch.stack([model_map.std(), aligned_map.std()]), rtol=1e-4, atol=0)
        test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
        output = model.model(test)
        model_map, aligned_map = map_parts(model, test)
        scale = 0.5 / 0.5 * level.units[0] / level.units[1]  # the default: half the map
        expected = model.model.anomaly_map_generator.blur(model_map + scale * aligned_map)
        torch.testing.assert_close(output.anomaly_map, expected, rtol=1e-5, atol=1e-5)
        without = fitted(aligned_images(), aligned=0.0).model(test)
    torch.testing.assert_close(output.pred_score, without.pred_score)  # the image score reads its own map


def test_the_fine_level_is_measured_against_the_map_with_the_aligned_level_in_it() -> None:
    model = fitted(aligned_images(), fine=0.25)
    generator = model.model.anomaly_map_generator
    aligned, fine = generator.aligned, generator.fine
    with torch.no_grad():
        model_map, aligned_map = map_parts(model, aligned_images())
        stage = model.model.extract_map_features(aligned_images()).finer
        fine_map = fine.distance_map(stage, (SIZE, SIZE), generator.align_corners)
    combined = model_map + aligned.units[0] / aligned.units[1] * aligned_map
    torch.testing.assert_close(fine.units, torch.stack([combined.std(), fine_map.std()]), rtol=1e-4, atol=0)


def test_the_choice_survives_a_state_dict_and_a_refit_measures_again() -> None:
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    for images in (aligned_images(), unaligned_images()):
        model = fitted(images)
        fresh = Fod(image_size=(SIZE, SIZE), visualizer=False, nearest_tokens=0, fine_map_weight=0.0, **TINY)
        fresh.load_state_dict(model.state_dict())
        fresh.eval()
        loaded, original = fresh.model.anomaly_map_generator.aligned, model.model.anomaly_map_generator.aligned
        assert loaded.declined == original.declined
        torch.testing.assert_close(loaded.position_share, original.position_share)
        with torch.no_grad():
            torch.testing.assert_close(fresh.model(test).anomaly_map, model.model(test).anomaly_map)
    # fitted again on aligned images, the declined level is measured anew and takes part
    declined = fitted(unaligned_images())
    fit_residual_statistics(declined.model, TrainingImages(list(aligned_images().split(3)), None, torch.device("cpu"),
                                                            False))
    assert not declined.model.anomaly_map_generator.aligned.declined


def test_a_checkpoint_from_before_the_level_keeps_its_map(tmp_path) -> None:  # noqa: ANN001
    plain = fitted(aligned_images(), aligned=0.0)
    path = save_from_before(plain, tmp_path / "older.ckpt", "aligned_map_weight", "aligned")
    older = Fod.load_from_checkpoint(path, weights_only=False)
    older.eval()
    assert older.model.anomaly_map_generator.aligned is None
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(older.model(test).anomaly_map, plain.model(test).anomaly_map)
    # left to the model at load, the level is built unmeasured: the next fit decides
    asked = Fod.load_from_checkpoint(path, weights_only=False, aligned_map_weight=None)
    level = asked.model.anomaly_map_generator.aligned
    assert level is not None
    assert not level.declined
    assert not level.fitted


def test_a_fitted_level_can_be_reweighted_or_left_out_but_not_added() -> None:
    model, plain = fitted(aligned_images(), aligned=0.25), fitted(aligned_images(), aligned=0.0)
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        at_quarter, without = model.model(test).anomaly_map, plain.model(test).anomaly_map
        model.set_scoring(aligned_map_weight=0.5)  # its units do not depend on its share: no refit
        torch.testing.assert_close(model.model(test).anomaly_map - without, 3 * (at_quarter - without),
                                   rtol=1e-4, atol=1e-5)
        model.set_scoring(aligned_map_weight=0.0)
        torch.testing.assert_close(model.model(test).anomaly_map, without)
    with pytest.raises(ValueError, match="cannot take one after the fact"):
        plain.set_scoring(aligned_map_weight=0.5)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"aligned_map_weight": 1.0}, "in \\[0, 1\\)"),
        ({"aligned_map_weight": -0.1}, "in \\[0, 1\\)"),
        ({"aligned_map_weight": 0.5, "reconstruction_term": "mse_cos"}, "residual statistics"),
    ],
)
def test_bad_aligned_map_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Fod(visualizer=False, pre_trained=False, **TINY, **settings)


def test_its_covariances_count_in_the_per_position_budget_before_training(monkeypatch) -> None:  # noqa: ANN001
    from anomalib_fod.models.fod import callbacks
    from anomalib_fod.models.fod.residual_statistics import per_position_bytes

    from fod_helpers import assert_budget_is_the_boundary

    model = fitted(aligned_images(), aligned=0.5)
    grids = [tuple(int(v) for v in level.ref_grid) for level in model.model.levels]
    channels = model.model.feature_extractor.channels
    levels = per_position_bytes(grids, channels)
    aligned = per_position_bytes(grids[:1], channels[:1])
    callback = callbacks.ResidualStatisticsCallback()
    assert_budget_is_the_boundary(
        monkeypatch, "PER_POSITION_BUDGET_BYTES", levels + aligned, lambda: callback.on_train_start(None, model),
        "aligned_map_weight=0",
    )
    # left to the model, the level steps aside instead
    default = fitted(aligned_images())
    with pytest.warns(UserWarning, match="made without it"):
        callback.on_train_start(None, default)
    assert default.model.anomaly_map_generator.aligned is None
    assert default.hparams["aligned_map_weight"] == 0.0


def test_the_exported_graph_carries_the_aligned_level(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("onnxscript")
    model = fitted(aligned_images(), fine=0.25)
    assert model.model.anomaly_map_generator.aligned_active
    path = model.to_onnx(tmp_path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    assert_exports_reproduce(model, path, images, {"rtol": 1e-4, "atol": 1e-4}, 1e-4)


def test_explain_shows_the_aligned_level_s_part_of_the_map(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    from anomalib_fod.explain import explain_image

    path = tmp_path / "image.png"
    Image.fromarray((aligned_images(1)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(path)
    model, plain = fitted(aligned_images()), fitted(aligned_images(), aligned=0.0)
    with_level, without = explain_image(model, path), explain_image(plain, path)
    assert without.aligned_map is None
    blur = model.model.anomaly_map_generator.blur
    shown = blur(torch.from_numpy(with_level.aligned_map)[None, None])[0, 0].numpy()
    torch.testing.assert_close(torch.from_numpy(with_level.anomaly_map - without.anomaly_map),
                               torch.from_numpy(shown), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_fit_says_what_it_chose_and_the_checkpoint_keeps_it(dummy_dataset, tmp_path, caplog) -> None:  # noqa: ANN001
    """Fitted through ``Engine`` with the default, the choice is said once on the console, with the share that made
    it, and comes back with the checkpoint (``fit_and_reload`` checks that the reloaded model predicts the same)."""
    import logging

    from fod_helpers import fit_and_reload

    with caplog.at_level(logging.INFO):
        model, reloaded = fit_and_reload(dummy_dataset, tmp_path, SIZE)
    fitted_level = model.model.anomaly_map_generator.aligned
    reloaded_level = reloaded.model.anomaly_map_generator.aligned
    assert fitted_level.position_share.numel() == 1
    torch.testing.assert_close(reloaded_level.position_share, fitted_level.position_share)
    assert reloaded_level.declined == fitted_level.declined
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FOD aligned map level")]
    assert len(said) == 1
    assert f"{float(fitted_level.position_share):.3f}" in said[0]
    assert ("left out" in said[0]) == fitted_level.declined


def test_one_training_image_leaves_the_default_out_and_an_explicit_share_in() -> None:
    image = aligned_images(1)
    for aligned, declined in ((None, True), (0.5, False)):
        torch.manual_seed(0)
        model = Fod(image_size=(SIZE, SIZE), visualizer=False, nearest_tokens=0, fine_map_weight=0.0,
                    aligned_map_weight=aligned, **TINY)
        model.model.set_mean_reference([f.mean(0) for f in model.model.extract_features(image)])
        fit_residual_statistics(model.model, TrainingImages([image], None, torch.device("cpu"), False))
        level = model.model.anomaly_map_generator.aligned
        assert level.declined == declined
        assert torch.isnan(level.position_share).all()
        if declined:
            assert "one training image" in level.describe()
        model.model.eval()
        with torch.no_grad():
            assert torch.isfinite(model.model(image).anomaly_map).all()
