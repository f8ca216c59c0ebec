"""Exact, threshold-free metrics on a model's raw (un-normalised, un-clamped) predictions.

anomalib's metrics in ``Engine.test`` see post-processed scores (min-max normalised with
validation statistics and clamped to [0, 1], which creates ties). For exact figures,
:func:`raw_post_processing` switches that off around ``Engine.predict``, :func:`collect_predictions`
gathers the outputs, and :func:`exact_metrics` computes:

- image AUROC and F1-max: anomalib's ``AUROC`` and ``F1Max`` on the image scores;
- pixel AUROC: anomalib's ``AUROC`` on every pixel of every test image;
- pixel AUPRO: anomalib's ``AUPRO`` (per-region overlap against the global false-positive rate,
  regions = connected components of each mask), integrated up to FPR 0.3 and divided by 0.3.

Each uses every distinct score as a threshold (no binning), so it depends only on the scores' ranking.
One care is needed for AUROC: torchmetrics' ROC takes scores outside ``[0, 1]`` for logits and squashes
them with a sigmoid, which ties every large raw score (anomalib's ``AUROC`` gives exactly 0.5 on raw
Mahalanobis distances in the tens). The scores are therefore mapped into ``[0, 1]`` first by an increasing
affine map in float64, which keeps every score's rank and keeps distinct float32 scores distinct; the
result equals scikit-learn's ``roc_auc_score`` up to the float32 rounding of torchmetrics' curve (below
1e-6, tested).

Used by ``anomalib-fod demo`` and the benchmark harness.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from anomalib.metrics import AUPRO, AUROC, F1Max
from anomalib.metrics.base import AnomalibMetric
from torch import nn


VISUALIZER_HOOKS = ("on_test_batch_end", "on_predict_batch_end")


def _draw_nothing(*args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - any Lightning hook's arguments
    del args, kwargs


@contextmanager
def raw_post_processing(model: nn.Module) -> Iterator[None]:
    """Switch off the post-processor's min-max normalisation (and clamping) temporarily, and the visualiser.

    ``Engine.predict`` otherwise returns scores normalised with the validation statistics and
    clamped to [0, 1]; the exact metrics need the model's raw outputs. A visualiser draws maps in
    [0, 1]: fed raw ones it wraps their values around (a heat map of rings) and overwrites the
    pictures of the same images that ``Engine.test`` drew from the normalised maps, so it draws
    nothing while the outputs are raw.
    """
    post_processor = getattr(model, "post_processor", None)
    if not post_processor:
        yield
        return
    if not hasattr(post_processor, "enable_normalization"):
        msg = (
            f"{type(model).__name__}'s post-processor {type(post_processor).__name__} has no "
            "`enable_normalization` switch: cannot obtain raw predictions."
        )
        raise TypeError(msg)
    visualizer = getattr(model, "visualizer", None)
    silenced = [hook for hook in VISUALIZER_HOOKS if visualizer is not None and hasattr(visualizer, hook)]
    saved = post_processor.enable_normalization
    post_processor.enable_normalization = False
    for hook in silenced:  # the instance's attribute shadows the class's method for as long as it exists
        setattr(visualizer, hook, _draw_nothing)
    try:
        yield
    finally:
        post_processor.enable_normalization = saved
        for hook in silenced:
            delattr(visualizer, hook)


def _as_nhw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, 0] if tensor.ndim == 4 else tensor  # noqa: PLR2004 - (N, 1, H, W) -> (N, H, W)


def collect_predictions(predictions: list[Any]) -> dict[str, Any]:
    """Concatenate predict batches into numpy arrays (maps resized to the masks if they differ).

    Returns:
        ``scores (N,)``, ``labels (N,)``, ``maps (N, H, W)`` or ``None``, ``masks (N, H, W)`` or
        ``None``, and the image ``paths``.
    """
    scores = torch.cat([p.pred_score.detach().flatten().float().cpu() for p in predictions])
    labels = torch.cat([p.gt_label.detach().flatten().int().cpu() for p in predictions])
    paths = [str(path) for p in predictions for path in (p.image_path or [])]
    maps = masks = None
    if all(p.anomaly_map is not None for p in predictions):
        maps = torch.cat([_as_nhw(p.anomaly_map.detach().float().cpu()) for p in predictions])
    if all(p.gt_mask is not None for p in predictions):
        masks = torch.cat([_as_nhw(p.gt_mask.detach().cpu()) for p in predictions]).bool()
    if maps is not None and masks is not None and maps.shape[-2:] != masks.shape[-2:]:
        size = masks.shape[-2:]
        maps = nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return {
        "scores": scores.numpy(),
        "labels": labels.numpy(),
        "maps": None if maps is None else maps.numpy(),
        "masks": None if masks is None else masks.numpy(),
        "paths": paths,
    }


def _has_both_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < int(labels.max()) and int(labels.min()) == 0


def _unit_interval(values: torch.Tensor) -> torch.Tensor:
    """``values`` mapped into ``[0, 1]`` by an increasing affine map, in float64 (ranks and ties unchanged)."""
    values = values.double()
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def _compute(metric: AnomalibMetric, prediction: torch.Tensor, target: torch.Tensor) -> float:
    """One anomalib metric over ``prediction`` and ``target``, handed over as the batch fields it reads."""
    metric.update(SimpleNamespace(**dict(zip(metric.fields, (prediction, target), strict=True))))
    return float(metric.compute())


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image-level AUROC (anomalib's ``AUROC``); NaN when the test set lacks normal or anomalous images."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not _has_both_classes(labels):
        return math.nan
    scores_t = _unit_interval(torch.as_tensor(np.asarray(scores)).flatten())
    return _compute(AUROC(fields=["pred_score", "gt_label"]), scores_t, torch.as_tensor(labels))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images (anomalib's ``AUROC``); NaN without both pixel classes."""
    masks = np.asarray(masks).astype(np.uint8).ravel()
    if not _has_both_classes(masks):
        return math.nan
    maps_t = _unit_interval(torch.as_tensor(np.asarray(maps)).flatten())
    return _compute(AUROC(fields=["anomaly_map", "gt_mask"]), maps_t, torch.as_tensor(masks).long())


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best image-level F1 over all thresholds (anomalib's ``F1Max``; the threshold is chosen on the test set:
    an upper bound)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not _has_both_classes(labels):
        return math.nan
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float64)).flatten()
    return _compute(F1Max(fields=["pred_score", "gt_label"]), scores_t, torch.as_tensor(labels))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """anomalib's AUPRO of ``(N, H, W)`` (or ``(N, 1, H, W)``) maps against binary masks (1.0 is perfect).

    It uses every distinct map value as a threshold, so it depends only on the ranking of the
    values. NaN (instead of anomalib's 0) when there is no defect region or no normal pixel.
    """
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}."
        raise ValueError(msg)
    maps_t = _as_nhw(torch.as_tensor(np.asarray(maps, dtype=np.float32)))
    masks_t = _as_nhw(torch.as_tensor(np.asarray(masks).astype(np.uint8)))
    if maps_t.shape != masks_t.shape:
        msg = f"maps {tuple(maps_t.shape)} and masks {tuple(masks_t.shape)} must have the same (N, H, W) shape."
        raise ValueError(msg)
    if not _has_both_classes(masks_t.numpy()):
        return math.nan
    return _compute(AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit), maps_t, masks_t)


def exact_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All exact metrics of one evaluation; pixel metrics are NaN without maps or masks."""
    result = {
        "image_auroc": image_auroc(scores, labels),
        "image_f1_max": f1_max(scores, labels),
        "pixel_auroc": math.nan,
        "pixel_aupro": math.nan,
    }
    if maps is not None and masks is not None:
        result["pixel_auroc"] = pixel_auroc(maps, masks)
        result["pixel_aupro"] = aupro(maps, masks, fpr_limit=fpr_limit)
    return result
