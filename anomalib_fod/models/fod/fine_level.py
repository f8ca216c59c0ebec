"""A finer level that only the anomaly map reads: the backbone's stride-4 stage, judged by a Gaussian per position.

FOD's two levels are pooled over 3x3 cells of stride 8 and 16: a stride-8 token stands for 24 px, and a boundary or
a defect smaller than that is placed only as finely as the bilinear upsampling guesses. The backbone's stage at
half that stride (Lite0's ``blocks.1``, 24 channels) resolves 4 px. Its features are less semantic, so they do not
go through a Transformer and do not make the image score; they only sharpen the map, at a share of it
(``fine_map_weight``) small enough that the stride-8 level stays in charge.

Each fine token is judged as a training-free FOD level is: the distance of its features from its position's mean
under the blended covariance (``ResidualStatistics("blend")``) of the training images' features at every intensity
gain. The two maps have different units (where the nearest-token score takes part, the model's map is a sum of
z-scores), so they are mixed in standard deviations of the training images' maps (at gain 1, unblurred):
``(1 - w) M / s_M + w F / s_F``, which ranks pixels as ``M + (w / (1 - w)) (s_M / s_F) F`` does; the latter keeps
the model's units, so the map changes only where the fine level adds to it. Both units are buffers (``units``), so
checkpoints and exported graphs carry them; the fit is ``fitting.fit_map_levels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .residual_statistics import ResidualStatistics, adopt_stored_shapes, forgive_missing
from .settings import ResidualCovariance

# Positions of the standard deviations in ``FineLevel.units``.
MODEL, FINE = 0, 1


class FineLevel(nn.Module):
    """The fine level's Gaussian (``statistics``) and the two maps' units; empty until fitted.

    Buffers: the statistics' (``mean`` ``(L, C)``, ``precision`` ``(C, C)``, ``position_precision`` ``(L, C, C)``)
    and ``units`` ``(2,)``: the standard deviations of the model's map and of the fine level's map over the training
    images' pixels.

    Args:
        weight: the fine level's share of the map, in ``(0, 1)``.
        covariance: which distance a token gets (``ResidualStatistics``'s).
        setting: the model setting that asks for the level (named in errors).
    """

    def __init__(
        self, weight: float, covariance: ResidualCovariance = "blend", setting: str = "fine_map_weight"
    ) -> None:
        super().__init__()
        if not 0 < weight < 1:
            msg = f"{setting} must lie in (0, 1) for the level to take part, got {weight}."
            raise ValueError(msg)
        self.weight = weight
        self.setting = setting
        self.statistics = ResidualStatistics(covariance)
        self.register_buffer("units", torch.empty(0))

    @property
    def fitted(self) -> bool:
        """Whether its Gaussian and units have been fitted (or loaded)."""
        return self.statistics.fitted and self.units.numel() == 2  # noqa: PLR2004

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # noqa: ANN001
        """Units of any shape load (empty before a fit); a checkpoint without the fine level loads unfitted."""
        adopt_stored_shapes(self, state_dict, prefix, ("units",))
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        forgive_missing(prefix, ("units",), missing_keys, before)

    def distance_map(self, features: torch.Tensor, image_size: tuple[int, int], align_corners: bool) -> torch.Tensor:
        """The fine tokens' distances ``(B, C, h, w)`` -> ``(B, 1, H, W)``, upsampled as the model's levels are."""
        batch, _, height, width = features.shape
        distance = self.statistics(features.flatten(2).transpose(1, 2).float()).reshape(batch, 1, height, width)
        return F.interpolate(distance, size=image_size, mode="bilinear", align_corners=align_corners)

    def scale(self) -> torch.Tensor:
        """Of the fine map in the model's map's units: ``(w / (1 - w)) s_M / s_F``."""
        if not self.fitted:
            msg = (
                f"the map level of {self.setting} is not fitted: fit the model, or call "
                "fit_residual_statistics on its training images."
            )
            raise RuntimeError(msg)
        return self.weight / (1 - self.weight) * self.units[MODEL] / self.units[FINE]

    def set_units(self, model_std: torch.Tensor, fine_std: torch.Tensor) -> None:
        """Store the standard deviations of the model's and the fine level's maps over the training images."""
        if not (model_std > 0 and fine_std > 0):
            msg = f"the training images' maps do not vary (standard deviations {float(model_std)}, {float(fine_std)})."
            raise RuntimeError(msg)
        self.units = torch.stack([model_std, fine_std]).float().to(self.units.device)
