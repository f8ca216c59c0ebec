"""Property-based tests of FOD's correlation maths and scoring (hypothesis).

Each property is checked on a few dozen drawn cases (``max_examples=30``) including the extremes
that break naive implementations: sigma logits of +-1e3 (sigma -> ~1e-5 or ~2, i.e. a one-hot or
a wide prior), one-hot and uniform maps with exact zeros, 1x1 to 8x8 token grids, and KLs of 1e4.
"""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anomalib_fod.models.fod.anomaly_map import AnomalyMapGenerator
from anomalib_fod.models.fod.correlation import (
    LOG_EPS,
    entropy,
    gaussian_target,
    separable_gaussian_target,
    sigma_from_logits,
    symmetric_kl,
)
from anomalib_fod.models.fod.settings import FodSettings, ScoringMode
from anomalib_fod.models.fod.transformer import (
    BranchStats,
    LevelOutput,
    grid_coordinates,
    grid_geometry,
    squared_distances,
)

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROW_SUM_TOL = 1e-5  # float32 sums of up to 64 terms

grid_side = st.integers(min_value=1, max_value=8)
# Finite sigma logits over the full range the sigma projection could produce, with the extremes
# (+-1e3) drawn often: sigmoid(5 * 1e3) saturates, sigma is then 3 ** 1e-5 - 1 ~ 1.1e-5 or ~2.
sigma_logit = st.one_of(
    st.floats(-1e3, 1e3, width=32),
    st.sampled_from([-1e3, -50.0, -1.0, 0.0, 1.0, 50.0, 1e3]),
)


def _logits(draw: st.DrawFn, batch: int, heads: int, length: int) -> torch.Tensor:
    values = draw(arrays(np.float32, (batch, heads, length, 2), elements=sigma_logit))
    return torch.from_numpy(values)


@st.composite
def sigma_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    """``(B, H, L, 2)`` sigmas from finite logits, for an ``h x w`` query grid."""
    height, width = draw(grid_side), draw(grid_side)
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return sigma_from_logits(_logits(draw, batch, heads, height * width)), height, width


def _assert_row_stochastic(target: torch.Tensor) -> None:
    assert torch.isfinite(target).all()
    assert (target >= 0).all()
    sums = target.double().sum(dim=-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=ROW_SUM_TOL), float((sums - 1).abs().max())


@PROPERTY_SETTINGS
@given(sigma_cases())
def test_gaussian_target_rows_sum_to_one(case):
    sigma, height, width = case
    coords = grid_coordinates(height, width)
    target = gaussian_target(sigma, *squared_distances(coords, coords))
    assert target.shape == (*sigma.shape[:3], height * width)
    _assert_row_stochastic(target)


@PROPERTY_SETTINGS
@given(sigma_cases(), st.integers(1, 8), st.data())
def test_gaussian_target_off_grid_keys_rows_sum_to_one(case, num_keys, data):
    """Coreset references sit anywhere: even when every key is far from a query, rows sum to 1."""
    sigma, height, width = case
    keys = torch.from_numpy(data.draw(arrays(np.float32, (num_keys, 2), elements=st.floats(-20, 20, width=32))))
    target = gaussian_target(sigma, *squared_distances(grid_coordinates(height, width), keys))
    assert target.shape == (*sigma.shape[:3], num_keys)
    _assert_row_stochastic(target)


@PROPERTY_SETTINGS
@given(sigma_cases())
def test_separable_gaussian_target_rows_sum_to_one_and_match_full(case):
    sigma, height, width = case
    coords = grid_coordinates(height, width)
    geometry = grid_geometry(coords, height, width)
    target = separable_gaussian_target(sigma, geometry.rows, geometry.cols)
    assert target.shape == (*sigma.shape[:3], height * width)
    _assert_row_stochastic(target)
    full = gaussian_target(sigma, *squared_distances(coords, coords))
    assert torch.allclose(target, full, atol=1e-5)


@st.composite
def row_stochastic_maps(draw: st.DrawFn, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``(B, H, L, S)`` maps whose rows sum to 1: smooth, peaked, one-hot or with exact zeros."""
    if shape is None:
        shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 16)))
    kind = draw(st.sampled_from(["softmax", "weights"]))
    if kind == "softmax":  # a scale of 1e3 makes rows one-hot with exact zeros elsewhere
        logits = draw(arrays(np.float32, shape, elements=st.floats(-5, 5, width=32)))
        scale = draw(st.sampled_from([0.0, 1.0, 10.0, 1e3]))
        return torch.softmax(torch.from_numpy(logits).double() * scale, dim=-1).float()
    weights = draw(arrays(np.float64, shape, elements=st.one_of(st.just(0.0), st.floats(0, 1e6))))
    weights[..., 0] += 1e-3  # every row needs some mass
    weights = torch.from_numpy(weights)
    return (weights / weights.sum(dim=-1, keepdim=True)).float()


@st.composite
def map_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    first = draw(row_stochastic_maps())
    return first, draw(row_stochastic_maps(tuple(first.shape)))


@PROPERTY_SETTINGS
@given(map_pairs())
def test_symmetric_kl_is_non_negative(pair):
    # Each key contributes (p - q) * (log(p + eps) - log(q + eps)): both factors have the same sign.
    p, q = pair
    kl = symmetric_kl(p, q)
    assert kl.shape == (p.shape[0], p.shape[2])
    assert torch.isfinite(kl).all()
    assert (kl >= -1e-6).all(), float(kl.min())
    assert torch.allclose(kl, symmetric_kl(q, p), atol=1e-5)


@PROPERTY_SETTINGS
@given(row_stochastic_maps())
def test_symmetric_kl_of_a_map_with_itself_is_zero(p):
    assert torch.all(symmetric_kl(p, p) == 0)


@PROPERTY_SETTINGS
@given(row_stochastic_maps())
def test_entropy_is_within_its_bounds(p):
    # entropy() computes -sum p log(p + eps) with eps = LOG_EPS = 1e-4 inside the log. Since
    # log(p + eps) >= log(p), it never exceeds the true entropy, hence <= log S. It can dip below 0
    # only where p + eps > 1 (a near one-hot row): there -p log(p + eps) >= -log(1 + eps) > -eps,
    # so the lower bound is -1e-4 rather than 0. The 1e-6 slack on both bounds is float32 rounding
    # (a one-hot row gives -log(float32(1 + 1e-4)) = -1.00012e-4).
    ent = entropy(p)
    size = p.shape[-1]
    assert torch.isfinite(ent).all()
    assert (ent >= -LOG_EPS - 1e-6).all(), float(ent.min())
    assert (ent <= math.log(size) + 1e-6).all(), (float(ent.max()), math.log(size))


# ----------------------------------------------------------------------------------------------
# Scoring: finite token inputs and finite (possibly huge) KLs give finite maps and scores.

finite_feature = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([0.0, -1e6, 1e6]))
finite_kl = st.one_of(st.floats(0, 1e4, width=32), st.sampled_from([0.0, 1e-12, 1e4]))


@st.composite
def level_inputs(draw: st.DrawFn, batch: int, branches: tuple[bool, bool], height: int, width: int):
    """Tokens ``(B, L, C)`` and a hand-built :class:`LevelOutput` with random finite statistics."""
    channels = draw(st.integers(1, 4))
    length = height * width
    tokens = torch.from_numpy(draw(arrays(np.float32, (batch, length, channels), elements=finite_feature)))
    reconstruction = torch.from_numpy(draw(arrays(np.float32, (batch, length, channels), elements=finite_feature)))
    output = LevelOutput(reconstruction=reconstruction)
    num_layers = draw(st.integers(1, 3))
    for enabled, stats in zip(branches, (output.intra, output.inter), strict=True):
        if not enabled:
            continue
        for _ in range(num_layers):
            kl = torch.from_numpy(draw(arrays(np.float32, (batch, length), elements=finite_kl)))
            ent = torch.from_numpy(draw(arrays(np.float32, (batch, length), elements=st.floats(0, 5, width=32))))
            stats.append(BranchStats(kl_attention=kl, kl_target=kl, entropy=ent))
    return tokens, output


@PROPERTY_SETTINGS
@given(
    scoring=st.sampled_from(get_args(ScoringMode)),
    term=st.sampled_from(["mse_cos", "cos", "mse"]),  # the whitened residual needs fitted statistics
    branches=st.sampled_from([(True, True), (True, False), (False, True)]),
    blur_sigma=st.sampled_from([0.0, 1.0, 4.0]),
    batch=st.integers(1, 2),
    grids=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=2),
    data=st.data(),
)
def test_anomaly_map_generator_is_finite(scoring, term, branches, blur_sigma, batch, grids, data):
    weight = st.floats(0, 10, allow_nan=False, allow_infinity=False)
    weights = data.draw(st.none() | st.lists(weight, min_size=len(grids), max_size=len(grids)).filter(any))
    generator = AnomalyMapGenerator(
        FodSettings(
            scoring=scoring,
            reconstruction_term=term,
            with_intra=branches[0],
            with_inter=branches[1],
            blur_sigma=blur_sigma,
            map_level_weights=weights,
        )
    )
    tokens, outputs = [], []
    for height, width in grids:
        level_tokens, output = data.draw(level_inputs(batch, branches, height, width))
        tokens.append(level_tokens)
        outputs.append(output)
        scores = generator.token_scores(level_tokens, output)
        assert scores.shape == (batch, height * width)
        assert torch.isfinite(scores).all()
        if scoring != "rec":
            div = generator.divergence_score(output)
            assert torch.isfinite(div).all()
            assert (div >= 0).all() and (div <= 1).all()
    image_size = (32, 40)  # >= 2 * the blur's reflect padding (16 at sigma 4), as at >= 64 px input
    anomaly_map, pred_score = generator(tokens, outputs, grids, image_size)
    assert anomaly_map.shape == (batch, 1, *image_size)
    assert pred_score.shape == (batch,)
    assert torch.isfinite(anomaly_map).all()
    assert torch.isfinite(pred_score).all()
    assert torch.equal(pred_score, anomaly_map.amax(dim=(-2, -1)).flatten())
