"""From the expert's per-crop patch maps to one anomaly map over the whole image.

AnyRes gives two views of a query image: the base crop (the whole image squeezed to one crop) and the
tiles (the image resized into a padded grid). Each view's patch map is brought back to image
coordinates (the tiles' padding removed the same way LLaVA-OneVision unpads features) and the two are
averaged, so fine tiles sharpen the map while the base crop still covers everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image


def assemble_heatmap(
    crop_maps: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """crop_maps [1 + rows*cols, s, s] of one image -> [H, W] map at out_size (differentiable)."""
    rows, cols = grid
    side = crop_maps.shape[-1]
    base = F.interpolate(crop_maps[:1, None].float(), out_size, mode="bilinear", align_corners=False)[0, 0]
    if rows * cols == 0:
        return base
    tiles = crop_maps[1:].float().view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    tiles = unpad_image(tiles[None], list(image_size))
    tiles = F.interpolate(tiles[None], out_size, mode="bilinear", align_corners=False)[0, 0]
    return (base + tiles) / 2


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[h, w] -> [H, W] bilinear, kept within the input's range."""
    if tuple(anomaly_map.shape) == tuple(size):
        return anomaly_map
    resized = F.interpolate(anomaly_map[None, None].float(), size, mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(float(anomaly_map.min()), float(anomaly_map.max()))
