"""The training loop both stages share: accelerate for devices, mixed precision, gradient accumulation and
multi-GPU (DDP, DeepSpeed ZeRO, FSDP via `accelerate launch`), with progress bar, metrics log,
checkpoints every N steps, exact resume and a final summary.

A stage supplies a `TrainingTask`: the module to train, its optimizer groups, the data, how to count a batch's
loss items and how to turn a batch into a loss. Everything else is here, once.

Losses are means over the items of the whole optimizer step (stage 2: answer tokens; stage 1: images), as
transformers' `num_items_in_batch` does: the loop fetches a step's micro-batches first, sums their item counts
over micro-batches and processes, and each micro-batch's loss is its summed item losses over that total. A
micro-batch mean would give a "Yes" as much weight as a paragraph, and a process with short answers as much
as one with long ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from assistant.errors import one_line
from assistant.files import partial_dir, publish_dir, write_text_atomic
from data.errors import DataError

from .checkpoint import Progress, checkpoint_dir, register_trainable_checkpointing, rotate_checkpoints
from .config import ConfigError, OptimConfig, RunConfig, ScheduleConfig, TrainConfig, save_config
from .datasets import EpochSampler

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainingTask:
    """What a stage plugs into the loop."""

    name: str
    model: nn.Module  # its forward is what `compute_loss` calls (DDP needs the call to go through it)
    param_groups: list[dict]  # torch optimizer groups: {"params", "lr", "name", ...}
    dataset: Dataset
    collate: Callable
    # batch -> the counts its loss terms average over, e.g. {"tokens": 412}; the same keys for every batch
    count_items: Callable[[dict], dict[str, int]]
    # (model, batch, the step's summed counts) -> (this batch's share of the step's mean loss, metrics likewise)
    compute_loss: Callable[[nn.Module, dict, dict[str, int]], tuple[torch.Tensor, dict[str, float]]]
    save_final: Callable[[nn.Module, dict, Path], None]  # unwrapped module, its full state dict, output_dir
    count_tokens: Callable[[dict], int] | None = None


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    final_loss: float
    mean_loss: float
    trainable_params: int
    total_params: int
    output_dir: Path
    losses: list[float] = field(default_factory=list)  # one per optimizer step of this session
    tokens_per_second: float | None = None

    def format(self) -> str:
        ran = bool(self.losses)  # a resumed run that was already complete trains no step
        lines = [
            f"steps            {self.steps}",
            f"time             {self.seconds:.1f} s",
            f"final loss       {self.final_loss:.4f}" if ran else "final loss       n/a (no step run)",
            f"mean loss        {self.mean_loss:.4f}" if ran else "mean loss        n/a (no step run)",
            f"trainable params {self.trainable_params:,} of {self.total_params:,}",
            f"output           {self.output_dir}",
        ]
        if self.tokens_per_second is not None:
            lines.insert(2, f"tokens/s         {self.tokens_per_second:,.0f}")
        return "\n".join(lines)


@dataclass
class StepMeter:
    """Sums the micro-batches' shares of one optimizer step, over processes too, into one log record."""

    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, metrics: dict[str, float]) -> None:
        self.loss += loss
        for key, value in metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value

    def record(self, accelerator: Accelerator, step: int, epoch: int, lr: float) -> dict:
        keys = sorted(self.metrics)  # every process has the same keys (`TrainingTask.compute_loss`)
        values = torch.tensor([self.loss, *(self.metrics[key] for key in keys)], device=accelerator.device)
        loss, *metrics = accelerator.reduce(values, "sum").tolist()
        self.loss, self.metrics = 0.0, {}
        return {"step": step, "epoch": epoch, "loss": loss, "lr": lr, **dict(zip(keys, metrics))}


def step_batches(batches, size: int):
    """The micro-batches of each optimizer step: `size` at a time, fewer where the epoch ends."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def step_totals(accelerator: Accelerator, task: TrainingTask, group: list[dict]) -> dict[str, int]:
    """The step's loss items, summed over its micro-batches and all processes."""
    counts = [task.count_items(batch) for batch in group]
    keys = sorted(counts[0])
    local = torch.tensor([[count[key] for key in keys] for count in counts], device=accelerator.device).sum(0)
    return dict(zip(keys, accelerator.reduce(local, "sum").tolist()))


@contextlib.contextmanager
def micro_batch(accelerator: Accelerator, model: nn.Module, last: bool):
    """`accelerator.accumulate` for micro-batches fetched ahead: only the step's last one syncs gradients (and,
    under DeepSpeed, is the accumulation boundary), also when an epoch ends mid-step. As transformers' Trainer
    does, this sets accelerate's sync flag directly: its own counter cannot know a step is cut short."""
    accelerator.gradient_state._set_sync_gradients(last)
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield


def make_accelerator(run: RunConfig) -> Accelerator:
    precision = run.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # A multi-process launch on a machine without CUDA (`accelerate launch --config_file
    # training/accelerate/cpu_ddp.yaml`, torchrun) is data parallel on CPU: accelerate forms that gloo process
    # group only when told the run is on CPU.
    on_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=run.grad_accum, cpu=on_cpu)
    if accelerator.gradient_accumulation_steps != run.grad_accum:  # e.g. a DeepSpeed JSON with a fixed value
        raise ConfigError(
            f"run.grad_accum is {run.grad_accum} but the launcher sets {accelerator.gradient_accumulation_steps} "
            "accumulation steps; set one of them to match the other"
        )
    if accelerator.device.type == "cpu":
        # Weights and activations drift into subnormal floats as training settles; x86 CPUs process those
        # 10-100x slower (seen here: stage 1 went from 1 s to 29 s a step). Flushing them to zero is harmless.
        torch.set_flush_denormal(True)
    return accelerator


def loader_options(run: RunConfig, dataset: Dataset, on_cuda: bool) -> dict:
    """The DataLoader's worker and pinning arguments, "auto" resolved for the device the run trains on. Workers
    persist only for a dataset whose samples ignore the epoch: one with `set_epoch` (stage 1's synthetic
    defects) would stay at the dataset copy of its first epoch."""
    workers = (2 if on_cuda else 0) if run.num_workers == "auto" else run.num_workers
    pin = on_cuda if run.pin_memory == "auto" else run.pin_memory
    persistent = run.persistent_workers and workers > 0 and not hasattr(dataset, "set_epoch")
    return {"num_workers": workers, "pin_memory": pin, "persistent_workers": persistent}


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int, steps_per_epoch: int):
    """A transformers scheduler over optimizer steps (stepped once per optimizer step, never per process)."""
    kwargs = {}
    if schedule.name == "cosine_with_restarts":
        kwargs["num_cycles"] = max(1, round(total_steps / max(1.0, steps_per_epoch / schedule.cycles_per_epoch)))
    return get_scheduler(
        schedule.name,
        optimizer,
        num_warmup_steps=math.ceil(schedule.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def run_training(
    task: TrainingTask,
    config: TrainConfig,
    accelerator: Accelerator,
    resume: Path | None = None,
) -> TrainSummary:
    """Train until the configured number of optimizer steps; checkpoints go to output_dir/checkpoints."""
    run: RunConfig = config.run
    optim: OptimConfig = config.optim
    output_dir = Path(run.output_dir)
    if len(task.dataset) == 0:
        raise DataError("the training data is empty")
    if accelerator.is_main_process:
        save_config(config, output_dir)

    loader = DataLoader(
        task.dataset,
        batch_size=run.batch_size,
        sampler=EpochSampler(len(task.dataset), run.seed),
        collate_fn=task.collate,
        **loader_options(run, task.dataset, accelerator.device.type == "cuda"),
        generator=torch.Generator().manual_seed(run.seed),  # keeps the global RNG untouched by the loader
    )
    optimizer = torch.optim.AdamW(
        task.param_groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    model, optimizer, loader = accelerator.prepare(task.model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / run.grad_accum)
    total_steps = run.max_steps or math.ceil(run.epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, config.schedule, total_steps, steps_per_epoch)

    progress = Progress()
    register_trainable_checkpointing(accelerator)
    accelerator.register_for_checkpointing(scheduler, progress)
    if resume is not None:
        load_checkpoint(accelerator, resume)
        accelerator.print(f"resumed from {resume} at step {progress.step}")
        if progress.step >= total_steps:
            accelerator.print(f"the run already has its {total_steps} steps; raise run.max_steps (or epochs) to go on")
        if accelerator.is_main_process:
            truncate_metrics(output_dir / METRICS_FILE, progress.step)

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_count, total_count = count_parameters(accelerator.unwrap_model(model))
    bar = tqdm(total=total_steps, initial=progress.step, desc=task.name, disable=not accelerator.is_local_main_process)
    meter, losses, tokens, started = StepMeter(), [], 0, time.perf_counter()

    # The backward divides each loss by the accumulation steps (accelerate's, or DeepSpeed's own) and DDP averages
    # gradients over processes; the losses are already shares of the step's total, so both are undone.
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    model.train()
    while progress.step < total_steps:
        batches = accelerator.skip_first_batches(loader, progress.batch_in_epoch) if progress.batch_in_epoch else loader
        batches.set_epoch(progress.epoch)  # accelerate would otherwise count epochs from 0 again after a resume
        if hasattr(task.dataset, "set_epoch"):
            task.dataset.set_epoch(progress.epoch)
        for group in step_batches(batches, run.grad_accum):
            totals = step_totals(accelerator, task, group)
            for index, batch in enumerate(group):
                with micro_batch(accelerator, model, last=index == len(group) - 1):
                    loss, metrics = task.compute_loss(model, batch, totals)
                    accelerator.backward(loss * scale)
                meter.add(loss.item(), metrics)
                if task.count_tokens is not None:
                    tokens += task.count_tokens(batch) * accelerator.num_processes
            progress.batch_in_epoch += len(group)
            grad_norm = accelerator.clip_grad_norm_(trainable, run.max_grad_norm) if run.max_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            record = meter.record(accelerator, progress.step, progress.epoch, scheduler.get_last_lr()[0])
            if grad_norm is not None:  # before clipping; the same on every process (None under DeepSpeed)
                record["grad_norm"] = float(grad_norm)
            losses.append(record["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process and (progress.step % run.log_every == 0 or progress.step == total_steps):
                log(record, output_dir / METRICS_FILE, bar)
            if run.checkpoint_every and progress.step % run.checkpoint_every == 0:
                save_checkpoint(accelerator, config, progress.step, resume)
            if progress.step >= total_steps:
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    seconds = time.perf_counter() - started
    if run.checkpoint_every and progress.step % run.checkpoint_every:
        save_checkpoint(accelerator, config, progress.step, resume)  # so a longer run can resume from the end

    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # gathered from every process under FSDP / ZeRO-3
    if accelerator.is_main_process:
        task.save_final(accelerator.unwrap_model(model), state, output_dir)
    accelerator.wait_for_everyone()
    return TrainSummary(
        steps=progress.step,
        seconds=seconds,
        final_loss=losses[-1] if losses else float("nan"),
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        trainable_params=trainable_count,
        total_params=total_count,
        output_dir=output_dir,
        losses=losses,
        tokens_per_second=tokens / seconds if task.count_tokens is not None and seconds > 0 else None,
    )


def log(record: dict, path: Path, bar: tqdm) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))


def _is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_checkpoint(accelerator: Accelerator, config: TrainConfig, step: int, resumed_from: Path | None) -> Path:
    """Every process writes into `step-N.partial`; the main process renames it once all are done, so a kill
    mid-save leaves the previous checkpoints as they were and no half-written `step-N` to resume from. Then
    `run.keep_last` rotates the older ones (never the new one, nor the one the run resumed from)."""
    folder = checkpoint_dir(config.run.output_dir, step)
    partial = partial_dir(folder)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    # DeepSpeed writes the model itself; frozen base weights would make every LoRA checkpoint full-size.
    accelerator.save_state(str(partial), **({"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(config, partial)
        publish_dir(partial, folder)
        if config.run.keep_last:
            rotate_checkpoints(folder, config.run.keep_last, resumed_from)
    accelerator.wait_for_everyone()
    return folder


# What reading a checkpoint's files raises when one is missing, truncated or overwritten since it was saved
# (torch.load's zip reader raises a RuntimeError; out-of-memory, a RuntimeError too, is not damage).
DAMAGED = (FileNotFoundError, EOFError, pickle.UnpicklingError, SafetensorError, RuntimeError)


def load_checkpoint(accelerator: Accelerator, folder: Path) -> None:
    try:
        accelerator.load_state(str(folder), **({"load_module_strict": False} if _is_deepspeed(accelerator) else {}))
    except torch.OutOfMemoryError:
        raise
    except DAMAGED as error:
        raise ConfigError(
            f"{folder}: checkpoint is damaged ({one_line(error)}); delete that folder to resume from the one "
            "before it, or pass --resume with another checkpoint folder"
        ) from error


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log records past the resumed step (and a line cut off by the crash), so the log reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # the last line of a run killed while writing it
    write_text_atomic(path, "".join(line + "\n" for line in kept))
