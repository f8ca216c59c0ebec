"""CDO scoring: teacher/student cosine discrepancy per level to an anomaly map and an image score.

Per level, ``1 - cos(t, s)`` at every position (the student was trained to match the teacher on
normal patterns only), upsampled bilinearly (``align_corners=False``, as in the loss) to the input
size and summed over levels, then blurred with a Gaussian (sigma 4). The image score is the mean
of the map's top 1 % values: more robust than the single maximum to one noisy pixel, still driven
by small defects (as the original code's ``maximum_as_anomaly_score(anomaly_map, 0.01)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_fod.models.blur import gaussian_blur


def top_fraction_mean(anomaly_map: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Mean of the ``floor(fraction * H * W)`` (at least one) largest values per image.

    Args:
        anomaly_map: ``(B, 1, H, W)`` or ``(B, H, W)``.
        fraction: share of the pixels averaged (``0.01``: the top 1 %).

    Returns:
        ``(B,)`` scores.
    """
    flat = anomaly_map.flatten(1)
    count = max(1, int(flat.shape[1] * fraction))
    return flat.topk(count, dim=1).values.mean(dim=1)


class AnomalyMapGenerator(nn.Module):
    """Turn per-level teacher/student features into ``(B, 1, H, W)`` maps and ``(B,)`` scores.

    Args:
        blur_sigma: sigma of the Gaussian blur on the final map (0 switches it off).
        top_fraction: share of the map's largest values averaged into the image score.
    """

    def __init__(self, blur_sigma: float = 4.0, top_fraction: float = 0.01) -> None:
        super().__init__()
        if not 0 < top_fraction <= 1:
            msg = f"top_fraction must be in (0, 1], got {top_fraction}."
            raise ValueError(msg)
        self.top_fraction = top_fraction
        # Truncated at 4 sigma (scipy's gaussian_filter default, used by the original code).
        self.blur = gaussian_blur(blur_sigma)

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine the levels.

        Args:
            teacher: per level ``(B, C_i, h_i, w_i)`` teacher features.
            student: per level ``(B, C_i, h_i, w_i)`` student features.
            image_size: ``(H, W)`` of the pre-processed input.

        Returns:
            ``(B, 1, H, W)`` anomaly map and ``(B,)`` image scores.
        """
        anomaly_map = None
        for t, s in zip(teacher, student, strict=True):
            level = 1.0 - F.cosine_similarity(t.float(), s.float(), dim=1).unsqueeze(1)
            level = F.interpolate(level, size=image_size, mode="bilinear", align_corners=False)
            anomaly_map = level if anomaly_map is None else anomaly_map + level
        if anomaly_map is None:
            msg = "no feature levels given."
            raise ValueError(msg)
        if self.blur is not None:
            anomaly_map = self.blur(anomaly_map)
        return anomaly_map, top_fraction_mean(anomaly_map, self.top_fraction)
