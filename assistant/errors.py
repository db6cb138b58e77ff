"""The base of every error that means "fix your input", so each surface can report it as one line.

Images (`image_io.ImageError`), data files (`data.errors.DataError`), training configs
(`training.config.ConfigError`), endpoints (`client.EndpointError`), official checkpoints
(`convert.ConversionError`) and command-line usage (`UsageError`) all derive from `AssistantError`:
the CLI prints them as `error: ...` with exit code 2, the app as a message, never as a traceback.
Each also keeps its older built-in base (ValueError, RuntimeError) so existing `except` clauses still match.
"""

from __future__ import annotations


class AssistantError(Exception):
    """A problem with what the user gave (a file, a setting, a server), with a message meant for them."""


class UsageError(AssistantError):
    """A command-line usage problem: a missing or contradictory option, a model folder that is not there."""


def one_line(error: BaseException) -> str:
    """An unexpected error as one line for a user: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
