import json

import numpy as np
import pytest
from pydantic import ValidationError

from assistant.verdict import Box, Verdict


def make(**overrides):
    fields = dict(
        anomalous=True,
        score=0.8,
        heatmap=np.linspace(0, 1, 12).reshape(3, 4),
        boxes=[Box(x0=0, y0=0, x1=2, y1=2, score=0.9)],
    )
    fields.update(overrides)
    return Verdict(**fields)


def test_json_round_trip_keeps_heatmap_to_16_bits():
    verdict = make(defect="scratch", reasoning="A scratch on the left.")
    data = json.loads(verdict.model_dump_json())
    assert isinstance(data["heatmap"], str) and data["boxes"][0]["x1"] == 2
    restored = Verdict.model_validate(data)
    assert restored.heatmap.shape == (3, 4)
    np.testing.assert_allclose(restored.heatmap, verdict.heatmap, atol=1 / 65535)
    assert restored.defect == "scratch"


@pytest.mark.parametrize(
    "overrides",
    [
        {"score": 1.5},
        {"heatmap": np.zeros(5)},
        {"heatmap": np.full((2, 2), 2.0)},
        {"boxes": [Box(x0=0, y0=0, x1=9, y1=2, score=0.5)]},
    ],
)
def test_invalid_verdicts_are_rejected(overrides):
    with pytest.raises(ValidationError):
        make(**overrides)


def test_box_corners_must_be_ordered():
    with pytest.raises(ValidationError, match="out of order"):
        Box(x0=5, y0=0, x1=5, y1=3, score=0.1)


def test_a_box_scales_outwards_and_stays_inside_the_image():
    box = Box(x0=10, y0=3, x1=11, y1=5, score=0.5)
    assert box.scaled(0.3, 0.3, 100, 100).corners == (3, 0, 4, 2)  # 3.0-3.3 px keeps one whole pixel
    assert box.scaled(4.0, 4.0, 40, 40).corners == (39, 12, 40, 20)  # clipped to the 40 px image
    assert Box(x0=100, y0=0, x1=110, y1=1, score=0.5).scaled(1.1, 1.0, 200, 1).corners == (110, 0, 121, 1)


def test_the_expert_verdict_is_built_at_the_images_size():
    heatmap = np.zeros((50, 100), np.float32)
    heatmap[10:20, 40:60] = 1.0
    boxes = [Box(x0=40, y0=10, x1=60, y1=20, score=1.0)]
    verdict = Verdict.decided(0.7, 0.5, heatmap, boxes, (200, 100))  # the image is twice the map's size
    assert verdict.anomalous and verdict.heatmap.shape == (100, 200)
    assert [box.corners for box in verdict.boxes] == [(80, 20, 120, 40)]
    normal = Verdict.decided(0.3, 0.5, heatmap, boxes, (200, 100))
    assert not normal.anomalous and normal.boxes == [] and normal.reasoning == "" and normal.defect is None
