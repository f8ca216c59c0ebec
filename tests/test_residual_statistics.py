"""The whitened-residual score: statistics equal a direct computation, survive checkpoints, fail clearly."""

from __future__ import annotations

import pytest
import torch

from anomalib_fod import Fod
from anomalib_fod.models.fod.residual_statistics import SHRINKAGE, ResidualStatistics, fit_statistics

from fod_helpers import TINY


def tiny_model(**settings) -> Fod:  # noqa: ANN003
    torch.manual_seed(0)
    return Fod(pre_trained=False, image_size=64, visualizer=False, **TINY, **settings)


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
    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance)
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
    shared = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance="shared")
    features = features_and_references(shared)
    fit_statistics(shared.model, [features])
    for covariance in ("position", "blend"):
        other = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance=covariance)
        other.load_state_dict(shared.state_dict())  # e.g. a checkpoint re-scored with another setting
        other.model.eval()
        with pytest.raises(RuntimeError, match="hold one shared covariance but residual_covariance"), torch.no_grad():
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
    from anomalib_fod.models.fod import residual_statistics  # noqa: PLC0415

    model = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance="position")
    features = features_and_references(model)
    grids = [tuple(f.shape[-2:]) for f in features]
    needed = residual_statistics.per_position_bytes(grids, [f.shape[1] for f in features])
    assert needed == sum(8 * f.shape[-2] * f.shape[-1] * f.shape[1] ** 2 for f in features)
    callback = residual_statistics.ResidualStatisticsCallback()
    monkeypatch.setattr(residual_statistics, "PER_POSITION_BUDGET_BYTES", needed)
    callback.on_train_start(None, model)  # within the budget: nothing happens
    monkeypatch.setattr(residual_statistics, "PER_POSITION_BUDGET_BYTES", needed - 1)
    with pytest.raises(ValueError, match="residual_covariance='shared'"):
        callback.on_train_start(None, model)
    shared = tiny_model(reconstruction_term="mahalanobis", scoring="rec", residual_covariance="shared")
    features_and_references(shared)
    callback.on_train_start(None, shared)  # one covariance per level: no such limit
