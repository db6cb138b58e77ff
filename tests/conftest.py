"""Shared fixtures: tiny random assistants built from configs and images drawn in code (no downloads)."""

from __future__ import annotations

import os

# Before transformers/gradio are imported: tests never reach a hub or a telemetry endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch
from PIL import Image

from assistant.factory import save_assistant, tiny_assistant


def defect_image(height: int = 120, width: int = 160, seed: int = 0, defect: bool = True) -> Image.Image:
    """A textured grey part with an optional bright scratch, drawn deterministically."""
    rng = np.random.default_rng(seed)
    pixels = 110 + 20 * rng.standard_normal((height, width, 3))
    if defect:
        y, x = height // 3, width // 2
        pixels[y : y + max(2, height // 20), x - width // 6 : x + width // 6] = 245
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) with ROI tokens on; do not mutate."""
    torch.manual_seed(0)
    return tiny_assistant(seed=0, roi=True)


@pytest.fixture(scope="session")
def tiny_no_roi():
    return tiny_assistant(seed=0, roi=False)


@pytest.fixture(scope="session")
def tiny_path(tiny, tmp_path_factory):
    """The ROI-enabled tiny model saved as a checkpoint folder."""
    model, processor = tiny
    return save_assistant(model, processor, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def image() -> Image.Image:
    return defect_image()


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "part.png"
    defect_image().save(path)
    return str(path)
