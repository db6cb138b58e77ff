"""From the expert's per-crop patch maps to one anomaly map over the whole image.

AnyRes gives two views of a query image: the base crop (the whole image squeezed to one crop) and the
tiles (the image resized into a padded grid). Each view's patch map is brought back to image
coordinates (the tiles' padding removed the way LLaVA-OneVision unpads features, `tile_content`) and the two are
averaged, so fine tiles sharpen the map while the base crop still covers everything. `crop_targets` goes the
other way for training: a defect mask onto every crop's patch grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import tile_content


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
    tiles = tiles[tile_content(tiles.shape, image_size, keep_one=True)]
    tiles = F.interpolate(tiles[None, None], out_size, mode="bilinear", align_corners=False)[0, 0]
    return (base + tiles) / 2


def tile_regions(
    boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], side: int, source_size: tuple[int, int]
) -> torch.Tensor:
    """Boxes [K, 4] (x0, y0, x1, y1 in source pixels) -> the same regions on the tiles' patch grid [K, 4]
    (continuous patch coordinates): the inverse of `assemble_heatmap`'s placement of the tiles' map."""
    rows, cols = grid
    content_rows, content_cols = tile_content((rows * side, cols * side), image_size, keep_one=True)
    source_h, source_w = source_size
    scale_x = (content_cols.stop - content_cols.start) / source_w
    scale_y = (content_rows.stop - content_rows.start) / source_h
    scale = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    offset = boxes.new_tensor([content_cols.start, content_rows.start, content_cols.start, content_rows.start])
    return boxes * scale + offset


def crop_targets(mask: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], side: int) -> torch.Tensor:
    """[H, W] defect mask -> [1 + rows*cols, side, side] patch targets laid out like the crop maps.

    A patch is a target when any of its pixels is defective (max pooling), so a defect smaller than a patch
    still marks one; the tiles' padding stays 0, placed exactly where `assemble_heatmap` removes it.
    """
    rows, cols = grid
    source = mask.float()[None, None]
    base = F.adaptive_max_pool2d(source, side)[0]
    if rows * cols == 0:
        return base
    tiles = torch.zeros(rows * side, cols * side, device=mask.device)
    # a view: writing it fills the unpadded region
    content = tiles[tile_content(tiles.shape, image_size, keep_one=True)]
    content.copy_(F.adaptive_max_pool2d(source, tuple(content.shape))[0, 0])
    tiles = tiles.view(rows, side, cols, side).permute(0, 2, 1, 3).reshape(rows * cols, side, side)
    return torch.cat([base, tiles])


def resize_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[h, w] -> [H, W] bilinear, kept within the input's range."""
    if tuple(anomaly_map.shape) == tuple(size):
        return anomaly_map
    resized = F.interpolate(anomaly_map[None, None].float(), size, mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(float(anomaly_map.min()), float(anomaly_map.max()))
