"""Stage 2: visual instruction tuning with LoRA (or QLoRA) on the LLM and the expert-token path trained fully.

The vision tower stays frozen, the expert too unless `objective.train_expert` says otherwise. The loss is
computed only on assistant answers (training/collate.py). At the end the adapter is saved on its own and,
by default, merged into a full checkpoint that `from_pretrained` and the vLLM plugin load.

    anomaly-assistant train instruct --config training/configs/tiny_instruct.yaml
    accelerate launch --config_file training/accelerate/zero2.yaml -m assistant train instruct --config ...
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from assistant.checkpoint import write_companions
from assistant.processing import IGNORE_INDEX, AssistantProcessor
from data.conversations import conversation_records
from data.folder import load_folder
from data.instruct import InstructSample, check_images, load_instruct_json
from data.mixture import load_mixture
from data.synth_dataset import ensure_synthetic_dataset

from .cards import stage_card
from .collate import InstructCollator
from .config import ConfigError, InstructData, InstructTrainConfig, save_config
from .datasets import InstructDataset
from .loop import TrainingTask, TrainSummary, make_accelerator, run_training
from .lora import apply_lora, export_merged, fully_trained_modules, save_adapter
from .models import compute_dtype, load_assistant, require_cuda_for_qlora, upcast_trainable

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def write_synthetic_conversations(data: InstructData, seed: int) -> None:
    """Write the synthetic images and their conversation JSON if the JSON is not there yet."""
    json_path = Path(data.json_path)
    if json_path.exists():
        return
    root = Path(data.image_root) if data.image_root else json_path.parent
    ensure_synthetic_dataset(root, data.synthesize)
    images = load_folder(root, "mvtec", "all", data.synthesize.categories)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(conversation_records(images, root, seed=seed)), encoding="utf-8")


def instruct_samples(data: InstructData, seed: int) -> list[InstructSample]:
    """Every training conversation, validated, with all image files checked before training starts."""
    if data.synthesize is not None:
        if data.json_path is None:
            raise ConfigError("data.synthesize writes a conversation file: give data.json_path for it")
        write_synthetic_conversations(data, seed)
    if data.mixture:
        samples = load_mixture(data.mixture, data.image_root, seed)
    else:
        samples = load_instruct_json(data.json_path, data.image_root)
    check_images(samples)
    return samples


def build_model(config: InstructTrainConfig, accelerator) -> tuple[nn.Module, AssistantProcessor, list[dict]]:
    """The LoRA-wrapped model, its processor and the optimizer groups (LoRA, projector, expert)."""
    model, processor = load_assistant(
        config.model,
        dtype=compute_dtype(accelerator),
        quantize=config.lora.qlora,
        device_index=accelerator.local_process_index,
    )
    model.config.use_cache = model.config.text_config.use_cache = False  # no KV cache while training
    if config.run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    full = fully_trained_modules(model, config.objective)
    peft_model = apply_lora(model, config.lora)  # freezes everything but the adapters
    lora = [p for name, p in peft_model.named_parameters() if p.requires_grad]
    rates = {"projector": config.objective.projector_lr, "expert": config.objective.expert_lr}
    groups = [{"name": "lora", "params": lora, "lr": config.optim.lr}]
    for name, params in full.items():
        for parameter in params:
            parameter.requires_grad_(True)
        groups.append({"name": name, "params": params, "lr": rates[name]})
    upcast_trainable(peft_model)
    return peft_model, processor, groups


def language_model_loss(model: nn.Module, batch: dict, totals: dict[str, int]) -> tuple[torch.Tensor, dict[str, float]]:
    """This batch's share of the optimizer step's token-mean loss: its summed token losses over the step's count."""
    return model(**batch, num_items_in_batch=totals["tokens"]).loss, {}


def count_items(batch: dict) -> dict[str, int]:
    """The answer tokens the loss is taken over (labels are shifted by one: the first label predicts nothing)."""
    return {"tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}


def count_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def save_outputs(config: InstructTrainConfig, processor: AssistantProcessor):
    def save(model: nn.Module, state: dict, output_dir: Path) -> None:
        adapter = save_adapter(model, processor, output_dir / ADAPTER_DIR, state)
        save_config(config, adapter)  # `train merge` finds the base model here
        data = config.data.json_path or "a data mixture"
        steps = f"{config.run.max_steps} steps" if config.run.max_steps else f"{config.run.epochs} epoch(s)"
        card = stage_card(config.model, "stage 2 (LoRA instruction tuning)", data, steps)
        write_companions(adapter, config.model.folder(), card)
        if config.objective.merge:
            export_merged(config.model, adapter, output_dir / MERGED_DIR)

    return save


def train_instruct(config: InstructTrainConfig, resume: Path | None = None) -> TrainSummary:
    if config.lora.qlora:
        require_cuda_for_qlora()  # before minutes of data checks
    accelerator = make_accelerator(config.run)
    set_seed(config.run.seed)
    samples = instruct_samples(config.data, config.run.seed)
    model, processor, groups = build_model(config, accelerator)
    task = TrainingTask(
        name="instruct",
        model=model,
        param_groups=groups,
        dataset=InstructDataset(samples),
        collate=InstructCollator(processor),
        compute_loss=language_model_loss,
        count_items=count_items,
        save_final=save_outputs(config, processor),
        count_tokens=count_tokens,
    )
    return run_training(task, config, accelerator, resume)
