"""Stage-2 training-step benchmark: LoRA and QLoRA at the LLaVA-OneVision 0.5B and 7B shapes.

The models have the real dimensions (SigLIP-so400m, Qwen2-0.5B / Qwen2-7B) and random weights built from
configs, so nothing is downloaded. Each case goes through the training code itself: the checkpoint is
saved and loaded back by `training.models.load_assistant` (4-bit NF4 through bitsandbytes for QLoRA),
wrapped by `training.instruct.build_model` (LoRA r=64 on every LLM linear layer, projector trained), and
fed one conversation built by `InstructCollator`: one image (1024 px by default) and an answer of about
512 tokens, the only labelled positions. A step is forward + backward + AdamW under bf16 autocast with
gradient checkpointing; the first steps are warm-up and not timed.

    python benchmarks/bench_training.py                      # GPU: the three cases; CPU: a tiny-model table
    python benchmarks/bench_training.py --steps 300 --cases qlora-7b

Peak memory is torch's (allocated = tensors, reserved = what the caching allocator holds from the GPU,
i.e. what must fit); on CPU it is the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.factory import create_assistant, save_assistant, tiny_tokenizer  # noqa: E402
from assistant.presets import QWEN2_05B, QWEN2_7B, SIGLIP_SO400M  # noqa: E402
from data.synthetic import normal_part  # noqa: E402
from training.collate import InstructCollator  # noqa: E402
from training.config import InstructData, InstructTrainConfig, LoraSettings, ModelSource, RunConfig  # noqa: E402
from training.instruct import build_model  # noqa: E402
from training.loop import make_accelerator  # noqa: E402

QWEN2 = {"0.5B": QWEN2_05B, "7B": QWEN2_7B}  # the registry's shapes (assistant.presets)
CASES = {"lora-0.5b": ("0.5B", False), "qlora-0.5b": ("0.5B", True), "qlora-7b": ("7B", True)}


@dataclass
class Result:
    name: str
    total_params: int
    trainable_params: int
    tokens: int
    labelled: int
    step_seconds: float
    peak_allocated_gb: float | None
    peak_reserved_gb: float  # GPU: allocator reserve; CPU: peak resident memory

    def row(self) -> str:
        allocated = "n/a" if self.peak_allocated_gb is None else f"{self.peak_allocated_gb:.1f}"
        return (
            f"| {self.name} | {self.total_params / 1e6:,.3g} M | {self.trainable_params / 1e6:,.3g} M "
            f"| {self.tokens:,} "
            f"| {self.labelled:,} | {self.step_seconds:.3f} | {self.tokens / self.step_seconds:,.0f} "
            f"| {allocated} | {self.peak_reserved_gb:.1f} |"
        )


HEADER = (
    "| case | params | trainable | tokens/step | labelled | step (s) | tokens/s "
    "| peak alloc (GB) | peak reserved (GB) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def random_checkpoint(shape: str, folder: Path) -> Path:
    """A randomly initialised assistant of a real shape, built on the GPU in bf16 and saved."""
    text = dict(QWEN2[shape])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model, processor = create_assistant(dict(SIGLIP_SO400M), text, tiny_tokenizer(), seed=0)
        save_assistant(model, processor, folder)
    finally:
        torch.set_default_dtype(default_dtype)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def conversation(processor, image_size: int, answer_tokens: int) -> tuple[list[dict], list]:
    """One inspection exchange: an image and an answer of about `answer_tokens` tokens."""
    sentence = "The scratch near the top left corner is a defect of the textile surface. "
    ids = processor.tokenizer.encode(sentence * (answer_tokens // 8 + 1), add_special_tokens=False)[:answer_tokens]
    answer = processor.tokenizer.decode(ids)
    image, _ = normal_part("textile", image_size, seed=0)
    messages = [
        {"role": "user", "content": "<image>\nDescribe any defect and where it is."},
        {"role": "assistant", "content": answer},
    ]
    return messages, [image]


def peak_memory(cuda: bool) -> tuple[float | None, float]:
    if cuda:
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
    return None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


def measure(
    name: str, config: InstructTrainConfig, image_size: int, answer_tokens: int, steps: int, warmup: int
) -> Result:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    accelerator = make_accelerator(config.run)
    model, processor, groups = build_model(config, accelerator)
    optimizer = torch.optim.AdamW(groups, lr=config.optim.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = InstructCollator(processor)([conversation(processor, image_size, answer_tokens)])
    batch = {key: value.to(accelerator.device) for key, value in batch.items()}
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    allocated, reserved = peak_memory(cuda)
    unwrapped = accelerator.unwrap_model(model)
    result = Result(
        name=name,
        total_params=sum(p.numel() for p in unwrapped.parameters()),
        trainable_params=sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        tokens=int(batch["attention_mask"].sum()),
        labelled=int((batch["labels"] != -100).sum()),
        step_seconds=seconds,
        peak_allocated_gb=allocated,
        peak_reserved_gb=reserved,
    )
    del model, optimizer, unwrapped
    accelerator.free_memory()
    gc.collect()
    return result


def case_config(
    source: ModelSource, qlora: bool, rank: int, gradient_checkpointing: bool, cuda: bool
) -> InstructTrainConfig:
    return InstructTrainConfig(
        model=source,
        data=InstructData(json_path="unused.json"),  # the benchmark feeds its own batch
        run=RunConfig(mixed_precision="bf16" if cuda else "no", gradient_checkpointing=gradient_checkpointing),
        lora=LoraSettings(r=rank, alpha=2 * rank, dropout=0.05, qlora=qlora),
    )


def gpu_results(args: argparse.Namespace) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        checkpoints: dict[str, Path] = {}
        for name in args.cases:
            shape, qlora = CASES[name]
            if shape not in checkpoints:
                print(f"[{name}] building a random {shape} checkpoint ...", flush=True)
                checkpoints[shape] = random_checkpoint(shape, Path(workdir) / shape)
            print(f"[{name}] measuring {args.steps} steps ...", flush=True)
            config = case_config(ModelSource(path=str(checkpoints[shape])), qlora, args.rank, True, cuda=True)
            results.append(measure(name, config, args.image_size, args.answer_tokens, args.steps, args.warmup))
            print(results[-1].row(), flush=True)
    return results


def cpu_results(args: argparse.Namespace) -> list[Result]:
    """No GPU: the same step on the tiny random model, so the script and its code path stay tested."""
    config = case_config(ModelSource(tiny=True), False, rank=8, gradient_checkpointing=True, cuda=False)
    return [measure("lora-tiny (cpu)", config, 56, 32, args.steps, args.warmup)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--answer-tokens", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="where the random checkpoints are written (7B: ~16 GB)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        results = gpu_results(args)
    else:
        device = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; no CUDA: QLoRA cases skipped"
        results = cpu_results(args)
    table = "\n".join(
        [f"{device}; {args.steps} timed steps after {args.warmup} warm-up", HEADER, *(r.row() for r in results)]
    )
    print(table)
    return table


if __name__ == "__main__":
    main()
