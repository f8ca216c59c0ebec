"""The context score: a prediction never reads its own neighbourhood, it learns, it travels with the model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from anomalib_fod import Fod
from anomalib_fod.models.fod.context import ContextLevel, ContextPredictor, fit_whitening, train_predictors
from anomalib_fod.models.fod.fitting import KeptLevels, fit_context, fit_statistics
from anomalib_fod.models.fod.residual_statistics import SHRINKAGE

from fod_helpers import (
    TINY,
    WITHOUT_MAP_LEVELS,
    assert_budget_is_the_boundary,
    assert_exports_reproduce,
    counted_position_products,
    explain_random_image,
)

SIZE = 96  # the coarsest grid (stride 16) is 6x6: the smallest that leaves radius 2 something to read


def test_a_prediction_reads_nothing_within_its_radius_nor_a_hidden_token() -> None:
    torch.manual_seed(0)
    predictor = ContextPredictor(6, radius=2, dim=16, heads=2)
    height, width = 7, 8
    tokens = torch.randn(2, height * width, 6, requires_grad=True)
    hidden = torch.zeros(2, height * width, dtype=torch.bool)
    hidden[0, 5] = True  # (0, 5): outside the query's neighbourhood
    query_y, query_x = 3, 4
    output = predictor(tokens, (height, width), hidden)
    (gradient,) = torch.autograd.grad(output[0, query_y * width + query_x].sum(), tokens)
    ys, xs = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    near = ((ys - query_y).abs() <= 2) & ((xs - query_x).abs() <= 2)
    read = gradient[0].abs().sum(-1)
    assert read[near].max() == 0  # not the token itself, nor any token whose 3x3 pooling window holds its cell
    assert read[5] == 0  # nor a hidden token
    others = ~near
    others[5] = False
    assert (read[others] > 0).all()  # every other token is read
    assert gradient[1].abs().max() == 0  # nor another image


def test_a_query_left_nothing_to_read_reads_no_token_not_even_its_own() -> None:
    """Every key beyond the radius hidden: the masked softmax would average every token, the query's own
    included; the prediction comes from the position alone instead."""
    torch.manual_seed(0)
    predictor = ContextPredictor(6, radius=1, dim=16, heads=2)
    height, width = 5, 5
    tokens = torch.randn(2, height * width, 6, requires_grad=True)
    ys, xs = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    query = 2 * width + 2
    hidden = torch.zeros(2, height * width, dtype=torch.bool)
    hidden[0] = ((ys - 2).abs() > 1) | ((xs - 2).abs() > 1)  # image 0: everything the query could read
    output = predictor(tokens, (height, width), hidden)
    (gradient,) = torch.autograd.grad(output[0, query].sum(), tokens, retain_graph=True)
    assert gradient.abs().max() == 0
    (gradient,) = torch.autograd.grad(output[1, query].sum(), tokens)
    assert gradient[1].abs().sum(-1)[~hidden[0]].max() == 0 and (gradient[1].abs().sum(-1)[hidden[0]] > 0).all()


def test_a_subset_of_queries_predicts_what_the_full_pass_predicts_there() -> None:
    torch.manual_seed(0)
    predictor = ContextPredictor(6, radius=2, dim=16, heads=2).eval()
    tokens = torch.randn(2, 7 * 8, 6)
    hidden = torch.zeros(2, 7 * 8, dtype=torch.bool)
    hidden[1, 30] = True
    queries = torch.tensor([41, 0, 55, 12])
    with torch.no_grad():
        full = predictor(tokens, (7, 8), hidden)
        subset = predictor(tokens, (7, 8), hidden, queries=queries)
    assert subset.shape == (2, 4, 6)
    torch.testing.assert_close(subset, full[:, queries], atol=1e-5, rtol=0)


def test_hidden_tokens_are_each_images_most_unusual_share() -> None:
    level = ContextLevel(4, hidden_share=0.1)
    scores = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    hidden = level.hidden(scores)
    assert hidden.sum(dim=1).tolist() == [5, 5, 5]
    for image, mask in zip(scores, hidden, strict=True):
        assert image[mask].min() > image[~mask].max()
    assert ContextLevel(4, hidden_share=0.0).hidden(scores) is None


def test_whitening_makes_the_tokens_covariance_the_identity() -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(5, 5, generator=generator)
    tokens = torch.randn(4000, 5, generator=generator) @ mixing + 3.0
    mean, whitening = fit_whitening(tokens)
    whitened = (tokens - mean) @ whitening
    torch.testing.assert_close(whitened.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(whitening, whitening.T)
    # it whitens the covariance shrunk as the residuals' is (1 % of the mean variance on the diagonal)
    covariance = torch.cov(tokens.T.double())
    covariance += SHRINKAGE * covariance.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(whitening.double() @ covariance @ whitening.double(), torch.eye(5, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert torch.linalg.eigvalsh(torch.cov(whitened.T)).max() < 1.0 + 1e-4  # shrinkage only ever shrinks


def smooth_fields(count: int, grid: int, channels: int, seed: int) -> torch.Tensor:
    """``(count, grid * grid, channels)`` tokens of random low-frequency waves: predictable from afar."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    phases = torch.rand(count, channels, 2, generator=generator) * 2 * math.pi
    waves = torch.sin(ys[None, None] * 0.35 + phases[..., 0, None, None]) + torch.cos(
        xs[None, None] * 0.3 + phases[..., 1, None, None],
    )
    return waves.flatten(2).transpose(1, 2)


def test_training_teaches_the_predictor_what_the_context_says() -> None:
    torch.manual_seed(0)
    train, test = smooth_fields(64, 10, 3, seed=1), smooth_fields(16, 10, 3, seed=2)
    level = ContextLevel(3)

    def unexplained() -> float:
        with torch.no_grad():
            return float((test - level.predictor(test, (10, 10))).square().mean() / test.square().mean())

    before = unexplained()
    losses = train_predictors([level], [train], [(10, 10)], 300, torch.device("cpu"), progress=False)
    assert len(losses) == 300
    assert before > 0.9  # untrained: it predicts about nothing
    assert unexplained() < 0.2  # trained: most of an unseen field comes from beyond the radius


def test_training_on_a_share_of_the_positions_per_step_teaches_every_position() -> None:
    torch.manual_seed(0)
    train, test = smooth_fields(64, 10, 3, seed=1), smooth_fields(16, 10, 3, seed=2)
    level = ContextLevel(3)
    train_predictors([level], [train], [(10, 10)], 300, torch.device("cpu"), progress=False, query_share=0.25)
    with torch.no_grad():
        residual = test - level.predictor(test, (10, 10))
    per_position = residual.square().mean(dim=(0, 2)) / test.square().mean()
    assert float(per_position.mean()) < 0.2  # as much as the full steps teach (the test above)
    assert float(per_position.max()) < 0.5  # no position is left out by the random subsets


def fitted_model(context_steps: int = 20, seed: int = 0, **settings) -> tuple[Fod, list[torch.Tensor]]:  # noqa: ANN003
    torch.manual_seed(seed)
    model = Fod(pre_trained=False, image_size=SIZE, visualizer=False, context_score=True,
                context_steps=context_steps, **TINY, **{**WITHOUT_MAP_LEVELS, **settings})
    images = torch.rand(12, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    features = model.model.extract_features(images)
    model.model.set_mean_reference([f.mean(0) for f in features])
    kept = KeptLevels([], [], [])
    fit_statistics(model.model, [[f[:6] for f in features], [f[6:] for f in features]], keep=kept)
    fit_context(model.model, kept, torch.device("cpu"), progress=False)
    model.model.eval()
    return model, features


def test_the_score_reads_the_trained_predictor_and_survives_a_checkpoint(tmp_path) -> None:  # noqa: ANN001
    model, features = fitted_model()
    level = model.model.anomaly_map_generator.context[0]
    assert level.fitted and level.rec_std.shape == (SIZE // 8 * SIZE // 8,)
    with torch.no_grad():
        before = model.model.forward_features(features, (SIZE, SIZE))
        assert torch.isfinite(before.pred_score).all() and torch.isfinite(before.anomaly_map).all()
        # another predictor gives other scores: the score reads it
        weight = level.predictor.out.weight
        weight.add_(1.0)
        assert not torch.allclose(model.model.forward_features(features, (SIZE, SIZE)).pred_score, before.pred_score)
        weight.sub_(1.0)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(5)  # another initialisation: everything must come from the file
    reloaded = Fod(pre_trained=False, image_size=SIZE, visualizer=False, context_score=True, **TINY,
                   **WITHOUT_MAP_LEVELS)
    reloaded.load_state_dict(torch.load(path))
    reloaded.model.eval()
    with torch.no_grad():
        after = reloaded.model.forward_features(features, (SIZE, SIZE))
    torch.testing.assert_close(after.pred_score, before.pred_score)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map)


def _position_distance(residual: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    centred = residual - mean
    return torch.einsum("blc,lcd,bld->bl", centred, precision, centred).clamp_min(0).sqrt()


def test_the_image_score_sums_both_distances_under_each_positions_own_covariance() -> None:
    model, features = fitted_model()
    generator = model.model.anomaly_map_generator
    with torch.no_grad():
        with counted_position_products() as calls:
            output = model.model.forward_features(features, (SIZE, SIZE))
        # per level one per-position product for the reconstruction, one for the context: map and score share them
        assert len(calls) == 2 * len(generator.context)
        run = model.model.run_levels(features)
        image_tokens = []
        for index, (level, tokens, out, grid) in enumerate(zip(generator.context, run.tokens, run.levels, run.grids,
                                                                strict=True)):
            statistics = generator.statistics[index]
            residual = tokens - out.reconstruction
            rec_position = _position_distance(residual, statistics.mean, statistics.position_precision)
            centred = residual - statistics.mean
            rec = 0.5 * (((centred @ statistics.precision) * centred).sum(-1).sqrt() + rec_position)
            rec_z = (rec - level.rec_mean) / level.rec_std
            hidden = rec_z >= rec_z.topk(math.ceil(0.05 * rec_z.shape[1]), dim=1).values[:, -1:]
            whitened = (tokens - level.token_mean) @ level.whitening
            context = whitened - level.predictor(whitened, grid, hidden)
            ctx_position = _position_distance(context, level.statistics.mean, level.statistics.position_precision)
            image_tokens.append((rec_position - level.rec_pos_mean) / level.rec_pos_std
                                + (ctx_position - level.ctx_pos_mean) / level.ctx_pos_std)
        expected = generator.combine_levels(image_tokens, run.grids, (SIZE, SIZE))[1]  # levels averaged
        torch.testing.assert_close(output.pred_score, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(output.pred_score, output.anomaly_map.amax(dim=(-3, -2, -1)))
        model.set_scoring(image_score="map")  # the paper's rule: the anomaly map's maximum
        output = model.model.forward_features(features, (SIZE, SIZE))
        torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(-3, -2, -1)))


def test_a_context_checkpoint_without_image_units_keeps_the_maps_maximum() -> None:
    model, features = fitted_model()
    state = {k: v for k, v in model.state_dict().items() if "_pos_" not in k}  # as saved before the image units
    torch.manual_seed(5)
    reloaded = Fod(pre_trained=False, image_size=SIZE, visualizer=False, context_score=True, **TINY,
                   **WITHOUT_MAP_LEVELS)
    reloaded.load_state_dict(state)
    reloaded.model.eval()
    with torch.no_grad():
        output = reloaded.model.forward_features(features, (SIZE, SIZE))
        torch.testing.assert_close(output.anomaly_map, model.model.eval().forward_features(features, (SIZE, SIZE))
                                   .anomaly_map)
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(-3, -2, -1)))


def test_the_context_predictors_train_after_the_transformers_not_with_them() -> None:
    model, _ = fitted_model(context_steps=0)
    optimised = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    context = model.model.anomaly_map_generator.context
    assert not any(id(p) in optimised for p in context.parameters())
    assert all(id(p) in optimised for p in model.model.levels.parameters())


def test_an_unfitted_context_score_and_a_wrong_size_are_clear_errors() -> None:
    torch.manual_seed(0)
    model = Fod(pre_trained=False, image_size=SIZE, visualizer=False, context_score=True, **TINY, **WITHOUT_MAP_LEVELS)
    images = torch.rand(2, 3, SIZE, SIZE)
    features = model.model.extract_features(images)
    model.model.set_mean_reference([f.mean(0) for f in features])
    fit_statistics(model.model, [features])  # the residual statistics alone
    model.model.eval()
    with pytest.raises(RuntimeError, match="context score is not fitted"):
        model.model.forward_features(features, (SIZE, SIZE))
    fitted, _ = fitted_model(context_steps=0)
    larger = fitted.model.extract_features(torch.rand(1, 3, SIZE + 32, SIZE + 32))
    with pytest.raises(RuntimeError, match="image size the model was trained with"):
        fitted.model.anomaly_map_generator.context[0](
            fitted.model.run_levels(larger).tokens[0], torch.zeros(1, larger[0].shape[-2] * larger[0].shape[-1]),
            tuple(larger[0].shape[-2:]),
        )


def test_bad_context_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="reconstruction_term='mahalanobis'"):
        Fod(pre_trained=False, context_score=True, reconstruction_term="mse_cos", **TINY)
    with pytest.raises(ValueError, match="context_hidden_share"):
        Fod(pre_trained=False, context_score=True, context_hidden_share=1.0, **TINY)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="context_query_share in \\(0, 1\\]"):
            Fod(pre_trained=False, context_score=True, context_query_share=share, **TINY)
    model = Fod(pre_trained=False, image_size=64, visualizer=False, context_score=True, **TINY, **WITHOUT_MAP_LEVELS)
    with pytest.raises(ValueError, match="use larger images or a smaller context_radius"):
        model.model.run_levels(model.model.extract_features(torch.rand(1, 3, 64, 64)))


def test_the_exported_graph_carries_the_context_score(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("onnxscript")
    model, _ = fitted_model()
    path = model.to_onnx(tmp_path)  # any input size: the graph resizes to the training size
    images = torch.rand(3, 3, 120, 150, generator=torch.Generator().manual_seed(3))
    assert_exports_reproduce(model, path, images, {"rtol": 1e-4, "atol": 0}, 1e-5)


@pytest.mark.slow
def test_a_fit_with_the_context_score_reloads_from_its_checkpoint(dummy_dataset, tmp_path) -> None:  # noqa: ANN001
    from lightning.pytorch import seed_everything

    from fod_helpers import EVAL_BATCH, TRAIN_BATCH, make_datamodule, make_engine

    seed_everything(0, workers=True)
    datamodule = make_datamodule(dummy_dataset.parent, dummy_dataset.name, TRAIN_BATCH, EVAL_BATCH)
    model = Fod(pre_processor=Fod.configure_pre_processor((SIZE, SIZE)), visualizer=False, training_steps=4,
                context_score=True, context_steps=30, **TINY)
    engine = make_engine(tmp_path, max_epochs=10)
    engine.fit(model, datamodule=datamodule)
    assert all(level.fitted for level in model.model.anomaly_map_generator.context)
    predictions = engine.predict(model, datamodule=datamodule)
    checkpoint = engine.trainer.checkpoint_callback.best_model_path
    reloaded = Fod.load_from_checkpoint(checkpoint)
    assert reloaded.model.settings.context_score and reloaded.model.settings.context_steps == 30
    again = engine.predict(reloaded, datamodule=datamodule)
    for first, second in zip(predictions, again, strict=True):
        torch.testing.assert_close(second.pred_score, first.pred_score)
        torch.testing.assert_close(second.anomaly_map, first.anomaly_map)


def test_a_training_set_too_large_to_keep_is_refused_before_training(monkeypatch) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from anomalib_fod.models.fod import callbacks

    model, features = fitted_model(context_steps=0)
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=list(range(100))))
    tokens = sum(f.shape[-2] * f.shape[-1] * f.shape[1] for f in features)
    needed = 3 * 4 * 100 * 3 * tokens  # three float32 copies of 100 images at three gains
    callback = callbacks.ResidualStatisticsCallback()
    assert_budget_is_the_boundary(
        monkeypatch, "CONTEXT_BUDGET_BYTES", needed, lambda: callback.on_train_start(trainer, model), "300 images"
    )


def test_the_explanation_shows_the_context_score_the_model_uses(tmp_path) -> None:  # noqa: ANN001
    import numpy as np

    from anomalib_fod.explain import render_explanation

    model, _ = fitted_model()
    passes = []
    hooks = [level.predictor.register_forward_hook(lambda *_: passes.append(1))
             for level in model.model.anomaly_map_generator.context]
    explanation = explain_random_image(model, tmp_path, SIZE)
    for hook in hooks:
        hook.remove()
    # one predictor pass per level gives the map and the panels (the helper's own forward adds one per level)
    assert len(passes) == 2 * len(hooks)
    for parts, level in zip(explanation.components, model.model.anomaly_map_generator.context, strict=True):
        assert set(parts) == {"rec", "context", "score"}
        rec_z = (parts["rec"] - level.rec_mean.reshape(parts["rec"].shape).numpy()) / level.rec_std.reshape(
            parts["rec"].shape).numpy()
        np.testing.assert_allclose(parts["score"], rec_z + parts["context"], rtol=1e-4, atol=1e-4)
    assert render_explanation(explanation, tmp_path / "figure.png").is_file()


def test_a_refit_keeps_the_trained_predictor_and_refits_its_units() -> None:
    model, features = fitted_model(context_steps=10)
    level = model.model.anomaly_map_generator.context[0]
    predictor = {k: v.clone() for k, v in level.predictor.state_dict().items()}
    whitening, units = level.whitening.clone(), level.rec_mean.clone()
    # the Transformers moved on: the reconstruction residuals, and so their z-units, change
    with torch.no_grad():
        for parameter in model.model.levels.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    kept = KeptLevels([], [], [])
    fit_statistics(model.model, [features], keep=kept)
    fit_context(model.model, kept, torch.device("cpu"), progress=False, train=False)
    for key, value in level.predictor.state_dict().items():
        torch.testing.assert_close(value, predictor[key], rtol=0, atol=0)
    torch.testing.assert_close(level.whitening, whitening, rtol=0, atol=0)
    assert not torch.allclose(level.rec_mean, units)
    # without a trained predictor a refit trains one
    untrained, _ = fitted_model(context_steps=0)
    untrained.model.anomaly_map_generator.context[0].ctx_std = torch.empty(0)
    before = {k: v.clone() for k, v in untrained.model.anomaly_map_generator.context[0].predictor.state_dict().items()}
    untrained.model.settings = dataclasses.replace(untrained.model.settings, context_steps=5)
    kept = KeptLevels([], [], [])
    fit_statistics(untrained.model, [features], keep=kept)
    fit_context(untrained.model, kept, torch.device("cpu"), progress=False, train=False)
    after = untrained.model.anomaly_map_generator.context[0].predictor.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())
