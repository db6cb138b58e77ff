"""Heatmap overlays for people: the anomaly map as a JET colour layer blended over the photo."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .verdict import Box


def quantize(heatmap: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 levels, the resolution the colour map has (a uint8 map passes unchanged)."""
    if heatmap.dtype == np.uint8:
        return heatmap
    return np.clip(heatmap * 255.0, 0, 255).astype(np.uint8)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] (or its `quantize`d levels) -> [H, W, 3] uint8 RGB (blue = normal, red = anomalous)."""
    return cv2.cvtColor(cv2.applyColorMap(quantize(heatmap), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def blend_heatmap(
    image: Image.Image, heatmap: np.ndarray, opacity: float = 0.5, boxes: Sequence[Box] = ()
) -> Image.Image:
    """The photo with the coloured heatmap at `opacity` (0 = photo only, 1 = heatmap only) and box outlines."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within [0, 1], got {opacity}")
    if heatmap.shape != (image.height, image.width):
        raise ValueError(f"heatmap {heatmap.shape} does not match the image size {(image.height, image.width)}")
    photo = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1.0 - opacity) * photo + opacity * colorize(heatmap).astype(np.float32)
    result = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    width = max(2, round(max(image.size) / 200))
    for box in boxes:
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), outline=(255, 255, 255), width=width)
    return result
