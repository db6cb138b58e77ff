"""The assistant inside lmms-eval: our model as an lmms-eval model (`model.AnomalyAssistant`, registered through
the `lmms_eval.models` entry point) and MMAD / VisA-D&R detection as lmms-eval tasks (`tasks/`, loaded with
`--include_path`). lmms-eval is imported only here, and lives in its own environment (`./run lmms-eval ...`)."""

from pathlib import Path

TASKS = Path(__file__).parent / "tasks"  # the folder to give lmms-eval's --include_path


def manifest():
    """The `lmms_eval.models` entry point (pyproject.toml): how lmms-eval finds `--model anomaly_assistant`.

    Here rather than in `model.py`: lmms-eval calls it while `lmms_eval.models` is still being imported, so it
    must not import that module's users."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest("anomaly_assistant", simple_class_path="eval.lmms.model.AnomalyAssistant")
