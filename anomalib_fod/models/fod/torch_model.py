"""PyTorch model of FOD: frozen backbone, per-level I2Correlation Transformers, scoring."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_fod.backbone import FeatureExtractor

from .anomaly_map import AnomalyMapGenerator
from .settings import FodSettings
from .transformer import FodTransformer, LevelOutput, grid_coordinates

logger = logging.getLogger(__name__)


@dataclass
class FodTrainOutput:
    """Training-mode output: the level inputs (reconstruction targets) and Transformer outputs."""

    tokens: list[torch.Tensor]
    levels: list[LevelOutput]
    grids: list[tuple[int, int]]


# Fewer tokens per side leave the Gaussian priors and correlations nothing to work with.
MIN_TOKENS_PER_SIDE = 2


def to_tokens(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h * w, C)`` row-major tokens."""
    return features.flatten(2).transpose(1, 2)


class MapFeatures(NamedTuple):
    """One backbone pass: the pooled levels ``(B, C_i, h_i, w_i)`` and what the map-only levels read, each
    ``(B, C, h, w)`` or ``None``: the finer stage (fine level) and the finest level unpooled (aligned level)."""

    levels: list[torch.Tensor]
    finer: torch.Tensor | None
    finest: torch.Tensor | None


class FodModel(nn.Module):
    """FOD: Focus the Discrepancy (Yao et al., ICCV 2023).

    Args:
        settings: the model's settings (:class:`~.settings.FodSettings`; default: FOD's defaults).
            ``FodModel`` reads the backbone fields and ``d_models`` (one level per backbone layer)
            and hands the object to every level's Transformer and to the anomaly-map generator.

    Shapes:
        training: ``(B, 3, H, W)`` -> :class:`FodTrainOutput`;
        eval: ``(B, 3, H, W)`` -> ``InferenceBatch(pred_score (B,), anomaly_map (B, 1, H, W))``.
    """

    def __init__(self, settings: FodSettings | None = None) -> None:
        super().__init__()
        settings = settings or FodSettings()
        # a share asked for needs the finer stage (True); the default takes it where the backbone has one (None)
        asked = settings.fine_map_weight is not None
        self.feature_extractor = FeatureExtractor(
            settings.backbone,
            settings.layers,
            settings.pre_trained,
            settings.weights_path,
            finer_stage=(True if asked else None) if settings.fine_weight else False,
        )
        settings = self.resolve_fine_weight(settings)
        self.settings = settings
        channels = self.feature_extractor.channels
        if len(channels) != len(settings.d_models):
            msg = (
                f"{len(channels)} backbone layers ({self.feature_extractor.layers}) but "
                f"{len(settings.d_models)} d_models."
            )
            raise ValueError(msg)
        weights = settings.map_level_weights
        if weights is not None and len(weights) != len(channels):
            msg = (
                f"map_level_weights {weights} has {len(weights)} weights for {len(channels)} levels: give one per "
                "level (finest first), or None for the levels' mean."
            )
            raise ValueError(msg)
        self.with_inter = settings.with_inter
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.levels = nn.ModuleList(
            FodTransformer(c, d, settings) for c, d in zip(channels, settings.d_models, strict=True)
        )
        self.anomaly_map_generator = AnomalyMapGenerator(settings, channels)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Pooled frozen backbone features, per level ``(B, C_i, h_i, w_i)``."""
        return [self.pool(f) for f in self.feature_extractor(images)]

    @torch.no_grad()
    def extract_map_features(self, images: torch.Tensor) -> MapFeatures:
        """:meth:`extract_features` and what the map-only levels read, from one backbone pass: with the fine map
        level the backbone's finer stage, with the aligned map level the finest level unpooled (each
        ``(B, C, h, w)``; else ``None``)."""
        generator = self.anomaly_map_generator
        if generator.fine is None:
            levels, finer = self.feature_extractor(images), None
        else:
            levels, finer = self.feature_extractor.forward_with_finer_stage(images)
        return MapFeatures([self.pool(f) for f in levels], finer, levels[0] if generator.aligned_active else None)

    def resolve_fine_weight(self, settings: FodSettings) -> FodSettings:
        """``settings`` with the fine map level's share made concrete: one left to the model (``None``) is the
        default where the scoring takes the level and this model's backbone has the finer stage, else 0."""
        if settings.fine_map_weight is not None:
            return settings
        weight = settings.fine_weight
        if weight and self.feature_extractor.map_layer is None:
            logger.info("FOD: no fine map level: the feature extractor has no stage at half the finest level's stride.")
            weight = 0.0
        return replace(settings, fine_map_weight=weight)

    @property
    def has_reference(self) -> bool:
        """Whether every level has reference features (always true without the inter branch)."""
        return (not self.with_inter) or all(level.has_reference for level in self.levels)

    @property
    def reference_grids(self) -> list[tuple[int, int]]:
        """Each level's token grid ``(h_i, w_i)`` as its references recorded it; ``(0, 0)`` before any."""
        return [(int(level.ref_grid[0]), int(level.ref_grid[1])) for level in self.levels]

    def set_mean_reference(self, means: Sequence[torch.Tensor]) -> None:
        """Store per-position mean features ``(C_i, h_i, w_i)`` as the references of each level."""
        for level, mean in zip(self.levels, means, strict=True):
            _, height, width = mean.shape
            positions = grid_coordinates(height, width, mean.device)
            level.set_reference(to_tokens(mean[None])[0], positions, (height, width))

    def set_reference_tokens(
        self,
        features: Sequence[torch.Tensor],
        positions: Sequence[torch.Tensor],
        grids: Sequence[tuple[int, int]],
    ) -> None:
        """Store arbitrary reference tokens ``(S_i, C_i)`` at ``(S_i, 2)`` grid positions (coreset)."""
        for level, feats, pos, grid in zip(self.levels, features, positions, grids, strict=True):
            level.set_reference(feats, pos, grid)

    def _check_grids(self, grids: list[tuple[int, int]]) -> None:
        smallest = min(min(grid) for grid in grids)
        if smallest < MIN_TOKENS_PER_SIDE:
            stride = max(self.feature_extractor.strides)
            msg = (
                f"the input is too small for backbone layers {self.feature_extractor.layers}: the coarsest level "
                f"(stride {stride}) gives a {grids[-1][0]}x{grids[-1][1]} token grid. FOD needs at least "
                f"{MIN_TOKENS_PER_SIDE} tokens per side, i.e. images of at least {MIN_TOKENS_PER_SIDE * stride} px "
                "per side (set image_size)."
            )
            raise ValueError(msg)
        if self.settings.context_score and smallest <= 2 * self.settings.context_radius + 1:
            msg = (
                f"context_score with context_radius={self.settings.context_radius} hides a "
                f"{2 * self.settings.context_radius + 1}-token square around every token, and the coarsest level's "
                f"grid is {grids[-1][0]}x{grids[-1][1]}: use larger images or a smaller context_radius."
            )
            raise ValueError(msg)

    def run_levels(self, features: Sequence[torch.Tensor], keep_maps: bool = False) -> FodTrainOutput:
        """Run every level's Transformer on pooled backbone features ``(B, C_i, h_i, w_i)``.

        Computes all branch statistics in training or with ``keep_maps`` (figures), otherwise only
        those the scoring reads.
        """
        tokens = [to_tokens(f) for f in features]
        grids = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        self._check_grids(grids)
        need_intra, need_inter = (
            (True, True) if (self.training or keep_maps) else self.anomaly_map_generator.needed_branches
        )
        outputs = [
            level(t, h, w, need_intra, need_inter, keep_maps)
            for level, t, (h, w) in zip(self.levels, tokens, grids, strict=True)
        ]
        return FodTrainOutput(tokens, outputs, grids)

    def forward_features(
        self,
        features: Sequence[torch.Tensor],
        image_size: tuple[int, int] | None = None,
        fine_features: torch.Tensor | None = None,
        aligned_features: torch.Tensor | None = None,
    ) -> FodTrainOutput | InferenceBatch:
        """Run the Transformers (and, in eval mode, the scoring) on pooled backbone features.

        Split from :meth:`forward` so cached backbone features can be fed directly. ``fine_features`` and
        ``aligned_features``: what the map-only levels read (:meth:`extract_map_features`).
        """
        output = self.run_levels(features)
        tokens, outputs, grids = output.tokens, output.levels, output.grids
        if self.training:
            return output
        if image_size is None:
            msg = "image_size is needed to build the anomaly map."
            raise ValueError(msg)
        anomaly_map, pred_score = self.anomaly_map_generator(
            tokens, outputs, grids, image_size, fine_features, aligned_features
        )
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> FodTrainOutput | InferenceBatch:
        """Training output, or ``InferenceBatch`` with ``(B,)`` scores and ``(B, 1, H, W)`` maps in eval."""
        features = self.extract_map_features(images)  # the map-only levels' stages cost nothing more
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return self.forward_features(features.levels, size, features.finer, features.finest)
