"""`--set SECTION.KEY=VALUE`: the one command-line form of `config.Settings`, shared by the CLI, app and server."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # the parser stays argparse-only: transformers loads when a command runs
    from .config import Settings


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change an expert/ROI/decision setting of the model for this run, e.g. roi.enabled=false (repeatable)",
    )


def run_settings(args: argparse.Namespace, **changes: dict) -> Settings:
    """`--set` assignments (and command-specific `changes`, which win) as validated `Settings`."""
    from .config import SUB_CONFIGS, Settings

    if args.settings and getattr(args, "endpoint", None):
        raise UsageError("--set changes an in-process model: a server's settings are given to `serve --set`")
    parsed = Settings.parse(args.settings)
    return Settings.checked({name: {**parsed.changes(name), **changes.get(name, {})} for name in SUB_CONFIGS})
