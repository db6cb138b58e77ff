"""Reading user-supplied data files so that every problem names the file (and line or item) it is in.

Shared by the training data loaders and the benchmark readers: one wording for a missing file, a
non-UTF-8 file, malformed JSON and an invalid record, whichever command met it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import DataError


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 file's text, or a `DataError` naming it (missing or not text)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{what} {path}: not UTF-8 text ({error})") from error


def parse_json(text: str, source: str, first_line: int = 1) -> Any:
    """JSON from `text` that starts at `first_line` of `source`, or a `DataError` naming the file line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line = first_line + error.lineno - 1
        raise DataError(f"{source}: not valid JSON (line {line}, column {error.colno}: {error.msg})") from error


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file or raise `DataError` naming it (missing, unreadable or malformed)."""
    return parse_json(read_text(path, what), f"{what} {path}")


def describe(error: ValidationError) -> str:
    """Every validation problem as 'field: message' (enough to find and fix the record)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()
    )


def check_files_exist(root: Path, relative: list[str], what: str, hint: str = "") -> None:
    """One error listing the first missing files, raised before a long run starts rather than hours into it."""
    missing = [str(root / name) for name in dict.fromkeys(relative) if not (root / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} {what} not found: {shown}{hint}")
