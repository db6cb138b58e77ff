"""MLLM-based anomaly reasoning assistant: Anomaly-OV expert + Triad ROI tokens on LLaVA-OneVision.

Exports are resolved lazily so that `anomaly-assistant --help` and light imports (the vLLM plugin's
registration, the image loader) do not pay for importing transformers.
"""

from importlib import import_module

_EXPORTS = {
    "AssistantConfig": "config",
    "ExpertConfig": "config",
    "RoiConfig": "config",
    "AssistantForConditionalGeneration": "modeling",
    "AssistantProcessor": "processing",
    "ImageError": "image_io",
    "load_image": "image_io",
    "Box": "verdict",
    "Verdict": "verdict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'assistant' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
