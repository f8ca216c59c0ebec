"""CDO's training objective: margin optimisation with overlap optimisation (Cao et al., TII 2023).

Per level, teacher and student features are upsampled (bilinear) to the first level's grid and
L2-normalised over channels; ``d = ||t - s||^2`` per position (in ``[0, 4]``). Upsampling uses
``align_corners=False``, which maps the centres of strided cells onto each other (the original code
uses ``True``; the difference is a sub-cell shift of the coarse levels). The synthetic-anomaly mask,
resized to that grid (nearest, as the original code), splits the positions of the whole batch into
normal ones ``n`` and synthetic-anomalous ones ``s``. The level's loss is

    L = (sum_n w_n d_n - sum_s w_s d_s) / (sum_n w_n + sum_s w_s)

i.e. pull the student onto the teacher on normal positions and push it away on synthetic ones
(margin optimisation), with the focal-style weights of overlap optimisation

    w_n = (d_n / mu_n) ^ gamma,    w_s = (mu_s / d_s) ^ gamma,

which concentrate the loss on the normal positions that are still far and the synthetic ones that
are still close -- the two tails where the distributions overlap. ``gamma = 0`` gives all weights 1,
the plain margin loss. The weights are detached: they choose where to push, not how.

``mu`` follows the original code (``cal_discrepancy`` is called once per group and level, and
takes ``torch.mean(d_p)`` of the discrepancies it was given): ``mu_n`` is the mean of ``d`` over
the *normal* positions of the whole batch at that level, ``mu_s`` the mean over its *synthetic*
positions. Levels are summed. The original multiplies each level's loss by the batch size; Adam's
update does not change with a constant factor on the loss, so it is left out here (it would only
weigh a smaller last batch of an epoch less).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# d lies in [0, 4]: below this a discrepancy is "zero" for the weights, and sums of weights
# smaller than this count as empty.
EPS = 1e-6


def level_discrepancies(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Squared distance of unit teacher/student features, per level on the first level's grid.

    Args:
        teacher: per level ``(B, C_i, h_i, w_i)`` teacher features.
        student: per level ``(B, C_i, h_i, w_i)`` student features.

    Returns:
        Per level ``(B, h_0, w_0)`` float32 discrepancies in ``[0, 4]``.
    """
    size = tuple(teacher[0].shape[-2:])
    discrepancies = []
    for t, s in zip(teacher, student, strict=True):
        t, s = t.float(), s.float()  # the sums below are not safe in half precision
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        # Normalised after upsampling: a blend of unit vectors is shorter than one.
        t = F.normalize(t, p=2, dim=1)
        s = F.normalize(s, p=2, dim=1)
        discrepancies.append((t - s).square().sum(dim=1))
    return discrepancies


def margin_loss(
    discrepancy: torch.Tensor,
    anomalous: torch.Tensor,
    gamma: float = 2.0,
    eps: float = EPS,
) -> torch.Tensor:
    """One level's weighted margin loss.

    Args:
        discrepancy: ``(B, h, w)`` squared distances ``d``.
        anomalous: ``(B, h, w)`` bool, True at synthetic-anomalous positions.
        gamma: overlap-optimisation exponent (0: plain margin).
        eps: guard of the divisions.

    Returns:
        Scalar loss; gradients flow through ``d`` only, never through the weights. Empty
        groups (a batch without synthetic pixels, or without normal ones) contribute nothing.
    """
    normal = ~anomalous
    d = discrepancy
    with torch.no_grad():
        # Batch-wide group means (see the module docstring); an empty group's mean is unused.
        mu_n = (d * normal).sum() / normal.sum().clamp_min(1)
        mu_s = (d * anomalous).sum() / anomalous.sum().clamp_min(1)
        w_n = (d / mu_n.clamp_min(eps)).pow(gamma)
        w_s = (mu_s / d.clamp_min(eps)).pow(gamma)
        # where, not a product: weights of the other group may be inf, and inf * 0 is nan.
        w_n = torch.where(normal, w_n, torch.zeros_like(w_n))
        w_s = torch.where(anomalous, w_s, torch.zeros_like(w_s))
        total_weight = (w_n.sum() + w_s.sum()).clamp_min(eps)
    return ((w_n * d).sum() - (w_s * d).sum()) / total_weight


class CdoLoss(nn.Module):
    """Collaborative discrepancy optimisation over all levels.

    Args:
        gamma: overlap-optimisation exponent (paper: 2; 0 switches it off).
        eps: guard of the divisions.
    """

    def __init__(self, gamma: float = 2.0, eps: float = EPS) -> None:
        super().__init__()
        if gamma < 0:
            msg = f"gamma must be >= 0, got {gamma}."
            raise ValueError(msg)
        self.gamma = gamma
        self.eps = eps

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss summed over levels, and detached means of ``d`` per group for logging.

        Args:
            teacher: per level ``(B, C_i, h_i, w_i)`` teacher features.
            student: per level ``(B, C_i, h_i, w_i)`` student features.
            mask: ``(B, 1, H, W)`` synthetic-anomaly mask of the input images (> 0.5: anomalous).

        Returns:
            Scalar loss, and ``d_normal`` / ``d_synthetic`` (mean discrepancy of each group,
            summed over levels; ``d_synthetic`` is 0 for a batch without synthetic pixels).
        """
        discrepancies = level_discrepancies(teacher, student)
        size = tuple(discrepancies[0].shape[-2:])
        anomalous = F.interpolate(mask.float(), size=size, mode="nearest")[:, 0] > 0.5  # noqa: PLR2004
        normal = ~anomalous
        loss = discrepancies[0].new_zeros(())
        d_normal = loss.new_zeros(())
        d_synthetic = loss.new_zeros(())
        for d in discrepancies:
            loss = loss + margin_loss(d, anomalous, self.gamma, self.eps)
            with torch.no_grad():
                d_normal += (d * normal).sum() / normal.sum().clamp_min(1)
                d_synthetic += (d * anomalous).sum() / anomalous.sum().clamp_min(1)
        return loss, {"d_normal": d_normal, "d_synthetic": d_synthetic}
