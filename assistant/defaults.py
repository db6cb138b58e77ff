"""Where the assistant finds a model when none is given."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "demo"


def default_model_path() -> Path | None:
    """The bundled demo model, if this installation has one."""
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").exists() else None
