"""Which model answers: the in-process model (`--model`) or any OpenAI-compatible endpoint (`--endpoint`).

Both give the same `Engine` interface; the local model is fed batches (`--batch-size` conversations per
generate call), the endpoint gets concurrent requests (`--concurrency`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from assistant.cli import add_endpoint_arguments, add_model_arguments, load_engine, resolve_model

if TYPE_CHECKING:
    from assistant.engine import Engine


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, else a usage error naming the value."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is less than {minimum}")
        return value

    parse.__name__ = "integer"  # argparse names the expected type with it ("invalid integer value")
    return parse


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--batch-size", type=at_least(1), default=8, help="conversations per generate call (local model)"
    )
    endpoint = add_endpoint_arguments(parser)
    endpoint.add_argument("--concurrency", type=at_least(1), default=8, help="requests in flight at once")


def model_label(args: argparse.Namespace) -> str:
    """What the report calls the model; also part of the settings a resumed run must match."""
    if args.endpoint:
        return f"{args.served_model} @ {args.endpoint}"
    return str(resolve_model(args.model).resolve())


def model_slug(args: argparse.Namespace) -> str:
    """A short model name for default output folders."""
    return args.served_model.replace("/", "_") if args.endpoint else resolve_model(args.model).resolve().name


def open_engine(args: argparse.Namespace) -> Engine:
    return load_engine(args, concurrency=args.concurrency)


def batch_size(args: argparse.Namespace) -> int:
    """Items handed to the engine at once: a generate batch locally, the requests in flight for an endpoint."""
    return args.concurrency if args.endpoint else args.batch_size
