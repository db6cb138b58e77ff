"""The expert's analysis in the API-server process, from the image side of the checkpoint only.

vLLM runs the model in its engine processes and returns text, so the verdict's score, heatmap and boxes
are computed here by the same `encode_images` code (`checkpoint.load_image_side`: the vision tower,
projector, expert and the three adverb rows of the LLM's token embeddings). ROI tokens only feed the LLM, so
this copy runs with them off and skips their second vision pass. The decision's P(Yes) comes from the served
LLM (`inspection.ServerEngine`); the domain check from the checkpoint's `domain.safetensors`; product profiles
from its `profiles/` folder (`assistant.profiles`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..checkpoint import load_image_side
from ..config import AssistantConfig, Settings
from ..domain import DomainModel
from ..engine import ImageAnalyzer


def analysis_engine(path: str | Path, config: AssistantConfig, dtype: torch.dtype, device: str) -> ImageAnalyzer:
    """An `ImageAnalyzer` over the image side only, for the served config (vLLM's, with its `--hf-overrides`)."""
    config = copy.deepcopy(config)
    config.apply_settings(Settings(roi={"enabled": False}))
    image_side, processor = load_image_side(path, config, dtype)
    domain = DomainModel.load(path, config.vision_config.hidden_size)
    return ImageAnalyzer(image_side.to(device), processor, domain=domain, profiles=path)
