"""The loop every benchmark shares: skip finished items, process the rest in batches, log each batch, show ETA."""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Protocol, TypeVar

from tqdm import tqdm

from .records import AnswerLog, Record


class Item(Protocol):
    id: str


ItemT = TypeVar("ItemT", bound=Item)
R = TypeVar("R", bound=Record)


def run_pending(
    items: Sequence[ItemT],
    done: Container[str],
    process: Callable[[list[ItemT]], list[R]],
    log: AnswerLog[R],
    batch_size: int,
    desc: str,
) -> int:
    """Process the items whose id is not in `done`; returns how many were processed now."""
    pending = [item for item in items if item.id not in done]
    with tqdm(total=len(items), initial=len(items) - len(pending), desc=desc, unit="item", dynamic_ncols=True) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            log.append(process(batch))
            bar.update(len(batch))
    return len(pending)
