"""Loading the starting model for training: a checkpoint folder (optionally 4-bit) or a tiny random model.

QLoRA quantises only the language model: the vision tower, projector, anomaly expert and lm_head stay in
bf16, as LLaVA's QLoRA recipe keeps its projector unquantised (4-bit there would cost accuracy and save
little memory).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import BitsAndBytesConfig

from assistant.factory import tiny_assistant
from assistant.modeling import AssistantForConditionalGeneration
from assistant.processing import AssistantProcessor

from .config import ConfigError, ModelSource

# transformers matches these as regexes from the start of the module name (or as its ending)
NOT_QUANTISED = ["model.vision_tower", "model.multi_modal_projector", "model.anomaly_expert", "lm_head"]


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
    """The model and processor to train, with the config's ROI override applied to both."""
    if quantize:
        require_cuda_for_qlora()
        if source.tiny:
            raise ConfigError("QLoRA loads a checkpoint folder: save the tiny model first and give model.path")
    if not source.tiny and not (Path(source.path) / "config.json").is_file():
        raise ConfigError(f"model.path: {source.path} is not a model folder (no config.json)")
    if source.tiny:
        model, processor = tiny_assistant(seed=source.seed)
        model = model.to(dtype) if dtype is not None else model
    else:
        kwargs = {"dtype": dtype or "auto"}
        if quantize:
            kwargs.update(quantization_config=qlora_config(), device_map={"": device_index})
        model = AssistantForConditionalGeneration.from_pretrained(source.path, **kwargs)
        processor = AssistantProcessor.from_pretrained(source.path, config=model.config)
    if source.roi is not None:
        model.config.roi = {**model.config.roi, "enabled": source.roi}
        processor.config = model.config
    return model, processor
