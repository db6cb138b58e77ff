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
