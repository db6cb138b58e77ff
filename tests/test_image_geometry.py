"""Every image size the loader accepts gives a finite heatmap of the image's own size, or the documented error.

A sweep over short sides from 1 px and aspect ratios from 1:1 to the pixel limit, both orientations, through
the tiny model's analysis (which also builds and counts every LLM embedding of the image) and the per-image
processor the vLLM server runs. Thin strips once made the tile heatmap empty and crashed every surface.
The pixel limit is lowered for the sweep: the geometry depends on the aspect ratio, not on the pixel count.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from assistant import image_io
from assistant.engine import LocalEngine
from assistant.heatmap import assemble_heatmap, crop_targets
from assistant.image_io import ImageError
from assistant.layout import anyres_grid, image_layout
from assistant.serve.images import ItemImageProcessor
from assistant.verdict import Verdict

PIXEL_LIMIT = 2_000_000


def sweep_sizes(limit: int) -> list[tuple[int, int]]:
    """(height, width): short sides 1..97 px times ratios 1:1..1:limit, both orientations, within the limit."""
    sizes = set()
    for short in (1, 2, 3, 7, 16, 33, 97):
        for ratio in (1, 2, 3, 5, 9, 16, 40, 100, 333, 2_000, 30_000, 400_000):
            long = short * ratio
            if short * long <= limit:
                sizes |= {(short, long), (long, short)}
    sizes |= {(1, limit), (limit, 1), (1414, 1414)}  # the extremes at the limit itself
    return sorted(sizes)


@pytest.fixture
def lowered_limit(monkeypatch):
    monkeypatch.setattr(image_io, "MAX_PIXELS", PIXEL_LIMIT)


@pytest.fixture(scope="module")
def engine(tiny):
    return LocalEngine(*tiny)


def flat_image(height: int, width: int) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 110, 100))


@pytest.mark.usefixtures("lowered_limit")
def test_every_accepted_size_gives_a_finite_heatmap_of_its_own_size(engine):
    for height, width in sweep_sizes(PIXEL_LIMIT):
        verdict = engine.analyze(flat_image(height, width))
        assert verdict.heatmap.shape == (height, width), (height, width)
        # Re-validated: finite heatmap in [0, 1], score in [0, 1], boxes inside the image with ordered corners.
        Verdict.model_validate(verdict.model_dump())


@pytest.mark.usefixtures("lowered_limit")
def test_the_serving_processor_takes_every_accepted_size(engine):
    processor = ItemImageProcessor(engine.processor)
    config = engine.model.config
    for height, width in sweep_sizes(PIXEL_LIMIT):
        fields = processor([flat_image(height, width)])
        seen = engine.processor.model_size((height, width))  # the long side shrunk to 1024 (Anomaly-OV's rule)
        layout = image_layout(seen, config)
        assert fields["pixel_values"][0].shape[0] == layout.num_crops, (height, width)
        assert fields["image_sizes"].tolist() == [list(seen)]


@pytest.mark.usefixtures("lowered_limit")
def test_over_the_pixel_limit_is_the_documented_error(engine):
    for height, width in [(1, PIXEL_LIMIT + 1), (PIXEL_LIMIT + 1, 1), (1415, 1415)]:
        with pytest.raises(ImageError, match="pixels is more than the limit"):
            engine.analyze(flat_image(height, width))
        with pytest.raises(ImageError, match="pixels is more than the limit"):
            ItemImageProcessor(engine.processor)([flat_image(height, width)])


def test_a_strip_thinner_than_one_tile_patch_keeps_its_tile_map(tiny):
    """The tiles still sharpen the map of a 1:50 strip: their middle patch row is kept, not the base map alone."""
    config = tiny[0].config
    size = (3, 150)
    rows, cols = anyres_grid(size, config)
    side = config.patches_per_side
    maps = torch.zeros(1 + rows * cols, side, side)
    maps[1:] = 1.0  # tiles all anomalous, base crop all normal
    heatmap = assemble_heatmap(maps, size, (rows, cols), size)
    assert heatmap.shape == size and torch.allclose(heatmap, torch.full(size, 0.5))  # the average of both views
    targets = crop_targets(torch.ones(size), size, (rows, cols), side)
    assert targets[1:].sum() > 0  # training marks the same rows
