"""The nearest-token score: the exact nearest distance, z-units from images the bank never saw, and a model that
carries it through checkpoints and exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_fod import Fod
from anomalib_fod.models.fod import nearest as nearest_module
from anomalib_fod.models.fod.context import fit_whitening
from anomalib_fod.models.fod.fitting import KeptLevels, fit_statistics, iterate_pooled_features
from anomalib_fod.models.fod.nearest import (
    MAP,
    NEAREST,
    NearestLevel,
    batch_layout,
    describe_choice,
    fit_nearest,
    held_out_units,
    nearest_distance,
    position_share,
)
from anomalib_fod.models.fod.residual_statistics import ResidualAccumulator, ResidualStatistics

from fod_helpers import TINY, WITHOUT_MAP_LEVELS, assert_exports_reproduce, explain_random_image

SIZE = 64
GAINS = (0.9, 1.0, 1.1)


def test_the_distance_is_the_exact_nearest_one_across_bank_slices(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(nearest_module, "BANK_SLICE", 7)  # several slices, the last one short
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 5, generator=generator)
    tokens = torch.randn(2, 11, 5, generator=generator) * 2
    tokens[0, 3] = bank[17]  # a token that is in the bank, in the third slice
    got = nearest_distance(tokens, bank, bank.square().sum(-1))
    expected = torch.cdist(tokens.flatten(0, 1), bank).amin(dim=1).reshape(2, 11)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    assert got[0, 3] < 1e-2


def test_the_rows_of_kept_batches_map_to_their_images_and_gains() -> None:
    images, plain = batch_layout([6, 3], GAINS)  # batches of 2 and 1 images, each seen at three gains
    assert images.tolist() == [0, 1, 0, 1, 0, 1, 2, 2, 2]
    assert plain.tolist() == [False, False, True, True, False, False, False, True, False]
    images, plain = batch_layout([4], (0.8, 1.2))  # no gain of 1: every row stands for its image
    assert images.tolist() == [0, 1, 0, 1] and plain.all()
    with pytest.raises(ValueError, match="does not hold 3 gains"):
        batch_layout([4], GAINS)


def test_the_z_units_come_from_images_the_bank_and_the_gaussian_never_saw() -> None:
    """Every image is its own cluster of tokens: scored in-sample, a bank holding every token puts each at distance
    0 from itself; scored held out, each token is as far from the bank as its image is from the others."""
    generator = torch.Generator().manual_seed(0)
    count, positions, channels = 10, 4, 3
    centres = torch.randn(count, 1, channels, generator=generator) * 10
    tokens = centres + 0.01 * torch.randn(count, positions, channels, generator=generator)
    residuals = torch.randn(count, positions, channels, generator=generator)
    statistics = ResidualStatistics("blend")
    statistics.set(torch.zeros(positions, channels), torch.eye(channels), torch.eye(channels).repeat(positions, 1, 1))
    images = torch.arange(count)
    units, position_units = held_out_units(statistics, tokens, residuals, images, torch.ones(count, dtype=torch.bool),
                           10_000, generator, torch.device("cpu"))
    # in-sample a bank holding every token would put each at 0 from itself (noise 0.01 against clusters ~10 apart)
    assert units[NEAREST] > 0.05
    # held out, the residuals lie further from a Gaussian than from one fitted on them
    accumulator = ResidualAccumulator(per_position=True)
    accumulator.add(residuals)
    statistics.set(*accumulator.finish())
    assert units[MAP] > 1.2 * float(statistics(residuals).mean()) and position_units is not None


def tiny_fod(nearest_tokens: int = 300, **settings) -> Fod:  # noqa: ANN003
    """A tiny untrained model (random backbone, ``SIZE`` px) with a nearest-token bank of ``nearest_tokens``."""
    settings = {**WITHOUT_MAP_LEVELS, **settings}
    return Fod(pre_trained=False, image_size=SIZE, visualizer=False, nearest_tokens=nearest_tokens, **TINY, **settings)


def fitted_model(
    seed: int = 0, nearest_tokens: int = 300, images: torch.Tensor | None = None, **settings,  # noqa: ANN003
) -> tuple[Fod, torch.Tensor]:
    """A tiny model with its statistics and (with ``nearest_tokens``) its nearest-token score fitted on ``images``
    (default: 8 random ones, whose tokens no position tells apart)."""
    torch.manual_seed(seed)
    model = tiny_fod(nearest_tokens, **settings)
    if images is None:
        images = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    gains = model.model.settings.intensity_gains
    batches = list(images.split(3))
    features = list(iterate_pooled_features(model.model, batches, None, torch.device("cpu"), False, gains=gains))
    model.model.set_mean_reference([f.mean(0) for f in features[0]])
    kept = KeptLevels([], [], [])
    fit_statistics(model.model, features, keep=kept)
    generator = model.model.anomaly_map_generator
    if nearest_tokens:
        fit_nearest(generator.nearest, generator.statistics, kept.tokens, kept.residuals, gains, nearest_tokens,
                    torch.device("cpu"), model.model.settings.nearest_position_limit)
    model.model.eval()
    return model, images


def aligned_images(count: int = 8) -> torch.Tensor:
    """``count`` copies of one structured image with a little noise: a part whose look each position tells."""
    generator = torch.Generator().manual_seed(2)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=SIZE, mode="bilinear")
    return (base + 0.02 * torch.randn(count, 3, SIZE, SIZE, generator=generator)).clamp(0, 1)


def test_checkpoints_from_before_the_share_or_the_score_load(tmp_path) -> None:  # noqa: ANN001
    """A state dict without the position share keeps its fitted score; one without any of the score's buffers (a
    model saved before the score existed) loads with the score left out, scoring as it did."""
    model, images = fitted_model()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_share")}
    reloaded = tiny_fod()
    reloaded.load_state_dict(state)
    assert reloaded.model.anomaly_map_generator.nearest_active
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(images).pred_score, model(images).pred_score)
    plain, _ = fitted_model(nearest_tokens=0)
    older = tiny_fod()
    older.load_state_dict(plain.state_dict())
    assert all(level.unmeasured for level in older.model.anomaly_map_generator.nearest)
    with torch.no_grad():
        torch.testing.assert_close(older.eval()(images).pred_score, plain(images).pred_score)


def test_the_position_share_tells_an_aligned_part_from_a_texture() -> None:
    generator = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 50, 6, generator=generator)  # what each of 50 positions looks like
    noise = torch.randn(400, 50, 6, generator=generator)  # 400 images

    def share(tokens: torch.Tensor) -> float:
        return position_share(tokens, *fit_whitening(tokens.flatten(0, 1)))

    assert share(pattern + 0.1 * noise) > 0.95  # told by position
    assert share(noise) < 0.02  # every position sees the same looks
    assert 0.4 < share(pattern + noise) < 0.6  # as much from position as from the rest
    with pytest.raises(ValueError, match="at least 2 training images"):
        share(noise[:1])


def test_a_part_told_by_position_declines_the_score_and_scores_as_without_it(tmp_path) -> None:  # noqa: ANN001
    images = aligned_images()
    model, _ = fitted_model(images=images)  # nearest_position_limit 0.5 by default
    plain, _ = fitted_model(nearest_tokens=0, images=images)
    generator = model.model.anomaly_map_generator
    assert all(level.declined for level in generator.nearest) and not generator.nearest_active
    assert float(generator.nearest[0].position_share) > 0.5
    assert all(level.bank.numel() == 0 for level in generator.nearest)  # no bank is kept for nothing
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        declined, without = model(test), plain(test)
    torch.testing.assert_close(declined.pred_score, without.pred_score)
    torch.testing.assert_close(declined.anomaly_map, without.anomaly_map)
    # the decision travels with the state dict
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    reloaded = tiny_fod()
    reloaded.load_state_dict(torch.load(path))
    assert all(level.declined for level in reloaded.model.anomaly_map_generator.nearest)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(test).pred_score, declined.pred_score)
    # the same images with the limit at 1 use it; random images (a share near 0) use it at the default limit
    always, _ = fitted_model(images=images, nearest_position_limit=1.0)
    assert always.model.anomaly_map_generator.nearest_active
    texture, _ = fitted_model()
    assert texture.model.anomaly_map_generator.nearest_active
    assert float(texture.model.anomaly_map_generator.nearest[0].position_share) < 0.5
    # what the run says it chose, and why
    share = float(generator.nearest[0].position_share)
    assert describe_choice(generator.nearest, 0.5).startswith("FOD nearest-token score: left out")
    assert f"{share:.3f}" in describe_choice(generator.nearest, 0.5)
    assert describe_choice(texture.model.anomaly_map_generator.nearest, 0.5).startswith("FOD nearest-token score: used")


def test_a_declined_score_exports_as_the_model_without_it(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("onnxscript")
    model, images = fitted_model(images=aligned_images())
    plain, _ = fitted_model(nearest_tokens=0, images=images)
    assert not model.model.anomaly_map_generator.nearest_active
    path = model.to_onnx(tmp_path)
    test = torch.rand(2, 3, 80, 90, generator=torch.Generator().manual_seed(3))
    assert_exports_reproduce(plain, path, test, {"rtol": 1e-4, "atol": 1e-4}, 1e-4)  # the graph of the model without it


def test_the_score_reads_the_bank_and_survives_a_state_dict(tmp_path) -> None:  # noqa: ANN001
    model, images = fitted_model()
    level = model.model.anomaly_map_generator.nearest[0]
    assert level.fitted and level.has_position_units and level.bank.shape == (300, 40)
    with torch.no_grad():
        before = model(images)
        assert torch.isfinite(before.pred_score).all() and torch.isfinite(before.anomaly_map).all()
        level.bank.mul_(2.0)  # another bank gives other scores: the score reads it
        level.bank_squares.mul_(4.0)
        assert not torch.allclose(model(images).pred_score, before.pred_score)
        level.bank.div_(2.0)
        level.bank_squares.div_(4.0)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    reloaded = tiny_fod()
    reloaded.load_state_dict(torch.load(path))
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(images)
    torch.testing.assert_close(after.pred_score, before.pred_score)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map)


def test_a_bank_of_every_training_token_finds_a_training_image_and_not_a_changed_one() -> None:
    """With a bank larger than the training set, a training image (gain 1) is at distance 0 everywhere; the same
    image with a patch no training image holds is not."""
    model, images = fitted_model(nearest_tokens=10**6)
    level = model.model.anomaly_map_generator.nearest[0]
    assert level.bank.shape[0] == 8 * len(GAINS) * (SIZE // 8) ** 2  # every token of every image and gain
    changed = images[:1].clone()
    changed[..., 16:32, 16:32] = torch.linspace(0, 1, 16)[:, None]
    with torch.no_grad():
        tokens = model.model.run_levels(model.model.extract_features(torch.cat([images[:1], changed]))).tokens[0]
        distance = level.distance(tokens)
    assert distance[0].amax() < 1e-2 < distance[1].amax()


def test_the_explanation_shows_the_nearest_score_the_model_uses(tmp_path) -> None:  # noqa: ANN001
    import numpy as np

    from anomalib_fod.explain import render_explanation

    model, _ = fitted_model()
    explanation = explain_random_image(model, tmp_path, SIZE)
    for parts, level in zip(explanation.components, model.model.anomaly_map_generator.nearest, strict=True):
        assert set(parts) == {"rec", "nearest", "score"}
        rec_z = (parts["rec"] - float(level.units[MAP])) / float(level.units[MAP + 1])
        np.testing.assert_allclose(parts["score"], rec_z + parts["nearest"], rtol=1e-4, atol=1e-4)
    assert render_explanation(explanation, tmp_path / "figure.png").is_file()


def test_an_unfitted_score_says_what_to_do() -> None:
    level = NearestLevel()
    with pytest.raises(RuntimeError, match="nearest-token score is not fitted"):
        level.distance(torch.zeros(1, 4, 3))


def test_fitting_it_needs_two_training_images() -> None:
    model = tiny_fod(10)
    features = list(iterate_pooled_features(model.model, [torch.rand(1, 3, SIZE, SIZE)], None, torch.device("cpu"),
                                            False, gains=GAINS))
    model.model.set_mean_reference([f.mean(0) for f in features[0]])
    kept = KeptLevels([], [], [])
    fit_statistics(model.model, features, keep=kept)
    generator = model.model.anomaly_map_generator
    with pytest.raises(ValueError, match="at least 2 training images"):
        fit_nearest(generator.nearest, generator.statistics, kept.tokens, kept.residuals, GAINS, 10,
                    torch.device("cpu"))


def test_where_it_cannot_be_measured_the_score_is_left_out_with_a_warning(caplog) -> None:  # noqa: ANN001
    """One training image or a DDP fit: the self-choosing score is left out (and says so), the model scores as without
    it; one that must be used (limit 1) refuses instead."""
    from anomalib_fod.models.fod.fitting import TrainingImages, fit_residual_statistics

    one = aligned_images(1)
    with caplog.at_level("WARNING"):
        model, _ = fitted_model(images=one)
    plain, _ = fitted_model(nearest_tokens=0, images=one)
    generator = model.model.anomaly_map_generator
    assert all(level.unmeasured for level in generator.nearest) and generator.keeps_training_tokens is None
    assert "one training image" in caplog.text and "could not be measured" in describe_choice(generator.nearest, 0.5)
    test = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(test).pred_score, plain(test).pred_score)

    def unfitted(limit: float, batches: list[torch.Tensor]) -> Fod:
        fresh = tiny_fod(nearest_position_limit=limit)
        features = next(iter(iterate_pooled_features(fresh.model, batches, None, torch.device("cpu"), False)))
        fresh.model.set_mean_reference([f.mean(0) for f in features])
        return fresh

    def ddp_fit(limit: float) -> Fod:
        batches = [torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))]
        fresh = unfitted(limit, batches)
        images = TrainingImages(batches, None, torch.device("cpu"), progress=False, reduce=lambda tensor: tensor)
        fit_residual_statistics(fresh.model, images)
        return fresh

    caplog.clear()
    with caplog.at_level("WARNING"):
        fitted = ddp_fit(0.5)
    assert all(level.unmeasured for level in fitted.model.anomaly_map_generator.nearest) and "DDP" in caplog.text
    assert all(statistics.fitted for statistics in fitted.model.anomaly_map_generator.statistics)
    with pytest.raises(NotImplementedError, match="without DDP"):
        ddp_fit(1.0)


def test_over_the_memory_budget_the_fit_keeps_a_random_share_of_the_images(monkeypatch, caplog) -> None:  # noqa: ANN001
    """Where keeping every training token would not fit in memory, the score is still measured and fitted: on the
    tokens of a random share of the images that fits (the Gaussians on all of them), self-choosing or required; where
    that share holds too few images for held-out z-units, the score is left out (or refused, when required)."""
    from types import SimpleNamespace

    from anomalib_fod.models.fod import callbacks
    from anomalib_fod.models.fod.fitting import TrainingImages, fit_residual_statistics

    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=list(range(100))))
    batches = list(torch.rand(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).split(4))  # a texture
    for limit in (0.5, 1.0):
        model = tiny_fod(nearest_position_limit=limit)
        features = list(iterate_pooled_features(model.model, batches, None, torch.device("cpu"), False))
        model.model.set_mean_reference([torch.cat(level).mean(0) for level in zip(*features, strict=True)])
        callback = callbacks.ResidualStatisticsCallback()
        callback.on_train_start(trainer, model)
        assert callback.keep_share == 1.0  # within the budget: every image
        grids = [tuple(int(v) for v in level.ref_grid) for level in model.model.levels]
        channels = model.model.feature_extractor.channels
        needed = 3 * 4 * 100 * len(GAINS) * sum(h * w * c for (h, w), c in zip(grids, channels, strict=True))
        monkeypatch.setattr(callbacks, "CONTEXT_BUDGET_BYTES", needed // 2)
        caplog.clear()
        with caplog.at_level("INFO"):
            callback.on_train_start(trainer, model)
        assert callback.keep_share == pytest.approx(0.5, abs=1e-6) and "GiB" in caplog.text
        # room for fewer than MIN_KEPT_IMAGES images: too few for the z-units, the score is left out or refused
        monkeypatch.setattr(callbacks, "CONTEXT_BUDGET_BYTES", needed * (callbacks.MIN_KEPT_IMAGES - 1) // 100)
        short = tiny_fod(nearest_position_limit=limit)
        short.model.set_mean_reference([torch.cat(level).mean(0) for level in zip(*features, strict=True)])
        if limit < 1:
            caplog.clear()
            with caplog.at_level("WARNING"):
                callbacks.ResidualStatisticsCallback().on_train_start(trainer, short)
            assert all(level.unmeasured for level in short.model.anomaly_map_generator.nearest)
            assert "fewer than" in caplog.text
        else:
            with pytest.raises(ValueError, match="keeps every training token"):
                callbacks.ResidualStatisticsCallback().on_train_start(trainer, short)
        monkeypatch.undo()
        fit_residual_statistics(
            model.model, TrainingImages(batches, None, torch.device("cpu"), progress=False, seed=3, keep_share=0.5)
        )
        generator = model.model.anomaly_map_generator
        assert generator.nearest_active and not any(level.unmeasured for level in generator.nearest)
        assert all(statistics.fitted for statistics in generator.statistics)


def test_a_kept_share_holds_each_drawn_image_at_every_gain() -> None:
    gains, images, positions = 3, 40, 2
    # row r of a batch: image r % images at gain r // images; the value tells both
    batch = (torch.arange(gains * images, dtype=torch.float)[:, None, None]).expand(-1, positions, 1)
    kept = KeptLevels([], [], [], share=0.25, gains=gains, generator=torch.Generator().manual_seed(0))
    kept.add([batch], [batch + 0.5], [(1, positions)])
    rows = kept.tokens[0][0][:, 0, 0].long()
    drawn = rows[: kept.images] % images
    assert 0 < kept.images < images and kept.images == rows.numel() // gains
    for gain in range(gains):  # the same images, in the same order, at every gain
        assert (rows[gain * kept.images : (gain + 1) * kept.images] == drawn + gain * images).all()
    torch.testing.assert_close(kept.residuals[0][0], kept.tokens[0][0] + 0.5)
    again = KeptLevels([], [], [], share=0.25, gains=gains, generator=torch.Generator().manual_seed(0))
    again.add([batch], [batch], [(1, positions)])
    torch.testing.assert_close(again.tokens[0][0], kept.tokens[0][0])  # drawn from the seed
    every = KeptLevels([], [], [])
    every.add([batch], [batch], [(1, positions)])
    assert every.images == gains * images  # gains=1 by default: every row an image


def test_bad_nearest_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="nearest_tokens must be >= 0"):
        Fod(pre_trained=False, nearest_tokens=-1, **TINY)
    for limit in (-0.1, 1.5):
        with pytest.raises(ValueError, match="nearest_position_limit is a share"):
            Fod(pre_trained=False, nearest_tokens=10, nearest_position_limit=limit, **TINY)
    for settings in ({"reconstruction_term": "mse_cos"}, {"context_score": True}):
        with pytest.raises(ValueError, match="nearest_tokens adds to the whitened residual"):
            Fod(pre_trained=False, nearest_tokens=10, nearest_position_limit=1.0, **TINY, **settings)
        # a self-choosing score stays out of a scoring it cannot add to
        generator = Fod(pre_trained=False, nearest_tokens=10, **TINY, **settings).model.anomaly_map_generator
        assert not generator.nearest_active and generator.keeps_training_tokens != "nearest_tokens"


def test_the_exported_graph_carries_the_nearest_score(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    pytest.importorskip("onnxscript")
    monkeypatch.setattr(nearest_module, "BANK_SLICE", 128)  # the graph holds several slices
    model, _ = fitted_model()
    path = model.to_onnx(tmp_path)
    images = torch.rand(2, 3, 80, 90, generator=torch.Generator().manual_seed(3))
    # the squared distances' |t|^2 - 2 t.b + |b|^2 cancels in float32: maps agree to 1e-4 of their largest value
    scale = float(model(images).anomaly_map.abs().max().detach())
    assert_exports_reproduce(model, path, images, {"rtol": 0, "atol": 1e-4 * scale}, 1e-4)


@pytest.mark.slow
def test_a_fit_with_the_nearest_score_reloads_from_its_checkpoint(dummy_dataset, tmp_path) -> None:  # noqa: ANN001
    from fod_helpers import fit_and_reload

    model, reloaded = fit_and_reload(dummy_dataset, tmp_path, SIZE, nearest_tokens=200)
    assert all(level.fitted for level in model.model.anomaly_map_generator.nearest)
    assert reloaded.model.settings.nearest_tokens == 200


def test_the_choice_reads_only_the_training_images(dummy_dataset, tmp_path) -> None:  # noqa: ANN001
    """The position share and what follows from it are the same when every test image is replaced by noise."""
    import shutil

    import numpy as np
    from PIL import Image

    from fod_helpers import TRAIN_BATCH, make_datamodule

    poisoned = tmp_path / dummy_dataset.name
    shutil.copytree(dummy_dataset, poisoned)
    generator = np.random.default_rng(0)
    files = [path for path in (poisoned / "test").rglob("*") if path.suffix.lower() in {".png", ".jpg", ".bmp"}]
    assert files
    for path in files:
        with Image.open(path) as image:
            shape = (image.height, image.width, 3)
        Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8)).save(path)

    def fitted(root: Path) -> Fod:
        torch.manual_seed(0)
        model = Fod(pre_processor=Fod.configure_pre_processor((SIZE, SIZE)), visualizer=False, nearest_tokens=200,
                    **TINY)
        datamodule = make_datamodule(root.parent, root.name, TRAIN_BATCH, TRAIN_BATCH)
        datamodule.setup("fit")
        model.model.set_mean_reference(
            [f.mean(0) for f in next(iter(iterate_pooled_features(
                model.model, datamodule.train_dataloader(), None, torch.device("cpu"), False)))])
        model.fit_residual_statistics(datamodule)
        return model

    clean, dirty = fitted(dummy_dataset), fitted(poisoned)
    for first, second in zip(clean.model.anomaly_map_generator.nearest, dirty.model.anomaly_map_generator.nearest,
                             strict=True):
        assert not torch.isnan(first.position_share).any()
        torch.testing.assert_close(second.position_share, first.position_share)
        assert first.declined == second.declined
        torch.testing.assert_close(second.bank, first.bank)


def test_a_refit_of_the_statistics_does_not_depend_on_the_shuffle(dummy_dataset) -> None:  # noqa: ANN001
    """The statistics read the training images in file order: two refits under different global seeds (which
    reorder the shuffled training loader) draw the same bank and the same z-units."""
    from fod_helpers import TRAIN_BATCH, make_datamodule

    torch.manual_seed(0)
    model = Fod(pre_processor=Fod.configure_pre_processor((SIZE, SIZE)), visualizer=False, nearest_tokens=200,
                nearest_position_limit=1.0, **TINY)
    model.draw_seed = 7  # as a trained checkpoint carries it: the draws' seed is fixed, only the shuffle differs
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, 2, TRAIN_BATCH)
    datamodule.setup("fit")
    model.model.set_mean_reference(
        [f.mean(0) for f in next(iter(iterate_pooled_features(
            model.model, datamodule.train_dataloader(), None, torch.device("cpu"), False)))])

    def refit(seed: int) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(seed)
        model.fit_residual_statistics(datamodule)
        return [{k: v.clone() for k, v in level.state_dict().items()} for level in
                model.model.anomaly_map_generator.nearest]

    first, second = refit(0), refit(1)
    assert all(level["bank"].numel() for level in first)
    for one, two in zip(first, second, strict=True):
        for key in one:
            torch.testing.assert_close(two[key], one[key], msg=key)
