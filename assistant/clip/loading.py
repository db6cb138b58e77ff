"""From a user's model spec to an open_clip model, tokenizer and transform, via open_clip's factory.

Spec forms (see docs/clip_expert.md):
  ARCH                     an open_clip architecture name, random weights (e.g. for smoke runs)
  ARCH:TAG                 with a pretrained tag, downloaded by open_clip (ViT-B-16-plus-240:laion400m_e32)
  ARCH@FILE                with a local checkpoint (.safetensors, .pt, .bin); ARCH may be a JSON config path
  CONFIG.json              a custom architecture from a JSON model config, random weights
  DIR | local-dir:DIR      a folder with open_clip_config.json and weights
  hf-hub:ORG/REPO          an open_clip model on the Hugging Face Hub
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

SCHEMAS = ("hf-hub:", "local-dir:")
CONFIG_KEYS = {"embed_dim", "vision_cfg", "text_cfg"}


@dataclass(frozen=True)
class ClipSpec:
    model_name: str  # what open_clip's factory accepts: a registered name or a schema-prefixed id
    pretrained: str | None  # a pretrained tag or a checkpoint file


def register_config(path: Path) -> str:
    """Register a JSON model config with open_clip under its file stem (how open_clip finds custom models)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model config not found")
    config = json.loads(path.read_text())
    missing = CONFIG_KEYS - set(config)
    if missing:
        raise ValueError(f"{path}: not an open_clip model config (missing {', '.join(sorted(missing))})")
    open_clip.add_model_config(path)
    return path.stem


def _architecture(name: str) -> str:
    if name.endswith(".json"):
        return register_config(Path(name))
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {name!r} (see open_clip.list_models())")
    return name


def parse_spec(spec: str) -> ClipSpec:
    """Resolve a spec to (model name, weights); JSON configs are registered on the way."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty CLIP model spec")
    if spec.startswith(SCHEMAS):
        return ClipSpec(spec, None)
    if Path(spec).is_dir():
        return ClipSpec(f"local-dir:{spec}", None)
    architecture, at, weights = spec.partition("@")
    if at:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: checkpoint file not found")
        return ClipSpec(_architecture(architecture), weights)
    if spec.endswith(".json"):
        return ClipSpec(_architecture(spec), None)
    name, _, tag = spec.partition(":")
    name = _architecture(name)
    if tag and tag not in open_clip.list_pretrained_tags_by_model(name):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ValueError(f"{name} has no pretrained tag {tag!r} (known: {known}); use ARCH@FILE for a checkpoint file")
    return ClipSpec(name, tag or None)


def load_clip(spec: str, device: str | torch.device) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model in eval mode, tokenizer, inference transform) for a spec.

    The transform squashes the whole image to the tower's input size instead of open_clip's default
    centre crop, so the anomaly map covers every pixel of the photo.
    """
    parsed = parse_spec(spec)
    model, _, preprocess = open_clip.create_model_and_transforms(
        parsed.model_name, pretrained=parsed.pretrained, device=device, image_resize_mode="squash"
    )
    return model.eval(), open_clip.get_tokenizer(parsed.model_name), preprocess
