"""FOD's training objective: patch-wise reconstruction plus the two-stage minimax game.

Per level, with ``KL_a`` = symmetric KL with the target detached (moves the attention) and
``KL_t`` = symmetric KL with the attention detached (moves the sigma projections):

    stage 1 (targets):    rec + l1 * KL_t(intra) - l1 * KL_t(inter)
    stage 2 (attentions): rec - l1 * KL_a(intra) - l2 * H(intra) + l1 * KL_a(inter) + l2 * H(inter)

Stage 1 pulls the intra prior towards the learned self-attention and pushes the inter prior
away; stage 2 pushes normal self-attention away from its prior (normal images correlate
widely, anomalies stay local) and pulls cross-attention to the references onto its prior,
with the entropy terms sharpening the inter and widening the intra attention.

The paper's code calls ``stage1.backward(retain_graph=True)`` then ``stage2.backward()`` and
steps once: the gradients add up, so one backward of ``stage1 + stage2`` is the same update
with one graph traversal. Levels are summed into one loss and one optimizer step (the paper
stepped Adam per level, which touches disjoint parameters: the same update).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .transformer import BranchStats, LevelOutput


def reconstruction_loss(tokens: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """MSE + mean (1 - cosine) over tokens, ``(B, L, C)`` x2 -> scalar."""
    tokens = tokens.float()
    reconstruction = reconstruction.float()
    cosine = F.cosine_similarity(tokens, reconstruction, dim=-1)
    return F.mse_loss(reconstruction, tokens) + (1.0 - cosine).mean()


def _branch_means(stats: list[BranchStats]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer-averaged mean of (KL_a, KL_t, entropy)."""
    count = len(stats)
    kl_attention = sum(s.kl_attention.mean() for s in stats) / count
    kl_target = sum(s.kl_target.mean() for s in stats) / count
    ent = sum(s.entropy.mean() for s in stats) / count
    return kl_attention, kl_target, ent


class FodLoss(nn.Module):
    """Minimax loss of FOD over all feature levels.

    Args:
        kl_weight: ``lambda1``, weight of the correlation KL terms (paper: 0.5).
        entropy_weight: ``lambda2``, weight of the entropy terms (paper: 0.5).
        with_entropy: keep the entropy terms (ablation switch).
    """

    def __init__(self, kl_weight: float = 0.5, entropy_weight: float = 0.5, with_entropy: bool = True) -> None:
        super().__init__()
        self.kl_weight = kl_weight
        self.entropy_weight = entropy_weight if with_entropy else 0.0

    def forward(
        self,
        tokens: list[torch.Tensor],
        outputs: list[LevelOutput],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its detached components (summed over levels).

        Args:
            tokens: per level ``(B, L, C)`` input features (the reconstruction targets).
            outputs: per level Transformer outputs.

        Returns:
            Scalar loss to back-propagate, and ``rec``, ``intra_kl``, ``inter_kl``,
            ``intra_entropy``, ``inter_entropy`` for logging.
        """
        l1, l2 = self.kl_weight, self.entropy_weight
        total = tokens[0].new_zeros((), dtype=torch.float32)
        parts = {name: total.clone() for name in ("rec", "intra_kl", "inter_kl", "intra_entropy", "inter_entropy")}
        for level_tokens, output in zip(tokens, outputs, strict=True):
            rec = reconstruction_loss(level_tokens, output.reconstruction)
            parts["rec"] += rec.detach()
            if not output.intra and not output.inter:  # patch-wise reconstruction only
                total = total + rec
                continue
            stage1 = rec
            stage2 = rec
            if output.intra:
                kl_a, kl_t, ent = _branch_means(output.intra)
                stage1 = stage1 + l1 * kl_t
                stage2 = stage2 - l1 * kl_a - l2 * ent
                parts["intra_kl"] += kl_a.detach()
                parts["intra_entropy"] += ent.detach()
            if output.inter:
                kl_a, kl_t, ent = _branch_means(output.inter)
                stage1 = stage1 - l1 * kl_t
                stage2 = stage2 + l1 * kl_a + l2 * ent
                parts["inter_kl"] += kl_a.detach()
                parts["inter_entropy"] += ent.detach()
            total = total + stage1 + stage2
        return total, parts
