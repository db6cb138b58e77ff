"""What the engine's verdict is made of: the Platt-scaled score, boxes in the image's own pixels, both heatmap views.

Each test fails when its step is skipped (raw sigmoid shown, boxes left in ROI-source pixels, tiles dropped
from the heatmap), without relying on trained weights: the test models are identity-calibrated and their
images small, so these steps were otherwise invisible to the suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from assistant.config import Settings
from assistant.engine import LocalEngine
from assistant.factory import tiny_assistant
from assistant.heatmap import assemble_heatmap
from assistant.layout import anyres_grid
from tests.helpers import defect_image


@pytest.fixture
def engine() -> LocalEngine:
    """A fresh tiny engine (its config is changed by the tests), its expert biased to call images anomalous."""
    model, processor = tiny_assistant(seed=0, roi=True)
    torch.nn.init.constant_(model.anomaly_expert.selector.score_head[2].bias, 3.0)
    return LocalEngine(model, processor)


def test_the_score_shown_is_the_decisions_scaled_expert_logit(engine):
    image = defect_image()
    engine.model.config.apply_settings(Settings(decision={"expert_weight": 0.5, "bias": -1.25}))  # llm_weight 0
    logit = float(engine.encode([image]).analysis.logits[0])
    assert engine.analyze(image).score == pytest.approx(1 / (1 + np.exp(-(0.5 * logit - 1.25))), abs=1e-6)
    assert abs(engine.analyze(image).score - 1 / (1 + np.exp(-logit))) > 0.05  # not the raw sigmoid


def test_boxes_are_in_the_images_pixels_when_it_is_larger_than_the_roi_source(engine):
    source_side = engine.model.config.roi.source_max_side
    image = defect_image(3 * source_side, 4 * source_side)  # the ROI source is this image at a quarter size
    analysis = engine.analyze(image)
    found = engine.encode([image]).analysis.boxes[0]
    assert analysis.anomalous and found and len(analysis.boxes) == len(found)
    source_h, source_w = engine.encode([image]).analysis.heatmaps[0].shape
    assert (source_h, source_w) == (3 * source_side // 4, source_side)
    for box, scored in zip(analysis.boxes, found):
        x0, y0, x1, y1 = scored.corners
        assert (box.x0, box.y0) == (x0 * 4, y0 * 4) and (box.x1, box.y1) == (x1 * 4, y1 * 4)
    assert max(box.x1 for box in analysis.boxes) > source_w  # beyond the source's width: rescaled


def test_the_heatmap_averages_the_base_crop_and_the_tiles(engine):
    config = engine.model.config
    size = (100, 150)
    rows, cols = anyres_grid(size, config)
    side = config.patches_per_side
    assert rows * cols > 0
    maps = torch.zeros(1 + rows * cols, side, side)
    maps[1:] = 1.0  # every tile anomalous, the base crop normal
    heatmap = assemble_heatmap(maps, size, (rows, cols), size)
    torch.testing.assert_close(heatmap, torch.full(size, 0.5))
    maps[1:] = 0.0
    maps[0] = 1.0  # and the other way round
    torch.testing.assert_close(assemble_heatmap(maps, size, (rows, cols), size), torch.full(size, 0.5))
