"""The optimised correlation paths give the same values and gradients as the textbook formulas.

Reference computations here are written the straightforward way (the paper's formulas, autograd
through every op, full distance maps repeated per batch and head). Tolerances: float32, values
relative 1e-5 and gradients absolute 1e-6 relative to their scale.
"""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_fod.models.fod.correlation import (
    LOG_EPS,
    correlation_stats,
    gaussian_target,
    separable_gaussian_target,
    sigma_from_logits,
)
from anomalib_fod.models.fod.loss import FodLoss
from anomalib_fod.models.fod.transformer import BranchStats, LevelOutput, grid_coordinates, squared_distances


def paper_target(sigma: torch.Tensor, coords_q: torch.Tensor, coords_k: torch.Tensor) -> torch.Tensor:
    """``exp(-dy / 2 sy^2 - dx / 2 sx^2) / (2 pi sy sx)`` with repeated distance maps, row-normalised."""
    batch, heads, length, _ = sigma.shape
    dy = (coords_q[:, None, 0] - coords_k[None, :, 0]).square().expand(batch, heads, -1, -1)
    dx = (coords_q[:, None, 1] - coords_k[None, :, 1]).square().expand(batch, heads, -1, -1)
    sy = sigma[..., 0:1].double()
    sx = sigma[..., 1:2].double()
    raw = torch.exp(-dy / (2 * sy**2) - dx / (2 * sx**2)) / (2 * math.pi * sy * sx)
    return (raw / raw.sum(dim=-1, keepdim=True)).float()


def naive_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p + LOG_EPS) - torch.log(q + LOG_EPS))).sum(-1).mean(1)


def naive_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + LOG_EPS)).sum(-1).mean(1)


@pytest.mark.parametrize(("height", "width"), [(4, 4), (3, 5), (6, 2)])
def test_targets_match_paper_formula(height: int, width: int) -> None:
    torch.manual_seed(0)
    coords = grid_coordinates(height, width)
    sigma = sigma_from_logits(torch.randn(2, 3, height * width, 2) * 0.3)  # moderate sigmas: no underflow
    expected = paper_target(sigma, coords, coords)
    full = gaussian_target(sigma, *squared_distances(coords, coords))
    rows = (coords[:, 0:1] - torch.arange(height, dtype=torch.float32)).square()
    cols = (coords[:, 1:2] - torch.arange(width, dtype=torch.float32)).square()
    factorised = separable_gaussian_target(sigma, rows, cols)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factorised, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(factorised.sum(-1), torch.ones(2, 3, height * width))


def test_target_stays_finite_for_extreme_sigmas() -> None:
    coords = grid_coordinates(5, 5)
    sigma = sigma_from_logits(torch.tensor([-50.0, 50.0]).expand(1, 1, 25, 2).contiguous())
    target = gaussian_target(sigma, *squared_distances(coords, coords))
    assert torch.isfinite(target).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(1, 1, 25))


def test_fused_statistics_match_autograd_of_naive_formulas() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 12, 12, requires_grad=True)
    sigma_logits = torch.randn(2, 4, 12, 2, requires_grad=True)
    coords = grid_coordinates(3, 4)
    dists = squared_distances(coords, coords)
    weights = torch.randn(3, 2, 12)  # arbitrary upstream gradients per output and token

    def run(fused: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        logits.grad = None
        sigma_logits.grad = None
        attention = torch.softmax(logits, -1)
        target = gaussian_target(sigma_from_logits(sigma_logits), *dists)
        if fused:
            outs = list(correlation_stats(attention, target))
        else:
            kl_a = naive_kl(target.detach(), attention) + naive_kl(attention, target.detach())
            kl_t = naive_kl(target, attention.detach()) + naive_kl(attention.detach(), target)
            outs = [kl_a, kl_t, naive_entropy(attention)]
        sum(w.mul(o).sum() for w, o in zip(weights, outs, strict=True)).backward()
        return [o.detach() for o in outs], logits.grad.clone(), sigma_logits.grad.clone()

    fused_out, fused_grad_attn, fused_grad_sigma = run(fused=True)
    naive_out, naive_grad_attn, naive_grad_sigma = run(fused=False)
    for got, want in zip(fused_out, naive_out, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad_attn, naive_grad_attn, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_grad_sigma, naive_grad_sigma, rtol=1e-4, atol=1e-6)


def test_minimax_loss_matches_two_backward_passes() -> None:
    """One backward of stage1 + stage2 == the paper's stage1.backward(retain_graph) + stage2.backward()."""
    torch.manual_seed(2)
    logits = torch.randn(2, 2, 9, 9, requires_grad=True)
    sigma_logits = torch.randn(2, 2, 9, 2, requires_grad=True)
    ref_logits = torch.randn(2, 2, 9, 9, requires_grad=True)
    ref_sigma_logits = torch.randn(2, 2, 9, 2, requires_grad=True)
    recon = torch.randn(2, 9, 5, requires_grad=True)
    tokens = torch.randn(2, 9, 5)
    coords = grid_coordinates(3, 3)
    dists = squared_distances(coords, coords)
    lam1, lam2 = 0.5, 0.5
    params = [logits, sigma_logits, ref_logits, ref_sigma_logits, recon]

    def maps() -> tuple[torch.Tensor, ...]:
        return (
            torch.softmax(logits, -1),
            gaussian_target(sigma_from_logits(sigma_logits), *dists),
            torch.softmax(ref_logits, -1),
            gaussian_target(sigma_from_logits(ref_sigma_logits), *dists),
        )

    # ours
    a, t, ra, rt = maps()
    stats = [BranchStats(*correlation_stats(a, t))], [BranchStats(*correlation_stats(ra, rt))]
    loss, _ = FodLoss(lam1, lam2)([tokens], [LevelOutput(recon, stats[0], stats[1])])
    ours = torch.autograd.grad(loss, params)

    # the paper's recipe
    a, t, ra, rt = maps()

    def sym(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return naive_kl(p, q).mean() + naive_kl(q, p).mean()

    rec = torch.nn.functional.mse_loss(recon, tokens) + (1 - torch.nn.functional.cosine_similarity(recon, tokens, -1)).mean()
    intra1, intra2 = sym(t.detach(), a), sym(t, a.detach())
    inter1, inter2 = sym(rt.detach(), ra), sym(rt, ra.detach())
    ent_intra, ent_inter = naive_entropy(a).mean(), naive_entropy(ra).mean()
    loss1 = rec + lam1 * intra2 - lam1 * inter2
    loss2 = rec - lam1 * intra1 - lam2 * ent_intra + lam1 * inter1 + lam2 * ent_inter
    for p in params:
        p.grad = None
    loss1.backward(retain_graph=True)
    loss2.backward()
    for got, param in zip(ours, params, strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_keeps_correlation_terms_in_float32() -> None:
    """Under bf16 autocast the KL/entropy statistics stay float32 and the loss stays near fp32's."""
    from anomalib_fod import Fod
    from fod_helpers import TINY, set_random_references

    torch.manual_seed(0)
    model = Fod(pre_trained=False, image_size=64, visualizer=False, **TINY)
    set_random_references(model.model, 64, 64)
    model.model.train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = model.model.extract_features(images)
    reference = model.model.forward_features(features)
    want, _ = model.loss(reference.tokens, reference.levels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model.model.forward_features(features)
        got, _ = model.loss(output.tokens, output.levels)
    stats = [s for level in output.levels for s in (*level.intra, *level.inter)]
    assert stats and all(s.kl_attention.dtype == torch.float32 and s.entropy.dtype == torch.float32 for s in stats)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=0.05)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_compiled_transformers_give_the_same_loss() -> None:
    """``compile_transformers``: the compiled levels (traced by dynamo) reproduce the eager loss."""
    from anomalib_fod import Fod
    from fod_helpers import TINY, set_random_references

    torch.manual_seed(0)
    model = Fod(pre_trained=False, image_size=64, visualizer=False, compile_transformers=True, **TINY)
    set_random_references(model.model, 64, 64)
    model.model.train()
    features = model.model.extract_features(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    eager = model.model.forward_features(features)
    want, _ = model.loss(eager.tokens, eager.levels)
    keys = set(model.model.state_dict())
    for level in model.model.levels:  # what Fod.setup does, with a backend that needs no C++ toolchain
        level.compile(backend="aot_eager")
    compiled = model.model.forward_features(features)
    got, _ = model.loss(compiled.tokens, compiled.levels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(model.model.state_dict()) == keys, "compiling must not rename checkpoint keys"
