"""MLLM-based anomaly reasoning assistant: Anomaly-OV expert + Triad ROI tokens on LLaVA-OneVision."""

from .config import AssistantConfig, ExpertConfig, RoiConfig
from .image_io import ImageError, load_image
from .modeling import AssistantForConditionalGeneration
from .processing import AssistantProcessor
from .verdict import Box, Verdict

__all__ = [
    "AssistantConfig",
    "AssistantForConditionalGeneration",
    "AssistantProcessor",
    "Box",
    "ExpertConfig",
    "ImageError",
    "RoiConfig",
    "Verdict",
    "load_image",
]
