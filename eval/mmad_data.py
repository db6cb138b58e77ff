"""MMAD's `mmad.json` (keyed by image path) turned into one prompt per question, as the official LLaVA script asks.

Official protocol (jam-cc/MMAD `evaluation/examples/LLaVA_Query/llava_query.py`): one question per call, the
options shuffled and re-lettered "A. text", k normal templates (`random_templates[:k]`, or `similar_templates`)
before the query, images fitted into 512x512 and JPEG re-encoded. We shuffle with a seeded RNG per (image,
question) instead of an unseeded one, and record the permutation with every answer.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from assistant.image_io import fit_long_side
from data.errors import DataError
from data.files import describe, read_json

# The official instruction (MMAD `evaluation/examples/GPT4/gpt4v.py`), leading and trailing newline included.
INSTRUCTION = (
    "\nYou are an industrial inspector who checks products by images. You should judge whether there is a defect "
    "in the query image and answer the questions about it.\n"
    "Answer with the option's letter from the given choices directly.\n"
)
LETTERS = string.ascii_uppercase


class MMADQuestion(BaseModel):
    """One multiple-choice question; field names as in mmad.json."""

    model_config = ConfigDict(extra="allow")

    Question: str
    Answer: str
    Options: dict[str, str]
    type: str

    @model_validator(mode="after")
    def _answer_is_an_option(self) -> MMADQuestion:
        if len(self.Options) < 2:
            raise ValueError("needs at least two Options")
        if self.Answer not in self.Options:
            raise ValueError(f"Answer {self.Answer!r} is not one of the Options {sorted(self.Options)}")
        return self


class MMADEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    conversation: list[MMADQuestion]
    similar_templates: list[str] = []
    random_templates: list[str] = []


@dataclass(frozen=True)
class MMADItem:
    """One question to ask, with its options in the order shown to the model."""

    id: str
    image: str  # path relative to the image root; its first component is the dataset
    index: int  # position in the image's conversation
    question: MMADQuestion
    templates: tuple[str, ...]
    options: dict[str, str]  # shown letter -> option text, in shown order
    permutation: tuple[str, ...]  # the original letter shown at A, B, ...

    @property
    def answer(self) -> str:
        """The correct letter as shown."""
        return LETTERS[self.permutation.index(self.question.Answer)]


def load_mmad(path: str | Path, limit: int | None = None) -> dict[str, MMADEntry]:
    """mmad.json -> {image path: entry}, in file order; `limit` keeps the first N images."""
    raw = read_json(path, "MMAD file")
    if not isinstance(raw, dict):
        raise DataError(f"MMAD file {path}: expected an object keyed by image path, got {type(raw).__name__}")
    entries = {}
    for key, value in list(raw.items())[:limit]:
        try:
            entries[key] = MMADEntry.model_validate(value)
        except ValidationError as error:
            raise DataError(f"MMAD file {path}, image {key!r}: {describe(error)}") from error
    return entries


def option_order(seed: int, image: str, index: int, letters: list[str], shuffle: bool) -> tuple[str, ...]:
    """The original letters in shown order; the same (seed, image, question) always gives the same order."""
    if not shuffle:
        return tuple(letters)
    return tuple(random.Random(f"{seed}|{image}|{index}").sample(letters, len(letters)))


def question_items(
    entries: dict[str, MMADEntry], shots: int, similar: bool, seed: int, shuffle: bool
) -> list[MMADItem]:
    items = []
    for image, entry in entries.items():
        templates = tuple((entry.similar_templates if similar else entry.random_templates)[:shots])
        for index, question in enumerate(entry.conversation):
            permutation = option_order(seed, image, index, list(question.Options), shuffle)
            options = {LETTERS[i]: question.Options[original] for i, original in enumerate(permutation)}
            items.append(MMADItem(f"{image}#{index}", image, index, question, templates, options, permutation))
    return items


def prompt(question: str, options: dict[str, str]) -> str:
    """The official LLaVA query text after its images: instruction, then the question and "A. text" lines."""
    lines = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return f"{INSTRUCTION}\nFollowing is new question list: \n{question} \n{lines}"


def mmad_view(image: Image.Image, max_side: int) -> Image.Image:
    """What the official scripts feed every model: fitted into max_side x max_side (INTER_AREA, may upscale),
    then JPEG re-encoded (OpenCV defaults). `max_side` 0 keeps the original pixels."""
    if max_side <= 0:
        return image
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    height, width = fit_long_side(bgr.shape[:2], max_side, floor=True, upscale=True)
    resized = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    decoded = cv2.imdecode(cv2.imencode(".jpg", resized)[1], cv2.IMREAD_COLOR)
    return Image.fromarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))
