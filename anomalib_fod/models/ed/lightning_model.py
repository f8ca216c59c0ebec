"""ED ("Emphasize Differences") as a preset of FOD's settings.

ED keeps FOD's backbone, references, three discrepancies (patch-wise, intra, inter), minimax
loss and scoring, and changes three parts of the Transformer. Each of them is a ``Fod`` setting,
so ``Ed`` is only a different set of defaults and shares every line of model code with FOD:

===========================  ===================================  ===========================================
part                         FOD                                  ED (``Ed`` defaults)
===========================  ===================================  ===========================================
branch fusion                ``fusion="subtract"``: intra-inter   ``fusion="concat_mlp"``: concat, MLP 2D->4D->D
attention                    fixed scale ``1/sqrt(head dim)``     ``learnable_temperature=True`` (init the same);
                                                                  ``relative_position_bias`` optional, off
feed-forward                 ``ffn="mlp"``                        ``ffn="dwconv_median"``: fc1, depth-wise 3x3
                                                                  conv, GELU, + scale x median token, fc2
===========================  ===================================  ===========================================

Any of them can be switched back, e.g. ``Ed(fusion="subtract")`` is FOD with ED's attention and
feed-forward. ``Ed`` keeps the papers' score (reconstruction times divergence), their three layers per
level and the trainer's epoch limits: ``Fod``'s newer defaults (the whitened residual, one layer, a
250-step budget) were measured on FOD only, and the papers' score needs the depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomalib.models.components import AnomalibModule

from anomalib_fod.models.fod.lightning_model import Fod
from anomalib_fod.models.fod.settings import FeedForwardMode, FusionMode, ReconstructionTerm, ScoringMode


class Ed(Fod, AnomalibModule):  # AnomalibModule again: anomalib's get_model only sees its direct subclasses
    """ED: Emphasize Differences -- FOD with concat+MLP fusion, learnable temperature and a DW-conv FFN.

    Args:
        fusion: ``"concat_mlp"`` (ED) or ``"subtract"`` (FOD).
        ffn: ``"dwconv_median"`` (ED) or ``"mlp"`` (FOD).
        learnable_temperature: learned attention logit scale (ED: on).
        relative_position_bias: learned relative-position bias (ED: optional, off by default).
        scoring: ``"rec_div"`` (ED and FOD papers), ``"rec"`` or ``"div"``.
        reconstruction_term: ``"mse_cos"`` (papers), ``"mahalanobis"`` (``Fod``'s default), ``"cos"``, ``"mse"``.
        training_steps: optimizer-step budget (``None``: the trainer's ``max_epochs`` decide).
        num_layers: encoder layers per level (the papers: 3).
        map_level_weights: the levels' weights in the anomaly map (``None``: their mean, as the papers).
        map_align_corners: the papers' corner-aligned upsampling of the token grids (see ``Fod``).
        **kwargs: every other :class:`~anomalib_fod.Fod` argument (backbone, image_size, ...).
    """

    def __init__(
        self,
        fusion: FusionMode = "concat_mlp",
        ffn: FeedForwardMode = "dwconv_median",
        learnable_temperature: bool = True,
        relative_position_bias: bool = False,
        scoring: ScoringMode = "rec_div",
        reconstruction_term: ReconstructionTerm = "mse_cos",
        training_steps: int | None = None,
        num_layers: int = 3,
        map_level_weights: Sequence[float] | None = None,
        map_align_corners: bool = True,
        **kwargs: Any,  # noqa: ANN401 - Fod's arguments
    ) -> None:
        super().__init__(
            fusion=fusion,
            ffn=ffn,
            learnable_temperature=learnable_temperature,
            relative_position_bias=relative_position_bias,
            scoring=scoring,
            reconstruction_term=reconstruction_term,
            training_steps=training_steps,
            num_layers=num_layers,
            map_level_weights=map_level_weights,
            map_align_corners=map_align_corners,
            **kwargs,
        )
