"""Exact, threshold-free metrics on a model's raw (un-normalised, un-clamped) predictions.

anomalib's metrics in ``Engine.test`` see post-processed scores (min-max normalised with
validation statistics and clamped to [0, 1], which creates ties). For exact figures,
:func:`raw_post_processing` switches that off around ``Engine.predict``, :func:`collect_predictions`
gathers the outputs, and :func:`exact_metrics` computes:

- image AUROC and F1-max: scikit-learn on the image scores;
- pixel AUROC: scikit-learn on every pixel of every test image;
- pixel AUPRO: anomalib's ``AUPRO`` (per-region overlap against the global false-positive rate,
  regions = connected components of each mask), integrated up to FPR 0.3 and divided by 0.3.

Used by ``anomalib-fod demo`` and the benchmark harness.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from anomalib.metrics import AUPRO
from sklearn.metrics import precision_recall_curve, roc_auc_score
from torch import nn


@contextmanager
def raw_post_processing(model: nn.Module) -> Iterator[None]:
    """Switch off the post-processor's min-max normalisation (and clamping) temporarily.

    ``Engine.predict`` otherwise returns scores normalised with the validation statistics and
    clamped to [0, 1]; the exact metrics need the model's raw outputs.
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
    saved = post_processor.enable_normalization
    post_processor.enable_normalization = False
    try:
        yield
    finally:
        post_processor.enable_normalization = saved


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


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image-level AUROC; NaN when the test set lacks normal or anomalous images."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not _has_both_classes(labels):
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images; NaN without both pixel classes."""
    masks = np.asarray(masks).astype(np.uint8).ravel()
    if not _has_both_classes(masks):
        return math.nan
    return float(roc_auc_score(masks, np.asarray(maps, dtype=np.float64).ravel()))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best image-level F1 over all thresholds (the threshold is chosen on the test set: an
    upper bound, reported as anomalib's ``F1Max`` is)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not _has_both_classes(labels):
        return math.nan
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64).ravel())
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


class _MapsAndMasks(NamedTuple):
    """The two batch fields anomalib's ``AUPRO`` reads."""

    anomaly_map: torch.Tensor
    gt_mask: torch.Tensor


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
    metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=fpr_limit)
    metric.update(_MapsAndMasks(anomaly_map=maps_t, gt_mask=masks_t))
    return float(metric.compute())


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
