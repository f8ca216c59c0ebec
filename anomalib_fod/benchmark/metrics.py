"""Exact, threshold-free metrics on raw (un-normalised, un-clamped) predictions.

anomalib's own metrics see post-processed scores (min-max normalised with validation
statistics and clamped to [0, 1], which creates ties) and its AUROC bins thresholds on [0, 1]
(0.5 on raw scores). These functions use every distinct score as a threshold instead:

- image AUROC and F1-max: scikit-learn on the image scores;
- pixel AUROC: scikit-learn on every pixel of every test image;
- pixel AUPRO: the per-region overlap (PRO) vs. global false-positive-rate curve of MVTec AD,
  integrated up to FPR 0.3 and divided by 0.3; regions are 8-connected components of each
  ground-truth mask (``scipy.ndimage.label``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

# 8-connectivity, as in the MVTec AD evaluation code.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


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


def min_max_scale(maps: np.ndarray) -> np.ndarray:
    """Scale all maps together to [0, 1] (one min and max over the whole test set)."""
    maps = np.asarray(maps, dtype=np.float64)
    low, high = float(maps.min()), float(maps.max())
    if high <= low:
        return np.zeros_like(maps)
    return (maps - low) / (high - low)


def region_labels(masks: np.ndarray) -> np.ndarray:
    """Connected components of each ``(N, H, W)`` mask, numbered 1.. uniquely over all images."""
    masks = np.asarray(masks).astype(bool)
    labels = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for index, mask in enumerate(masks):
        components, count = ndimage.label(mask, structure=_CONNECTIVITY)
        labels[index] = np.where(components > 0, components + offset, 0)
        offset += count
    return labels


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global FPR and mean per-region overlap at every distinct threshold (descending).

    Sorting all pixels by score once makes every threshold exact: lowering the threshold past a
    pixel adds ``1 / n_negative`` to the FPR if it is normal, and ``1 / (|region| n_regions)``
    to the mean overlap if it belongs to a defect region. Both curves start at (0, 0).

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` binary ground-truth masks.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.shape != masks.shape:
        msg = f"maps {maps.shape} and masks {masks.shape} must have the same (N, H, W) shape."
        raise ValueError(msg)
    labels = region_labels(masks).ravel()
    scores = maps.ravel()
    n_regions = int(labels.max())
    negatives = labels == 0
    n_negative = int(negatives.sum())
    if n_regions == 0 or n_negative == 0:
        return np.array([0.0]), np.array([0.0])

    region_size = np.bincount(labels, minlength=n_regions + 1).astype(np.float64)
    fpr_step = negatives / n_negative
    pro_step = np.where(negatives, 0.0, 1.0 / (region_size[labels] * n_regions))

    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    fpr = np.cumsum(fpr_step[order])
    pro = np.cumsum(pro_step[order])
    # One point per distinct threshold: the last pixel of each run of equal scores.
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate([[0.0], np.minimum(fpr[last_of_run], 1.0)])
    pro = np.concatenate([[0.0], np.minimum(pro[last_of_run], 1.0)])
    return fpr, pro


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, scale: bool = True) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (1.0 is perfect).

    Args:
        maps: ``(N, H, W)`` (or ``(N, 1, H, W)``) anomaly maps.
        masks: binary ground-truth masks of the same shape.
        fpr_limit: integrate over FPR in ``[0, fpr_limit]``.
        scale: min-max scale the maps over the whole set first (does not change the exact value,
            which depends only on the ranking; kept so stored curves are comparable).

    Returns:
        NaN when there is no defect region or no normal pixel.
    """
    if not 0 < fpr_limit <= 1:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}."
        raise ValueError(msg)
    fpr, pro = pro_curve(min_max_scale(maps) if scale else maps, masks)
    if fpr.size < 2:  # noqa: PLR2004 - no region or no negative pixel
        return math.nan
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit and inside.sum() < fpr.size:
        # Close the curve at exactly fpr_limit by linear interpolation to the next point.
        nxt = int(inside.sum())
        x0, x1, y0, y1 = fpr[nxt - 1], fpr[nxt], pro[nxt - 1], pro[nxt]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def exact_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All exact metrics of one cell; pixel metrics are NaN without maps or masks."""
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
