"""``context_radius``: a token's reconstruction is built from other tokens' values, never from its own.

The check is a Jacobian: with the mask, the reconstruction of token ``i`` must not change when a hidden
neighbour of ``i`` changes, and ``i`` itself reaches it only through its queries (which choose among the
values of the visible tokens and the references), on every path a model takes (training with the blocked
kernels, training with full maps, inference with the fused attention, inference with statistics). The
masked blocked kernels must still equal the plain computation over full maps.
"""

from __future__ import annotations

import pytest
import torch

from anomalib_fod.models.fod.blocked_attention import correlation_attention_inference, correlation_attention_training
from anomalib_fod.models.fod.correlation import correlation_stats, sigma_from_logits
from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.transformer import FodTransformer, context_mask, grid_coordinates, grid_geometry

HEIGHT, WIDTH, CHANNELS = 5, 6, 12


def level(radius: int | None, seed: int = 0) -> FodTransformer:
    torch.manual_seed(seed)
    model = FodTransformer(CHANNELS, 16, FodSettings(num_heads=4, context_radius=radius))
    model.set_reference(torch.randn(HEIGHT * WIDTH, CHANNELS), grid_coordinates(HEIGHT, WIDTH), (HEIGHT, WIDTH))
    return model


def blind_queries(model: FodTransformer) -> FodTransformer:
    """Queries that ignore the tokens (zero weights): what is left of a token's reach is its values'."""
    with torch.no_grad():
        for layer in model.layers:
            for attention in (layer.self_attention, layer.cross_attention):
                attention.query.weight.zero_()
    return model


def own_dependence(model: FodTransformer, need_stats: bool, keep_maps: bool = False) -> torch.Tensor:
    """``(L, L)``: how much token ``i``'s reconstruction moves with token ``j`` (summed |Jacobian|)."""
    tokens = torch.randn(1, HEIGHT * WIDTH, CHANNELS)

    def reconstruct(flat: torch.Tensor) -> torch.Tensor:
        output = model(flat.view(1, HEIGHT * WIDTH, CHANNELS), HEIGHT, WIDTH, need_stats, need_stats, keep_maps)
        return output.reconstruction.flatten()

    jacobian = torch.autograd.functional.jacobian(reconstruct, tokens.flatten())  # (L * C, L * C)
    return jacobian.view(HEIGHT * WIDTH, CHANNELS, HEIGHT * WIDTH, CHANNELS).abs().sum(dim=(1, 3))


def hidden(radius: int) -> torch.Tensor:
    return context_mask(grid_coordinates(HEIGHT, WIDTH), radius) < 0


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize(("training", "need_stats", "keep_maps"), [
    (True, True, False),  # training: blocked kernels with statistics
    (True, True, True),  # figures: full maps
    (False, False, False),  # inference of the default score: fused attention, no statistics
    (False, True, False),  # inference with the divergences: blocked kernels without autograd
])
def test_a_reconstruction_never_reads_the_hidden_tokens(
    radius: int, training: bool, need_stats: bool, keep_maps: bool
) -> None:
    dependence = own_dependence(level(radius).train(training), need_stats, keep_maps)
    neighbours = hidden(radius) & ~torch.eye(HEIGHT * WIDTH, dtype=torch.bool)
    assert dependence[neighbours].sum() == 0  # radius 0 hides no neighbour
    assert dependence.diagonal().min() > 0  # through its queries only (next check)
    assert (dependence[~hidden(radius)] > 0).float().mean() > 0.9  # the rest of the image does reach it
    blind = own_dependence(blind_queries(level(radius)).train(training), need_stats, keep_maps)
    assert blind[hidden(radius)].max() == 0
    assert (blind[~hidden(radius)] > 0).float().mean() > 0.9


def test_without_the_mask_a_token_reads_itself() -> None:
    """The checks above can fail: the paper's layer lets a token's own values reach its reconstruction."""
    blind = own_dependence(blind_queries(level(None)).train(False), need_stats=False)
    assert blind.diagonal().min() > 0


def test_the_mask_hides_a_square_window() -> None:
    mask = hidden(1).view(HEIGHT, WIDTH, HEIGHT, WIDTH)
    assert mask[2, 3].nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (2, 3, 4)]
    assert mask[0, 0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # clipped at the border
    assert hidden(0).view(HEIGHT * WIDTH, -1).equal(torch.eye(HEIGHT * WIDTH, dtype=torch.bool))


@pytest.mark.parametrize("block", [1, 7, 64])
def test_masked_blocked_kernels_match_the_plain_path(block: int) -> None:
    generator = torch.Generator().manual_seed(0)
    length, heads, dim = HEIGHT * WIDTH, 3, 8
    tensors = [torch.randn(2, heads, length, dim, generator=generator).requires_grad_(True) for _ in range(3)]
    sigma_logits = torch.randn(2, heads, length, 2, generator=generator).requires_grad_(True)
    coords = grid_coordinates(HEIGHT, WIDTH)
    geometry = grid_geometry(coords, HEIGHT, WIDTH)
    bias = context_mask(coords, 1)

    def plain() -> tuple[torch.Tensor, ...]:
        query, key, value = tensors
        attention = torch.softmax(query @ key.transpose(-2, -1) + bias, dim=-1)
        target = geometry.target(sigma_from_logits(sigma_logits))
        return (attention @ value, *correlation_stats(attention, target))

    def blocked() -> tuple[torch.Tensor, ...]:
        inv = 0.5 / sigma_from_logits(sigma_logits).square()
        return correlation_attention_training(*tensors, inv, geometry, block=block, bias=bias)

    def run(function):  # noqa: ANN001, ANN202
        for tensor in (*tensors, sigma_logits):
            tensor.grad = None
        outputs = function()
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
        sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)).backward()
        return [o.detach() for o in outputs], [t.grad.clone() for t in (*tensors, sigma_logits)]

    want_values, want_grads = run(plain)
    got_values, got_grads = run(blocked)
    for got, want in zip(got_values, want_values, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    with torch.no_grad():
        inv = 0.5 / sigma_from_logits(sigma_logits).square()
        out, kl, entropy = correlation_attention_inference(*tensors, inv, geometry, block=block, bias=bias)
    for got, want in zip((out, kl, entropy), (want_values[0], want_values[1], want_values[3]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings", [
    {"fusion": "concat_mlp"},
    {"with_intra": False},
    {"with_inter": False},
    {"num_layers": 2},
])
def test_layouts_that_leak_the_token_are_refused(settings: dict) -> None:
    with pytest.raises(ValueError, match="context_radius hides a token"):
        FodSettings(context_radius=1, **settings)


@pytest.mark.parametrize("radius", [-1, 1.5, True, "2"])
def test_a_bad_radius_is_refused(radius: object) -> None:
    with pytest.raises(ValueError, match="context_radius must be"):
        FodSettings(context_radius=radius)
