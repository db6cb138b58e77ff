"""Where the assistant finds a model when none is given."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "demo"
MODEL_ENV = "ANOMALY_ASSISTANT_MODEL"


def default_model_path() -> Path | None:
    """The bundled demo model, if this installation has one."""
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").exists() else None


def resolve_model(path: str | None) -> Path:
    """--model, else $ANOMALY_ASSISTANT_MODEL, else the bundled demo model."""
    candidate = path or os.environ.get(MODEL_ENV) or default_model_path()
    if candidate is None:
        raise UsageError(f"no model given: pass --model PATH, set {MODEL_ENV}, or build the demo model (see README)")
    candidate = Path(candidate)
    if not (candidate / "config.json").exists():
        raise UsageError(f"{candidate}: not a model folder (no config.json)")
    return candidate
