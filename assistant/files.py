"""Writing state files so that a kill at any moment leaves either the old file or the new one, never half of one.

Every file a long run reads back to resume (an evaluation's `run.json`, a training checkpoint's config and
metrics, a calibrated `config.json`, a converted-weights cache) is written under a temporary name beside the
target, flushed to disk, and renamed over it (a rename within one folder is atomic on POSIX and Windows).
Folders (training checkpoints) are built under a temporary name and renamed the same way. The new file keeps
the permissions of the one it replaces (a new one gets the usual umask), so no reader loses access.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # folders being written; never read as finished state
CACHE_ENV = "ANOMALY_ASSISTANT_CACHE"


def cache_dir() -> Path:
    """Where downloaded, converted and merged weights are kept: $ANOMALY_ASSISTANT_CACHE, else
    $HF_HOME/anomaly-assistant (beside huggingface_hub's own cache)."""
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(os.environ.get(CACHE_ENV) or Path(home) / "anomaly-assistant")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; it replaces `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        if path.exists():
            shutil.copymode(path, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) in one step; the parent folder is created if needed."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def partial_dir(folder: str | Path) -> Path:
    """The temporary name a folder is written under before `publish_dir` gives it its real one."""
    folder = Path(folder)
    return folder.with_name(folder.name + PARTIAL_SUFFIX)


def publish_dir(partial: Path, folder: Path) -> Path:
    """Rename a finished `partial_dir(folder)` to `folder`; an older folder of that name is moved aside first
    and removed only once the new one is in place."""
    if not folder.exists():
        os.replace(partial, folder)
        return folder
    previous = folder.with_name(folder.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(folder, previous)
    os.replace(partial, folder)
    shutil.rmtree(previous)
    return folder
