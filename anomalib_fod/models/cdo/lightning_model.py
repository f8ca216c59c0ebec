"""CDO as an anomalib model: ``from anomalib_fod import Cdo``.

Example, on folders of your own images (50 epochs at batch 16 is the original recipe):
    >>> from anomalib.data import Folder
    >>> from anomalib.engine import Engine
    >>> from anomalib_fod import Cdo
    >>> data = Folder(name="parts", root="parts", normal_dir="good", abnormal_dir="defect", train_batch_size=16)
    >>> Engine(max_epochs=50).fit(Cdo(anomaly_source="perlin"), datamodule=data)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from anomalib.data import Batch
from anomalib.models import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim
from torchvision.transforms import v2

from anomalib_fod.models.base import OfflineBackboneModule

from .loss import CdoLoss
from .synthetic import AnomalySource, make_anomaly_generator
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

    A resumed run sees the same batches as an uninterrupted one, but other synthetic anomalies:
    they are drawn from the global RNG, which a checkpoint does not hold.

    Args:
        gamma: overlap-optimisation exponent (paper: 2; 0: plain margin loss).
        anomaly_source: ``"white_noise"`` (paper: noise rectangles) or ``"perlin"`` (anomalib's
            Perlin generator).
        blur_sigma: Gaussian blur of the anomaly map (paper: 4).
        learning_rate: Adam learning rate (original code: 4e-4).
        **kwargs: ``backbone`` for teacher and student (the paper uses HRNet32, not in timm's
            feature form here; e.g. ``"wide_resnet50_2"`` with ``weights_path`` works too),
            ``layers`` (three feature layers; ``None`` picks the stride-4, 8 and 16 stages:
            EfficientNet-Lite blocks.1, blocks.2, blocks.4; ResNets layer1, layer2, layer3),
            ``pre_trained`` / ``weights_path`` (the teacher's ImageNet weights), ``image_size``,
            ``pre_processor``, ``post_processor``, ``evaluator``, ``visualizer``: see
            :class:`~anomalib_fod.models.base.OfflineBackboneModule`.
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
        gamma: float = 2.0,
        anomaly_source: AnomalySource = "white_noise",
        blur_sigma: float = 4.0,
        learning_rate: float = 4e-4,
        **kwargs: Any,  # noqa: ANN401 - OfflineBackboneModule's arguments
    ) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        hparams = self.hparams  # every argument of this class and its bases, by name
        self.model = CdoModel(
            backbone=hparams.backbone,
            layers=hparams.layers,
            pre_trained=hparams.pre_trained,
            weights_path=hparams.weights_path,
            blur_sigma=blur_sigma,
        )
        self.loss = CdoLoss(gamma=gamma)
        self.anomaly_generator = make_anomaly_generator(anomaly_source, *normalisation_of(self.pre_processor))

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
        self.log_loss(loss, parts, batch_size=batch.image.shape[0])
        return loss
