"""The per-level I2Correlation Transformer: shapes, branch ablations, reference checks."""

from __future__ import annotations

import pytest
import torch

from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.transformer import (
    BranchStats,
    FodTransformer,
    LevelOutput,
    grid_coordinates,
    sincos_embedding,
)

CHANNELS, D_MODEL, HEADS = 6, 16, 2


def make_level(with_intra: bool = True, with_inter: bool = True, num_layers: int = 2, **kwargs) -> FodTransformer:
    torch.manual_seed(0)
    settings = FodSettings(num_heads=HEADS, num_layers=num_layers, with_intra=with_intra, with_inter=with_inter, **kwargs)
    return FodTransformer(CHANNELS, D_MODEL, settings)


def give_reference(level: FodTransformer, height: int, width: int) -> None:
    level.set_reference(torch.randn(height * width, CHANNELS), grid_coordinates(height, width), (height, width))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("height", "width"), [(4, 4), (3, 5), (6, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_level_output_shapes(batch, height, width, training):
    level = make_level()
    give_reference(level, height, width)
    level.train(training)
    tokens = torch.randn(batch, height * width, CHANNELS)
    with torch.set_grad_enabled(training):
        output = level(tokens, height, width)
    assert isinstance(output, LevelOutput)
    assert output.reconstruction.shape == (batch, height * width, CHANNELS)
    assert len(output.intra) == len(output.inter) == 2  # one per layer
    for stats in [*output.intra, *output.inter]:
        assert isinstance(stats, BranchStats)
        for value in (stats.kl_attention, stats.kl_target, stats.entropy):
            assert value.shape == (batch, height * width)
            assert torch.isfinite(value).all()
        assert (stats.kl_attention >= 0).all()
        assert stats.maps is None
        torch.testing.assert_close(stats.kl_attention, stats.kl_target)


def test_keep_maps_returns_row_stochastic_maps():
    level = make_level()
    give_reference(level, 2, 3)
    level.eval()
    with torch.no_grad():
        output = level(torch.randn(2, 6, CHANNELS), 2, 3, keep_maps=True)
    intra_attention, intra_target = output.intra[0].maps
    inter_attention, inter_target = output.inter[0].maps
    assert intra_attention.shape == intra_target.shape == (2, HEADS, 6, 6)
    assert inter_attention.shape == inter_target.shape == (2, HEADS, 6, 6)
    for maps in (intra_attention, intra_target, inter_attention, inter_target):
        torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
    # a Gaussian prior peaks at the query's own position
    eye = torch.arange(6)
    assert torch.equal(intra_target.argmax(-1), eye.expand(2, HEADS, 6))
    assert torch.equal(inter_target.argmax(-1), eye.expand(2, HEADS, 6))


def test_coreset_references_at_arbitrary_positions():
    level = make_level(reference="coreset")
    positions = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    level.set_reference(torch.randn(4, CHANNELS), positions, (2, 3))
    level.eval()
    with torch.no_grad():
        output = level(torch.randn(2, 6, CHANNELS), 2, 3, keep_maps=True)
    inter_attention, inter_target = output.inter[0].maps
    assert inter_attention.shape == inter_target.shape == (2, HEADS, 6, 4)
    torch.testing.assert_close(inter_target.sum(-1), torch.ones(2, HEADS, 6))
    # two reference tokens at the same position get the same prior mass
    torch.testing.assert_close(inter_target[..., 2], inter_target[..., 3])


@pytest.mark.parametrize("training", [True, False])
def test_mean_reference_path_equals_general_path(training):
    """A full-grid reference in "mean" mode (factorised target) equals the general "coreset" path."""
    mean_level = make_level(reference="mean")
    general_level = make_level(reference="coreset")
    general_level.load_state_dict(mean_level.state_dict(), strict=False)
    give_reference(mean_level, 3, 4)
    general_level.set_reference(mean_level.ref_features, mean_level.ref_positions, (3, 4))
    tokens = torch.randn(2, 12, CHANNELS)
    mean_level.train(training)
    general_level.train(training)
    fast = mean_level(tokens, 3, 4, keep_maps=True)
    slow = general_level(tokens, 3, 4, keep_maps=True)
    torch.testing.assert_close(fast.reconstruction, slow.reconstruction)
    for a, b in zip([*fast.intra, *fast.inter], [*slow.intra, *slow.inter], strict=True):
        torch.testing.assert_close(a.kl_attention, b.kl_attention, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.kl_target, b.kl_target, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy)
        torch.testing.assert_close(a.maps[1], b.maps[1], rtol=1e-4, atol=1e-6)


def test_sincos_embedding_shape_and_range():
    emb = sincos_embedding(grid_coordinates(3, 5), 16)
    assert emb.shape == (15, 16)
    assert emb.abs().max() <= 1.0
    assert len({tuple(row.tolist()) for row in emb}) == 15  # every position distinct


def params_named(module: torch.nn.Module, word: str) -> list[str]:
    return [name for name, _ in module.named_parameters() if word in name]


def test_both_branches_build_both_attentions():
    level = make_level(True, True)
    assert level.ref_embedding is not None
    for layer in level.layers:
        assert layer.self_attention is not None and layer.self_attention.sigma is not None
        assert layer.cross_attention is not None and layer.cross_attention.sigma is not None


def test_intra_only_has_no_cross_attention():
    level = make_level(True, False)
    assert level.ref_embedding is None
    for layer in level.layers:
        assert layer.cross_attention is None
        assert layer.self_attention.sigma is not None
    assert not params_named(level, "cross_attention")
    # no reference needed
    output = level(torch.randn(2, 12, CHANNELS), 3, 4)
    assert len(output.intra) == 2 and output.inter == []


def test_inter_only_has_no_self_attention():
    level = make_level(False, True)
    assert level.ref_embedding is not None
    for layer in level.layers:
        assert layer.self_attention is None
        assert layer.cross_attention.sigma is not None
    assert not params_named(level, "self_attention")
    give_reference(level, 3, 4)
    output = level(torch.randn(2, 12, CHANNELS), 3, 4)
    assert output.intra == [] and len(output.inter) == 2


def test_patch_only_is_plain_self_attention_without_targets():
    level = make_level(False, False)
    assert level.ref_embedding is None
    assert not params_named(level, "sigma")
    for layer in level.layers:
        assert layer.cross_attention is None
        assert layer.self_attention is not None and layer.self_attention.sigma is None
    assert not level.has_reference  # and it does not need one
    output = level(torch.randn(3, 12, CHANNELS), 3, 4)
    assert output.intra == [] and output.inter == []
    assert output.reconstruction.shape == (3, 12, CHANNELS)


def test_missing_reference_is_a_clear_runtime_error():
    level = make_level()
    assert not level.has_reference
    with pytest.raises(RuntimeError, match="reference features are missing"):
        level(torch.randn(1, 12, CHANNELS), 3, 4)
    level.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="reference features are missing"):
        level(torch.randn(1, 12, CHANNELS), 3, 4)


def test_reference_grid_mismatch_is_a_clear_runtime_error():
    level = make_level()
    give_reference(level, 3, 4)
    level(torch.randn(1, 12, CHANNELS), 3, 4)  # fine
    with pytest.raises(RuntimeError, match="3x4 token grid"):
        level(torch.randn(1, 20, CHANNELS), 4, 5)
    with pytest.raises(RuntimeError, match="3x4 token grid"):
        level(torch.randn(1, 12, CHANNELS), 4, 3)  # same token count, other grid


def test_reference_channel_mismatch_is_a_runtime_error():
    level = make_level()
    level.set_reference(torch.randn(12, CHANNELS + 1), grid_coordinates(3, 4), (3, 4))
    with pytest.raises(RuntimeError, match="channels"):
        level(torch.randn(1, 12, CHANNELS), 3, 4)


def test_reference_buffers_are_state():
    level = make_level()
    give_reference(level, 3, 4)
    state = level.state_dict()
    assert state["ref_features"].shape == (12, CHANNELS)
    assert state["ref_positions"].shape == (12, 2)
    assert state["ref_grid"].tolist() == [3, 4]
    fresh = make_level()
    fresh.load_state_dict(state)  # DynamicBufferMixin resizes the empty buffers
    assert torch.equal(fresh.ref_features, level.ref_features)
    assert fresh.has_reference


def test_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        FodTransformer(CHANNELS, 18, FodSettings(num_heads=2))
    with pytest.raises(ValueError, match="divisible"):
        FodTransformer(CHANNELS, 16, FodSettings(num_heads=3))
