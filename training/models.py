"""Loading the starting model for training: a checkpoint folder (optionally 4-bit) or a tiny random model.

QLoRA quantises only the language model: the vision tower, projector, anomaly expert and lm_head stay in
bf16, as LLaVA's QLoRA recipe keeps its projector unquantised (4-bit there would cost accuracy and save
little memory).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from transformers import BitsAndBytesConfig

from assistant.checkpoint import CheckpointError, load_checkpoint
from assistant.factory import tiny_assistant
from assistant.modeling import AssistantForConditionalGeneration
from assistant.processing import AssistantProcessor
from assistant.vision import IMAGE_MODULES

from .config import ConfigError, ModelSource

# transformers matches these as regexes from the start of the module name (or as its ending)
NOT_QUANTISED = [f"model.{name}" for name in IMAGE_MODULES] + ["lm_head"]


def qlora_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=NOT_QUANTISED,
    )


def require_cuda_for_qlora() -> None:
    if not torch.cuda.is_available():
        raise ConfigError(
            "lora.qlora: true needs a CUDA GPU (bitsandbytes 4-bit training runs on CUDA only); "
            "set lora.qlora: false to train plain LoRA on this machine"
        )


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    """bf16 weights when training under bf16 autocast (GPU), fp32 otherwise (CPU has no autocast here)."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


def upcast_trainable(model: nn.Module) -> None:
    """Trainable weights in fp32: AdamW updates on bf16 weights lose most small steps to rounding."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def load_assistant(
    source: ModelSource, dtype: torch.dtype | None = None, quantize: bool = False, device_index: int = 0
) -> tuple[AssistantForConditionalGeneration, AssistantProcessor]:
    """The model and processor to train (any checkpoint kind, `checkpoint.load_checkpoint`), `model.settings`
    applied to both."""
    if quantize:
        require_cuda_for_qlora()
        if source.tiny:
            raise ConfigError("QLoRA loads a checkpoint folder: save the tiny model first and give model.path")
    if source.tiny:
        model, processor = tiny_assistant(seed=source.seed)
        model.config.apply_settings(source.settings)
        return (model.to(dtype) if dtype is not None else model), processor
    options = {"quantization_config": qlora_config(), "device_map": {"": device_index}} if quantize else {}
    try:
        return load_checkpoint(source.folder(), dtype or "auto", source.settings, **options)
    except CheckpointError as error:
        raise ConfigError(f"model.path: {error}") from error
