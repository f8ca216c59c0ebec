"""Correlation maths of FOD: learned Gaussian target correlations, symmetric KL and entropy.

All functions work on row-stochastic maps ``(B, H, L, S)`` (batch, heads, query tokens,
key tokens) and reduce to per-token values ``(B, L)`` by summing over keys and averaging
over heads, as the paper does.
"""

from __future__ import annotations

import torch

# Added inside the logarithms as in the paper's code: it bounds the KL when a map has exact
# zeros (a Gaussian target with a tiny sigma has them), which keeps the minimax game stable.
LOG_EPS = 1e-4


def sigma_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Map raw sigma projections to the paper's range ``(~0, 2)``.

    ``sigma = 3 ** (sigmoid(5 * s) + 1e-5) - 1``: steep in ``s`` so a query can switch between
    a point-like and a wide prior within a few updates.

    Args:
        logits: ``(..., 2)`` raw outputs (y, x).

    Returns:
        ``(..., 2)`` strictly positive sigmas.
    """
    return torch.pow(3.0, torch.sigmoid(logits * 5.0) + 1e-5) - 1.0


def gaussian_target(sigma: torch.Tensor, sq_dist_y: torch.Tensor, sq_dist_x: torch.Tensor) -> torch.Tensor:
    """Row-normalised anisotropic Gaussian (RBF) prior over key positions.

    The paper normalises ``exp(-dy / 2 sy^2 - dx / 2 sx^2) / (2 pi sy sx)`` by its row sum. The
    normalising constant is the same for a whole row, so this equals a softmax over keys of
    the exponent: one pass, no overflow for tiny sigmas, no 0/0 when every key is far away.
    The distance maps are broadcast, never repeated per batch or head.

    Args:
        sigma: ``(B, H, L, 2)`` per-query sigmas (y, x).
        sq_dist_y: ``(L, S)`` squared row distances between query and key positions.
        sq_dist_x: ``(L, S)`` squared column distances.

    Returns:
        ``(B, H, L, S)`` target correlations; every row sums to 1.
    """
    inv_y = 0.5 / sigma[..., 0:1].float().square()
    inv_x = 0.5 / sigma[..., 1:2].float().square()
    logits = -(sq_dist_y * inv_y + sq_dist_x * inv_x)
    return torch.softmax(logits, dim=-1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """``KL(p || q) + KL(q || p)`` per query token, averaged over heads.

    Uses ``(p - q) * (log(p + eps) - log(q + eps))``, which is the sum of both directions in a
    single pass over the maps.

    Args:
        p: ``(B, H, L, S)`` row-stochastic map.
        q: ``(B, H, L, S)`` row-stochastic map (broadcastable to ``p``).
        eps: added inside the logarithms (see ``LOG_EPS``).

    Returns:
        ``(B, L)`` non-negative divergences.
    """
    p = p.float()
    q = q.float()
    per_key = (p - q) * (torch.log(p + eps) - torch.log(q + eps))
    return per_key.sum(dim=-1).mean(dim=1)


def entropy(p: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """Shannon entropy of each row, averaged over heads.

    Args:
        p: ``(B, H, L, S)`` row-stochastic map.
        eps: added inside the logarithm (see ``LOG_EPS``).

    Returns:
        ``(B, L)`` entropies in ``[0, log S]`` (up to the eps shift).
    """
    p = p.float()
    return -(p * torch.log(p + eps)).sum(dim=-1).mean(dim=1)
