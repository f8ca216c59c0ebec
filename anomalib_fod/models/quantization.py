"""INT8 post-training quantization (``INT8_PTQ``, ``INT8_ACQ``) of an exported model with NNCF.

anomalib's own implementation hands the whole graph to ``nncf.quantize``. NNCF then also quantizes
the scoring head: the feature normalisation, the teacher-student (or reconstruction) discrepancy,
the map's upsampling and Gaussian blur and the post-processor's min-max normalisation. Quantizing
the blur alone (a convolution) took a CDO model's raw scores from 3.4 to 4e-6: every normalised
score became 0.0 (image AUROC 0.5). Here only the model's feature layers are quantized: by default
the backbone's convolutions, i.e. ``Convolution``/``GroupConvolution`` nodes except those of the
modules the model keeps in float (its anomaly-map generator). Everything else stays float32.

Two more differences from anomalib 2.7:

- Calibration and validation feed single images (NNCF's ``subset_size`` counts images, and a model
  at 256 px does not need batches of 32 in memory).
- ``INT8_ACQ``'s validation metric is reset for every model NNCF evaluates. anomalib's updates one
  metric and never resets it, so each result mixes the predictions of all earlier models (measured:
  a drop of 0.27 F1 remained with every layer reverted to float32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import AnomalibDataModule, ImageBatch
from anomalib.deploy import CompressionType
from torch.utils.data import DataLoader

QUANTIZED_COMPRESSIONS = (CompressionType.INT8_PTQ, CompressionType.INT8_ACQ)


class SingleImages:
    """A re-iterable view of a dataloader's images, one ``(1, 3, H, W)`` float array at a time.

    Args:
        dataloader: an anomalib dataloader (batches with an ``image`` field in ``[0, 1]``).
    """

    def __init__(self, dataloader: DataLoader) -> None:
        self.dataloader = dataloader

    def __iter__(self) -> Iterator[Any]:
        for batch in self.dataloader:
            for image in batch.image:
                yield image[None].numpy()

    def __len__(self) -> int:
        return len(self.dataloader.dataset)


def _weight_name(op: Any) -> str:  # noqa: ANN401 - openvino.Node
    """Name of the constant feeding ``op``'s weight input: the torch parameter/buffer name when it survived."""
    node = op.input(1).get_source_output().get_node()
    while node.get_type_name() in {"Convert", "Reshape", "Transpose", "Unsqueeze"}:
        node = node.input(0).get_source_output().get_node()
    return node.get_friendly_name() if node.get_type_name() == "Constant" else ""


def ignored_scope(
    model: Any,  # noqa: ANN401 - openvino.Model
    quantized_types: Sequence[str],
    float_modules: Sequence[str] = (),
) -> Any:  # noqa: ANN401 - nncf.IgnoredScope
    """An ``nncf.IgnoredScope`` that leaves only the model's feature layers to quantize.

    Args:
        model: the OpenVINO model.
        quantized_types: OpenVINO op types to quantize, e.g. ``("Convolution", "GroupConvolution")``.
        float_modules: torch name prefixes (``"model.anomaly_map_generator."``) of layers that stay
            float although their type is quantized, recognised by the name of their weight constant.
            The exporter keeps parameter and buffer names on constants it does not fold; a folded
            one (e.g. a depthwise kernel reshaped for ``GroupConvolution``) is nameless and is
            quantized, so the layers named here must not have their weights folded.
    """
    import nncf  # noqa: PLC0415 - optional dependency

    types: set[str] = set()
    float_names: list[str] = []
    for op in model.get_ops():
        types.add(op.get_type_name())
        if op.get_type_name() in quantized_types and _weight_name(op).startswith(tuple(float_modules)):
            float_names.append(op.get_friendly_name())
    others = sorted(types - set(quantized_types))
    return nncf.IgnoredScope(names=float_names, types=others, validate=False)


def _validation_function(metric: Any) -> Callable[[Any, Iterable[Any]], float]:  # noqa: ANN401
    """``validation_fn`` for ``nncf.quantize_with_accuracy_control``: ``metric`` over the given batches only."""

    def validate(compiled: Any, batches: Iterable[Any]) -> float:  # noqa: ANN401 - openvino.CompiledModel
        metric.reset()
        for batch in batches:
            outputs = compiled(batch.image.numpy())
            anomaly_map = torch.from_numpy(outputs["anomaly_map"])
            gt_mask = batch.gt_mask
            if gt_mask is not None:
                # The map comes back at the training size; masks are at the image's.
                gt_mask = F.interpolate(gt_mask[:, None].float(), size=anomaly_map.shape[-2:], mode="nearest") > 0.5  # noqa: PLR2004
            metric.update(
                ImageBatch(
                    image=batch.image,
                    gt_label=batch.gt_label,
                    gt_mask=gt_mask,
                    pred_score=torch.from_numpy(outputs["pred_score"]).reshape(-1),
                    pred_label=torch.from_numpy(outputs["pred_label"]).reshape(-1),
                    anomaly_map=anomaly_map,
                    pred_mask=torch.from_numpy(outputs["pred_mask"]) if "pred_mask" in outputs else None,
                ),
            )
        return float(metric.compute())

    return validate


def default_acq_metric() -> Any:  # noqa: ANN401 - an anomalib metric
    """anomalib's default for ``INT8_ACQ``: the image-level F1 score of the predicted labels."""
    from anomalib.metrics import F1Score  # noqa: PLC0415

    return F1Score(fields=["pred_label", "gt_label"])


def quantize_int8(
    model: Any,  # noqa: ANN401 - openvino.Model
    compression_type: CompressionType,
    datamodule: AnomalibDataModule | None,
    quantized_types: Sequence[str],
    float_modules: Sequence[str] = (),
    metric: Any = None,  # noqa: ANN401 - an anomalib metric
    max_drop: float = 0.01,
) -> Any:  # noqa: ANN401
    """Quantize ``model`` (an OpenVINO model of the whole pipeline) to INT8 with NNCF.

    Args:
        model: the FP32 OpenVINO model.
        compression_type: ``INT8_PTQ`` or ``INT8_ACQ``.
        datamodule: calibration images (validation split); for ``INT8_ACQ`` also the labelled test split.
        quantized_types: OpenVINO op types to quantize, e.g. ``("Convolution", "GroupConvolution")``.
        float_modules: torch name prefixes of layers of those types that stay float (see :func:`ignored_scope`).
        metric: ``INT8_ACQ``'s metric (higher is better); default image F1 of ``pred_label``.
        max_drop: ``INT8_ACQ``'s largest accepted absolute drop of ``metric``.

    Raises:
        ValueError: no datamodule, an unknown compression type or ``max_drop`` outside ``[0, 1]``.
    """
    import nncf  # noqa: PLC0415 - optional dependency

    if compression_type not in QUANTIZED_COMPRESSIONS:
        msg = f"quantize_int8 does {[c.value for c in QUANTIZED_COMPRESSIONS]}, got {compression_type}."
        raise ValueError(msg)
    if datamodule is None:
        msg = f"{compression_type.value} needs a datamodule: its validation images calibrate the quantization."
        raise ValueError(msg)
    if not 0 <= max_drop <= 1:
        msg = f"max_drop must be between 0 and 1, got {max_drop}."
        raise ValueError(msg)
    datamodule.setup("fit")
    calibration = nncf.Dataset(SingleImages(datamodule.val_dataloader()))
    scope = ignored_scope(model, quantized_types, float_modules)
    if compression_type == CompressionType.INT8_PTQ:
        return nncf.quantize(model, calibration, ignored_scope=scope)
    datamodule.setup("test")
    return nncf.quantize_with_accuracy_control(
        model,
        calibration,
        nncf.Dataset(datamodule.test_dataloader()),
        _validation_function(metric if metric is not None else default_acq_metric()),
        max_drop=max_drop,
        ignored_scope=scope,
    )
