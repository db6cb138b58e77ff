"""The one answer every surface shares: CLI JSON, server response, UI, evaluations.

The heatmap travels as a 16-bit grayscale PNG (base64) in JSON: an image-sized float array would be
megabytes of text, and 1/65535 steps are far finer than any anomaly score needs.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator


class Box(BaseModel):
    """A suspicious region in image pixels (x1, y1 exclusive) and the peak anomaly score inside it."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"box corners out of order: ({self.x0}, {self.y0}, {self.x1}, {self.y1})")
        return self


def encode_heatmap(heatmap: np.ndarray) -> str:
    quantised = np.round(np.clip(heatmap, 0.0, 1.0) * 65535).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(quantised).save(buffer, format="PNG")  # uint16 -> "I;16" (Pillow 13 rejects an explicit mode)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_heatmap(data: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    return np.asarray(image, dtype=np.float32) / 65535.0


class Verdict(BaseModel):
    """Is there an anomaly, how sure, where, and why."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    anomalous: bool
    score: float = Field(ge=0.0, le=1.0, description="calibrated probability that the image is anomalous")
    heatmap: np.ndarray = Field(description="HxW anomaly map in [0, 1] at the image's resolution")
    boxes: list[Box] = Field(default_factory=list)
    defect: str | None = None
    reasoning: str = ""

    @field_validator("heatmap", mode="before")
    @classmethod
    def _as_array(cls, value: object) -> np.ndarray:
        if isinstance(value, str):
            value = decode_heatmap(value)
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 2 or array.size == 0:
            raise ValueError(f"heatmap must be a non-empty 2-D array, got shape {array.shape}")
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("heatmap values must be finite and within [0, 1]")
        return array

    @field_serializer("heatmap")
    def _heatmap_png(self, heatmap: np.ndarray) -> str:
        return encode_heatmap(heatmap)

    @model_validator(mode="after")
    def _boxes_inside(self) -> Verdict:
        height, width = self.heatmap.shape
        for box in self.boxes:
            if box.x1 > width or box.y1 > height or box.x0 < 0 or box.y0 < 0:
                raise ValueError(f"box {box} lies outside the {width}x{height} heatmap")
        return self
