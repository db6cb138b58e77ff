"""Reading user-supplied benchmark files so that every problem is reported with the file (and item) it is in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from data.errors import DataError  # the project's one "unusable data" error, printed by the CLI as one line

__all__ = ["DataError", "check_files_exist", "describe", "read_json"]


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file or raise `DataError` naming it (missing, unreadable or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{what} {path}: not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise DataError(
            f"{what} {path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from error


def describe(error: ValidationError) -> str:
    """The first validation problem as 'field: message' (enough to find and fix the item)."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "item"
    return f"{location}: {first['msg']}"


def check_files_exist(root: Path, relative: list[str], what: str, hint: str = "") -> None:
    """One error listing the first missing files, raised before a long run starts rather than hours into it."""
    missing = [str(root / name) for name in dict.fromkeys(relative) if not (root / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} {what} not found: {shown}{hint}")
