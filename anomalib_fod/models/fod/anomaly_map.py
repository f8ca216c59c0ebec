"""FOD scoring: per-token reconstruction and correlation-divergence scores to an anomaly map.

Per level and token (paper, eq. 11):

- ``rec = mean_c (x - x_hat)^2 + 1 - cos(x, x_hat)`` (patch-wise discrepancy);
- ``div`` from the per-token symmetric KL between attention and target, averaged over layers:
  inter branch ``max(softmax(-kl)) - softmax(-kl)`` (large where an image token's correlation to
  the normal references does not follow its learned prior); intra branch ``softmax(-kl)`` (the
  minimax pushes normal tokens' self-attention *away* from the prior, so a small KL is
  anomalous). The softmax and max run over the tokens of each image.
- ``rec_div = rec * div`` (the paper), ``rec`` (``Fod``'s default) or ``div`` alone (the paper's
  ablation rows).

``reconstruction_term`` chooses what ``rec`` is: ``"mahalanobis"`` (``Fod``'s default: the residual
whitened by the training images' own residual statistics, ``residual_statistics.py``), ``"mse_cos"``
(the paper's sum), ``"cos"`` (``1 - cos`` alone) or ``"mse"`` (the MSE alone). The MSE depends on
the feature scale, the cosine does not; the whitened residual is judged against what the model does
on normal images. Scoring only: a trained model can be re-scored with another term without retraining.

With both branches the divergence is the inter one: the paper reports that the intra branch
helps through training and scoring with inter alone is slightly better.

Levels are upsampled (bilinear; each token at the centre of its stride cell unless ``map_align_corners``, the
paper's corner-aligned grid) to the input size and combined, then blurred with a Gaussian
(sigma 4); the image score is the map's maximum. The paper averages the levels; ``Fod``'s anomaly map
weighs them ``map_level_weights`` (7/8 on the stride-8 level by default): the finer level draws a
defect's outline where the stride-16 level smears it over its neighbours. With the Mahalanobis term and
``image_score="position"`` (``Fod``'s default) the image score is the maximum of a second map, made from
every token's distance under its own position's covariance alone with the levels averaged equally: the
per-position Gaussian and the coarser level's context rank images better, the blended distance and the
finer level localise better, so each part of the output takes the rule that measured better for it
(benchmarks/results/accuracy.md).

With ``context_score`` each token's score is its whitened residual's distance plus its context residual's
(``context.py``), both in the training images' z-units; with ``image_score="position"`` the image score follows
the same rule as without it: the same sum made of the distances under each position's own covariance (in their
own z-units), levels averaged. With ``nearest_tokens`` each token's score is its Gaussian distance plus its
distance to the nearest training token (``nearest.py``), both in held-out z-units; the image score's map makes the
same sum with the per-position distance. With ``fine_map_weight`` the anomaly map (not the image score's own map)
adds a map-only level of the backbone's finer stage before the blur (``fine_level.py``); before it, where the
training images are aligned (or ``aligned_map_weight`` asks), a map-only level of the finest stage unpooled, judged
per position (``aligned_level.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from anomalib_fod.models.blur import gaussian_blur
from anomalib_fod.utils import check_choice

from .aligned_level import AlignedLevel
from .context import ContextLevel
from .fine_level import FineLevel
from .nearest import NearestLevel
from .residual_statistics import ResidualStatistics
from .settings import ALIGNED_POSITION_LIMIT, FodSettings, ImageScore, ReconstructionTerm, ResidualCovariance

if TYPE_CHECKING:
    from .transformer import BranchStats, LevelOutput


logger = logging.getLogger(__name__)


def reconstruction_parts(tokens: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token MSE and ``1 - cosine``, ``(B, L, C)`` x2 -> two ``(B, L)``."""
    tokens = tokens.float()
    reconstruction = reconstruction.float()
    mse = (tokens - reconstruction).square().mean(dim=-1)
    return mse, 1.0 - F.cosine_similarity(tokens, reconstruction, dim=-1)


def reconstruction_score(
    tokens: torch.Tensor,
    reconstruction: torch.Tensor,
    term: ReconstructionTerm = "mse_cos",
) -> torch.Tensor:
    """Per-token reconstruction discrepancy, ``(B, L, C)`` x2 -> ``(B, L)``.

    ``term``: ``"mse_cos"`` MSE + (1 - cosine) (paper), ``"cos"`` or ``"mse"`` alone.
    """
    mse, cosine_distance = reconstruction_parts(tokens, reconstruction)
    if term == "cos":
        return cosine_distance
    if term == "mse":
        return mse
    return mse + cosine_distance


class LevelScores(NamedTuple):
    """Per-level token scores ``(B, L_i)``: of the anomaly map, of the image score's own map (None: the image
    score is the anomaly map's maximum) and, with the context or the nearest-token score, its z-scores (else None)."""

    map: list[torch.Tensor]
    image: list[torch.Tensor] | None
    context: list[torch.Tensor] | None
    nearest: list[torch.Tensor] | None = None


def mean_divergence(stats: list[BranchStats]) -> torch.Tensor:
    """Symmetric KL per token averaged over layers, ``(B, L)``."""
    return torch.stack([s.kl_attention for s in stats]).mean(dim=0)


class AnomalyMapGenerator(nn.Module):
    """Turn per-level Transformer outputs into ``(B, 1, H, W)`` maps and ``(B,)`` scores.

    Args:
        settings: reads ``scoring`` (``"rec"``, ``"rec_div"`` (paper) or ``"div"``), ``with_intra`` /
            ``with_inter`` (the model's branches), ``blur_sigma`` (of the Gaussian blur on the final
            map; 0 switches it off), ``map_level_weights`` (of the levels in the anomaly map),
            ``map_align_corners`` (of the levels' bilinear upsampling),
            ``reconstruction_term`` (what ``rec`` is), ``residual_covariance`` and ``image_score`` (which
            Mahalanobis distances make the map and the image score), ``context_score`` (and its settings).
        channels: the levels' token channels (needed with ``context_score``).
    """

    def __init__(self, settings: FodSettings | None = None, channels: Sequence[int] = ()) -> None:
        super().__init__()
        settings = settings or FodSettings()
        if settings.context_score and len(channels) != len(settings.d_models):
            msg = f"context_score needs the channels of every level, got {tuple(channels)}."
            raise ValueError(msg)
        scoring, blur_sigma = settings.scoring, settings.blur_sigma
        with_intra, with_inter = settings.with_intra, settings.with_inter
        self.reconstruction_term = settings.reconstruction_term
        if scoring != "rec" and not (with_intra or with_inter):
            msg = f"scoring={scoring!r} needs a correlation branch: set with_intra or with_inter, or scoring='rec'."
            raise ValueError(msg)
        self.scoring = scoring
        self.with_intra = with_intra
        self.with_inter = with_inter
        self.statistics = nn.ModuleList(ResidualStatistics(settings.residual_covariance) for _ in settings.d_models)
        self.context = nn.ModuleList(
            ContextLevel(c, settings.context_radius, settings.context_hidden_share)
            for c in (channels if settings.context_score else ())
        )
        # Built whenever asked for, so a checkpoint's bank loads under any scoring; used where it applies.
        self.nearest = nn.ModuleList(NearestLevel() for _ in (settings.d_models if settings.nearest_tokens else ()))
        self.nearest_applies = settings.nearest_applies
        # A map-only level of the backbone's finer stage (fine_level.py); fed by the model's forward.
        # None (left to the model) counts as off here: FodModel makes it concrete for its backbone before this.
        self.fine = FineLevel(settings.fine_map_weight) if settings.fine_map_weight else None
        # A map-only level of the finest stage unpooled, per position (aligned_level.py); use_scoring sets whether
        # the fit decides if it takes part (the default) or it always does (an explicit share).
        weight = settings.aligned_weight
        self.aligned = AlignedLevel(weight, ALIGNED_POSITION_LIMIT) if weight else None
        self.use_scoring(settings)
        self.blur = gaussian_blur(blur_sigma)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # noqa: ANN001
        """A checkpoint's map-only levels are left behind by a model built without them (``fine_map_weight=0``,
        ``aligned_map_weight=0``)."""
        for name in ("fine", "aligned"):
            if getattr(self, name) is None:
                for key in [key for key in state_dict if key.startswith(f"{prefix}{name}.")]:
                    del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def keeps_training_tokens(self) -> str | None:
        """The option whose fit keeps every training token and residual (``"context_score"`` or
        ``"nearest_tokens"``, unless the latter was left out unmeasured), or None."""
        if len(self.context):
            return "context_score"
        if self.nearest_applies and len(self.nearest) and not all(level.unmeasured for level in self.nearest):
            return "nearest_tokens"
        return None

    @property
    def nearest_active(self) -> bool:
        """Whether scoring adds the nearest-token score (configured, and not declined by its fit)."""
        return self.nearest_applies and len(self.nearest) > 0 and not all(level.declined for level in self.nearest)

    @property
    def needs_statistics(self) -> bool:
        """Whether scoring reads the residual statistics of the training images."""
        return self.reconstruction_term == "mahalanobis" and self.scoring != "div"

    def use_scoring(self, settings: FodSettings) -> None:
        """Combine the levels as ``settings`` say (``map_level_weights``, ``map_align_corners``, ``image_score``,
        ``fine_map_weight``, ``aligned_map_weight``): the scoring settings a trained model may change
        (``Fod.set_scoring``). A map-only level can be left out or re-weighted (its units do not depend on its
        share), not added: it needs a fit. Re-weighting the aligned level moves the map the fine level's units were
        measured on, so the fine level's share is then approximate until a refit."""
        self.fine = self._map_level("fine", settings.fine_map_weight)
        self.aligned = self._map_level("aligned", settings.aligned_weight)
        if self.aligned is not None:
            # left to the model, the next fit decides; asked for, it takes part whatever the images
            self.aligned.limit = ALIGNED_POSITION_LIMIT if settings.aligned_chooses else 0.0
            if self.aligned.declined and not settings.aligned_chooses:
                logger.warning(
                    "the fit left the aligned map level out (position share %.3f, not aligned): "
                    "aligned_map_weight=%s takes part after its statistics are refitted "
                    "(Fod.fit_residual_statistics(datamodule)).",
                    float(self.aligned.position_share), settings.aligned_map_weight,
                )
        self.map_level_weights = settings.map_level_weights
        self.align_corners = settings.map_align_corners
        self.use_image_score(settings.image_score)

    def _map_level(self, name: str, weight: float) -> FineLevel | None:
        """The map-only level ``name`` at ``weight`` (0: left out); refuses to add one the model was built without."""
        level = getattr(self, name)
        if not weight:
            return None
        if level is None:
            msg = (
                f"a model built without the {name} map level cannot take one after the fact: build it with "
                f"{name}_map_weight={weight} and fit its residual statistics."
            )
            raise ValueError(msg)
        level.weight = weight
        return level

    def use_image_score(self, image_score: ImageScore) -> None:
        """Take the image score from ``image_score``'s map; the statistics keep what it needs when fitted."""
        check_choice("image_score", image_score, ImageScore)
        self.image_score = image_score
        for statistics in self.statistics:
            statistics.keep_position = image_score == "position"

    @property
    def image_from_position(self) -> bool:
        """Whether the image score comes from its own map (per-position distances, levels averaged equally; a
        context score fitted before it had its image units keeps the anomaly map's maximum)."""
        if not (self.image_score == "position" and self.needs_statistics):
            return False
        if len(self.context):
            return all(level.has_position_units for level in self.context)
        if self.nearest_active and all(level.fitted for level in self.nearest):
            return all(level.has_position_units for level in self.nearest)
        return self.statistics[0].covariance != "position" or self.map_level_weights is not None

    @property
    def needed_branches(self) -> tuple[bool, bool]:
        """Which branch statistics (intra, inter) scoring reads; the rest is skipped at inference."""
        if self.scoring == "rec":
            return False, False
        return (not self.with_inter, self.with_inter)

    def divergence_score(self, output: LevelOutput) -> torch.Tensor:
        """The ``div`` term of one level, ``(B, L)``."""
        if self.with_inter:
            weights = torch.softmax(-mean_divergence(output.inter), dim=-1)
            return weights.amax(dim=-1, keepdim=True) - weights
        return torch.softmax(-mean_divergence(output.intra), dim=-1)

    def token_scores(
        self,
        tokens: torch.Tensor,
        output: LevelOutput,
        level: int = 0,
        covariance: ResidualCovariance | None = None,
    ) -> torch.Tensor:
        """Score of every token of level ``level``, ``(B, L)`` (``covariance``: see :meth:`reconstruction_score`)."""
        return self.token_scores_under(tokens, output, level, (covariance,))[0]

    def token_scores_under(
        self,
        tokens: torch.Tensor,
        output: LevelOutput,
        level: int,
        covariances: Sequence[ResidualCovariance | None],
    ) -> list[torch.Tensor]:
        """:meth:`token_scores` under each of ``covariances``, ``(B, L)`` each, from one pass of the Mahalanobis
        distance (the blended distance holds the per-position one)."""
        if self.scoring == "div":
            return [self.divergence_score(output)] * len(covariances)
        rec = self.reconstruction_scores(tokens, output, level, covariances)
        if self.scoring == "rec":
            return rec
        div = self.divergence_score(output)
        return [score * div for score in rec]

    def reconstruction_score(
        self,
        tokens: torch.Tensor,
        output: LevelOutput,
        level: int = 0,
        covariance: ResidualCovariance | None = None,
    ) -> torch.Tensor:
        """The ``rec`` term of level ``level`` with this generator's ``reconstruction_term``, ``(B, L)``.

        ``covariance``: the Mahalanobis distance's covariance (default: ``residual_covariance``).
        """
        return self.reconstruction_scores(tokens, output, level, (covariance,))[0]

    def reconstruction_scores(
        self,
        tokens: torch.Tensor,
        output: LevelOutput,
        level: int,
        covariances: Sequence[ResidualCovariance | None],
    ) -> list[torch.Tensor]:
        """:meth:`reconstruction_score` under each of ``covariances`` (one pass of the Mahalanobis distance)."""
        if self.reconstruction_term == "mahalanobis":
            residual = tokens.float() - output.reconstruction.float()
            return self.statistics[level].distances(residual, covariances)
        return [reconstruction_score(tokens, output.reconstruction, self.reconstruction_term)] * len(covariances)

    def level_scores(
        self,
        tokens: list[torch.Tensor],
        outputs: list[LevelOutput],
        grids: list[tuple[int, int]],
    ) -> LevelScores:
        """Every level's token scores: of the anomaly map (with ``context_score``, the sum of the reconstruction
        and context distances in z-units), of the image score's own map when it has one, and the context z-scores
        (one context-predictor pass per level gives all three)."""
        pairs = list(enumerate(zip(tokens, outputs, strict=True)))
        if self.image_from_position:
            both = [self.token_scores_under(t, o, i, (None, "position")) for i, (t, o) in pairs]
            scores, position = [s for s, _ in both], [p for _, p in both]
        else:
            scores, position = [self.token_scores(t, o, i) for i, (t, o) in pairs], None
        if self.nearest_active:
            summed = [
                nearest.components(t, s, None if position is None else position[i])
                for nearest, (i, (t, _)), s in zip(self.nearest, pairs, scores, strict=True)
            ]
            image = None if position is None else [part[1] for part in summed]
            return LevelScores([part[0] for part in summed], image, None, [part[2] for part in summed])
        if not len(self.context):
            return LevelScores(scores, position, None)
        parts = [
            context.components(t, s, g, None if position is None else position[i])
            for context, (i, (t, _)), s, g in zip(self.context, pairs, scores, grids, strict=True)
        ]
        return LevelScores(
            [rec_z + ctx_z for rec_z, ctx_z, _ in parts],
            None if position is None else [image for *_, image in parts],
            [ctx_z for _, ctx_z, _ in parts],
        )

    @property
    def aligned_active(self) -> bool:
        """Whether the aligned map level adds to the map (built, and not declined by its fit)."""
        return self.aligned is not None and not self.aligned.declined

    def fine_share(self, fine_features: torch.Tensor | None, image_size: tuple[int, int]) -> torch.Tensor | None:
        """The fine map level's part ``(B, 1, H, W)`` of the anomaly map, in the map's units and before the blur,
        from the backbone's finer stage ``(B, C, h, w)``; ``None`` without the level."""
        if self.fine is None:
            return None
        if fine_features is None:
            msg = "the fine map level (fine_map_weight) needs the backbone's finer stage: call the model on images."
            raise ValueError(msg)
        return self.fine.scale() * self.fine.distance_map(fine_features, image_size, self.align_corners)

    def aligned_share(self, aligned_features: torch.Tensor | None, image_size: tuple[int, int]) -> torch.Tensor | None:
        """The aligned map level's part ``(B, 1, H, W)`` of the anomaly map, in the map's units and before the blur,
        from the finest level's unpooled backbone features ``(B, C, h, w)``; ``None`` where it takes no part."""
        if not self.aligned_active:
            return None
        if aligned_features is None:
            msg = (
                "the aligned map level (aligned_map_weight) needs the finest level's unpooled features: call the "
                "model on images."
            )
            raise ValueError(msg)
        return self.aligned.scale() * self.aligned.distance_map(aligned_features, image_size, self.align_corners)

    def map_shares(
        self,
        fine_features: torch.Tensor | None,
        aligned_features: torch.Tensor | None,
        image_size: tuple[int, int],
    ) -> torch.Tensor | None:
        """The map-only levels' parts of the anomaly map, summed ``(B, 1, H, W)``, or ``None`` without any."""
        parts = [
            part
            for part in (self.aligned_share(aligned_features, image_size), self.fine_share(fine_features, image_size))
            if part is not None
        ]
        return sum(parts[1:], parts[0]) if parts else None

    def combine(
        self,
        scores: LevelScores,
        grids: list[tuple[int, int]],
        image_size: tuple[int, int],
        fine_features: torch.Tensor | None = None,
        aligned_features: torch.Tensor | None = None,
        added: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, H, W)`` anomaly map (levels weighted ``map_level_weights``; with the map-only levels, their maps
        added from ``fine_features`` and ``aligned_features`` ``(B, C, h, w)``, or ``added`` where the caller made
        their sum ``(B, 1, H, W)``) and ``(B,)`` image scores (the maximum of the image score's own map, levels
        averaged, or of the anomaly map)."""
        if added is None:
            added = self.map_shares(fine_features, aligned_features, image_size)
        anomaly_map, image_scores = self.combine_levels(scores.map, grids, image_size, self.map_level_weights, added)
        if scores.image is not None:
            image_scores = self.combine_levels(scores.image, grids, image_size)[1]
        return anomaly_map, image_scores

    def forward(
        self,
        tokens: list[torch.Tensor],
        outputs: list[LevelOutput],
        grids: list[tuple[int, int]],
        image_size: tuple[int, int],
        fine_features: torch.Tensor | None = None,
        aligned_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine the levels.

        Args:
            tokens: per level ``(B, L_i, C_i)`` input features.
            outputs: per level Transformer outputs.
            grids: per level token grid ``(h_i, w_i)``.
            image_size: ``(H, W)`` of the pre-processed input.
            fine_features: with the fine map level, the backbone's finer stage ``(B, C, h, w)``.
            aligned_features: with the aligned map level, the finest level's unpooled features ``(B, C, h, w)``.

        Returns:
            ``(B, 1, H, W)`` anomaly map and ``(B,)`` image scores.
        """
        return self.combine(
            self.level_scores(tokens, outputs, grids), grids, image_size, fine_features, aligned_features
        )

    def combine_levels(
        self,
        scores: list[torch.Tensor],
        grids: list[tuple[int, int]],
        image_size: tuple[int, int],
        weights: Sequence[float] | None = None,
        added: torch.Tensor | None = None,
        blur: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-level token scores ``(B, L_i)`` -> ``(B, 1, H, W)`` map (upsampled, combined, blurred), ``(B,)`` max.

        ``weights``: of each level in the map (normalised to sum 1); ``None``: the levels' mean. ``added``: a
        ``(B, 1, H, W)`` map added before the blur. ``blur=False``: the map before the blur.
        """
        maps = []
        for score, (height, width) in zip(scores, grids, strict=True):
            score = score.reshape(score.shape[0], 1, height, width)
            maps.append(F.interpolate(score, size=image_size, mode="bilinear", align_corners=self.align_corners))
        if weights is None:
            anomaly_map = torch.stack(maps).mean(dim=0)
        else:
            total = sum(weights)
            anomaly_map = sum(level * (weight / total) for level, weight in zip(maps, weights, strict=True))
        if added is not None:
            anomaly_map = anomaly_map + added
        if blur and self.blur is not None:
            anomaly_map = self.blur(anomaly_map)
        return anomaly_map, anomaly_map.amax(dim=(-2, -1)).flatten()
