"""Stage-2 data throughput: samples/s of the instruct dataset + collator, by DataLoader workers, against what a
training step consumes.

Writes `--images` JPEG photos at the `--sides` (long side; aspect ratios 3:4 to 4:3) with a two-turn
Anomaly-Instruct-style conversation each (LLaVA JSON), then reads them through `InstructDataset` and
`InstructCollator` exactly as `train instruct` does: image decode, AnyRes preprocessing, the chat template,
answer-only labels. The processor has the real 0.5B preset's shapes (SigLIP 384/14, AnyRes up to 1024 px, the
preset's expert and ROI settings; no weights are built). Each worker count reads every image once after a
one-batch warm-up; "start" is the time to the first batch (worker start-up included).

"fed" runs the loader again against a consumer that holds each batch for the GPU step's time (a sleep: the
accelerator computes while the CPU is free), and "GPU busy" is the share of that time the step ran: what
workers buy when the model runs elsewhere. On a CPU-only run the step needs the same cores the workers take.

The consumer side:
  tiny step     one training step (forward + backward, LoRA) of the tiny test model on its own batches, here
  GPU step      samples/s that stage 2 of the 0.5B model consumes at 16.8k tokens/s (stock transformers + peft
                LoRA, batch 1, one H100, measured earlier; see issue 16), for this data's mean tokens per sample

    python benchmarks/bench_data_pipeline.py --images 48 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.factory import create_config, create_processor, tiny_assistant, tiny_tokenizer  # noqa: E402
from assistant.presets import QWEN2_05B, REAL_ROI, SIGLIP_SO400M  # noqa: E402
from data.instruct import load_instruct_json  # noqa: E402
from training.collate import InstructCollator  # noqa: E402
from training.config import LoraSettings  # noqa: E402
from training.datasets import InstructDataset  # noqa: E402
from training.lora import apply_lora  # noqa: E402

GPU_TOKENS_PER_SECOND = 16_800  # stock transformers + peft LoRA, Qwen2-0.5B shapes, batch 1, one H100
DESCRIPTION = "A thin dark scratch runs across the upper left of the part; the rest of the surface is even."


def write_dataset(root: Path, count: int, sides: list[int], seed: int = 0) -> Path:
    """`count` textured JPEG photos with a scratch, and their conversations."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        side = sides[index % len(sides)]
        aspect = rng.uniform(0.75, 4 / 3)
        height, width = (side, int(side / aspect)) if aspect > 1 else (int(side * aspect), side)
        pixels = rng.normal(150, 25, (height, width, 3)).clip(0, 255).astype(np.uint8)
        pixels[height // 3 : height // 3 + 4, width // 4 : width // 2] = 30
        Image.fromarray(pixels).save(root / f"{index}.jpg", quality=90)
        turns = [("<image>\nIs there any defect in the object?", "Yes."), ("Describe it.", DESCRIPTION)]
        conversation = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"id": str(index), "image": f"{index}.jpg", "conversations": conversation})
    path = root / "instruct.json"
    path.write_text(json.dumps(records))
    return path


def real_processor():
    config = create_config(dict(SIGLIP_SO400M), dict(QWEN2_05B), tiny_tokenizer(), roi=dict(REAL_ROI))
    return create_processor(config, tiny_tokenizer())


def read_all(dataset, collate, workers: int, pin_memory: bool, step_seconds: float = 0.0) -> dict:
    """Samples/s through the loader; each batch held `step_seconds` by the consumer."""
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
    )
    started = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    start = time.perf_counter() - started
    tokens, counted = [int(first["attention_mask"].sum())], time.perf_counter()
    for batch in batches:
        tokens.append(int(batch["attention_mask"].sum()))
        time.sleep(step_seconds)
    seconds = time.perf_counter() - counted
    return {"start": start, "rate": (len(tokens) - 1) / seconds, "tokens": statistics.mean(tokens)}


def tiny_step_rate(dataset, repeats: int = 8) -> float:
    """Training steps/s (batch 1) of the tiny model with LoRA, on its own processor's batches of this data."""
    model, processor = tiny_assistant(seed=0, roi=False)
    model.config.use_cache = model.config.text_config.use_cache = False
    model = apply_lora(model, LoraSettings(r=8, alpha=16, dropout=0.0)).train()
    collate = InstructCollator(processor)
    batches = [collate([dataset[index % len(dataset)]]) for index in range(repeats + 1)]
    times = []
    for batch in batches:
        started = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - started)
    return 1 / statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pin-memory", action="store_true", help="pin batches (only does anything with CUDA)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        dataset = InstructDataset(load_instruct_json(write_dataset(Path(folder), args.images, args.sides)))
        collate = InstructCollator(real_processor())
        rows = [(workers, read_all(dataset, collate, workers, args.pin_memory)) for workers in args.workers]
        tokens = rows[0][1]["tokens"]
        step = tokens / GPU_TOKENS_PER_SECOND
        fed = [read_all(dataset, collate, workers, args.pin_memory, step) for workers in args.workers]
        tiny = tiny_step_rate(dataset)
    print(f"{args.images} images, long sides {args.sides}, {tokens:,.0f} LLM tokens per sample (0.5B preset)\n")
    print(f"| workers | first batch (s) | samples/s | x workers 0 | fed, {step:.2f} s step: samples/s | GPU busy |")
    print("|---|---|---|---|---|---|")
    for (workers, row), feeding in zip(rows, fed):
        print(
            f"| {workers} | {row['start']:.2f} | {row['rate']:.1f} | {row['rate'] / rows[0][1]['rate']:.2f} "
            f"| {feeding['rate']:.2f} | {feeding['rate'] * step:.0%} |"
        )
    print(f"\n| tiny step (batch 1, CPU) | {tiny:.1f} samples/s |")
    print(f"| GPU step (0.5B at {GPU_TOKENS_PER_SECOND:,} tok/s) | {1 / step:.1f} samples/s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
