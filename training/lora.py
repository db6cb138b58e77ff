"""LoRA for stage 2: adapters on the language model only, full training of the expert-token path, and the
adapter's save / load / merge.

peft's `all-linear` would also hit the SigLIP and projector linears of a VLM, so targets are a regex
anchored on `model.language_model`. The projector and `image_newline` (and optionally the expert) are not
LoRA targets (peft cannot wrap them well, and vLLM's LoRA covers only the LLM): they train fully in their own
optimizer groups and are saved next to the adapter. Serving always uses the merged checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from assistant.factory import save_assistant
from assistant.modeling import AssistantForConditionalGeneration
from assistant.processing import AssistantProcessor

from .config import ConfigError, InstructObjectiveConfig, LoraSettings, ModelSource
from .models import load_assistant

TRAINED_MODULES_FILE = "trained_modules.safetensors"
PEFT_PREFIX = "base_model.model."
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def lora_target_regex(modules: list[str]) -> str:
    """peft full-matches this against module names, e.g. model.language_model.layers.0.self_attn.q_proj."""
    return rf"model\.language_model\..*\.({'|'.join(re.escape(m) for m in modules)})"


def apply_lora(model: AssistantForConditionalGeneration, settings: LoraSettings) -> PeftModel:
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_regex(settings.target_modules),
        bias="none",
    )
    return get_peft_model(model, config)


def fully_trained_modules(
    model: AssistantForConditionalGeneration, objective: InstructObjectiveConfig
) -> dict[str, list[nn.Parameter]]:
    """Non-LoRA parameters that train in stage 2, by optimizer group name."""
    inner = model.model
    groups = {}
    if objective.train_projector:
        groups["projector"] = [*inner.multi_modal_projector.parameters(), inner.image_newline]
    if objective.train_expert != "none":
        expert = inner.anomaly_expert.selector if objective.train_expert == "selector" else inner.anomaly_expert
        groups["expert"] = list(expert.parameters())
    return groups


def clean_name(name: str) -> str:
    """Parameter name without the peft prefix and FSDP / activation-checkpointing wrapper levels."""
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name.removeprefix(PEFT_PREFIX)


def trained_modules_state(model: PeftModel, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Trainable non-LoRA weights under the base model's names (what `load_adapter` loads back)."""
    state = model.state_dict() if state is None else state
    cleaned = {clean_name(key): value for key, value in state.items()}
    names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    return {name: cleaned[name].detach().cpu().contiguous() for name in names}


def save_adapter(
    model: PeftModel, processor: AssistantProcessor, folder: Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """peft adapter (adapter_config.json + adapter_model.safetensors), trained modules and the processor."""
    model.save_pretrained(folder, state_dict=state)
    save_file(trained_modules_state(model, state), str(folder / TRAINED_MODULES_FILE))
    processor.save_pretrained(folder)
    return folder


def load_adapter(base: AssistantForConditionalGeneration, folder: Path) -> PeftModel:
    """Base model + trained modules + LoRA adapter, as at the end of training."""
    trained = load_file(str(Path(folder) / TRAINED_MODULES_FILE))
    unexpected = base.load_state_dict(trained, strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(f"{folder}: trained modules do not fit this base model (e.g. {unexpected[:3]})")
    return PeftModel.from_pretrained(base, str(folder))


def merge_and_save(model: PeftModel, processor: AssistantProcessor, folder: Path, source: Path | None = None) -> Path:
    """Fold LoRA into the LLM weights and save a plain checkpoint (`from_pretrained`, vLLM), with the
    companions (model card, domain statistics) of `source` (the adapter folder)."""
    merged = model.merge_and_unload()
    return save_assistant(merged, processor, folder, source)


def export_merged(source: ModelSource, adapter: Path, folder: Path) -> Path:
    """Merge from the saved adapter onto an unquantised base, so QLoRA runs also give full-precision weights."""
    base, processor = load_assistant(source)
    return merge_and_save(load_adapter(base, adapter), processor, folder, adapter)
