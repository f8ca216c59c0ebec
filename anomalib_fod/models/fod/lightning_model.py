"""FOD as an anomalib model: ``from anomalib_fod import Fod``.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_fod import Fod
    >>> engine = Engine(max_epochs=10)
    >>> engine.fit(Fod(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import AnomalibDataModule, Batch
from anomalib.models import AnomalibModule
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import optim

from anomalib_fod.models.base import ONNX_OPSET, NonFiniteLossError, OfflineBackboneModule

from .callbacks import (
    ReferenceFeatureCallback,
    ResidualStatisticsCallback,
    ValidateWhenTrainingStops,
    kept_token_share,
    training_transform,
)
from .feature_cache import FeatureCache, cache_blocker
from .fitting import TrainingImages, fill_feature_cache, fit_residual_statistics, in_file_order, shard_loader
from .loss import FodLoss
from .settings import (
    FeedForwardMode,
    FodSettings,
    FusionMode,
    ImageScore,
    ReconstructionTerm,
    ReferenceMode,
    ResidualCovariance,
    ScoringMode,
)
from .torch_model import FodModel

logger = logging.getLogger(__name__)

# Scoring settings added after checkpoints had been saved, with the value that keeps such a checkpoint's behaviour:
# its thresholds were learnt, and its statistics fitted, with it.
LEGACY_SCORING: dict[str, Any] = {
    "image_score": "map",
    "intensity_gains": (1.0,),
    "map_level_weights": None,
    "map_align_corners": True,
    "fine_map_weight": 0.0,
    "aligned_map_weight": 0.0,
}

# Where a checkpoint keeps the run's seed of the draws after training (Fod.draw_seed).
DRAW_SEED_KEY = "fod_draw_seed"

# Fewer optimizer steps than this are warned about: the minimax game may be under-trained (see _warn_few_steps).
MIN_RECOMMENDED_STEPS = 200
# The default budget: the default score (the whitened residual) no longer changes after it.
DEFAULT_TRAINING_STEPS = 250

__all__ = ["ONNX_OPSET", "Fod", "NonFiniteLossError"]


class Fod(OfflineBackboneModule, AnomalibModule):
    """FOD: Focus the Discrepancy -- intra- and inter-correlation learning (ICCV 2023).

    Every setting of :class:`~.settings.FodSettings` is an argument here (flat, for anomalib's CLI
    and the checkpoint's hyper-parameters); the backbone and pre-processing arguments are those of
    :class:`~anomalib_fod.models.base.OfflineBackboneModule` (passed on through ``**kwargs``). Where a
    default differs from the paper, docs/differences.md says why; the measurements behind each default
    are in benchmarks/results/accuracy.md and docs/training.md. The paper's recipe is the ``fod_paper`` config.

    Args:
        d_models: Transformer width per level (paper: 256, 512).
        num_heads: attention heads (paper: 8).
        num_layers: I2Correlation layers per level (paper: 3). One by default: the default score reads only
            the reconstruction, which a second and third layer did not improve, at three times the
            Transformers' arithmetic. The paper's score (``scoring="rec_div"``) needs the three.
        ffn_ratio: feed-forward width multiple (paper: 4).
        dropout: Transformer dropout (paper: 0).
        with_intra: intra-correlation branch (ablation switch).
        with_inter: inter-correlation branch (ablation switch).
        with_entropy: entropy terms in the loss (ablation switch).
        kl_weight: ``lambda1`` (paper: 0.5).
        entropy_weight: ``lambda2`` (paper: 0.5).
        scoring: ``"rec"`` (default: the reconstruction term alone), ``"rec_div"`` (paper: times the
            inter-branch divergence's within-image softmax) or ``"div"`` (the divergence alone).
        reconstruction_term: what the ``rec`` scoring term is: ``"mahalanobis"`` (default: the residual's
            Mahalanobis distance under a Gaussian model of the training images' residuals, fitted after
            training, see ``residual_statistics.py``; it judges a residual against those the model makes on
            normal images, channel by channel), ``"mse_cos"`` (paper: MSE + 1 - cos, in practice the MSE,
            whose scale follows the backbone's channels), ``"cos"`` (1 - cos alone) or ``"mse"``. Scoring
            only, so a trained model can be re-scored with another one
            (``Fod.load_from_checkpoint(path, reconstruction_term="cos")``; for ``"mahalanobis"`` then call
            :meth:`fit_residual_statistics`).
        residual_covariance: with ``reconstruction_term="mahalanobis"``, which covariance of the residuals
            a token's distance is measured under: ``"shared"`` (one per level for all token positions: parts
            that sit anywhere), ``"position"`` (one per position, shrunk towards the shared one by
            ``C / (N + C)`` for ``N`` training images and ``C`` channels: aligned parts, small defects) or
            ``"blend"`` (default: the mean of the two distances, which keeps most of what each is good at).
            The per-position statistics take ``L x C x C`` floats per level; training refuses, before its
            first step, more than 1 GiB of them (e.g. WideResNet50 at 256 px): then use ``"shared"``. Scoring
            only: on a trained checkpoint, refit with :meth:`fit_residual_statistics` (per-position
            statistics also hold the shared ones, so they serve all three).
        image_score: with ``reconstruction_term="mahalanobis"``, what the image score is the maximum of:
            ``"position"`` (default) a map made like the anomaly map from every token's distance under its
            own position's covariance alone, with the levels averaged equally, or ``"map"`` the anomaly map
            itself. The per-position distance ranks images best and the blend localises best, so each output
            takes its own. Needs the per-position statistics whatever ``residual_covariance`` is: with
            ``"shared"`` for their memory, set ``"map"`` too. Checkpoints saved before this setting existed
            keep ``"map"`` (their thresholds were learnt on the map's maximum) unless ``load_from_checkpoint``
            is given another.
        intensity_gains: with ``reconstruction_term="mahalanobis"``, the residual statistics are fitted on
            every training image multiplied by each of these gains (intensities in ``[0, 1]`` as anomalib's
            datasets load them, clipped), so their covariances hold what a global change of exposure or
            lighting does to the features and such a change within the gains is not scored as a defect.
            Default ``(0.9, 1.0, 1.1)``: +-10 %. ``(1.0,)``: the images as they are (set it when a global
            change of brightness is itself a defect of your product). Scoring only: the training is the same;
            the statistics' fit sees every training batch at every gain (in one batch of ``len(gains)`` times
            the size). Checkpoints saved before this setting existed refit with ``(1.0,)`` unless
            ``load_from_checkpoint`` is given another.
        map_level_weights: weight of each level in the anomaly map, finest first (normalised to sum 1), or
            ``None`` for the levels' mean (paper). Default ``(0.875, 0.125)``: the stride-8 level draws a
            defect's outline that the stride-16 level smears over its neighbours. The image score stays on
            the levels' mean, whose coarser context ranks images better, unless ``image_score="map"``.
            Scoring only; checkpoints saved before this setting existed keep the mean unless
            ``load_from_checkpoint`` is given weights.
        map_align_corners: upsample the levels' token grids with ``align_corners=True`` (the paper's code: the
            grid's corner tokens on the image's corners, up to half a stride off their cells' centres) instead
            of putting every token at the centre of its stride cell (default, as PaDiM and ``Cdo``). Scoring
            only; checkpoints saved before this setting existed keep ``True``.
        reference: ``"mean"`` (paper) or ``"coreset"`` reference features.
        out_projection: apply an output projection after each attention. ``False`` (default)
            matches the paper's code, which computed the projection and discarded it. Applying
            it (standard multi-head attention) made FOD leave chance in its first epoch less
            reliably (docs/differences.md).
        blur_sigma: Gaussian blur of the anomaly map (paper: 4).
        fusion: how a layer combines its intra and inter branches: ``"subtract"`` (FOD's
            I2Correlation) or ``"concat_mlp"`` (ED: concatenation, Linear 2D->4D, ReLU, Linear 4D->D).
        ffn: ``"mlp"`` (FOD) or ``"dwconv_median"`` (ED: depth-wise 3x3 conv over the token grid and
            a learned per-channel share of the median token).
        learnable_temperature: learn each attention's logit scale, from ``1/sqrt(head dim)`` (ED).
        relative_position_bias: learned bias of the query-to-key offset in every attention (ED
            option, off in ED's default).
        learning_rate: Adam learning rate (paper: 1e-4).
        training_steps: stop training after this many optimizer steps, whatever ``max_epochs`` says
            (``None``: the trainer's limits decide, as for other anomalib models). FOD learns per step,
            so a budget in steps means the same training on a small and a large dataset. The default,
            250, is where the default score stopped changing; the paper's score needs 1000 or more.
        cache_features: compute the frozen backbone's pooled features of every training image once,
            in CPU memory, when training starts (see ``feature_cache.py``). Used only when the
            dataset's augmentations and the pre-processor's transform are known to be deterministic
            (otherwise the features are computed every step, and the log says why). Results equal
            those without the cache up to floating-point rounding.
        compile_transformers: compile each level's Transformer with ``torch.compile`` (in place,
            so checkpoints keep their keys) when training or inference starts. Worth it for long GPU
            runs; the first steps pay the compilation (tens of seconds), which a short CPU run never
            wins back. Results are the same up to floating-point reordering.
        compile_kernels: compile only the correlation attentions' per-block kernels (softmax, logarithms,
            KL and entropy sums and their gradients; ``blocked_attention.py``) with ``torch.compile``, for
            maps large enough to pay for it: a few seconds of compiling, then faster training steps. Without
            a working compiler (no C++ compiler on a CPU, no Triton on a GPU) it warns once and runs the
            eager kernels. Results equal within float32 rounding.
        context_score: add the context score (``context.py``): each token is also judged against what the tokens
            beyond ``context_radius`` grid cells predict for it, a small predictor trained after the Transformers
            on the training images; the score is the sum of the two whitened distances in the training images'
            z-units; the image score follows ``image_score`` (by default the same sum of the distances under each
            position's own covariance, levels averaged).
        context_steps: the context predictors' optimizer steps (0: untrained).
        context_radius: grid cells around a token whose tokens its prediction may not read.
        context_hidden_share: share of each image's most unusual tokens hidden from every prediction.
        context_query_share: share of each level's positions the predictors learn per training step (a fresh
            random subset; about 3x cheaper steps at a quarter); inference predicts every position.
        nearest_tokens: the nearest-token score (``nearest.py``; 0: off; by default it chooses itself, see
            ``nearest_position_limit``): per level, a bank of this many
            training tokens drawn at random, and each token's distance to the nearest of them added to the
            Gaussian's, both in z-units measured on held-out training images (the image score: the same with the
            per-position distance). It keeps the several looks of a texture or of pooled products apart, where
            one Gaussian per position merges them. 40 000 tokens take 24 MB of buffers with Lite0; the score
            costs about 3 GMAC more per 256x256 image. It takes part with the whitened residual alone: the
            paper's scoring and ``context_score`` leave it out.
        nearest_position_limit: with ``nearest_tokens``, add the nearest-token score only when the training
            tokens' grid position explains less than this share of their variation (finest level, measured after
            training on the training images alone; logged, stored in the checkpoint): an aligned part is scored by
            its per-position Gaussian alone, a texture, a turning part or a few-image product with both.
            1.0: always add it.
        fine_map_weight: share of the anomaly map given to the backbone's stage at half the finest level's stride
            (Lite0's stride-4 ``blocks.1``), unpooled and untrained, judged by its own per-position Gaussian of the
            training images' features; both maps mixed in standard deviations of the training images' maps. It
            sharpens where the map places a small defect or a boundary; the image score's own map does not read it.
            ``None``: a quarter (``DEFAULT_FINE_MAP_WEIGHT``) where the scoring is the whitened residual and the
            backbone has that stage, else off; 0: off.
        aligned_map_weight: share of the anomaly map given to the finest level's backbone features unpooled, each
            token judged by its position's own Gaussian of the training images' features (PaDiM's model of an
            aligned part; untrained, map only): it keeps a defect a few pixels across whole where the pooled levels
            dilute it. ``None``: half (``DEFAULT_ALIGNED_MAP_WEIGHT``) where the scoring is the whitened residual
            and the fit finds the training images aligned (a token's grid position explains at least half of its
            variation: logged, stored in the checkpoint), else off; 0: off; a share: always, at that share.
        **kwargs: ``backbone`` (default ``"tf_efficientnet_lite0"``; the paper uses
            ``"wide_resnet50_2"``, see ``configs/fod_paper.yaml``), ``layers`` (two feature layers;
            ``None`` picks the stride-8 and stride-16 stages: WideResNet50 layer2, layer3;
            EfficientNet-Lite blocks.2, blocks.4), ``pre_trained``, ``weights_path``,
            ``image_size`` (any size with a few stride-16 tokens, >= 64 px per side),
            ``pre_processor``, ``post_processor``, ``evaluator``, ``visualizer``: see
            :class:`~anomalib_fod.models.base.OfflineBackboneModule`.
    """

    DISPLAY_NAME = "FOD"
    ARCHITECTURE_HPARAMS = FodSettings.architecture_names()
    EPOCHS_HINT = (
        "With training_steps=None FOD trains for the trainer's epochs: pass --trainer.max_epochs (or "
        "Engine(max_epochs=...)), or leave training_steps at its default (250 optimizer steps); see "
        "docs/training.md, 'Training length: optimizer steps'."
    )

    def __init__(
        self,
        d_models: Sequence[int] = (256, 512),
        num_heads: int = 8,
        num_layers: int = 1,
        ffn_ratio: int = 4,
        dropout: float = 0.0,
        with_intra: bool = True,
        with_inter: bool = True,
        with_entropy: bool = True,
        kl_weight: float = 0.5,
        entropy_weight: float = 0.5,
        scoring: ScoringMode = "rec",
        reconstruction_term: ReconstructionTerm = "mahalanobis",
        residual_covariance: ResidualCovariance = "blend",
        image_score: ImageScore = "position",
        intensity_gains: Sequence[float] = (0.9, 1.0, 1.1),
        map_level_weights: Sequence[float] | None = (0.875, 0.125),
        map_align_corners: bool = False,
        reference: ReferenceMode = "mean",
        out_projection: bool = False,
        blur_sigma: float = 4.0,
        fusion: FusionMode = "subtract",
        ffn: FeedForwardMode = "mlp",
        learnable_temperature: bool = False,
        relative_position_bias: bool = False,
        learning_rate: float = 1e-4,
        training_steps: int | None = DEFAULT_TRAINING_STEPS,
        cache_features: bool = True,
        compile_transformers: bool = False,
        compile_kernels: bool = True,
        context_score: bool = False,
        context_steps: int = 1000,
        context_radius: int = 2,
        context_hidden_share: float = 0.05,
        context_query_share: float = 0.25,
        nearest_tokens: int = 40000,
        nearest_position_limit: float = 0.5,
        fine_map_weight: float | None = None,
        aligned_map_weight: float | None = None,
        **kwargs: Any,  # noqa: ANN401 - OfflineBackboneModule's arguments
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        # The hyper-parameters hold every argument of this class and its bases, by name.
        self.model = FodModel(FodSettings.from_hparams(self.hparams))
        self.loss = FodLoss(kl_weight=kl_weight, entropy_weight=entropy_weight, with_entropy=with_entropy)
        if training_steps is not None and training_steps < 1:
            msg = f"training_steps must be a positive number of optimizer steps or None, got {training_steps}."
            raise ValueError(msg)
        self.training_steps = training_steps
        self.cache_features = cache_features
        self.compile_transformers = compile_transformers
        self._feature_cache = FeatureCache()
        # The seed of the fit's random draws after training (nearest-token folds and banks): the process's seed when
        # a fit starts, kept in checkpoints, so a run resumed in a process seeded otherwise draws the same.
        self.draw_seed: int | None = None

    def training_callbacks(self) -> list[Callback]:
        """The references before the first step; the residual statistics (when scoring reads them) after steps."""
        return [
            *super().training_callbacks(),
            ReferenceFeatureCallback(self.model.settings.reference),
            ResidualStatisticsCallback(),
            ValidateWhenTrainingStops(),
        ]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Fod:  # noqa: ANN401
        """Load a checkpoint (see the base class); a scoring setting added since checkpoints were first saved
        (:data:`LEGACY_SCORING`) passed here wins over the saved one."""
        model = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        # on_load_checkpoint may have set an older checkpoint's behaviour
        asked = {name: kwargs[name] for name in LEGACY_SCORING if name in kwargs}
        if asked:
            model.set_scoring(**asked)
        return model

    def on_fit_start(self) -> None:
        """Take the process's seed for the draws after training, unless a resumed checkpoint brought its own."""
        super().on_fit_start()
        if self.draw_seed is None:
            self.draw_seed = torch.initial_seed()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the run's draw seed beside the weights."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[DRAW_SEED_KEY] = self.draw_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved before a scoring setting existed keeps the behaviour its statistics and thresholds
        come from (:data:`LEGACY_SCORING`), unless a fit resumes from it: the fit refits the statistics and
        thresholds, so the settings this model was built with win. The run's draw seed comes back with it."""
        super().on_load_checkpoint(checkpoint)
        self.draw_seed = checkpoint.get(DRAW_SEED_KEY, self.draw_seed)
        if self._trainer is not None and self._trainer.state.fn == "fit":
            return
        saved = checkpoint.get("hyper_parameters", {})
        settings = self.model.settings
        legacy = {
            name: value for name, value in LEGACY_SCORING.items()
            if name not in saved and getattr(settings, name) != value
        }
        if legacy:
            logger.info("FOD: this checkpoint predates %s; it keeps %s.", ", ".join(legacy), legacy)
            self.set_scoring(**legacy)

    def set_scoring(self, **changes: Any) -> None:  # noqa: ANN401
        """Score with these scoring settings from now on (settings, hyper-parameters and the scoring module).

        ``intensity_gains`` act on the next fit of the residual statistics (the stored ones are kept until then).
        """
        unknown = set(changes) - set(LEGACY_SCORING)
        if unknown:
            msg = f"set_scoring changes {sorted(LEGACY_SCORING)}, not {sorted(unknown)}."
            raise ValueError(msg)
        settings = self.model.resolve_fine_weight(dataclasses.replace(self.model.settings, **changes))
        self.model.settings = settings
        self.model.anomaly_map_generator.use_scoring(settings)
        self.hparams.update({name: getattr(settings, name) for name in changes})

    def fit_residual_statistics(self, datamodule: AnomalibDataModule) -> None:
        """Fit the residual statistics on ``datamodule``'s training images, e.g. to re-score a checkpoint.

        With ``context_score`` a checkpoint's trained context predictor is kept (its z-units are refitted); one
        without it is trained.

        Example:
            >>> model = Fod.load_from_checkpoint("model.ckpt", reconstruction_term="mahalanobis")  # doctest: +SKIP
            >>> model.fit_residual_statistics(datamodule)  # doctest: +SKIP
        """
        datamodule.setup("fit")
        loader = in_file_order(datamodule.train_dataloader())
        share = kept_token_share(self.model, len(loader.dataset))
        images = TrainingImages(loader, training_transform(self), self.device, seed=self.draw_seed, keep_share=share)
        fit_residual_statistics(self.model, images, train_context=False)

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam over the Transformers (the backbone is frozen; the context predictors train after them)."""
        params = [p for p in self.model.levels.parameters() if p.requires_grad]
        return optim.Adam(params, lr=self.learning_rate)

    def setup(self, stage: str) -> None:
        """Compile the Transformers if asked."""
        del stage
        if self.compile_transformers:
            for level in self.model.levels:
                if not getattr(level, "_compiled_call_impl", None):
                    level.compile()

    def on_train_start(self) -> None:
        """Warn about too few optimizer steps; cache the backbone features when that is safe."""
        self._warn_few_steps()
        self._feature_cache.clear()
        self._use_cache = False
        if not self.cache_features:
            return
        trainer = self.trainer
        blocker = cache_blocker(trainer.train_dataloader, training_transform(self))
        if blocker is not None:
            logger.info("FOD: backbone features are not cached: %s.", blocker)
            return
        self._use_cache = True
        shard = shard_loader(trainer.train_dataloader, trainer.global_rank, trainer.world_size)
        images = TrainingImages(shard, training_transform(self), self.device, progress=trainer.is_global_zero)
        fill_feature_cache(self._feature_cache, self.model, images)
        logger.info(
            "FOD feature cache: %d images, %.1f MB of CPU memory",
            len(self._feature_cache),
            self._feature_cache.nbytes / 2**20,
        )

    @property
    def stops_itself(self) -> bool:
        """With ``training_steps`` FOD ends training itself, whatever the epoch count."""
        return self.training_steps is not None

    def on_train_batch_end(self, outputs: STEP_OUTPUT, batch: Batch, batch_idx: int) -> None:
        """Stop after ``training_steps`` optimizer steps (Lightning then validates, as at an epoch's end)."""
        del outputs, batch, batch_idx
        if self.training_steps is not None and self.global_step >= self.training_steps:
            self.trainer.should_stop = True

    def _warn_few_steps(self) -> None:
        """FOD learns per optimizer step, not per image: say so when a run takes too few steps.

        A large batch makes an epoch cheaper on a GPU but leaves the minimax game few updates
        (anomalib's datamodules default to batch 32: 7 steps per epoch on 209 images).
        """
        steps = self.trainer.estimated_stepping_batches
        if self.training_steps is not None and math.isfinite(steps) and steps < self.training_steps:
            logger.warning(
                "%s: the trainer's limits (max_epochs/max_steps) stop this run after %d optimizer steps, before "
                "training_steps=%d. Raise max_epochs (or leave it unset: FOD stops itself).",
                self.DISPLAY_NAME,
                int(steps),
                self.training_steps,
            )
        if self.training_steps is not None:
            steps = min(steps, self.training_steps)
        if not math.isfinite(steps) or steps >= MIN_RECOMMENDED_STEPS:
            return
        logger.warning(
            "%s: this run takes only %d optimizer steps. FOD learns per step: its default score was measured "
            "from %d steps on, and the paper's score (scoring='rec_div') needs its minimax game trained for 1000 "
            "or more. Use a smaller train_batch_size (1-4) or more epochs; see docs/training.md, 'Training length: "
            "optimizer steps'.",
            self.DISPLAY_NAME,
            int(steps),
            DEFAULT_TRAINING_STEPS,
        )

    def _training_features(self, batch: Batch) -> list[torch.Tensor]:
        paths = batch.image_path if getattr(self, "_use_cache", False) else None
        if not paths:
            return self.model.extract_features(batch.image)
        return self._feature_cache.get_or_compute(list(paths), batch.image, self.model.extract_features)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One minimax step on a batch of pre-processed normal images."""
        del args, kwargs
        output = self.model.forward_features(self._training_features(batch))
        loss, parts = self.loss(output.tokens, output.levels)
        self.log_loss(loss, parts, batch_size=batch.image.shape[0])
        return loss

    def _fixed_size_reason(self) -> str:
        """FOD's reference features are tied to the training token grid."""
        return (
            f"FOD's reference features (inter-correlation branch) were computed on the {self._grid_description()} "
            "token grid of the training images, and its positional encodings and target correlations are built "
            "from that grid."
        )

    def _grid_description(self) -> str:
        """``"32x32"``-style token grid of the first level's references (for error messages)."""
        level = self.model.levels[0]
        grid = getattr(level, "ref_grid", None)
        if not getattr(level, "has_reference", False) or grid is None or grid.numel() != 2:  # noqa: PLR2004
            return "training"
        height, width = (int(v) for v in grid.tolist())
        return f"{height}x{width}"
