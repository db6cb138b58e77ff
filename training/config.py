"""Training configurations: typed dataclasses read from YAML, validated, and saved with every checkpoint.

One YAML file describes a run (see training/configs/). Unknown keys are errors, so a typo never silently
falls back to a default; `--set section.key=value` on the command line overrides single fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from assistant.errors import AssistantError
from assistant.files import write_text_atomic
from data.synth_dataset import SynthSpec

CONFIG_FILE = "train_config.yaml"


class ConfigError(AssistantError, ValueError):
    """A configuration problem, with the offending key."""


@dataclass
class ModelSource:
    """Where the starting model comes from: a checkpoint folder or a tiny random model (tests, smoke runs)."""

    path: str | None = None
    tiny: bool = False
    seed: int = 0  # seed of the tiny model
    roi: bool | None = None  # override the checkpoint's roi.enabled (None keeps it)

    def __post_init__(self) -> None:
        if (self.path is None) == (not self.tiny):
            raise ConfigError("model: give exactly one of `path` or `tiny: true`")


@dataclass
class RunConfig:
    """Steps, batching, checkpoints and logging, shared by both stages."""

    output_dir: str = "runs/train"
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 1  # per device
    grad_accum: int = 1
    checkpoint_every: int = 500  # optimizer steps; 0 = only at the end
    log_every: int = 10
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, else fp32
    num_workers: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("run: batch_size and grad_accum must be >= 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("run: give max_steps or epochs > 0")


@dataclass
class OptimConfig:
    """AdamW; `lr` is the main group's rate (the expert in stage 1, the LoRA weights in stage 2)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    """A transformers scheduler; `cosine_with_restarts` restarts `cycles_per_epoch` times an epoch."""

    name: Literal["cosine", "cosine_with_restarts", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.0
    cycles_per_epoch: float = 2.0  # Anomaly-OV stage 1: a restart every half epoch


@dataclass
class FolderSource:
    """A labelled image folder in MVTec AD or VisA layout."""

    root: str
    layout: Literal["mvtec", "visa"] = "mvtec"
    split: Literal["train", "test", "all"] = "all"
    categories: list[str] = field(default_factory=list)


@dataclass
class ExpertData:
    folders: list[FolderSource] = field(default_factory=list)
    synthetic_anomalies: float = 0.0  # chance that a normal image gets a synthetic defect (with mask) on the fly
    synthetic_kinds: list[str] = field(default_factory=list)  # defect generators to draw from (empty: all)
    max_image_side: int | None = 1024  # larger images are downscaled first, as Anomaly-OV's scripts do
    synthesize: SynthSpec | None = None  # write this synthetic dataset into folders[0].root if it is missing


@dataclass
class ExpertObjectiveConfig:
    """Stage 1: balanced BCE on the image score, plus a loss on the anomaly maps where masks are known."""

    train_vision: bool = False
    vision_lr: float = 1e-5
    mask_loss_weight: float = 1.0  # 0 disables the mask loss
    # "pixel": focal + dice on the image-size heatmap (rewards the defect's shape); "patch": balanced BCE of every
    # crop's patch map against the mask max-pooled onto its grid (a defect smaller than a patch still counts).
    mask_level: Literal["pixel", "patch"] = "pixel"
    focal_gamma: float = 2.0


@dataclass
class ExpertTrainConfig:
    model: ModelSource
    data: ExpertData
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine_with_restarts"))
    objective: ExpertObjectiveConfig = field(default_factory=ExpertObjectiveConfig)
    stage: Literal["expert"] = "expert"


@dataclass
class InstructData:
    """Conversations: one LLaVA JSON file, or a datasets.yaml mixture; or a synthetic set written on the fly."""

    json_path: str | None = None
    mixture: str | None = None
    image_root: str | None = None  # default: the JSON file's folder
    synthesize: SynthSpec | None = None  # write a synthetic dataset + conversations into image_root if missing

    def __post_init__(self) -> None:
        if (self.json_path is None) == (self.mixture is None):
            raise ConfigError("data: give exactly one of `json_path` or `mixture`")


@dataclass
class LoraSettings:
    """peft LoRA on the language model's linear layers only (never the vision tower, projector or expert)."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    qlora: bool = False  # 4-bit NF4 language model (bitsandbytes; CUDA only)


@dataclass
class InstructObjectiveConfig:
    """Stage 2: which non-LoRA parts train fully, each in its own optimizer group."""

    train_projector: bool = True  # multi_modal_projector + image_newline (the expert-token path)
    projector_lr: float = 2e-5
    train_expert: Literal["none", "selector", "all"] = "none"
    expert_lr: float = 1e-5
    merge: bool = True  # also write the LoRA-merged full checkpoint (what vLLM serves)


@dataclass
class InstructTrainConfig:
    model: ModelSource
    data: InstructData
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_ratio=0.03))
    lora: LoraSettings = field(default_factory=LoraSettings)
    objective: InstructObjectiveConfig = field(default_factory=InstructObjectiveConfig)
    stage: Literal["instruct"] = "instruct"


TrainConfig = ExpertTrainConfig | InstructTrainConfig
STAGES: dict[str, type] = {"expert": ExpertTrainConfig, "instruct": InstructTrainConfig}


def _build(kind: object, value: object, where: str) -> object:
    """Turn YAML data into the annotated type: nested dataclasses, lists, tuples, optionals, literals."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        built = {name: _build(hints[name], item, f"{where}.{name}" if where else name) for name, item in value.items()}
        try:
            return kind(**built)
        except TypeError as error:
            raise ConfigError(f"{where or 'config'}: {error}") from error
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _build(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_types = args if origin is tuple else [args[0]] * len(value)
        if origin is tuple and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return origin(_build(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)  # also "1e-4", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            pass
    if kind in (int, str, bool) and type(value) is kind:
        return value
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    data[leaf] = value


def parse_config(data: dict, stage: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Validate a config mapping; `overrides` are "section.key=value" strings (values parsed as YAML)."""
    data = dict(data or {})
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
    return _build(STAGES[stage], data, "")


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
    return write_text_atomic(Path(folder) / CONFIG_FILE, yaml.safe_dump(_plain(asdict(config)), sort_keys=False))


def _plain(value: object) -> object:
    """Tuples to lists, so the YAML stays plain (safe_load cannot read python tuples back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
