"""Answers on disk, one JSON line per finished item, so that a run can stop anywhere and resume.

Each line is written whole and flushed before the next batch starts, so a crash can only leave a partial
last line; `load` drops it (truncating the file) and the re-run repeats exactly the unfinished items.
`check_settings` refuses to mix answers produced under different settings in one output folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from assistant.files import write_text_atomic
from data.errors import DataError
from data.files import describe

SETTINGS_FILE = "run.json"


class Record(BaseModel):
    """One finished item; `id` is stable across runs (derived from the data, never from run order)."""

    id: str


R = TypeVar("R", bound=Record)


class AnswerLog(Generic[R]):
    """An append-only JSONL file of records of one schema."""

    def __init__(self, path: str | Path, schema: type[R]):
        self.path = Path(path)
        self.schema = schema

    def load(self) -> dict[str, R]:
        """Finished records by id (a later line wins); a trailing partial line from a crash is removed."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            with self.path.open("r+b") as file:
                file.truncate(complete)
        records: dict[str, R] = {}
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = self.schema.model_validate_json(line)
            except ValidationError as error:
                raise DataError(
                    f"{self.path}, line {number}: not a valid {self.schema.__name__} record ({describe(error)}); "
                    "delete that line to answer the item again (the other answers are kept)"
                ) from error
            records[record.id] = record
        return records

    def append(self, records: Iterable[R]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            for record in records:
                file.write(record.model_dump_json() + "\n")
                file.flush()


def check_settings(directory: Path, settings: dict[str, Any]) -> None:
    """Record the run's settings; refuse to resume a folder whose answers came from different ones.

    New keys (e.g. a scorer added later) are merged in; a changed value is an error.
    """
    settings = json.loads(json.dumps(settings))  # tuples -> lists, so the comparison matches what is stored
    path = directory / SETTINGS_FILE
    stored = _stored_settings(path)
    changed = [
        f"{key}: {stored[key]!r} -> {value!r}"
        for key, value in settings.items()
        if key in stored and stored[key] != value
    ]
    if changed:
        raise DataError(
            f"{directory} holds answers from a run with other settings ({'; '.join(changed)}); "
            "use another --output folder, or the original settings to resume"
        )
    write_text_atomic(path, json.dumps({**stored, **settings}, indent=2) + "\n")


def _stored_settings(path: Path) -> dict[str, Any]:
    """The settings a previous run recorded; a damaged file says how to recover without losing its answers."""
    if not path.exists():
        return {}
    recovery = "delete it and re-run with the original settings to resume: the finished answers in that folder are kept"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # malformed JSON, or not UTF-8
        raise DataError(f"{path} is damaged ({error}); {recovery}") from error
    if not isinstance(stored, dict):
        raise DataError(f"{path} is damaged (a JSON {type(stored).__name__}, not an object); {recovery}")
    return stored
