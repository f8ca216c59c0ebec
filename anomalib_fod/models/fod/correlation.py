"""Correlation maths of FOD: learned Gaussian target correlations, symmetric KL and entropy.

All functions work on row-stochastic maps ``(B, H, L, S)`` (batch, heads, query tokens,
key tokens) and reduce to per-token values ``(B, L)`` by summing over keys and averaging
over heads, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Added inside the logarithms as in the paper's code: it bounds the KL when a map has exact
# zeros (a Gaussian target with a tiny sigma has them), which keeps the minimax game stable.
LOG_EPS = 1e-4


def sigma_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Map raw sigma projections to the paper's range ``(~1e-5, 3 ** (1 + 1e-5) - 1 ~ 2.00003)``.

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


def separable_gaussian_target(
    sigma: torch.Tensor,
    sq_dist_rows: torch.Tensor,
    sq_dist_cols: torch.Tensor,
) -> torch.Tensor:
    """:func:`gaussian_target` for keys that form a full ``h x w`` grid (row-major).

    The exponent splits into a row and a column part and the row sum of a full grid factorises,
    so the target is the outer product of two small 1D softmaxes: one full-size write instead
    of several passes over ``(B, H, L, S)``. Equal to :func:`gaussian_target` up to rounding.

    Args:
        sigma: ``(B, H, L, 2)`` per-query sigmas (y, x).
        sq_dist_rows: ``(L, h)`` squared distances from each query's row to every key row.
        sq_dist_cols: ``(L, w)`` squared distances from each query's column to every key column.

    Returns:
        ``(B, H, L, h * w)`` target correlations; every row sums to 1.
    """
    rows = torch.softmax(-sq_dist_rows * (0.5 / sigma[..., 0:1].float().square()), dim=-1)  # (B, H, L, h)
    cols = torch.softmax(-sq_dist_cols * (0.5 / sigma[..., 1:2].float().square()), dim=-1)  # (B, H, L, w)
    return (rows.unsqueeze(-1) * cols.unsqueeze(-2)).flatten(-2)


class _CorrelationStats(torch.autograd.Function):
    """Fused symmetric KL (two detach variants) and entropy with a hand-written backward.

    Autograd through :func:`symmetric_kl` twice plus :func:`entropy` materialises and walks a
    dozen ``(B, H, L, S)`` intermediates. Here the forward computes each logarithm once and
    keeps ``log(a + eps)`` and ``log(a + eps) - log(t + eps)`` for the backward, which is then
    a handful of multiply-adds. Gradients (``n`` heads, ``la = log(a + eps)``,
    ``lt = log(t + eps)``, ``g*`` the incoming per-token gradients):

    - ``d KL / d a = (la - lt + (a - t) / (a + eps)) / n``   (routed from ``kl_attention`` only)
    - ``d KL / d t = (lt - la - (a - t) / (t + eps)) / n``   (routed from ``kl_target`` only)
    - ``d H / d a = -(la + a / (a + eps)) / n``
    """

    @staticmethod
    def forward(ctx, attention: torch.Tensor, target: torch.Tensor, eps: float):  # noqa: ANN205
        a = attention.float()
        t = target.float()
        log_a = torch.log(a + eps)
        neg_entropy = (a * log_a).sum(dim=-1).mean(dim=1)
        dlog = log_a - torch.log(t + eps)
        kl = ((a - t) * dlog).sum(dim=-1).mean(dim=1)
        ctx.save_for_backward(attention, target, log_a, dlog)
        ctx.eps = eps
        return kl, kl.clone(), -neg_entropy

    @staticmethod
    def backward(ctx, grad_kl_attention, grad_kl_target, grad_entropy):  # noqa: ANN205
        attention, target, log_a, dlog = ctx.saved_tensors
        eps = ctx.eps
        a = attention.float()
        t = target.float()
        heads = a.shape[1]
        g_kl_a = (grad_kl_attention / heads)[:, None, :, None]
        g_kl_t = (grad_kl_target / heads)[:, None, :, None]
        g_ent = (grad_entropy / heads)[:, None, :, None]
        grad_a = grad_t = None
        if ctx.needs_input_grad[0]:
            # g_kl_a * (dlog + (a - t) / (a + eps)) - g_ent * (log_a + a / (a + eps))
            numerator = (g_kl_a - g_ent) * a - g_kl_a * t
            grad_a = numerator.div_(a + eps).add_(g_kl_a * dlog).sub_(g_ent * log_a).to(attention.dtype)
        if ctx.needs_input_grad[1]:
            grad_t = ((t - a).div_(t + eps).sub_(dlog).mul_(g_kl_t)).to(target.dtype)
        return grad_a, grad_t, None


def correlation_stats(
    attention: torch.Tensor,
    target: torch.Tensor,
    eps: float = LOG_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(kl_attention, kl_target, entropy)``, each ``(B, L)``, with the minimax routing.

    ``kl_attention`` = ``symmetric_kl(target.detach(), attention)``: its gradient reaches only the
    attention. ``kl_target`` = ``symmetric_kl(target, attention.detach())``: only the target.
    ``entropy`` = ``entropy(attention)``. Without autograd this is a plain computation (also the
    path an exported graph takes).
    """
    if torch.is_grad_enabled() and (attention.requires_grad or target.requires_grad):
        return _CorrelationStats.apply(attention, target, eps)
    kl = symmetric_kl(target, attention, eps)
    return kl, kl, entropy(attention, eps)


@dataclass
class KeyGeometry:
    """Squared distances between query and key positions, for the Gaussian targets.

    ``separable=True``: the keys form a full row-major ``h x w`` grid and ``rows`` / ``cols`` are
    ``(L, h)`` / ``(L, w)`` distances to each key row / column (the cheap, factorised target).
    ``separable=False``: keys anywhere; ``rows`` / ``cols`` are full ``(L, S)`` distance maps.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    separable: bool

    def target(self, sigma: torch.Tensor) -> torch.Tensor:
        """``(B, H, L, S)`` row-normalised Gaussian target for ``(B, H, L, 2)`` sigmas."""
        if self.separable:
            return separable_gaussian_target(sigma, self.rows, self.cols)
        return gaussian_target(sigma, self.rows, self.cols)

    def block(self, start: int, stop: int) -> KeyGeometry:
        """The distances of queries ``start:stop`` only."""
        return KeyGeometry(self.rows[start:stop], self.cols[start:stop], self.separable)
