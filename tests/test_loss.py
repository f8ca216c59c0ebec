"""FOD's minimax loss: the stage-1/stage-2 formula, the detach pattern and where gradients go."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_fod.models.fod.correlation import entropy, symmetric_kl
from anomalib_fod.models.fod.loss import FodLoss, reconstruction_loss
from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.torch_model import FodModel
from anomalib_fod.models.fod.transformer import BranchStats, FodTransformer, LevelOutput, branch_stats, grid_coordinates

from fod_helpers import TINY, set_random_references


def moved(grad: torch.Tensor | None) -> bool:
    """Whether a gradient exists and is not all zeros."""
    return grad is not None and bool(grad.abs().max() > 0)


def constant_stats(kl_attention: float, kl_target: float, ent: float, shape=(2, 3)) -> BranchStats:
    return BranchStats(
        kl_attention=torch.full(shape, kl_attention),
        kl_target=torch.full(shape, kl_target),
        entropy=torch.full(shape, ent),
    )


def test_reconstruction_loss_hand_computed():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    recon = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    # MSE over all 4 entries: (0 + 1 + 0 + 0) / 4; cosine: token 0 -> 1/sqrt(2), token 1 -> 1
    expected = 0.25 + ((1 - 1 / math.sqrt(2)) + 0.0) / 2
    assert reconstruction_loss(tokens, recon).item() == pytest.approx(expected, rel=1e-6)
    assert reconstruction_loss(tokens, tokens).item() == pytest.approx(0.0, abs=1e-6)


def test_fod_loss_combines_the_two_stages():
    """total = stage1 + stage2 per level, summed over levels (hand-expanded)."""
    l1, l2 = 0.3, 0.7
    loss = FodLoss(kl_weight=l1, entropy_weight=l2)
    tokens = [torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.ones(1, 1, 3)]
    recons = [torch.tensor([[[1.0, 1.0], [0.0, 2.0]]]), torch.ones(1, 1, 3)]
    rec = [reconstruction_loss(t, r).item() for t, r in zip(tokens, recons, strict=True)]
    outputs = [
        LevelOutput(
            recons[0],
            intra=[constant_stats(1.0, 2.0, 3.0), constant_stats(3.0, 4.0, 5.0)],  # layer means: 2, 3, 4
            inter=[constant_stats(0.5, 0.25, 1.5)],
        ),
        LevelOutput(recons[1], intra=[constant_stats(1.0, 1.0, 1.0)], inter=[constant_stats(2.0, 2.0, 2.0)]),
    ]
    total, parts = loss(tokens, outputs)

    def level(rec_, intra, inter):  # intra/inter = (kl_attention, kl_target, entropy)
        stage1 = rec_ + l1 * intra[1] - l1 * inter[1]
        stage2 = rec_ - l1 * intra[0] - l2 * intra[2] + l1 * inter[0] + l2 * inter[2]
        return stage1 + stage2

    expected = level(rec[0], (2.0, 3.0, 4.0), (0.5, 0.25, 1.5)) + level(rec[1], (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["rec"].item() == pytest.approx(rec[0] + rec[1], rel=1e-6)
    assert parts["intra_kl"].item() == pytest.approx(2.0 + 1.0)
    assert parts["inter_kl"].item() == pytest.approx(0.5 + 2.0)
    assert parts["intra_entropy"].item() == pytest.approx(4.0 + 1.0)
    assert parts["inter_entropy"].item() == pytest.approx(1.5 + 2.0)
    assert all(not value.requires_grad for value in parts.values())

    without_entropy, _ = FodLoss(kl_weight=l1, entropy_weight=l2, with_entropy=False)(tokens, outputs)
    expected_no_entropy = expected - (-l2 * 4.0 + l2 * 1.5) - (-l2 * 1.0 + l2 * 2.0)
    assert without_entropy.item() == pytest.approx(expected_no_entropy, rel=1e-6)


def test_patch_only_loss_is_reconstruction():
    tokens = [torch.randn(2, 5, 4), torch.randn(2, 3, 6)]
    recons = [torch.randn(2, 5, 4), torch.randn(2, 3, 6)]
    total, parts = FodLoss()(tokens, [LevelOutput(r) for r in recons])
    expected = sum(reconstruction_loss(t, r) for t, r in zip(tokens, recons, strict=True))
    torch.testing.assert_close(total, expected)
    assert parts["intra_kl"] == 0 and parts["inter_kl"] == 0


def peaked_maps(*shape: int, seed: int) -> torch.Tensor:
    """Row-stochastic maps with some rows nearly one-hot (entries far below the 1e-4 eps)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator) * 4.0
    logits[..., 0, :] *= 10.0
    return logits


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_branch_stats_values_match_the_formulas(grad_enabled):
    attention = torch.softmax(peaked_maps(2, 3, 5, 7, seed=0), dim=-1)
    target = torch.softmax(peaked_maps(2, 3, 5, 7, seed=1), dim=-1)
    with torch.set_grad_enabled(grad_enabled):
        stats = branch_stats(attention.requires_grad_(grad_enabled), target.requires_grad_(grad_enabled))
    expected_kl = symmetric_kl(target.detach(), attention.detach())
    torch.testing.assert_close(stats.kl_attention.detach(), expected_kl)
    torch.testing.assert_close(stats.kl_target.detach(), expected_kl)
    torch.testing.assert_close(stats.entropy.detach(), entropy(attention.detach()))


def test_branch_stats_gradients_follow_the_detach_pattern():
    """Gradients equal autograd through KL(t.detach(), a), KL(t, a.detach()) and H(a)."""
    attention_logits = peaked_maps(2, 3, 5, 7, seed=2).requires_grad_(True)
    target_logits = peaked_maps(2, 3, 5, 7, seed=3).requires_grad_(True)
    generator = torch.Generator().manual_seed(4)
    weights = [torch.randn(2, 5, generator=generator) for _ in range(3)]

    def grads(kl_attention, kl_target, ent):
        objective = sum((w * v).sum() for w, v in zip(weights, (kl_attention, kl_target, ent), strict=True))
        return torch.autograd.grad(objective, (attention_logits, target_logits))

    attention = torch.softmax(attention_logits, dim=-1)
    target = torch.softmax(target_logits, dim=-1)
    stats = branch_stats(attention, target)
    got = grads(stats.kl_attention, stats.kl_target, stats.entropy)
    attention = torch.softmax(attention_logits, dim=-1)
    target = torch.softmax(target_logits, dim=-1)
    want = grads(symmetric_kl(target.detach(), attention), symmetric_kl(target, attention.detach()), entropy(attention))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)

    # each statistic alone reaches only its side
    for statistic, reaches_attention, reaches_target in (
        ("kl_attention", True, False),
        ("kl_target", False, True),
        ("entropy", True, False),
    ):
        stats = branch_stats(torch.softmax(attention_logits, -1), torch.softmax(target_logits, -1))
        objective = getattr(stats, statistic).sum()
        g_attention, g_target = torch.autograd.grad(objective, (attention_logits, target_logits), allow_unused=True)
        assert moved(g_attention) == reaches_attention, statistic
        assert moved(g_target) == reaches_target, statistic


# --- the detach pattern inside a Transformer -------------------------------------------------------

CHANNELS, LAYERS = 6, 2


@pytest.fixture
def level_and_output():
    torch.manual_seed(0)
    level = FodTransformer(CHANNELS, 16, FodSettings(num_heads=2, num_layers=LAYERS))
    level.set_reference(torch.randn(12, CHANNELS), grid_coordinates(3, 4), (3, 4))
    level.train()
    return level, level(torch.randn(2, 12, CHANNELS), 3, 4)


def attention_modules(level: FodTransformer, index: int) -> list[torch.nn.Module]:
    layer = level.layers[index]
    return [m for m in (layer.self_attention, layer.cross_attention) if m is not None]


def gradients(objective: torch.Tensor, module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    names, params = zip(*module.named_parameters(), strict=True)
    grads = torch.autograd.grad(objective, params, allow_unused=True, retain_graph=True)
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("index", range(LAYERS))
def test_kl_target_moves_only_the_sigma_projection(level_and_output, index):
    level, output = level_and_output
    objective = output.intra[index].kl_target.sum() + output.inter[index].kl_target.sum()
    grads = gradients(objective, level)
    own = [n for n in grads if n.startswith((f"layers.{index}.self_attention.", f"layers.{index}.cross_attention."))]
    assert len([n for n in own if "sigma" in n]) == 4  # weight and bias of both priors
    for name in own:
        if "sigma" in name:
            assert moved(grads[name]), name
        else:  # query / key / value / output projection of this layer
            assert not moved(grads[name]), name
    for name, grad in grads.items():
        if "sigma" in name and not name.startswith(f"layers.{index}."):
            assert not moved(grad), name  # other layers' priors take no part
        if name.startswith(("head.", "norm.", f"layers.{index}.ffn.", f"layers.{index}.norm")):
            assert not moved(grad), name  # nothing downstream of this layer's maps
        if index == 0 and name.startswith("ref_embedding."):
            assert not moved(grad), name  # the first layer's priors depend on the image tokens only
        if any(name.startswith(f"layers.{later}.") for later in range(index + 1, LAYERS)):
            assert not moved(grad), name


@pytest.mark.parametrize("index", range(LAYERS))
@pytest.mark.parametrize("branch", ["intra", "inter"])
def test_kl_attention_and_entropy_never_move_sigma(level_and_output, index, branch):
    level, output = level_and_output
    stats = getattr(output, branch)[index]
    attention = attention_modules(level, index)[0 if branch == "intra" else 1]
    for objective in (stats.kl_attention.sum(), stats.entropy.sum()):
        grads = gradients(objective, level)
        assert not any(moved(g) for n, g in grads.items() if "sigma" in n)
        local = gradients(objective, attention)
        assert moved(local["query.weight"]) and moved(local["key.weight"])
        assert not moved(local["value.weight"])  # values do not shape the attention map


def test_full_loss_reaches_every_transformer_parameter_but_not_the_backbone():
    torch.manual_seed(0)
    model = FodModel(FodSettings(pre_trained=False, **TINY))
    set_random_references(model, 64, 64)
    model.train()
    output = model(torch.randn(2, 3, 64, 64))
    total, _ = FodLoss()(output.tokens, output.levels)
    total.backward()
    for name, parameter in model.levels.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
    backbone = list(model.feature_extractor.parameters())
    assert backbone
    assert all(not p.requires_grad and p.grad is None for p in backbone)
    # the frozen backbone stays in eval mode (BatchNorm statistics do not move)
    assert not model.feature_extractor.body.training
