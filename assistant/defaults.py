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


MODEL_HELP = (
    f"model folder, preset name (`anomaly-assistant models`) or Hugging Face Hub id "
    f"(default: ${MODEL_ENV} or the bundled demo model)"
)


def resolve_model(spec: str | Path | None) -> Path:
    """The model folder of --model (else $ANOMALY_ASSISTANT_MODEL, else the bundled demo model): a folder as it
    is, a preset name or a Hub id fetched and converted once (`hub`), with a one-line error otherwise."""
    candidate = spec or os.environ.get(MODEL_ENV) or default_model_path()
    if candidate is None:
        raise UsageError(f"no model given: pass --model PATH, set {MODEL_ENV}, or build the demo model (see README)")
    path = Path(candidate)
    if (path / "config.json").exists():
        return path
    from . import hub
    from .presets import PRESETS

    if str(candidate) in PRESETS:
        return hub.pull(str(candidate))
    if hub.is_hub_id(str(candidate)):
        return hub.from_hub(str(candidate))
    if path.exists():
        raise UsageError(f"{candidate}: not a model folder (no config.json)")
    raise UsageError(
        f"{candidate}: no such folder, preset ({', '.join(PRESETS)}) or Hugging Face Hub id (owner/name)"
    )
