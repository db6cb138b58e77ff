"""Anomaly-detection metrics with the MVTec/VisA conventions, and the pixel resampling they are computed on.

Image and pixel AUROC and F1-max come from scikit-learn's ROC / precision-recall curves. AUPRO follows the MVTec
definition (Bergmann et al., IJCV 2021): per-region overlap averaged over the connected components (8-connected)
of the ground truth, integrated over the false-positive rate up to 0.3 and divided by 0.3 (not by the last FPR
reached, the anomalib < 2.3 bug that inflates it). A metric that is undefined for the data (one class only)
returns None instead of raising.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

from assistant.image_io import fit_long_side

FPR_LIMIT = 0.3


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The best F1 over all thresholds (chosen on the test data itself, so optimistic by construction)."""
    labels = np.asarray(labels).ravel().astype(bool)
    if not labels.any():
        return None
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores).ravel())
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def _regions(masks: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Connected components of every mask, flattened and numbered 1..R across all masks (0 = normal)."""
    labels, count = [], 0
    for mask in masks:
        found, components = cv2.connectedComponents(np.asarray(mask, dtype=np.uint8), connectivity=8)
        labels.append(np.where(components > 0, components + count, 0).ravel())
        count += found - 1
    return np.concatenate(labels), count


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = FPR_LIMIT) -> float | None:
    """Normalised area under the per-region-overlap curve for FPR in [0, fpr_limit].

    `masks` and `maps` are per-image HxW arrays (sizes may differ between images). Exact: every distinct score
    is a threshold (pixels with score >= threshold are predicted anomalous).
    """
    region, count = _regions(masks)
    normal = int((region == 0).sum())
    if count == 0 or normal == 0:
        return None
    sizes = np.bincount(region, minlength=count + 1).astype(np.float64)
    # Each pixel, once above the threshold, adds 1/normal to the FPR or 1/(count * its region's size) to the PRO.
    fpr_step = np.where(region == 0, 1.0 / normal, 0.0)
    pro_step = np.where(region > 0, 1.0 / (count * sizes[region]), 0.0)
    scores = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    order = np.argsort(-scores, kind="stable")
    last_of_tie = np.r_[scores[order][1:] != scores[order][:-1], True]
    fpr = np.r_[0.0, np.cumsum(fpr_step[order])[last_of_tie]]
    pro = np.r_[0.0, np.cumsum(pro_step[order])[last_of_tie]]
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], pro[:inside]
    if inside < len(fpr):  # close the curve at the limit by linear interpolation
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        x, y = np.r_[x, fpr_limit], np.r_[y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    return float(np.trapezoid(y, x) / fpr_limit)


def evaluation_size(height: int, width: int, pixel_size: int) -> tuple[int, int]:
    """The mask resolution, shrunk so the long side is at most `pixel_size` (0: unchanged) to bound memory."""
    return (height, width) if pixel_size <= 0 else fit_long_side((height, width), pixel_size)


def resample(anomaly_map: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Map bilinear and mask nearest-neighbour to (H, W) `size`, as the pixel metrics expect."""
    height, width = size
    resized_map = cv2.resize(np.asarray(anomaly_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    resized_mask = cv2.resize(np.asarray(mask, dtype=np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return resized_map, resized_mask
