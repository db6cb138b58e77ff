"""Factory functions (open_clip style): build configs, processors and models from parts.

`create_assistant` wires any SigLIP-style vision config, any causal-LM text config and a tokenizer into
a consistent (model, processor) pair: it adds the `<image>` token (and ChatML to a tokenizer without a
chat template; one with a template keeps its own), stores the suspicion phrase ids and the normalisation
in the config, and scales the AnyRes grid to the crop size. `tiny_assistant` builds a random model small
enough for tests and smoke runs, with a byte-level BPE tokenizer trained in memory, so nothing is ever
downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, SiglipVisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from .card import ModelCard
from .checkpoint import write_companions
from .config import AssistantConfig
from .modeling import AssistantForConditionalGeneration
from .presets import TINY_EXPERT, TINY_ROI, TINY_TEXT, TINY_VISION
from .processing import DEFAULT_CHAT_TEMPLATE, AssistantProcessor, suspicion_phrase_ids
from .prompts import IMAGE_TOKEN

SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]
CHATML_SPECIALS = {  # the tiny tokenizer's default: Qwen2's ChatML tokens, in id order
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": ["<|im_start|>"],
    "eos_token": "<|im_end|>",
}


def grid_pinpoints(crop_size: int, max_tiles_per_side: int = 6) -> list[list[int]]:
    """LLaVA-OneVision's (1x1)...(6x6) AnyRes resolutions for a given crop size."""
    sides = range(1, max_tiles_per_side + 1)
    return [[crop_size * rows, crop_size * cols] for rows in sides for cols in sides]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add `<image>`, a pad token and the ChatML template where the tokenizer lacks them (its own template stays)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def create_config(
    vision_config: SiglipVisionConfig | dict,
    text_config: dict,
    tokenizer: PreTrainedTokenizerBase,
    expert: dict | None = None,
    roi: dict | None = None,
    image_mean: list[float] = SIGLIP_MEAN,
    image_std: list[float] = SIGLIP_STD,
    **kwargs,
) -> AssistantConfig:
    vision = vision_config.to_dict() if isinstance(vision_config, SiglipVisionConfig) else dict(vision_config)
    vision.setdefault("model_type", "siglip_vision_model")
    text = dict(text_config)
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    return AssistantConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=kwargs.pop("image_grid_pinpoints", grid_pinpoints(vision["image_size"])),
        expert=expert,
        roi=roi,
        image_mean=list(image_mean),
        image_std=list(image_std),
        tie_word_embeddings=text.get("tie_word_embeddings", False),
        **suspicion_phrase_ids(tokenizer),
        **kwargs,
    )


def create_processor(config: AssistantConfig, tokenizer: PreTrainedTokenizerBase) -> AssistantProcessor:
    crop = config.crop_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": crop, "width": crop},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=config.image_mean,
        image_std=config.image_std,
    )
    return AssistantProcessor(image_processor, tokenizer, config=config)


def create_assistant(
    vision_config: SiglipVisionConfig | dict,
    text_config: dict,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    **config_kwargs,
) -> tuple[AssistantForConditionalGeneration, AssistantProcessor]:
    """A randomly initialised model and its processor (load real weights into it afterwards)."""
    tokenizer = prepare_tokenizer(tokenizer)
    config = create_config(vision_config, text_config, tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AssistantForConditionalGeneration(config).eval()
    return model, create_processor(config, tokenizer)


# -- tiny random models for tests and smoke runs -------------------------------------------------------------

TINY_CORPUS = [
    "Yes. No. There is a scratch on the surface of the object.",
    "The image shows a crack near the top left corner and a hole in the center.",
    "There are no defects; the object looks normal and clean.",
    "with slightly moderately highly suspicious features: ",
    "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'.",
    "A contamination stain, a dent, a bent wire, a missing part, a broken edge, a color defect.",
    "The defect is located at the bottom right. The textile fabric has a local defect.",
    "What type of defect is it? Describe the anomaly and where it is.",
]


def tiny_tokenizer(
    vocab_size: int = 512, specials: Mapping[str, str | list[str]] = CHATML_SPECIALS, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences in memory.

    `specials`: PreTrainedTokenizerFast's special-token arguments; their tokens take the first ids in the order
    given, then `<image>`. No chat template unless given: `prepare_tokenizer` gives it ChatML.
    """
    tokens = [token for value in specials.values() for token in ([value] if isinstance(value, str) else value)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*tokens, IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TINY_CORPUS * 4, trainer)
    arguments = {**specials, "additional_special_tokens": [*specials.get("additional_special_tokens", []), IMAGE_TOKEN]}
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **arguments)
    wrapped.chat_template = chat_template
    return wrapped


def tiny_vision_config(image_size: int = 56, patch_size: int = 14, layers: int = 4) -> dict:
    """The registry's tiny SigLIP shape (`presets.TINY_VISION`), optionally resized."""
    return {**TINY_VISION, "image_size": image_size, "patch_size": patch_size, "num_hidden_layers": layers}


def tiny_text_config(model_type: str = "qwen2", vocab_size: int = 512) -> dict:
    """The registry's tiny LLM shape (`presets.TINY_TEXT`) as a Qwen2 or another causal LM type."""
    return {**TINY_TEXT, "model_type": model_type, "vocab_size": vocab_size}


def tiny_assistant(
    seed: int = 0,
    roi: bool | dict = True,
    text_model: str = "qwen2",
    expert: dict | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_kwargs,
) -> tuple[AssistantForConditionalGeneration, AssistantProcessor]:
    """A random ~0.35M-parameter assistant: 56 px crops of 4x4 patches, 2-layer LLM with head dim 32.

    `roi`: on/off, or RoiConfig fields (ROI source images default to 224 px here). `tokenizer`: `tiny_tokenizer()`
    (ChatML) unless given.
    """
    tokenizer = tiny_tokenizer() if tokenizer is None else tokenizer
    expert = {**TINY_EXPERT, **(expert or {})}
    roi_config = {**TINY_ROI, **(roi if isinstance(roi, dict) else {"enabled": roi})}
    return create_assistant(
        tiny_vision_config(),
        tiny_text_config(text_model),
        tokenizer,
        seed=seed,
        expert=expert,
        roi=roi_config,
        **config_kwargs,
    )


def save_assistant(
    model: AssistantForConditionalGeneration,
    processor: AssistantProcessor,
    path: str | Path,
    source: str | Path | None = None,
    card: ModelCard | None = None,
) -> Path:
    """Model (safetensors), config, tokenizer, image processor and the companions (`checkpoint.write_companions`:
    model card and domain statistics, from `source` unless `card` is given) in one folder."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    write_companions(path, source, card)
    return path
