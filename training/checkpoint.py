"""Checkpoints that resume exactly: accelerate's save_state with only the trainable weights.

`accelerator.save_state` already stores the optimizer, RNG states (python, numpy, torch, CUDA) and any
registered object (our scheduler and `Progress`, which holds the step and the position in the data);
under DeepSpeed/FSDP it writes their sharded formats. Our hooks replace its full-model weights with the
trainable ones, so a LoRA checkpoint of a 7B model is megabytes, not 15 GB.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from .config import ConfigError

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS_FILE = "model.safetensors"  # the name accelerate's save_state gives model 0's weights


@dataclass
class Progress:
    """Where training is: optimizer steps done, and the epoch and batch within it (per process)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def register_trainable_checkpointing(accelerator: Accelerator) -> None:
    """Save and load only parameters with requires_grad (frozen weights come from the base model)."""

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        for index, model in enumerate(models[: len(weights)]):
            weights[index] = trainable_state(accelerator.unwrap_model(model))

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        path = Path(input_dir) / WEIGHTS_FILE
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            state = load_file(path)  # on CPU; load_state_dict copies onto each parameter's device
            expected = set(trainable_state(unwrapped))
            if set(state) != expected:
                missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ConfigError(
                    f"{path} does not match this run's trainable parameters "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it made with another config?"
                )
            unwrapped.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load full weights

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def step_checkpoints(output_dir: str | Path) -> list[Path]:
    """The finished step checkpoints of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    steps = (
        [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := STEP_DIR.match(p.name))]
        if folder.is_dir()
        else []
    )
    return [path for _, path in sorted(steps)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    steps = step_checkpoints(output_dir)
    return steps[-1] if steps else None


REMOVING_SUFFIX = ".removing"


def rotate_checkpoints(saved: Path, keep_last: int, resumed_from: Path | None = None) -> list[Path]:
    """After `saved` was written: delete all but the newest `keep_last` step checkpoints up to it; `saved` itself
    and the one this run resumed from always stay. Checkpoints past `saved` (left by a run this one resumed
    before the end of) are not this run's history and are left alone.

    A folder is renamed out of the step pattern before it is deleted, so a kill mid-delete never leaves a
    half-deleted checkpoint that `--resume` could pick; such leftovers are swept first on the next rotation.
    """
    folder = Path(saved).parent
    for doomed in folder.glob(f"*{REMOVING_SUFFIX}"):
        shutil.rmtree(doomed)
    steps = step_checkpoints(folder.parent)
    history = steps[: steps.index(Path(saved)) + 1]  # the same folder: paths compare as built
    resumed = Path(resumed_from).resolve() if resumed_from is not None else None
    removed = [path for path in history[:-keep_last] if path.resolve() != resumed]
    for path in removed:
        doomed = path.with_name(path.name + REMOVING_SUFFIX)
        path.rename(doomed)
        shutil.rmtree(doomed)
    return removed
