"""AssistantProcessor's image side, one entry per image: vLLM caches, hashes and batches images one by one.

The transformers path processes a sample's images together and takes the last one as the query. vLLM may
process only the images of a request that are not cached yet, so each image's role travels as an explicit
flag and every output field has one entry per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BatchFeature

from ..image_io import load_image
from ..processing import AssistantProcessor


def last_is_query(count: int) -> list[bool]:
    """The prompt rule: references first, the query last."""
    return [index == count - 1 for index in range(count)]


class ItemImageProcessor:
    """images -> per-image crops, size, role and (for queries, with ROI on) the uint8 ROI source image."""

    def __init__(self, processor: AssistantProcessor):
        self.processor = processor
        self.roi = processor.config.roi.enabled

    def __call__(
        self, images: Sequence[Image.Image], image_is_query: Sequence[bool] | None = None, return_tensors: str = "pt"
    ) -> BatchFeature:
        """`return_tensors` is part of the processor protocol vLLM calls; the fields are PyTorch tensors already."""
        flags = list(image_is_query) if image_is_query is not None else last_is_query(len(images))
        if len(flags) != len(images):
            raise ValueError(f"got {len(flags)} image roles for {len(images)} images")
        images = [load_image(image, f"image {index + 1}") for index, image in enumerate(images)]
        data: dict[str, object] = {
            "pixel_values": [
                torch.from_numpy(self.processor.image_crops(image, query)) for image, query in zip(images, flags)
            ],
            "image_sizes": torch.tensor(
                [self.processor.model_size((image.height, image.width)) for image in images], dtype=torch.long
            ),
            "image_is_query": torch.tensor(flags, dtype=torch.bool),
        }
        if self.roi:
            # References need no ROI source; an empty tensor keeps one entry per image.
            data["roi_pixel_values"] = [
                torch.from_numpy(self.processor.source_pixels(image))
                if query
                else torch.zeros(3, 0, 0, dtype=torch.uint8)
                for image, query in zip(images, flags)
            ]
        return BatchFeature(data)
