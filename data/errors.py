"""The one exception every data loader (and evaluation input reader) raises: an `AssistantError` the CLI prints."""

from __future__ import annotations

from collections.abc import Sequence

from assistant.errors import AssistantError

MAX_LISTED = 10  # problems listed by name in one message; the rest are counted


class DataError(AssistantError, ValueError):
    """A dataset problem, naming the file and the record it concerns."""


def summarise(problems: Sequence[str], what: str) -> str:
    """'N <what>:' followed by the first few problems, one per line, and a count of the rest."""
    lines = [f"{len(problems)} {what}:"] + [f"  {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)
