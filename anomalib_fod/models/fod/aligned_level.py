"""A level that only the anomaly map reads, for aligned parts: the finest stage unpooled, a Gaussian per position.

FOD's levels average the backbone's features over 3x3 cells before anything judges them: a stride-8 token stands
for 24 px, so a defect a few pixels across is diluted by its eight neighbours, and a shared covariance judges every
position by the variation of all of them. Where the training images show the same part in the same place, neither
is needed: a token's own position tells what it should look like, and its unpooled features keep a small defect
whole. That is PaDiM's model of normal (a mean and a covariance per position, unpooled features), and it is what
FOD's map misses on aligned parts with small defects.

The level reads the finest level's backbone features before the pooling (no Transformer, no training), each token
judged by its distance from its position's mean under its position's own covariance (``ResidualStatistics
("position")``: shrunk towards the shared one with ``C / (N + C)``). It is mixed into the map in standard deviations
of the training images' maps, as the fine level is (``fine_level.py``), at ``aligned_map_weight`` (half by
default: as much as the model's own levels, neither in charge). The image score's own map does not read it.

Whether it takes part is decided on the training images, without labels: where the images are not aligned (a
texture, a part that moves) a per-position Gaussian of unpooled features only adds noise. The measure is the share
of a token's variation that its grid position explains (:func:`position_share_of`, the quantity
``nearest.position_share`` measures for the nearest-token score): at or above ``ALIGNED_POSITION_LIMIT`` the level
takes part, below it the level is declined and keeps only the share it measured.
"""

from __future__ import annotations

import math

import torch

from .fine_level import FineLevel
from .nearest import check_share_count, share_of_variation
from .residual_statistics import SHRINKAGE, adopt_stored_shapes, forgive_missing


class AlignedLevel(FineLevel):
    """The aligned level's Gaussian (per position), the two maps' units and the position share that decided it.

    Buffers: :class:`~.fine_level.FineLevel`'s and ``position_share`` ``(1,)`` (empty until measured). A declined
    level holds its share and nothing else, and adds nothing to the map.

    Args:
        weight: the level's share of the map, in ``(0, 1)``.
        limit: the position share at or above which the fit keeps the level (0: always).
    """

    def __init__(self, weight: float, limit: float) -> None:
        super().__init__(weight, covariance="position", setting="aligned_map_weight")
        self.limit = limit
        self.register_buffer("position_share", torch.empty(0))

    @property
    def declined(self) -> bool:
        """Whether the fit measured the training images' position share and left the level out."""
        return self.position_share.numel() > 0 and not self.statistics.fitted

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:  # noqa: ANN001
        """A share of any shape loads (empty before a fit); a checkpoint without it loads unmeasured."""
        adopt_stored_shapes(self, state_dict, prefix, ("position_share",))
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        forgive_missing(prefix, ("position_share",), missing_keys, before)

    def forget_choice(self) -> None:
        """Drop the measured share before a refit, which measures it again (a declined level then reads its stage)."""
        self.position_share = torch.empty(0, device=self.units.device)

    def choose(self, share: float) -> bool:
        """Store the measured position share and say whether the level takes part (``share >= limit``; always with
        a limit of 0; never where the share could not be measured, NaN); a declined level's statistics and units are
        emptied, so checkpoints and exports carry the decision."""
        self.position_share = torch.tensor([share], device=self.units.device)
        keep = self.limit <= 0 or share >= self.limit
        if not keep:
            self.statistics.set(torch.empty(0, 0), torch.empty(0, 0))
            self.units = torch.empty(0, device=self.units.device)
        return keep

    def describe(self) -> str:
        """One line for the run's log: whether the level takes part, and the share that decided it."""
        share = float(self.position_share) if self.position_share.numel() else float("nan")
        if self.limit <= 0:
            return f"FOD aligned map level: {self.weight:g} of the map, as asked (position share {share:.3f})."
        if self.declined and math.isnan(share):
            return (
                "FOD aligned map level: left out; one training image cannot tell whether a token's grid position "
                "explains its variation (aligned_map_weight=0.5 would force the level)."
            )
        if self.declined:
            return (
                f"FOD aligned map level: left out; a token's grid position explains {share:.3f} of its variation on "
                f"the training images, below {self.limit:g} (not aligned: aligned_map_weight=0.5 would force it)."
            )
        return (
            f"FOD aligned map level: {self.weight:g} of the map; a token's grid position explains {share:.3f} of its "
            f"variation on the training images (aligned: at least {self.limit:g}; aligned_map_weight=0 leaves it out)."
        )


def position_share_of(total: torch.Tensor, outer: torch.Tensor, count: float) -> float:
    """Share of the tokens' variation that their grid position explains, from summed tokens: ``total`` ``(L, C)``,
    per-position outer products ``outer`` ``(L, C, C)`` over ``count`` images.

    The same measure as :func:`~.nearest.position_share` (which reads the tokens themselves): in the whitening of
    all tokens (covariance shrunk by ``SHRINKAGE``), the variance of the per-position means over positions, less what
    ``count`` images' sampling noise puts there, over that plus the variance within positions. 0: every position
    sees the same looks; 1: a token is told by its position.
    """
    check_share_count(count)
    total, outer = total.double(), outer.double()
    positions, channels = total.shape
    means = total / count  # (L, C)
    grand = means.mean(dim=0)
    spread = outer.sum(dim=0) / (count * positions) - grand[:, None] * grand[None, :]
    spread = spread + SHRINKAGE * spread.diagonal().mean() * torch.eye(channels, dtype=spread.dtype)
    precision = torch.linalg.inv(spread)
    within_positions = (outer / count - means[:, :, None] * means[:, None, :]).mean(dim=0)  # mean of (C, C)
    within = float((precision * within_positions).sum()) * count / (count - 1)
    centred = means - grand
    return share_of_variation(float(((centred @ precision) * centred).sum(-1).mean()), within, count)
