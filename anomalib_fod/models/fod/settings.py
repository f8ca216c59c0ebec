"""FOD's model settings: one typed, frozen object handed down the module tree.

``Fod`` keeps flat keyword arguments (anomalib's CLI lists them as ``--model.<name>`` and
checkpoints store them as hyper-parameters); :meth:`FodSettings.from_hparams` collects them into
this object once, and every module below (``FodModel``, ``FodTransformer``, ``I2CorrelationLayer``,
``CorrelationAttention``, ``AnomalyMapGenerator``) reads the fields it needs by name. Adding a
setting means one field here and one argument of ``Fod``; no signature in between changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from anomalib_fod.utils import check_choices

ScoringMode = Literal["rec", "div", "rec_div"]
ReconstructionTerm = Literal["mse_cos", "cos", "mse", "mahalanobis"]
ResidualCovariance = Literal["shared", "position", "blend"]
ImageScore = Literal["map", "position"]
ReferenceMode = Literal["mean", "coreset"]
FusionMode = Literal["subtract", "concat_mlp"]
FeedForwardMode = Literal["mlp", "dwconv_median"]

# Field metadata of the settings that change parameter or buffer shapes.
_SHAPES = {"architecture": True}

# The fine map level's share of the map where ``fine_map_weight`` is left to the model (None): small enough that the
# pooled stride-8 level stays in charge of the map, large enough to place a defect smaller than its 3x3 cells.
DEFAULT_FINE_MAP_WEIGHT = 0.25

# Where ``aligned_map_weight`` is left to the model (None): the aligned map level takes part when the training images'
# grid position explains at least this share of a token's variation (``aligned_level.position_share_of``; the limit
# the nearest-token score declines at), and then as much of the map as the model's own levels, neither in charge.
ALIGNED_POSITION_LIMIT = 0.5
DEFAULT_ALIGNED_MAP_WEIGHT = 0.5


@dataclass(frozen=True)
class FodSettings:
    """Everything that defines a FOD torch model (training-only settings live in ``Fod``).

    Attributes:
        backbone: timm CNN name.
        layers: two backbone feature layers (``None``: the stride-8 and stride-16 stages).
        pre_trained: load ImageNet weights for the backbone (offline, see :mod:`anomalib_fod.backbone`).
        weights_path: local timm state dict for the backbone.
        d_models: Transformer width per level.
        num_heads: attention heads.
        num_layers: encoder layers per level (default 1; the paper: 3).
        ffn_ratio: feed-forward width as a multiple of ``d_model``.
        dropout: dropout probability in the Transformers.
        with_intra: intra-correlation branch.
        with_inter: inter-correlation branch.
        out_projection: apply attention output projections (off, as in the paper's code).
        reference: ``"mean"`` (one reference per grid position) or ``"coreset"`` references.
        fusion: ``"subtract"`` (FOD) or ``"concat_mlp"`` (ED) fusion of the two branches.
        ffn: ``"mlp"`` (FOD) or ``"dwconv_median"`` (ED) feed-forward.
        learnable_temperature: learned attention logit scale (ED).
        relative_position_bias: learned relative-position bias in the attentions (ED option).
        scoring: ``"rec"`` (default), ``"rec_div"`` (paper) or ``"div"``.
        reconstruction_term: what the ``rec`` term is: ``"mahalanobis"`` (default): the residual whitened
            by the training images' own residual statistics (fitted after training, stored as buffers;
            see ``residual_statistics.py``), ``"mse_cos"`` (paper), ``"cos"`` or ``"mse"``.
        residual_covariance: with ``"mahalanobis"``: each token's distance under one residual covariance
            per level shared by all token positions (``"shared"``), under one per position shrunk towards
            the shared one (``"position"``), or the mean of the two (``"blend"``, default).
        image_score: with ``"mahalanobis"``: the image score is the maximum of the anomaly map (``"map"``) or
            of the map the per-position distances alone make (``"position"``, default; same upsampling and
            blur, levels averaged), whatever ``residual_covariance`` and ``map_level_weights`` the map uses. With
            other terms it is the map's maximum.
        intensity_gains: with ``"mahalanobis"``: the residual statistics are fitted on the training images
            multiplied by each of these gains (intensities in ``[0, 1]``, clipped), so a global change of
            exposure or lighting within them is normal. ``(1.0,)``: the images as they are.
        map_level_weights: weight of each level in the anomaly map (finest first; normalised to sum 1), or
            ``None`` for the paper's plain mean. The image score reads the levels equally whatever these are
            (with ``image_score="position"``; with ``"map"`` it is this map's maximum).
        map_align_corners: how the levels' token grids are upsampled (bilinear) to the image: ``False`` puts
            each token at the centre of its stride cell (the image area it stands for); ``True`` (the
            paper's code) stretches the grid so its corner tokens land on the image's corners, which shifts
            a token's score by up to half a stride towards the border.
        blur_sigma: Gaussian blur of the anomaly map (0 switches it off).
        compile_kernels: run the correlation attentions' block kernels through ``torch.compile`` where
            their maps are large (see ``blocked_attention.py``); same results, faster steps.
        context_score: add the context score to the whitened residual (``context.py``): every token is also
            judged against what the tokens beyond ``context_radius`` cells predict for it, both distances in the
            training images' z-units; with ``image_score="position"`` the image score sums the same two distances
            under each position's own covariance (levels averaged), else it is the anomaly map's maximum. Needs
            ``reconstruction_term="mahalanobis"`` and ``scoring="rec"``.
        context_steps: optimizer steps of the context predictors, after the Transformers' training (0: untrained,
            the reference of its learning gain).
        context_radius: grid cells around a token that its prediction may not read (2: none whose 3x3 pooling
            window holds the token's own cell).
        context_hidden_share: share of each image's most unusual tokens hidden from every prediction at inference.
        context_query_share: share of each level's positions the context predictors learn to predict per
            training step (a fresh random subset each step; 1: all). A quarter makes a step about 3x cheaper at
            256 px; inference always predicts every position.
        nearest_tokens: the nearest-token score (``nearest.py``): a bank of this many training tokens per
            level, each token's distance to the nearest of them added to the Gaussian's in held-out z-units
            (0: off). Takes part with ``reconstruction_term="mahalanobis"`` and ``scoring="rec"``, not with
            ``context_score``.
        nearest_position_limit: with ``nearest_tokens``, the model adds the nearest-token score only when a
            normal token's grid position explains less than this share of its variation (measured on the training
            images' finest level after training, ``nearest.position_share``): where position tells most of what a
            token should look like, the per-position Gaussian is the better model of normal and the nearest token,
            blind to position, only adds noise. 1.0: always add it; 0.0: never.
        fine_map_weight: share of the anomaly map given to a finer level that only the map reads
            (``fine_level.py``): the backbone's stage at half the finest level's stride (Lite0's stride-4
            ``blocks.1``), unpooled and untrained, each token judged by the distance of its features from its
            position's mean under the blended covariance of the training images (at every intensity gain). Both
            maps are mixed in standard deviations of the training images' maps. The image score's own map
            (``image_score="position"``) does not read it. ``None`` (the default): ``DEFAULT_FINE_MAP_WEIGHT`` where
            the scoring is fitted with the residual statistics (``reconstruction_term="mahalanobis"``, ``scoring``
            not ``"div"``) and the backbone has such a stage, else off. 0: off. A share given explicitly needs both.
        aligned_map_weight: share of the anomaly map (before the fine level's) given to a level that only the map
            reads (``aligned_level.py``): the finest level's backbone features unpooled (stride 8), each token judged
            by the distance from its position's mean under its position's own covariance, as PaDiM models aligned
            parts. ``None`` (the default): ``DEFAULT_ALIGNED_MAP_WEIGHT`` where the scoring is fitted with the
            residual statistics and the fit finds the training images aligned (a token's grid position explains at
            least ``ALIGNED_POSITION_LIMIT`` of its variation), else off; the choice is stored with the model.
            0: off. A share given explicitly takes part whatever the images (it needs the same scoring).
    """

    backbone: str = field(default="tf_efficientnet_lite0", metadata=_SHAPES)
    layers: tuple[str, ...] | None = field(default=None, metadata=_SHAPES)
    pre_trained: bool = True
    weights_path: str | None = None
    d_models: tuple[int, ...] = field(default=(256, 512), metadata=_SHAPES)
    num_heads: int = field(default=8, metadata=_SHAPES)
    num_layers: int = field(default=1, metadata=_SHAPES)
    ffn_ratio: int = field(default=4, metadata=_SHAPES)
    dropout: float = 0.0
    with_intra: bool = field(default=True, metadata=_SHAPES)
    with_inter: bool = field(default=True, metadata=_SHAPES)
    out_projection: bool = field(default=False, metadata=_SHAPES)
    reference: ReferenceMode = "mean"
    fusion: FusionMode = field(default="subtract", metadata=_SHAPES)
    ffn: FeedForwardMode = field(default="mlp", metadata=_SHAPES)
    learnable_temperature: bool = field(default=False, metadata=_SHAPES)
    relative_position_bias: bool = field(default=False, metadata=_SHAPES)
    scoring: ScoringMode = "rec"
    reconstruction_term: ReconstructionTerm = "mahalanobis"
    residual_covariance: ResidualCovariance = "blend"
    image_score: ImageScore = "position"
    intensity_gains: tuple[float, ...] = (0.9, 1.0, 1.1)
    map_level_weights: tuple[float, ...] | None = (0.875, 0.125)
    map_align_corners: bool = False
    blur_sigma: float = 4.0
    compile_kernels: bool = True
    context_score: bool = field(default=False, metadata=_SHAPES)
    context_steps: int = 1000
    context_radius: int = 2
    context_hidden_share: float = 0.05
    context_query_share: float = 0.25
    nearest_tokens: int = field(default=40000, metadata=_SHAPES)
    nearest_position_limit: float = 0.5
    fine_map_weight: float | None = None
    aligned_map_weight: float | None = None

    def __post_init__(self) -> None:
        # YAML and jsonargparse give lists; tuples keep the object hashable and comparable.
        for name in ("layers", "d_models"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        gains = self.intensity_gains
        gains = (gains,) if isinstance(gains, (int, float)) else tuple(float(gain) for gain in gains)
        if not gains or not all(math.isfinite(gain) and gain > 0 for gain in gains):
            msg = f"intensity_gains must be one or more positive numbers (1.0: the images as they are), got {gains}."
            raise ValueError(msg)
        object.__setattr__(self, "intensity_gains", gains)
        weights = self.map_level_weights
        if weights is not None:
            weights = tuple(float(weight) for weight in weights)
            if not all(math.isfinite(weight) and weight >= 0 for weight in weights) or sum(weights) <= 0:
                msg = (
                    "map_level_weights must be non-negative weights, one per level (finest first) and not all "
                    f"zero, or None for the levels' mean; got {weights}."
                )
                raise ValueError(msg)
            object.__setattr__(self, "map_level_weights", weights)
        if (
            self.context_steps < 0
            or self.context_radius < 0
            or not 0 <= self.context_hidden_share < 1
            or not 0 < self.context_query_share <= 1
        ):
            msg = (
                "context_steps and context_radius must be >= 0, context_hidden_share in [0, 1) and "
                f"context_query_share in (0, 1]; got {self.context_steps}, {self.context_radius}, "
                f"{self.context_hidden_share}, {self.context_query_share}."
            )
            raise ValueError(msg)
        if self.context_score and (self.reconstruction_term != "mahalanobis" or self.scoring != "rec"):
            msg = (
                "context_score adds to the whitened residual: it needs reconstruction_term='mahalanobis' and "
                f"scoring='rec', got {self.reconstruction_term!r} and {self.scoring!r}."
            )
            raise ValueError(msg)
        if self.nearest_tokens < 0:
            msg = f"nearest_tokens must be >= 0 (0: off), got {self.nearest_tokens}."
            raise ValueError(msg)
        if not 0 <= self.nearest_position_limit <= 1:
            msg = (
                "nearest_position_limit is a share of the tokens' variation, in [0, 1] (1: always add the "
                f"nearest-token score), got {self.nearest_position_limit}."
            )
            raise ValueError(msg)
        if self.nearest_tokens and not self.nearest_chooses and not self.nearest_applies:
            msg = (
                "nearest_tokens adds to the whitened residual: it needs reconstruction_term='mahalanobis', "
                f"scoring='rec' and context_score=False, got {self.reconstruction_term!r}, {self.scoring!r} and "
                f"{self.context_score}."
            )
            raise ValueError(msg)
        self._check_map_share("fine_map_weight", self.fine_map_weight)
        self._check_map_share("aligned_map_weight", self.aligned_map_weight)
        check_choices(self)

    def _check_map_share(self, name: str, share: float | None) -> None:
        """A map-only level's share: ``None`` or in ``[0, 1)``, and a non-zero one needs the residual statistics."""
        if share is None:
            return
        if not 0 <= share < 1:
            msg = f"{name} is a share of the anomaly map, in [0, 1) (0: off; None: the model's default), got {share}."
            raise ValueError(msg)
        if share and not self.map_levels_apply:
            msg = (
                f"{name} is fitted with the residual statistics: it needs reconstruction_term='mahalanobis' and "
                f"scoring 'rec' or 'rec_div', got {self.reconstruction_term!r} and {self.scoring!r}."
            )
            raise ValueError(msg)

    @property
    def nearest_applies(self) -> bool:
        """Whether the nearest-token score can take part: it adds to the whitened residual alone. Where it cannot
        (the paper's scoring, ``context_score``), a self-choosing one (``nearest_position_limit < 1``) stays out and
        a required one is refused."""
        return self.reconstruction_term == "mahalanobis" and self.scoring == "rec" and not self.context_score

    @property
    def map_levels_apply(self) -> bool:
        """Whether the map-only levels (fine, aligned) can take part: they are fitted with the residual statistics."""
        return self.reconstruction_term == "mahalanobis" and self.scoring != "div"

    @property
    def fine_weight(self) -> float:
        """The fine map level's share of the map these settings ask for (``fine_map_weight`` resolved; whether the
        backbone has the stage is the feature extractor's to say)."""
        if self.fine_map_weight is not None:
            return self.fine_map_weight
        return DEFAULT_FINE_MAP_WEIGHT if self.map_levels_apply else 0.0

    @property
    def aligned_weight(self) -> float:
        """The aligned map level's share of the map these settings ask for (``aligned_map_weight`` resolved; whether
        the images are aligned is the fit's to say, see :attr:`aligned_chooses`)."""
        if self.aligned_map_weight is not None:
            return self.aligned_map_weight
        return DEFAULT_ALIGNED_MAP_WEIGHT if self.map_levels_apply else 0.0

    @property
    def aligned_chooses(self) -> bool:
        """Whether the fit decides if the aligned map level takes part (the default) rather than being told."""
        return self.aligned_map_weight is None

    @property
    def nearest_chooses(self) -> bool:
        """Whether the nearest-token score decides on the training images whether to take part
        (``nearest_position_limit < 1``), and so is left out where it cannot decide; else it is required."""
        return self.nearest_position_limit < 1

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> FodSettings:
        """The settings among ``hparams`` (a model's saved hyper-parameters); others are ignored."""
        return cls(**{f.name: hparams[f.name] for f in fields(cls) if f.name in hparams})

    @classmethod
    def architecture_names(cls) -> tuple[str, ...]:
        """Settings that change parameter or buffer shapes: a checkpoint only fits the same values."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("architecture"))
