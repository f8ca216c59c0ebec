"""FodModel / Fod: any input size and batch size, output shapes, ablations, bad settings."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch
from fod_helpers import PAPER_SCORE, TINY, set_random_references

from anomalib_fod import Fod
from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.torch_model import FodModel, FodTrainOutput

SIZES = [(64, 64), (96, 128), (128, 96), (72, 100)]  # the last is not a multiple of the stride 16


@pytest.fixture(scope="module")
def model() -> FodModel:
    torch.manual_seed(0)
    return FodModel(FodSettings(pre_trained=False, **TINY, **PAPER_SCORE))


def expected_grids(height: int, width: int) -> list[tuple[int, int]]:
    # tf_efficientnet_lite0 pads "same": a stride-s stage gives ceil(size / s) tokens per side
    return [(-(-height // s), -(-width // s)) for s in (8, 16)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_any_input_size_and_batch(model, height, width):
    set_random_references(model, height, width)
    channels = model.feature_extractor.channels
    for batch in (1, 3):
        images = torch.randn(batch, 3, height, width)
        model.train()
        output = model(images)
        assert isinstance(output, FodTrainOutput)
        assert output.grids == expected_grids(height, width)
        for tokens, level, (h, w), c in zip(output.tokens, output.levels, output.grids, channels, strict=True):
            assert tokens.shape == (batch, h * w, c)
            assert level.reconstruction.shape == (batch, h * w, c)
            assert len(level.intra) == len(level.inter) == TINY["num_layers"]
            assert level.inter[0].kl_attention.shape == (batch, h * w)

        model.eval()
        with torch.no_grad():
            prediction = model(images)
        assert isinstance(prediction, InferenceBatch)
        assert prediction.pred_score.shape == (batch,)
        assert prediction.anomaly_map.shape == (batch, 1, height, width)
        assert prediction.pred_label is None and prediction.pred_mask is None
        assert torch.isfinite(prediction.anomaly_map).all()
        assert (prediction.anomaly_map >= 0).all()  # rec >= 0 and div >= 0
        torch.testing.assert_close(prediction.pred_score, prediction.anomaly_map.amax(dim=(1, 2, 3)))


def test_prediction_does_not_depend_on_the_batch(model):
    set_random_references(model, 64, 64)
    model.eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model(images)
        alone = [model(images[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(together.pred_score, torch.cat([a.pred_score for a in alone]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        together.anomaly_map, torch.cat([a.anomaly_map for a in alone]), rtol=1e-4, atol=1e-6
    )


def test_missing_reference_is_a_clear_runtime_error():
    fresh = FodModel(FodSettings(pre_trained=False, **TINY)).eval()
    assert not fresh.has_reference
    with torch.no_grad(), pytest.raises(RuntimeError, match="reference features are missing"):
        fresh(torch.randn(1, 3, 64, 64))


def test_other_input_size_than_the_references_is_a_clear_runtime_error(model):
    set_random_references(model, 64, 64)
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="8x8 token grid.*12x12"):
        model(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize(
    ("with_intra", "with_inter", "scoring"),
    [(False, False, "rec"), (True, False, "rec_div"), (True, False, "div"), (False, True, "div"), (True, True, "rec")],
)
def test_ablations_build_the_right_modules_and_predict(with_intra, with_inter, scoring):
    torch.manual_seed(0)
    ablation = FodModel(
        FodSettings(
            pre_trained=False,
            with_intra=with_intra,
            with_inter=with_inter,
            scoring=scoring,
            reconstruction_term="mse_cos",
            **TINY,
        )
    )
    names = [name for name, _ in ablation.named_parameters()]
    assert any("cross_attention" in n for n in names) == with_inter
    assert any("ref_embedding" in n for n in names) == with_inter
    assert any("self_attention" in n for n in names) == (with_intra or not with_inter)
    assert any("sigma" in n for n in names) == (with_intra or with_inter)
    if with_inter:
        set_random_references(ablation, 64, 64)
    else:
        assert ablation.has_reference  # nothing to compute: usable without the callback
    images = torch.randn(2, 3, 64, 64)
    ablation.train()
    output = ablation(images)
    for level in output.levels:
        assert bool(level.intra) == with_intra
        assert bool(level.inter) == with_inter
    ablation.eval()
    with torch.no_grad():
        prediction = ablation(images)
    assert prediction.pred_score.shape == (2,)
    assert prediction.anomaly_map.shape == (2, 1, 64, 64)
    assert torch.isfinite(prediction.anomaly_map).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scoring": "foo"}, "scoring"),
        ({"reconstruction_term": "l1"}, "reconstruction_term"),
        ({"reference": "foo"}, "reference"),
        ({"scoring": "div", "with_intra": False, "with_inter": False}, "branch"),
        ({"scoring": "rec_div", "with_intra": False, "with_inter": False}, "branch"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"d_models": (30, 64)}, "multiple of 4"),
        ({"d_models": (32, 64, 128)}, "d_models"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fod(pre_trained=False, **{**TINY, **kwargs})


def test_fod_defaults_are_the_papers_shapes_with_one_layer_a_calibrated_score_and_a_step_budget():
    fod = Fod(pre_trained=False)
    hparams = fod.hparams
    assert tuple(hparams.d_models) == (256, 512)
    assert (hparams.num_heads, hparams.ffn_ratio) == (8, 4)
    assert (hparams.kl_weight, hparams.entropy_weight) == (0.5, 0.5)
    assert hparams.reference == "mean"
    # Not the paper's: the whitened residual, one layer and 250 optimizer steps (docs/differences.md).
    assert (hparams.scoring, hparams.reconstruction_term, hparams.training_steps) == ("rec", "mahalanobis", 250)
    assert hparams.num_layers == 1
    assert all(len(level.layers) == 1 for level in fod.model.levels)
    assert fod.model.anomaly_map_generator.needs_statistics
    assert fod.stops_itself
    assert hparams.learning_rate == 1e-4
    # The paper's code computes the attention output projection and discards it; so do we (docs/differences.md).
    assert hparams.out_projection is False
    attention = fod.model.levels[0].layers[0].self_attention
    assert isinstance(attention.proj, torch.nn.Identity)
    assert fod.trainer_arguments["num_sanity_val_steps"] == 0
    # only the Transformers are optimised
    optimizer = fod.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in fod.model.levels.parameters()}


def _step_warnings(fod: Fod, steps: float, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What ``_warn_few_steps`` logs when the trainer would run ``steps`` optimizer steps."""
    import logging
    from types import SimpleNamespace

    fod._trainer = SimpleNamespace(estimated_stepping_batches=steps)  # noqa: SLF001 - only this property is read
    with caplog.at_level(logging.WARNING, logger="anomalib_fod.models.fod.lightning_model"):
        fod._warn_few_steps()  # noqa: SLF001
    return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(("steps", "warns"), [(150, True), (200, False), (float("inf"), False)])
def test_too_few_optimizer_steps_warn(steps, warns, caplog):
    messages = _step_warnings(Fod(pre_trained=False, training_steps=None, **TINY), steps, caplog)
    assert bool(messages) == warns
    if warns:
        assert "only 150 optimizer steps" in messages[0]
        assert "train_batch_size" in messages[0]


@pytest.mark.parametrize(("steps", "warnings"), [(100, 2), (240, 1), (250, 0), (float("inf"), 0)])
def test_the_default_step_budget_warns_when_the_trainer_stops_first(steps, warnings, caplog):
    messages = _step_warnings(Fod(pre_trained=False, **TINY), steps, caplog)
    assert len(messages) == warnings
    if warnings:
        assert f"after {steps} optimizer steps, before training_steps=250" in messages[0]


def test_reconstruction_term_rescores_the_same_trained_outputs(model):
    """``reconstruction_term`` changes only what ``rec`` is: MSE + (1 - cos), 1 - cos, or MSE."""
    import torch.nn.functional as F  # noqa: N812, PLC0415

    from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator  # noqa: PLC0415

    set_random_references(model, 64, 64)
    model.eval()
    with torch.no_grad():
        features = model.extract_features(torch.randn(2, 3, 64, 64))
        run = model.run_levels(features)
    tokens, level = run.tokens[0], run.levels[0]
    mse = (tokens - level.reconstruction).square().mean(dim=-1)
    cos = 1.0 - F.cosine_similarity(tokens, level.reconstruction, dim=-1)
    expected = {"mse_cos": mse + cos, "cos": cos, "mse": mse}
    div = AnomalyMapGenerator().divergence_score(level)
    for term, rec in expected.items():
        for scoring, want in (("rec", rec), ("rec_div", rec * div)):
            generator = AnomalyMapGenerator(FodSettings(scoring=scoring, reconstruction_term=term))
            torch.testing.assert_close(generator.token_scores(tokens, level), want)
    maps = {
        term: AnomalyMapGenerator(FodSettings(reconstruction_term=term))(run.tokens, run.levels, run.grids, (64, 64))[0]
        for term in expected
    }
    assert not torch.allclose(maps["cos"], maps["mse_cos"]) and not torch.allclose(maps["mse"], maps["mse_cos"])


def test_reconstruction_term_can_be_changed_when_loading_a_checkpoint(tmp_path):
    fod = Fod(pre_trained=False, visualizer=False, **TINY)
    set_random_references(fod.model, 64, 64)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": fod.state_dict(), "hyper_parameters": dict(fod.hparams), "pytorch-lightning_version": "2.6.0"}, path)
    rescored = Fod.load_from_checkpoint(path, reconstruction_term="cos")
    assert rescored.model.anomaly_map_generator.reconstruction_term == "cos"
    assert rescored.hparams["reconstruction_term"] == "cos"
