"""Training configurations: pydantic models read from YAML, validated, and saved with every checkpoint.

One YAML file describes a run (see training/configs/). Unknown keys and wrong types are errors that name the
key path, so a typo never silently falls back to a default; `--set section.key=value` on the command line
overrides single fields. The sections are frozen: the config saved with a checkpoint is the one that ran.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from assistant.config import Settings, validation_message
from assistant.defaults import resolve_model
from assistant.errors import AssistantError
from assistant.files import write_text_atomic
from data.synth_dataset import SynthSpec

CONFIG_FILE = "train_config.yaml"


class ConfigError(AssistantError, ValueError):
    """A configuration problem, with the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Section):
    """Where the starting model comes from: a checkpoint folder or a tiny random model (tests, smoke runs)."""

    path: str | None = None
    tiny: bool = False
    seed: int = 0  # seed of the tiny model
    settings: Settings = Settings()  # changes to the checkpoint's expert/ROI sub-configs, e.g. {roi: {enabled: false}}

    @model_validator(mode="before")
    @classmethod
    def _saved_roi_flag(cls, data: object) -> object:
        """Configs saved before `settings` existed hold `roi: true|false|null` (an override of roi.enabled)."""
        if isinstance(data, dict) and "roi" in data and "settings" not in data:
            data = dict(data)
            enabled = data.pop("roi")
            if enabled is not None:
                data["settings"] = {"roi": {"enabled": enabled}}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (not self.tiny):
            raise ValueError("give exactly one of `path` or `tiny: true`")
        return self

    def folder(self) -> Path | None:
        """The checkpoint folder `path` names (a folder, preset or Hub id: `defaults.resolve_model`); None if tiny."""
        return resolve_model(self.path) if self.path else None


class RunConfig(_Section):
    """Steps, batching, checkpoints and logging, shared by both stages."""

    output_dir: str = "runs/train"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = Field(1, ge=1)  # per device
    grad_accum: int = Field(1, ge=1)
    checkpoint_every: int = 500  # optimizer steps; 0 = only at the end
    keep_last: int | None = Field(None, ge=1)  # keep the newest N step checkpoints (and the resumed one); None: all
    log_every: int = 10
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, else fp32
    # DataLoader worker processes per training process; "auto": none without CUDA (on CPU the step needs the same
    # cores), else 2 (one worker kept a 0.5B LoRA step 97% busy where none left it 78%: bench_data_pipeline.py)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    pin_memory: bool | Literal["auto"] = "auto"  # auto: when training on CUDA
    persistent_workers: bool = True  # keep workers between epochs (with workers, and data that ignores the epoch)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _has_length(self) -> RunConfig:
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("give max_steps or epochs > 0")
        return self


class OptimConfig(_Section):
    """AdamW; `lr` is the main group's rate (the expert in stage 1, the LoRA weights in stage 2)."""

    lr: float = 1e-4  # also "1e-4", which YAML 1.1 reads as a string
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class ScheduleConfig(_Section):
    """A transformers scheduler; `cosine_with_restarts` restarts `cycles_per_epoch` times an epoch."""

    name: Literal["cosine", "cosine_with_restarts", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.0
    cycles_per_epoch: float = 2.0  # Anomaly-OV stage 1: a restart every half epoch


class FolderSource(_Section):
    """A labelled image folder in MVTec AD or VisA layout."""

    root: str
    layout: Literal["mvtec", "visa"] = "mvtec"
    split: Literal["train", "val", "test", "all"] = "all"
    categories: list[str] = []


class ExpertData(_Section):
    folders: list[FolderSource] = []
    synthetic_anomalies: float = 0.0  # chance that a normal image gets a synthetic defect (with mask) on the fly
    synthetic_kinds: list[str] = []  # defect generators to draw from (empty: all)
    max_image_side: int | None = 1024  # larger images are downscaled first, as Anomaly-OV's scripts do
    synthesize: SynthSpec | None = None  # write this synthetic dataset into folders[0].root if it is missing


class ExpertObjectiveConfig(_Section):
    """Stage 1: balanced BCE on the image score, plus a loss on the anomaly maps where masks are known."""

    train_vision: bool = False
    vision_lr: float = 1e-5
    mask_loss_weight: float = 1.0  # 0 disables the mask loss
    # "pixel": focal + dice on the image-size heatmap (rewards the defect's shape); "patch": balanced BCE of every
    # crop's patch map against the mask max-pooled onto its grid (a defect smaller than a patch still counts).
    mask_level: Literal["pixel", "patch"] = "pixel"
    focal_gamma: float = 2.0


class ExpertTrainConfig(_Section):
    model: ModelSource
    data: ExpertData
    run: RunConfig = RunConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig(name="cosine_with_restarts")
    objective: ExpertObjectiveConfig = ExpertObjectiveConfig()
    stage: Literal["expert"] = "expert"


class InstructData(_Section):
    """Conversations: one LLaVA JSON file, or a datasets.yaml mixture; or a synthetic set written on the fly."""

    json_path: str | None = None
    mixture: str | None = None
    image_root: str | None = None  # default: the JSON file's folder
    synthesize: SynthSpec | None = None  # write a synthetic dataset + conversations into image_root if missing

    @model_validator(mode="after")
    def _one_source(self) -> InstructData:
        if (self.json_path is None) == (self.mixture is None):
            raise ValueError("give exactly one of `json_path` or `mixture`")
        return self


class LoraSettings(_Section):
    """peft LoRA on the language model's linear layers only (never the vision tower, projector or expert)."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    qlora: bool = False  # 4-bit NF4 language model (bitsandbytes; CUDA only)


class InstructObjectiveConfig(_Section):
    """Stage 2: which non-LoRA parts train fully, each in its own optimizer group."""

    train_projector: bool = True  # multi_modal_projector + image_newline (the expert-token path)
    projector_lr: float = 2e-5
    train_expert: Literal["none", "selector", "all"] = "none"
    expert_lr: float = 1e-5
    merge: bool = True  # also write the LoRA-merged full checkpoint (what vLLM serves)


class InstructTrainConfig(_Section):
    model: ModelSource
    data: InstructData
    run: RunConfig = RunConfig()
    optim: OptimConfig = OptimConfig(lr=2e-4)
    schedule: ScheduleConfig = ScheduleConfig(warmup_ratio=0.03)
    lora: LoraSettings = LoraSettings()
    objective: InstructObjectiveConfig = InstructObjectiveConfig()
    stage: Literal["instruct"] = "instruct"


TrainConfig = ExpertTrainConfig | InstructTrainConfig
STAGES: dict[str, type[TrainConfig]] = {"expert": ExpertTrainConfig, "instruct": InstructTrainConfig}


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    data[leaf] = value


def parse_config(data: dict, stage: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Validate a config mapping; `overrides` are "section.key=value" strings (values parsed as YAML)."""
    if not isinstance(data or {}, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy(data or {})  # overrides must not change the caller's sections
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _set(data, key.strip(), yaml.safe_load(text))
    stage = stage or data.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage!r} is not one of {sorted(STAGES)}")
    if data.get("stage", stage) != stage:
        raise ConfigError(f"this is a {data['stage']!r} config, not a {stage!r} one")
    data["stage"] = stage
    try:
        return STAGES[stage].model_validate(data)
    except ValidationError as error:
        raise ConfigError(validation_message(error)) from None


def load_config(path: str | Path, stage: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    return parse_config(data, stage, overrides)


def save_config(config: TrainConfig, folder: str | Path) -> Path:
    """Write the config next to what it produced, so every checkpoint says how it was made."""
    plain = config.model_dump(mode="json")  # plain YAML types only, whatever a field holds
    return write_text_atomic(Path(folder) / CONFIG_FILE, yaml.safe_dump(plain, sort_keys=False))
