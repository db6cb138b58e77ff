"""Import official checkpoints: llava-hf LLaVA-OneVision folders and Anomaly-OV expert `.pth` files.

The official expert (`pretrained_expert_{7b,05b}.pth`) is a plain state dict of Anomaly-OV's `AnomalyOV`
module. Its LTFM keeps softmax channel 1 (its `negative_embedding`) as the anomaly probability, so that
embedding becomes our `abnormal_embedding`. Unlike the official loader (`strict=False`), every key must
map: a silently dropped tensor would leave a random layer in a "pretrained" expert.

`anomaly-assistant convert` (registered in `cli.py`) runs `from_llava_onevision`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from .card import ModelCard, untrained_card
from .config import token_part_fields
from .errors import AssistantError
from .expert import AnomalyExpert
from .factory import create_assistant
from .vision import spread_feature_layers


class ConversionError(AssistantError, ValueError):
    """An official checkpoint that is missing or does not fit the assistant's layout."""


_EMBEDDINGS = {"negative_embedding": "ltfm.abnormal_embedding", "positive_embedding": "ltfm.normal_embedding"}


def expert_key_pairs(num_levels: int) -> dict[str, str]:
    """Official Anomaly-OV expert key -> our `AnomalyExpert` key."""
    pairs = dict(_EMBEDDINGS)
    modules = {
        "pooling_layer.0": "ltfm.token_pooling",
        "class_predictor.0": "ltfm.class_head.0",
        "class_predictor.2": "ltfm.class_head.2",
        "q_former.query_proj": "selector.query_proj",
        "q_former.key_proj": "selector.key_proj",
        "final_predictor.0": "selector.score_head.0",
        "final_predictor.2": "selector.score_head.2",
    }
    for level in range(num_levels):
        modules[f"prompt_adaptors.{level}"] = f"ltfm.description_heads.{level}"
        modules[f"siglip_adaptors.{level}"] = f"ltfm.feature_adapters.{level}"
    for official, ours in modules.items():
        for parameter in ("weight", "bias"):
            pairs[f"{official}.{parameter}"] = f"{ours}.{parameter}"
    return pairs


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model.", "anomaly_expert."):
        if key.startswith(prefix):
            return _strip_prefix(key[len(prefix) :])
    return key


def _num_levels(keys) -> int:
    """How many feature levels a state dict (official or ours) has adapters for."""
    levels = {int(k.split(".")[1]) for k in keys if k.startswith("prompt_adaptors.")}
    levels |= {int(k.split(".")[2]) for k in keys if k.startswith("ltfm.description_heads.")}
    return max(levels, default=-1) + 1


def expert_from_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Anomaly-OV expert state dict -> our `AnomalyExpert` state dict."""
    state_dict = {_strip_prefix(key): tensor for key, tensor in state_dict.items()}
    pairs = expert_key_pairs(_num_levels(state_dict))
    unknown = sorted(set(state_dict) - set(pairs))
    if unknown:
        more = " ..." if len(unknown) > 8 else ""
        raise ConversionError(f"keys not in the Anomaly-OV expert layout: {unknown[:8]}{more}")
    embeddings = set(_EMBEDDINGS.values())
    return {
        pairs[key]: tensor.reshape(-1) if pairs[key] in embeddings else tensor for key, tensor in state_dict.items()
    }


def expert_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `AnomalyExpert` state dict -> the official layout (for interchange and round-trip tests)."""
    reverse = {ours: official for official, ours in expert_key_pairs(_num_levels(state_dict)).items()}
    unknown = sorted(set(state_dict) - set(reverse))
    if unknown:
        raise ValueError(f"keys with no official counterpart: {unknown[:8]}")
    return {
        reverse[key]: tensor.reshape(1, -1) if reverse[key] in _EMBEDDINGS else tensor
        for key, tensor in state_dict.items()
    }


def read_official_expert(path: str | Path) -> dict[str, torch.Tensor]:
    """Our-layout state dict from a `pretrained_expert_*.pth` file (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expert checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails on foreign files with many unrelated exception types
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
    return expert_from_official(state)


def expert_dims(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """ExpertConfig sizes implied by an (our-layout) expert state dict."""
    return {
        "embedding_dim": state_dict["ltfm.abnormal_embedding"].shape[0],
        "class_dim": state_dict["ltfm.class_head.2.weight"].shape[0],
        "attention_dim": state_dict["selector.query_proj.weight"].shape[0],
        "predictor_dim": state_dict["selector.score_head.0.weight"].shape[0],
    }


def load_official_expert(expert: AnomalyExpert, path: str | Path) -> None:
    """Load a `pretrained_expert_*.pth` into our expert; every key and shape must match."""
    converted = read_official_expert(path)
    expected = expert.state_dict()
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConversionError(f"{path}: the expert checkpoint lacks {missing}")
    for key, tensor in converted.items():
        if tensor.shape != expected[key].shape:
            raise ConversionError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    expert.load_state_dict(converted, strict=True)


def from_llava_onevision(
    llava_path: str | Path,
    expert_path: str | Path | None = None,
    token_parts: tuple[str, ...] = ("base",),
    expert: dict | None = None,
    roi: dict | None = None,
):
    """An assistant whose LLaVA-OneVision weights come from a llava-hf folder (expert random unless given).

    A llava-hf LLM was trained to read stock image tokens only, so the checkpoint records `llm_token_parts`
    ["base"]; `token_parts` switches on the parts its LLM reads (default: exactly those; more warns at load).
    `expert`, `roi`: ExpertConfig / RoiConfig fields (the expert's sizes are read from its file).
    The weights keep the checkpoint's dtype (bf16 as published: half the memory and disk of fp32).
    """
    llava_path = Path(llava_path)
    if not (llava_path / "config.json").is_file():  # Hub ids are resolved to folders first (`hub.snapshot`)
        raise ConversionError(f"{llava_path}: not a llava-hf LLaVA-OneVision folder (no config.json)")
    if expert_path is not None:
        expert = {**expert_dims(read_official_expert(expert_path)), **(expert or {})}
    base = LlavaOnevisionForConditionalGeneration.from_pretrained(llava_path, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(llava_path)
    config = base.config
    expert = {"feature_layers": spread_feature_layers(config.vision_config.num_hidden_layers), **(expert or {})}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(base.dtype)  # built in the checkpoint's dtype: no fp32 copy of a 7B model
    try:
        model, processor = create_assistant(
            config.vision_config,
            config.text_config.to_dict(),
            tokenizer,
            **token_part_fields(token_parts, expert, roi),
            image_grid_pinpoints=config.image_grid_pinpoints,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            llm_token_parts=["base"],
        )
    finally:
        torch.set_default_dtype(default_dtype)
    if model.config.image_token_id != config.image_token_id:
        raise ConversionError(
            f"tokenizer's <image> id {model.config.image_token_id} differs from "
            f"the checkpoint's {config.image_token_id}"
        )
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    missing = [key for key in missing if not key.startswith("model.anomaly_expert.")]
    if missing or unexpected:
        raise ConversionError(f"LLaVA-OneVision weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if expert_path is not None:
        load_official_expert(model.anomaly_expert, expert_path)
    return model, processor


def converted_card(llava: str | Path, expert: str | Path | None) -> ModelCard:
    """The card of a converted official checkpoint (`llava`: the folder or Hub id it came from): what its parts
    are; nothing measured on it here yet."""
    if expert is None:
        return untrained_card(
            f"{Path(llava).name} + random expert",
            "LLaVA-OneVision with an untrained (random) Anomaly-OV expert: its anomaly scores and maps are noise.",
        )
    return ModelCard(
        name=f"{Path(llava).name} + {Path(expert).name}",
        summary="LLaVA-OneVision (llava-hf) with Anomaly-OV's trained anomaly expert, converted.",
        trained_on=(
            "LLaVA-OneVision's own data; the expert: Anomaly-OV's training (Anomaly-Instruct-125k and its visual "
            "anomaly data, per the Anomaly-OV paper)"
        ),
        image_kinds="industrial and general photos (colour)",
        limits=(
            "the Anomaly-OV paper reports zero-shot image AUROC 94.0 (MVTec AD) and 91.1 (VisA) for the expert; "
            "nothing has been measured on this converted checkpoint yet, and its decision is not calibrated"
        ),
    )
