"""Where every visual token of an image goes in the LLM input, computed from the image size alone.

The processor, the model and the vLLM plugin all call these functions, so the number of placeholder
tokens can never disagree between them. A query image expands to

    [base + AnyRes tokens] "with" [adverb] " suspicious features:" [global, crop-0 and grid expert tokens] [ROI tokens]

(without the phrase and the expert's tokens when `expert.tokens` is off, without ROI tokens when `roi.enabled` is)

where every bracketed run is made of image-token positions whose embeddings the model supplies.
Reference (normal) images in a few-shot prompt use LLaVA-OneVision's multi-image form, the padded square crop
plus one newline, followed with `reference.prompt` "expert" (and `expert.tokens` on) by its own phrase and expert
tokens (global + crop):

    [square crop + newline] ("with" [adverb] " suspicious features:" [global and crop expert tokens])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers.image_processing_utils import select_best_resolution

from .config import AssistantConfig


@dataclass(frozen=True)
class ImageLayout:
    """Token counts of one image, in the order they appear in the prompt."""

    is_query: bool
    grid: tuple[int, int]  # AnyRes tiles (rows, cols); (0, 0) for a reference image
    num_base: int
    num_adverb: int
    num_expert: int
    num_roi: int
    num_boxes: int = 0  # ROI boxes (`roi_box_count`); their tokens are `num_roi`

    @property
    def num_crops(self) -> int:
        """Crops the vision tower encodes: the base crop plus the AnyRes tiles (a reference has no tiles)."""
        rows, cols = self.grid
        return 1 + rows * cols

    @property
    def num_embeddings(self) -> int:
        """Positions whose embeddings come from the model (all image-token positions)."""
        return self.num_base + self.num_adverb + self.num_expert + self.num_roi

    @property
    def part_counts(self) -> dict[str, int]:
        """LLM tokens per token part (`AssistantConfig.token_parts`): the expert's are its adverb and its tokens."""
        return {"base": self.num_base, "expert": self.num_adverb + self.num_expert, "roi": self.num_roi}


def anyres_grid(image_size: tuple[int, int], config: AssistantConfig) -> tuple[int, int]:
    """Rows and columns of crop-size tiles that AnyRes cuts an image of (height, width) into."""
    best_height, best_width = select_best_resolution(list(image_size), config.image_grid_pinpoints)
    return best_height // config.crop_size, best_width // config.crop_size


def tile_content(
    grid_size: tuple[int, int], image_size: tuple[int, int], keep_one: bool = False
) -> tuple[slice, slice]:
    """Rows and columns of a padded tile grid (in patches) that hold the image: LLaVA-OneVision's unpad rule.

    The slices of transformers' `unpad_image`, which the LLM's AnyRes tokens follow. An image thinner than one
    patch of the grid (a 1:20 strip on a coarse grid, say) has no rows left by that rule, and stock
    LLaVA-OneVision gives it no tile tokens; `keep_one=True` (the heatmap, which needs a map wherever the image
    is) keeps the middle row or column instead, two when the grid's side is even.
    """
    grid_h, grid_w = grid_size
    height, width = image_size
    least = 1 if keep_one else 0
    if width / height > grid_w / grid_h:
        padding = (grid_h - max(least, int(round(height * grid_w / width, 7)))) // 2
        return slice(padding, grid_h - padding), slice(0, grid_w)
    padding = (grid_w - max(least, int(round(width * grid_h / height, 7)))) // 2
    return slice(0, grid_h), slice(padding, grid_w - padding)


def base_token_count(image_size: tuple[int, int], config: AssistantConfig) -> int:
    """LLaVA-OneVision's AnyRes count: base crop + unpadded tile grid + one newline per grid row."""
    side = config.patches_per_side
    rows, cols = anyres_grid(image_size, config)
    content_rows, content_cols = tile_content((side * rows, side * cols), image_size)
    current_height = content_rows.stop - content_rows.start
    current_width = content_cols.stop - content_cols.start
    unpadded, newlines = current_height * current_width, current_height
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(current_height * current_width / (max_tiles * side**2))
    if ratio > 1.1:
        unpadded = int(current_height // ratio) * int(current_width // ratio)
        newlines = int(current_height // ratio)
    return side * side + unpadded + newlines


def expert_token_count(grid: tuple[int, int], config: AssistantConfig) -> int:
    """Global token + crop-0 tokens + the tiles' tokens as a (p*rows) x (p*cols) grid with row newlines."""
    pooled = config.expert.pooled_side
    rows, cols = grid
    return 1 + pooled * pooled + (pooled * rows) * (pooled * cols) + pooled * rows


def roi_tokens_per_box(config: AssistantConfig) -> int:
    roi = config.roi
    side = config.patches_per_side // roi.pool
    return side * side + (side if roi.newline else 0)


def roi_box_count(image_size: tuple[int, int], config: AssistantConfig) -> int:
    """ROI boxes of a query image of this (height, width): `roi.max_boxes`, but one when the image fits in one
    crop. Every box grows to at least a crop, so there each box would be the whole image again: tokens that add
    nothing (Triad's rule gives a 384 px image four identical boxes at SigLIP-384's shapes)."""
    return 1 if max(image_size) <= config.crop_size else config.roi.max_boxes


def image_layout(image_size: tuple[int, int], config: AssistantConfig, is_query: bool = True) -> ImageLayout:
    if not is_query:
        expert = config.expert.tokens and config.reference.prompt == "expert"
        return ImageLayout(
            is_query=False,
            grid=(0, 0),
            num_base=config.patches_per_side**2 + 1,
            num_adverb=len(config.adverb_token_ids[0]) if expert else 0,
            num_expert=expert_token_count((0, 0), config) if expert else 0,
            num_roi=0,
        )
    grid = anyres_grid(image_size, config)
    roi, expert_tokens = config.roi, config.expert.tokens
    boxes = roi_box_count(image_size, config) if roi.enabled else 0
    return ImageLayout(
        is_query=True,
        grid=grid,
        num_base=base_token_count(image_size, config),
        num_adverb=len(config.adverb_token_ids[0]) if expert_tokens else 0,
        num_expert=expert_token_count(grid, config) if expert_tokens else 0,
        num_roi=boxes * roi_tokens_per_box(config),
        num_boxes=boxes,
    )


def expand_image_ids(layout: ImageLayout, config: AssistantConfig) -> list[int]:
    """The token ids that replace one image placeholder; image-token positions get model embeddings."""
    image = config.image_token_id
    if not layout.num_adverb:  # no suspicion phrase: the expert's tokens are off, or a reference's "base" prompt
        return [image] * (layout.num_base + layout.num_roi)
    return (
        [image] * layout.num_base
        + list(config.phrase_prefix_ids)
        + [image] * layout.num_adverb
        + list(config.phrase_suffix_ids)
        + [image] * (layout.num_expert + layout.num_roi)
    )
