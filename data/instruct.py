"""Anomaly-Instruct-125k / LLaVA conversation files as validated samples with resolved image paths.

The format is LLaVA-NeXT's: a JSON list (or JSONL, one record a line) of
`{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}`
with `<image>` placeholders in the human turns. Records may carry more fields (Triad's `mask`/`bbox`, a
`label`); they are kept. Every problem names the file and the record (index and id), and missing images
are found before training starts, not hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from assistant.prompts import IMAGE_TOKEN

from .errors import DataError, summarise
from .files import describe, parse_json, read_text

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class Turn(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    speaker: Literal["human", "gpt", "system"] = Field(alias="from")
    value: str


class InstructRecord(BaseModel):
    """One LLaVA-format record: an optional image (or several views) and a conversation about it."""

    model_config = ConfigDict(extra="allow")

    id: str | int | None = None
    image: str | list[str] | None = None
    conversations: list[Turn] = Field(min_length=2)

    @property
    def images(self) -> list[str]:
        if self.image is None:
            return []
        return [self.image] if isinstance(self.image, str) else list(self.image)

    @model_validator(mode="after")
    def _check_turns(self) -> InstructRecord:
        turns = [t.speaker for t in self.conversations if t.speaker != "system"]
        if any(t.speaker == "system" for t in self.conversations[1:]):
            raise ValueError("a system turn may only come first")
        if turns[::2] != ["human"] * len(turns[::2]) or turns[1::2] != ["gpt"] * len(turns[1::2]):
            raise ValueError(f"turns must alternate human, gpt, ...; got {turns}")
        if turns[-1] != "gpt":
            raise ValueError("the conversation must end with a gpt answer")
        placeholders = sum(t.value.count(IMAGE_TOKEN) for t in self.conversations)
        if placeholders and placeholders != len(self.images):
            raise ValueError(f"{placeholders} {IMAGE_TOKEN} placeholders for {len(self.images)} image(s)")
        return self

    def messages(self) -> list[dict[str, str]]:
        """Chat messages; records without placeholders get them before the first question (LLaVA's rule)."""
        messages = [{"role": ROLES[t.speaker], "content": t.value} for t in self.conversations]
        has_placeholders = any(IMAGE_TOKEN in m["content"] for m in messages)
        if self.images and not has_placeholders:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = f"{IMAGE_TOKEN}\n" * len(self.images) + first_user["content"]
        return messages


@dataclass(frozen=True)
class InstructSample:
    """A record ready for training: where it came from, its image files and its chat messages."""

    key: str  # "file.json[index] id=..." for error messages
    images: tuple[Path, ...]
    messages: tuple[dict[str, str], ...]


def record_key(path: Path, index: int, record: object) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"{path.name}[{index}]" + (f" id={record_id}" if record_id is not None else "")


def _read_records(path: Path) -> list[object]:
    text = read_text(path, "conversation file")
    if path.suffix == ".jsonl":
        lines = enumerate(text.splitlines(), start=1)
        return [parse_json(line, str(path), number) for number, line in lines if line.strip()]
    records = parse_json(text, str(path))
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def load_instruct_json(path: str | Path, image_root: str | Path | None = None) -> list[InstructSample]:
    """Parse and validate every record; image paths are relative to image_root (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples, problems = [], []
    for index, raw in enumerate(_read_records(path)):
        key = record_key(path, index, raw)
        try:
            record = InstructRecord.model_validate(raw)
        except ValidationError as error:
            problems.append(f"{key}: {describe(error)}")
            continue
        samples.append(InstructSample(key, tuple(root / image for image in record.images), tuple(record.messages())))
    if problems:
        raise DataError(summarise(problems, f"malformed record(s) in {path}"))
    return samples


def check_images(samples: list[InstructSample]) -> None:
    """Fail once, up front, listing the records whose image files do not exist."""
    missing = [f"{s.key}: {image}" for s in samples for image in s.images if not image.is_file()]
    if missing:
        raise DataError(summarise(missing, "missing image file(s)"))
