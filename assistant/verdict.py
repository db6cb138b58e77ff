"""The one answer every surface shares: CLI JSON, server response, UI, evaluations.

The heatmap travels as a 16-bit grayscale PNG (base64) in JSON: an image-sized float array would be
megabytes of text, and 1/65535 steps are far finer than any anomaly score needs.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from .heatmap import resize_map


def _floor(value: float) -> int:
    return math.floor(value + 1e-9)  # 110.00000000000001 is pixel 110, not a rounding step outwards


def _ceil(value: float) -> int:
    return math.ceil(value - 1e-9)


class Box(BaseModel):
    """A region in image pixels (x1, y1 exclusive) and the peak anomaly score inside it.

    The one box shape: the regions a verdict shows, the ROI crops the model encodes, the app's display boxes.
    """

    model_config = ConfigDict(frozen=True)

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

    @property
    def corners(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x1, self.y1

    def scaled(self, scale_x: float, scale_y: float, width: int, height: int) -> Box:
        """The box on an image resized by these factors to width x height, rounded outwards (at least 1 px)."""
        x0, y0 = min(width - 1, _floor(self.x0 * scale_x)), min(height - 1, _floor(self.y0 * scale_y))
        x1 = min(width, max(x0 + 1, _ceil(self.x1 * scale_x)))
        y1 = min(height, max(y0 + 1, _ceil(self.y1 * scale_y)))
        return Box(x0=x0, y0=y0, x1=x1, y1=y1, score=self.score)


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

    anomalous: bool = Field(description="the one decision: score >= the checkpoint's decision threshold")
    score: float = Field(ge=0.0, le=1.0, description="probability that the image is anomalous (see `decision`)")
    heatmap: np.ndarray = Field(description="HxW anomaly map in [0, 1] at the image's resolution")
    boxes: list[Box] = Field(default_factory=list)
    defect: str | None = None
    reasoning: str = Field("", description="the language model's answer, opening with the decided Yes/No")
    expert_score: float | None = Field(
        None, ge=0.0, le=1.0, description="the anomaly expert's raw score (with normal references: their evidence in)"
    )
    reference_distance: float | None = Field(
        None, ge=0.0, description="the query patch farthest from the normal references (None: zero-shot)"
    )
    llm_yes_probability: float | None = Field(
        None, ge=0.0, le=1.0, description="the language model's P(Yes) to the detection question"
    )
    in_domain: bool | None = Field(
        None, description="whether the image looks like the checkpoint's training images; None = domain unknown"
    )
    domain_score: float | None = Field(
        None, ge=0.0, le=1.0, description="share of the checkpoint's reference images at least as far from its domain"
    )

    @property
    def domain_status(self) -> str:
        """'in domain', 'OUT OF DOMAIN' or 'domain unknown' (a checkpoint without domain statistics)."""
        if self.in_domain is None:
            return "domain unknown"
        return "in domain" if self.in_domain else "OUT OF DOMAIN"

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

    @classmethod
    def decided(
        cls,
        score: float,
        threshold: float,
        heatmap: np.ndarray | torch.Tensor,
        boxes: Sequence[Box],
        size: tuple[int, int],
        **sources: float | bool | None,
    ) -> Verdict:
        """The verdict on an image of (width, height): the one place every backend builds one.

        `score` is the calibrated decision score, decided once against `threshold`; `heatmap` and `boxes` are in
        the pixels the expert worked in (e.g. the ROI source image) and are brought to the image's own. Boxes are
        shown only when the verdict is anomalous; `sources` are the raw signals and the domain check
        (`expert_score`, `reference_distance`, `llm_yes_probability`, `in_domain`, `domain_score`). The language
        model's reasoning and defect name are added later (`engine.inspect`).
        """
        width, height = size
        anomaly_map = torch.as_tensor(heatmap).detach().float().cpu()
        map_height, map_width = anomaly_map.shape
        anomalous = score >= threshold
        shown = [box.scaled(width / map_width, height / map_height, width, height) for box in boxes]
        return cls(
            anomalous=anomalous,
            score=score,
            heatmap=resize_map(anomaly_map, (height, width)).clamp(0, 1).numpy(),
            boxes=shown if anomalous else [],
            **sources,
        )
