"""VisA-D&R files (Anomaly-OV): `test_data.json` for Yes/No detection and `visa_dr.json` for multi-turn reasoning.

Official scripts (honda-research-institute/Anomaly-OneVision `scripts/eval/`): image paths are relative to the data
root and their second component is the class; images whose long side exceeds 1024 px are shrunk to 1024; the
reasoning run skips pcb2 and pcb4. The public code never reads reference answers, so their field name is ours:
`answers`, one per question (without it, responses are generated but not scored).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from assistant.image_io import shrink_long_side
from data.errors import DataError
from data.files import describe, read_json

MAX_SIDE = 1024
SKIPPED_IN_REASONING = ("pcb2", "pcb4")


class DetectionItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str
    anomaly: bool

    @property
    def id(self) -> str:
        return self.image


class ReasoningItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str
    questions: list[str]
    answers: list[str] | None = None

    @property
    def id(self) -> str:
        return self.image

    @model_validator(mode="after")
    def _one_answer_per_question(self) -> ReasoningItem:
        if not self.questions:
            raise ValueError("questions is empty")
        if self.answers is not None and len(self.answers) != len(self.questions):
            raise ValueError(f"{len(self.answers)} answers for {len(self.questions)} questions")
        return self


Item = TypeVar("Item", DetectionItem, ReasoningItem)


def category(image: str) -> str:
    """The class, as the official scorer finds it: the second path component (VisA/<class>/...)."""
    return image.split("/")[1]


def load_items(path: str | Path, schema: type[Item], limit: int | None = None) -> list[Item]:
    """A JSON list of items; each problem names the file and the item."""
    raw = read_json(path, "VisA-D&R file")
    if not isinstance(raw, list):
        raise DataError(f"VisA-D&R file {path}: expected a list of items, got {type(raw).__name__}")
    items, seen = [], set()
    for number, value in enumerate(raw[:limit], start=1):
        try:
            item = schema.model_validate(value)
        except ValidationError as error:
            raise DataError(f"VisA-D&R file {path}, item {number}: {describe(error)}") from error
        if len(item.image.split("/")) < 3:
            raise DataError(
                f"VisA-D&R file {path}, item {number}: image {item.image!r} is not <root>/<class>/.../<file>"
            )
        if item.image in seen:
            raise DataError(f"VisA-D&R file {path}, item {number}: image {item.image!r} appears twice")
        seen.add(item.image)
        items.append(item)
    return items


def visa_dr_view(image: Image.Image) -> Image.Image:
    """Shrink so the long side is at most 1024 px (PIL's default filter), as the official scripts do."""
    height, width = shrink_long_side((image.height, image.width), MAX_SIDE)
    return image if (width, height) == image.size else image.resize((width, height))
