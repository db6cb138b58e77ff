"""Expert-guided regions of interest (Triad's EG-RoI): anomaly map -> square boxes to crop and re-encode.

Triad binarises the map at 90% of its dynamic range, takes the external contours' boxes, grows each to
at least one crop, merges overlapping ones and squares them. We keep that rule for the boxes we show,
sort them by their peak score, and then fill up to the image layout's box count around the next most
suspicious peaks: that count follows from the image size alone (`layout.roi_box_count`), so vLLM knows
every image's ROI tokens before the model runs.
"""

from __future__ import annotations

import cv2
import numpy as np

from .config import RoiConfig
from .verdict import Box

Corners = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive: the arithmetic before scoring


def _fit_span(start: int, stop: int, min_length: int, limit: int) -> tuple[int, int]:
    """Grow [start, stop) around its centre to min_length, shifted to stay inside [0, limit)."""
    length = stop - start
    if length >= min_length:
        return start, stop
    if min_length >= limit:
        return 0, limit
    start = (start + stop) // 2 - min_length // 2
    start = min(max(start, 0), limit - min_length)
    return start, start + min_length


def grow_box(box: Corners, min_side: int, width: int, height: int) -> Corners:
    x0, x1 = _fit_span(box[0], box[2], min_side, width)
    y0, y1 = _fit_span(box[1], box[3], min_side, height)
    return x0, y0, x1, y1


def square_box(box: Corners, width: int, height: int) -> Corners:
    side = max(box[2] - box[0], box[3] - box[1])
    return grow_box(box, side, width, height)


def overlap_of_smaller(a: Corners, b: Corners) -> float:
    """Intersection over the smaller box's area (Triad's merge criterion)."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return inter_w * inter_h / smaller


def merge_boxes(boxes: list[Corners], min_overlap: float) -> list[Corners]:
    """Replace overlapping boxes by their union until no pair overlaps more than min_overlap."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if overlap_of_smaller(boxes[i], boxes[j]) > min_overlap:
                    a, b = boxes[i], boxes.pop(j)
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    merged = True
                    break
            if merged:
                break
    return boxes


def _peak(anomaly_map: np.ndarray, corners: Corners) -> float:
    x0, y0, x1, y1 = corners
    return float(anomaly_map[y0:y1, x0:x1].max())


def _box(corners: Corners, peak: float) -> Box:
    """The box scored with its peak, clipped to [0, 1] like the heatmap a verdict shows."""
    x0, y0, x1, y1 = corners
    return Box(x0=x0, y0=y0, x1=x1, y1=y1, score=min(1.0, max(0.0, peak)))


def detect_boxes(anomaly_map: np.ndarray, min_side: int, config: RoiConfig) -> list[Box]:
    """Triad's rule: threshold, contours, grow to one crop, merge, square; best `max_boxes` by peak."""
    if anomaly_map.ndim != 2 or anomaly_map.size == 0:
        raise ValueError(f"anomaly map must be a non-empty 2-D array, got shape {anomaly_map.shape}")
    height, width = anomaly_map.shape
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    if not np.isfinite([low, high]).all():
        raise ValueError("anomaly map contains NaN or infinite values")
    if high - low <= 1e-12:
        return []  # a flat map points nowhere
    binary = (anomaly_map >= low + config.threshold_ratio * (high - low)).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    corners = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        corners.append(grow_box((x, y, x + w, y + h), min_side, width, height))
    corners = [square_box(box, width, height) for box in merge_boxes(corners, config.merge_overlap)]
    peaks = {box: _peak(anomaly_map, box) for box in corners}  # ranked unclipped, as Triad does
    ranked = sorted(peaks, key=lambda box: (-peaks[box], box))
    return [_box(box, peaks[box]) for box in ranked[: config.max_boxes]]


def fill_boxes(anomaly_map: np.ndarray, boxes: list[Box], min_side: int, count: int) -> list[Box]:
    """Add square boxes around the highest peaks outside the chosen boxes until there are `count`."""
    height, width = anomaly_map.shape
    remaining = anomaly_map.astype(np.float64, copy=True)
    for box in boxes:
        remaining[box.y0 : box.y1, box.x0 : box.x1] = -np.inf
    boxes = list(boxes)
    while len(boxes) < count:
        if np.isneginf(remaining).all():
            remaining = anomaly_map.astype(np.float64, copy=True)  # whole image covered: allow repeats
        y, x = np.unravel_index(int(np.argmax(remaining)), remaining.shape)
        corners = grow_box((int(x), int(y), int(x) + 1, int(y) + 1), min_side, width, height)
        boxes.append(_box(corners, _peak(anomaly_map, corners)))
        remaining[corners[1] : corners[3], corners[0] : corners[2]] = -np.inf
    return boxes


def roi_boxes(anomaly_map: np.ndarray, min_side: int, config: RoiConfig, count: int) -> tuple[list[Box], list[Box]]:
    """Detected boxes (to show) and exactly `count` crop boxes (to encode: the image layout's `num_boxes`)."""
    detected = detect_boxes(anomaly_map, min_side, config)
    return detected, fill_boxes(anomaly_map, detected[:count], min_side, count)
