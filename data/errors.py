"""The one exception every data loader raises, so the CLI can print it as a one-line error."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 10  # problems listed by name in one message; the rest are counted


class DataError(ValueError):
    """A dataset problem, naming the file and the record it concerns."""


def summarise(problems: Sequence[str], what: str) -> str:
    """'N <what>:' followed by the first few problems, one per line, and a count of the rest."""
    lines = [f"{len(problems)} {what}:"] + [f"  {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)
