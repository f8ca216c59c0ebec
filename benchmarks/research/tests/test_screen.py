"""``benchmarks/research/screen.py`` observes what its candidates read, whatever ``Fod()``'s own default score is."""

from __future__ import annotations


import pytest
import torch

from fod_helpers import TINY

from screen import build_model, candidates, observe, train_stats  # noqa: E402


def test_screen_observes_the_divergence_and_scores_every_candidate() -> None:
    torch.manual_seed(0)
    model = build_model((64, 64), {"pre_trained": False, **TINY})
    fod = model.model
    features = fod.extract_features(torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    fod.set_mean_reference([f.mean(dim=0) for f in features])
    assert observe(fod, features, batch=4).hidden == []  # kept only when asked for
    observation = observe(fod, features, batch=4, keep_hidden=True)
    for level, tokens in enumerate(observation.tokens):
        assert observation.divergence[level].shape == tokens.shape[:2]
    # the hidden representation is what each level's norm and head turn into its reconstruction, batch by batch
    for level, (hidden, tokens) in enumerate(zip(observation.hidden, observation.tokens, strict=True)):
        assert hidden.shape[:2] == tokens.shape[:2]
        with torch.no_grad():
            reconstruction = fod.levels[level].head(fod.levels[level].norm(hidden))
        torch.testing.assert_close(tokens - reconstruction, observation.residual[level], rtol=1e-5, atol=1e-5)
    stats = train_stats(observation)
    for name, rule in candidates().items():
        for level, tokens in enumerate(observation.tokens):
            assert rule(observation, stats, level).shape == tokens.shape[:2], name


def test_screen_refuses_a_model_that_skips_the_divergence() -> None:
    model = build_model((64, 64), {"pre_trained": False, "scoring": "rec", **TINY})
    features = model.model.extract_features(torch.rand(2, 3, 64, 64))
    model.model.set_mean_reference([f.mean(dim=0) for f in features])
    with pytest.raises(ValueError, match="scoring='rec_div'"):
        observe(model.model, features)
