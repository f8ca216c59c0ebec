"""The whitened-residual score: statistics equal a direct computation, survive checkpoints, fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_fod import Fod
from anomalib_fod.models.fod.fitting import fit_statistics, iterate_pooled_features
from anomalib_fod.models.fod.residual_statistics import SHRINKAGE, ResidualStatistics

from fod_helpers import TINY, WITHOUT_MAP_LEVELS, assert_budget_is_the_boundary, counted_position_products, fit_and_run


def tiny_model(**settings) -> Fod:  # noqa: ANN003
    """A tiny model scored by the Gaussian alone (the nearest-token score, fitted apart, has its own tests)."""
    torch.manual_seed(0)
    settings.setdefault("nearest_tokens", 0)
    return Fod(pre_trained=False, image_size=64, visualizer=False, **TINY, **{**WITHOUT_MAP_LEVELS, **settings})


def features_and_references(model: Fod) -> list[torch.Tensor]:
    images = torch.rand(7, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    features = model.model.extract_features(images)
    model.model.set_mean_reference([f.mean(0) for f in features])
    return features


def direct_mahalanobis(residual: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """The score written out: per-position mean, one pooled covariance, shrunk diagonal, float64."""
    mean = train.double().mean(0)
    centred = (train.double() - mean).flatten(0, 1)
    cov = centred.T @ centred / (centred.shape[0] - 1)
    cov += SHRINKAGE * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    diff = residual.double() - mean
    return ((diff @ torch.linalg.inv(cov)) * diff).sum(-1).sqrt()


def test_scores_use_the_statistics_and_survive_a_checkpoint(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    features = features_and_references(model)
    fit_statistics(model.model, [features])
    model.model.eval()
    with torch.no_grad():
        before = model.model.forward_features(features, (64, 64)).pred_score
        # other statistics give other scores: the scores really read them
        stats = model.model.anomaly_map_generator.statistics[0]
        stats.set(stats.mean + 1.0, stats.precision, stats.position_precision)
        assert not torch.allclose(model.model.forward_features(features, (64, 64)).pred_score, before)
        stats.set(stats.mean - 1.0, stats.precision, stats.position_precision)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    reloaded = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    reloaded.load_state_dict(torch.load(path))
    reloaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.forward_features(features, (64, 64)).pred_score, before)


def test_missing_statistics_are_a_clear_error_and_old_state_dicts_load() -> None:
    old = tiny_model()  # the paper's score: nothing fitted
    state = {k: v for k, v in old.state_dict().items() if "statistics" not in k}  # as saved before they existed
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    model.load_state_dict(state)
    features = features_and_references(model)
    model.model.eval()
    with pytest.raises(RuntimeError, match="fit_residual_statistics"), torch.no_grad():
        model.model.forward_features(features, (64, 64))
    assert not ResidualStatistics().fitted


def direct_position_mahalanobis(residual: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Per position: its own covariance and the pooled one mixed by C / (N + C), float64, one position at a time."""
    count, positions, channels = train.shape
    mean = train.double().mean(0)
    centred = train.double() - mean
    pooled = centred.flatten(0, 1)
    shared = pooled.T @ pooled / (pooled.shape[0] - 1)
    shared += SHRINKAGE * shared.diagonal().mean() * torch.eye(channels, dtype=shared.dtype)
    weight = channels / (count + channels)
    scores = []
    for position in range(positions):
        own = centred[:, position].T @ centred[:, position] / (count - 1)
        precision = torch.linalg.inv((1 - weight) * own + weight * shared)
        diff = residual[:, position].double() - mean[position]
        scores.append(((diff @ precision) * diff).sum(-1).sqrt())
    return torch.stack(scores, dim=1)


@pytest.mark.parametrize("covariance", ["shared", "position", "blend"])
def test_statistics_equal_a_direct_computation(covariance: str) -> None:
    # image_score="map": nothing asks for the per-position statistics unless the covariance does
    model = tiny_model(
        reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance, image_score="map"
    )
    fod = model.model
    features = features_and_references(model)
    # in two batches: the running sums must equal the one-shot statistics
    fit_statistics(fod, [[f[:3] for f in features], [f[3:] for f in features]])
    fod.eval()
    with torch.no_grad():
        run = fod.run_levels(features)
        for level, (tokens, output) in enumerate(zip(run.tokens, run.levels, strict=True)):
            residual = tokens - output.reconstruction
            statistics = fod.anomaly_map_generator.statistics[level]
            got = statistics(residual).double()
            shared = direct_mahalanobis(residual, residual)
            if covariance == "shared":
                assert statistics.position_precision.numel() == 0  # nothing per position is kept
                torch.testing.assert_close(got, shared, rtol=1e-4, atol=1e-4)
                continue
            assert statistics.position_precision.shape == (*residual.shape[1:], residual.shape[-1])
            position = direct_position_mahalanobis(residual, residual)
            expected = position if covariance == "position" else 0.5 * (shared + position)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert not torch.allclose(got, shared, rtol=1e-2)  # really per position
            assert not torch.allclose(got, position, rtol=1e-2) or covariance == "position"


def test_statistics_of_another_covariance_kind_are_a_clear_error() -> None:
    shared = tiny_model(
        reconstruction_term="mahalanobis", scoring="rec", residual_covariance="shared", image_score="map"
    )
    features = features_and_references(shared)
    fit_statistics(shared.model, [features])
    assert all(s.position_precision.numel() == 0 for s in shared.model.anomaly_map_generator.statistics)
    for covariance, image_score in (("position", "map"), ("blend", "map"), ("shared", "position")):
        other = tiny_model(
            reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance, image_score=image_score
        )
        other.load_state_dict(shared.state_dict())  # e.g. a checkpoint re-scored with another setting
        other.model.eval()
        with pytest.raises(RuntimeError, match="hold one shared covariance but the 'position' distance|"
                           "hold one shared covariance but the 'blend' distance"), torch.no_grad():
            other.model.forward_features(features, (64, 64))
        fit_statistics(other.model, [features])  # refitting is the way out
        with torch.no_grad():
            other.model.forward_features(features, (64, 64))
    # per-position statistics keep the shared precision too: any of the three scores reads them without a refit
    blend = other
    for covariance in ("shared", "position"):
        rescored = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance)
        rescored.load_state_dict(blend.state_dict())
        rescored.model.eval()
        with torch.no_grad():
            rescored.model.forward_features(features, (64, 64))


def test_per_position_checkpoints_of_the_earlier_layout_load() -> None:
    """Before "blend", the per-position precisions were stored as ``precision`` ``(L, C, C)``."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance="position")
    features = features_and_references(model)
    fit_statistics(model.model, [features])
    model.model.eval()
    with torch.no_grad():
        before = model.model.forward_features(features, (64, 64)).pred_score
    state = model.state_dict()
    for key in [k for k in state if k.endswith(".position_precision")]:
        state[key.removesuffix("position_precision") + "precision"] = state.pop(key)  # the earlier layout
    assert any(v.dim() == 3 for k, v in state.items() if k.endswith(".precision"))
    reloaded = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance="position")
    reloaded.load_state_dict(state)
    reloaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.forward_features(features, (64, 64)).pred_score, before)


def test_an_unknown_covariance_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="covariance must be one of"):
        ResidualStatistics("diagonal")  # type: ignore[arg-type]


def test_per_position_statistics_too_large_to_keep_are_refused_before_training(monkeypatch) -> None:  # noqa: ANN001
    """A backbone with many channels would need GiBs of (L, C, C) covariances: refused at train start."""
    from anomalib_fod.models.fod import callbacks, residual_statistics  # noqa: PLC0415

    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance="position")
    features = features_and_references(model)
    grids = [tuple(f.shape[-2:]) for f in features]
    needed = residual_statistics.per_position_bytes(grids, [f.shape[1] for f in features])
    assert needed == sum(8 * f.shape[-2] * f.shape[-1] * f.shape[1] ** 2 for f in features)
    callback = callbacks.ResidualStatisticsCallback()
    assert_budget_is_the_boundary(
        monkeypatch, "PER_POSITION_BUDGET_BYTES", needed, lambda: callback.on_train_start(None, model),
        "residual_covariance='shared'",
    )
    with pytest.raises(ValueError, match="image_score='map'"):
        callback.on_train_start(None, model)
    # the per-position image score alone needs them too
    for covariance, image_score, refused in (("shared", "position", True), ("shared", "map", False)):
        shared = tiny_model(
            reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance, image_score=image_score
        )
        features_and_references(shared)
        if refused:
            with pytest.raises(ValueError, match="image_score='position'"):
                callback.on_train_start(None, shared)
        else:
            callback.on_train_start(None, shared)  # one covariance per level: no such limit


@pytest.mark.parametrize("covariance", ["shared", "blend"])
def test_the_image_score_is_the_maximum_of_the_per_position_map(covariance: str) -> None:
    """``image_score="position"``: the map is ``covariance``'s, the image score the maximum of the map the
    per-position distances make (same upsampling and blur, levels averaged equally), both equal to a direct
    computation."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance)
    fod = model.model
    features = features_and_references(model)
    result, run = fit_and_run(fod, features)
    generator = fod.anomaly_map_generator
    with torch.no_grad():
        residuals = [(t - o.reconstruction).double() for t, o in zip(run.tokens, run.levels, strict=True)]
        shared = [direct_mahalanobis(r, r).float() for r in residuals]
        position = [direct_position_mahalanobis(r, r).float() for r in residuals]
        mapped = shared if covariance == "shared" else [0.5 * (a + b) for a, b in zip(shared, position, strict=True)]
        expected_map, map_maximum = generator.combine_levels(mapped, run.grids, (64, 64), generator.map_level_weights)
        _, expected_score = generator.combine_levels(position, run.grids, (64, 64))
    torch.testing.assert_close(result.anomaly_map, expected_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.pred_score, expected_score, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(result.pred_score, map_maximum, rtol=1e-3)  # really another score than the map's
    with counted_position_products() as calls, torch.no_grad():
        again = fod.forward_features(features, (64, 64))
    torch.testing.assert_close(again.pred_score, result.pred_score)
    assert len(calls) == len(run.grids)  # the per-position product once per level, for the map and the score
    generator.use_image_score("map")
    with torch.no_grad():
        rescored = fod.forward_features(features, (64, 64)).pred_score
    torch.testing.assert_close(rescored, map_maximum, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="image_score must be one of"):
        generator.use_image_score("mean")  # type: ignore[arg-type]


def test_checkpoints_from_before_image_score_keep_the_maps_maximum(tmp_path) -> None:  # noqa: ANN001
    """Their thresholds were learnt on the map's maximum: loading them must not change what they score."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    features = features_and_references(model)
    fit_statistics(model.model, [features])
    hparams = dict(model.hparams)
    assert hparams["image_score"] == "position"
    model.model.eval()
    with torch.no_grad():
        new = model.model.forward_features(features, (64, 64))
    old_hparams = {k: v for k, v in hparams.items() if k != "image_score"}
    for name, saved in (("new.ckpt", hparams), ("old.ckpt", old_hparams)):
        checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": saved, "pytorch-lightning_version": "2.6.0"}
        torch.save(checkpoint, tmp_path / name)
    reloaded = Fod.load_from_checkpoint(tmp_path / "new.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.forward_features(features, (64, 64)).pred_score, new.pred_score)
    old = Fod.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    assert old.hparams["image_score"] == "map"
    assert old.model.settings.image_score == "map"
    with torch.no_grad():
        scored = old.model.forward_features(features, (64, 64))
    torch.testing.assert_close(scored.anomaly_map, new.anomaly_map)
    torch.testing.assert_close(scored.pred_score, new.anomaly_map.amax(dim=(-2, -1)).flatten())
    # asked for by name, the new image score applies to an old checkpoint too
    switched = Fod.load_from_checkpoint(tmp_path / "old.ckpt", image_score="position").eval()
    assert switched.hparams["image_score"] == "position"
    with torch.no_grad():
        torch.testing.assert_close(switched.model.forward_features(features, (64, 64)).pred_score, new.pred_score)


def test_statistics_fitted_at_intensity_gains_equal_those_of_the_scaled_images() -> None:
    """``intensity_gains``: the statistics are those of every training image at every gain (clipped to [0, 1],
    before the pre-processing), as if the scaled images were more training images."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", intensity_gains=[0.5, 1.0, 1.6])
    assert model.model.settings.intensity_gains == (0.5, 1.0, 1.6)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    transform = model.pre_processor.transform
    model.model.set_mean_reference([f.mean(0) for f in model.model.extract_features(transform(images))])
    batches = [images[:3], images[3:]]
    seen = list(iterate_pooled_features(model.model, batches, transform, torch.device("cpu"), progress=False,
                                        gains=model.model.settings.intensity_gains))
    assert len(seen) == 2  # one forward pass per batch: its copies at every gain go through together
    assert [features[0].shape[0] for features in seen] == [3 * 3, 2 * 3]
    scaled = torch.cat([(batch * gain).clamp(0, 1) for batch in batches for gain in (0.5, 1.0, 1.6)])
    direct = model.model.extract_features(transform(scaled))
    for level, expected in enumerate(direct):
        torch.testing.assert_close(torch.cat([features[level] for features in seen]), expected)
    fit_statistics(model.model, seen)
    gained = [s.position_precision.clone() for s in model.model.anomaly_map_generator.statistics]
    fit_statistics(model.model, [direct])
    for statistics, kept in zip(model.model.anomaly_map_generator.statistics, gained, strict=True):
        torch.testing.assert_close(statistics.position_precision, kept, rtol=1e-4, atol=1e-4)
    fit_statistics(model.model, [model.model.extract_features(transform(images))])  # the images as they are
    assert not torch.allclose(model.model.anomaly_map_generator.statistics[0].position_precision, gained[0], rtol=1e-2)


def test_intensity_gains_refuse_bad_values_and_normalised_images() -> None:
    for gains in ([], [0.0, 1.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="intensity_gains must be one or more positive numbers"):
            tiny_model(intensity_gains=gains)
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    normalised = torch.randn(2, 3, 64, 64)  # what a pre-processed batch looks like: not gains' [0, 1] intensities
    with pytest.raises(ValueError, match=r"scale images with intensities in \[0, 1\]"):
        next(iter(iterate_pooled_features(model.model, [normalised], None, torch.device("cpu"), gains=(0.9, 1.0))))
    # a resize's overshoot of [0, 1] (rounding, ringing) is clipped, not refused
    overshoot = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 1.1
    features = next(iter(iterate_pooled_features(model.model, [overshoot], None, torch.device("cpu"), gains=(0.9,))))
    for level, expected in zip(features, model.model.extract_features((overshoot * 0.9).clamp(0, 1)), strict=True):
        torch.testing.assert_close(level, expected)
    # without a gain the images are used as they are, whatever their range
    assert len(next(iter(iterate_pooled_features(model.model, [normalised], None, torch.device("cpu"))))) == 2


def test_checkpoints_from_before_intensity_gains_refit_without_them(tmp_path) -> None:  # noqa: ANN001
    """Their statistics were fitted on the images as they are: a refit keeps that unless asked otherwise."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    assert model.hparams["intensity_gains"] == (0.9, 1.0, 1.1)
    hparams = dict(model.hparams)
    old_hparams = {k: v for k, v in hparams.items() if k != "intensity_gains"}
    for name, saved in (("new.ckpt", hparams), ("old.ckpt", old_hparams)):
        checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": saved, "pytorch-lightning_version": "2.6.0"}
        torch.save(checkpoint, tmp_path / name)
    assert Fod.load_from_checkpoint(tmp_path / "new.ckpt").model.settings.intensity_gains == (0.9, 1.0, 1.1)
    old = Fod.load_from_checkpoint(tmp_path / "old.ckpt")
    assert old.model.settings.intensity_gains == (1.0,)
    assert old.hparams["intensity_gains"] == (1.0,)
    asked = Fod.load_from_checkpoint(tmp_path / "old.ckpt", intensity_gains=[0.8, 1.0])
    assert asked.model.settings.intensity_gains == (0.8, 1.0)


def upsampled_levels(covariance: str | None = None, **settings) -> tuple:  # noqa: ANN003
    """A tiny model with fitted statistics (default score, no blur, ``settings``), its output on random images, and
    each level's token scores under ``covariance`` upsampled by hand as its settings ask: ``(fod, features, output,
    [(B, 1, 64, 64)] per level)``."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", blur_sigma=0, **settings)
    features = features_and_references(model)
    fod = model.model
    result, run = fit_and_run(fod, features)
    with torch.no_grad():
        pairs = list(enumerate(zip(run.tokens, run.levels, strict=True)))
        levels = [fod.anomaly_map_generator.token_scores(t, o, i, covariance) for i, (t, o) in pairs]
    align = fod.settings.map_align_corners
    upsampled = [
        F.interpolate(level.reshape(-1, 1, h, w), size=(64, 64), mode="bilinear", align_corners=align)
        for level, (h, w) in zip(levels, run.grids, strict=True)
    ]
    return fod, features, result, upsampled


def test_map_level_weights_weigh_the_maps_levels_and_leave_the_image_score_alone() -> None:
    """The anomaly map is the weighted mean of the upsampled levels (written out here, before the blur); the
    per-position image score averages the levels whatever the map's weights, ``image_score="map"`` reads them."""
    scores = {}
    for weights in ((0.875, 0.125), (7.0, 1.0), (1.0, 0.0), None):
        fod, features, result, upsampled = upsampled_levels(map_level_weights=weights)
        share = 0.5 if weights is None else weights[0] / sum(weights)
        torch.testing.assert_close(result.anomaly_map, share * upsampled[0] + (1 - share) * upsampled[1])
        scores[weights] = result.pred_score
        if weights == (1.0, 0.0):
            fod.anomaly_map_generator.use_image_score("map")
            with torch.no_grad():
                mapped = fod.forward_features(features, (64, 64)).pred_score
            torch.testing.assert_close(mapped, upsampled[0].amax(dim=(-2, -1)).flatten())
    for weights, score in scores.items():
        torch.testing.assert_close(score, scores[None], msg=f"map_level_weights={weights} changed the image score")
    assert tiny_model(map_level_weights=[3, 1]).model.settings.map_level_weights == (3.0, 1.0)
    for bad in ([-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="map_level_weights must be non-negative weights, one per level"):
            tiny_model(map_level_weights=bad)
    for bad in ([1.0], [1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match=f"has {len(bad)} weights for 2 levels"):
            tiny_model(map_level_weights=bad)


def test_map_align_corners_puts_each_token_at_the_centre_of_its_cell() -> None:
    """One hot token of a 4x4 grid upsampled to 32x32 (stride 8): by default its score peaks on the two pixels
    around its cell's centre (8 i + 3.5); ``map_align_corners=True`` (the paper) stretches the grid so the peak
    moves to ``i * 31 / 3``. Both the anomaly map and the image score's map use the model's upsampling."""
    score = torch.zeros(1, 16)
    score[0, 1 * 4 + 2] = 1.0  # row 1, column 2
    for align, rows, columns in ((False, [11, 12], [19, 20]), (True, [10], [21])):
        model = tiny_model(map_align_corners=align, blur_sigma=0)
        assert model.model.settings.map_align_corners is align
        anomaly_map, image_score = model.model.anomaly_map_generator.combine_levels([score], [(4, 4)], (32, 32))
        peak = anomaly_map[0, 0] == anomaly_map.max()
        assert peak.nonzero()[:, 0].unique().tolist() == rows, f"align_corners={align}"
        assert peak.nonzero()[:, 1].unique().tolist() == columns, f"align_corners={align}"
        # the pixels nearest the token sit 1/16 (centred) or 1/31 (corner-aligned) of a token off it
        assert image_score.item() == pytest.approx((30 / 31) ** 2 if align else (15 / 16) ** 2)
    for align in (False, True):
        _, _, result, upsampled = upsampled_levels("position", map_align_corners=align)
        expected = (0.5 * (upsampled[0] + upsampled[1])).amax(dim=(-2, -1)).flatten()
        torch.testing.assert_close(result.pred_score, expected)


def test_checkpoints_from_before_the_map_settings_keep_the_papers_map(tmp_path) -> None:  # noqa: ANN001
    """Their thresholds were learnt on maps of the levels' mean, upsampled corner-aligned: loading them must not
    change their maps."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    assert model.hparams["map_level_weights"] == (0.875, 0.125)
    features = features_and_references(model)
    fit_statistics(model.model, [features])
    hparams = dict(model.hparams)
    old_hparams = {k: v for k, v in hparams.items() if k not in ("map_level_weights", "map_align_corners")}
    for name, saved in (("new.ckpt", hparams), ("old.ckpt", old_hparams)):
        checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": saved, "pytorch-lightning_version": "2.6.0"}
        torch.save(checkpoint, tmp_path / name)
    assert Fod.load_from_checkpoint(tmp_path / "new.ckpt").model.settings.map_level_weights == (0.875, 0.125)
    old = Fod.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    assert old.model.settings.map_level_weights is None
    assert old.hparams["map_level_weights"] is None
    assert old.model.settings.map_align_corners is True
    assert old.model.anomaly_map_generator.align_corners is True
    mean = tiny_model(reconstruction_term="mahalanobis", scoring="rec", map_level_weights=None,
                      map_align_corners=True).eval()
    mean.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(old.model.forward_features(features, (64, 64)).anomaly_map,
                                   mean.model.forward_features(features, (64, 64)).anomaly_map)
    asked = Fod.load_from_checkpoint(tmp_path / "old.ckpt", map_level_weights=[1.0, 1.0], map_align_corners=False)
    assert asked.model.anomaly_map_generator.map_level_weights == (1.0, 1.0)
    assert asked.model.anomaly_map_generator.align_corners is False
    assert asked.hparams["map_align_corners"] is False
    with pytest.raises(ValueError, match="set_scoring changes"):
        asked.set_scoring(blur_sigma=2.0)


def test_a_fit_resumed_from_an_old_checkpoint_scores_with_the_settings_the_model_was_built_with() -> None:
    """Resuming a fit refits the statistics and thresholds, so the old checkpoint's scoring must not replace the
    settings the user built the model with; testing from it keeps the old scoring."""
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    saved = {k: v for k, v in model.hparams.items() if k not in ("map_level_weights", "map_align_corners")}
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": saved}
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    resumed = tiny_model(reconstruction_term="mahalanobis", scoring="rec")
    resumed.trainer = trainer
    trainer.state.fn = TrainerFn.FITTING
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.model.settings.map_align_corners is False
    assert resumed.model.anomaly_map_generator.map_level_weights == (0.875, 0.125)
    trainer.state.fn = TrainerFn.TESTING
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.model.settings.map_align_corners is True
    assert resumed.model.anomaly_map_generator.map_level_weights is None
