"""ROI boxes on synthetic maps: known blobs give the expected boxes (Triad's rule + our fill-up)."""

import numpy as np
import pytest

from assistant.config import RoiConfig
from assistant.roi import detect_boxes, fill_boxes, merge_boxes, overlap_of_smaller, roi_boxes, square_box
from assistant.verdict import Box

CONFIG = RoiConfig(max_boxes=4)


def blob_map(height, width, blobs):
    anomaly_map = np.zeros((height, width), dtype=np.float32)
    for (y0, y1, x0, x1), value in blobs:
        anomaly_map[y0:y1, x0:x1] = value
    return anomaly_map


def test_single_blob_is_grown_to_one_crop_around_its_centre():
    anomaly_map = blob_map(400, 600, [((100, 110, 300, 320), 1.0)])
    [found] = detect_boxes(anomaly_map, 64, CONFIG)
    x0, y0, x1, y1 = found.corners
    assert (x1 - x0, y1 - y0) == (64, 64)
    assert x0 <= 300 and x1 >= 320 and y0 <= 100 and y1 >= 110
    assert abs((x0 + x1) / 2 - 310) <= 1 and abs((y0 + y1) / 2 - 105) <= 1
    assert found.score == pytest.approx(1.0)


def test_boxes_near_the_border_are_shifted_inside():
    anomaly_map = blob_map(200, 200, [((0, 5, 195, 200), 1.0)])
    [found] = detect_boxes(anomaly_map, 64, CONFIG)
    assert found.corners == (136, 0, 200, 64)


def test_two_distant_blobs_give_two_boxes_sorted_by_peak():
    anomaly_map = blob_map(300, 300, [((20, 30, 20, 30), 0.95), ((250, 260, 250, 260), 1.0)])
    found = detect_boxes(anomaly_map, 50, CONFIG)
    assert [f.score for f in found] == pytest.approx([1.0, 0.95])
    assert found[0].corners[0] >= 200 and found[1].corners[2] <= 100


def test_close_blobs_merge_into_one_square_box():
    anomaly_map = blob_map(300, 300, [((100, 110, 100, 110), 1.0), ((100, 110, 140, 150), 1.0)])
    [found] = detect_boxes(anomaly_map, 60, CONFIG)
    x0, y0, x1, y1 = found.corners
    assert x1 - x0 == y1 - y0  # squared
    assert x0 <= 100 and x1 >= 150


def test_weak_regions_below_ninety_percent_of_the_range_are_ignored():
    anomaly_map = blob_map(300, 300, [((20, 30, 20, 30), 0.85), ((250, 260, 250, 260), 1.0)])
    assert len(detect_boxes(anomaly_map, 50, CONFIG)) == 1


def test_flat_map_gives_no_box_and_small_images_span_fully():
    assert detect_boxes(np.full((50, 50), 0.3, dtype=np.float32), 64, CONFIG) == []
    [found] = detect_boxes(blob_map(40, 90, [((10, 12, 10, 12), 1.0)]), 64, CONFIG)
    assert found.corners[1] == 0 and found.corners[3] == 40  # the height is smaller than a crop


def test_fill_up_always_returns_the_requested_number_of_boxes():
    anomaly_map = blob_map(200, 200, [((90, 100, 90, 100), 1.0)])
    detected, crops = roi_boxes(anomaly_map, 64, CONFIG, CONFIG.max_boxes)
    assert len(detected) == 1 and len(crops) == CONFIG.max_boxes == 4
    assert roi_boxes(anomaly_map, 64, CONFIG, 1)[1] == crops[:1]
    assert crops[0] == detected[0]
    for x0, y0, x1, y1 in (box.corners for box in crops):
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200
    # Even a map fully covered by its boxes is filled (boxes may then repeat).
    assert len(fill_boxes(np.ones((30, 30)), [Box(x0=0, y0=0, x1=30, y1=30, score=1.0)], 64, 4)) == 4


def test_overlap_and_merge_helpers():
    assert overlap_of_smaller((0, 0, 10, 10), (5, 5, 100, 100)) == pytest.approx(0.25)
    assert overlap_of_smaller((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert merge_boxes([(0, 0, 10, 10), (5, 5, 20, 20), (50, 50, 60, 60)], 0.1) == [(0, 0, 20, 20), (50, 50, 60, 60)]
    assert square_box((10, 10, 30, 20), 100, 100) == (10, 5, 30, 25)


def test_invalid_maps_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        detect_boxes(np.zeros((3, 3, 3)), 10, CONFIG)
    with pytest.raises(ValueError, match="NaN"):
        detect_boxes(np.array([[0.0, np.nan]]), 10, CONFIG)
