"""The assistant at the exact LLaVA-OneVision-0.5B shapes on CPU: tokens, seconds per stage, memory, and the cost
of the expert + ROI path against stock transformers LLaVA-OneVision on the same weights and image.

Random weights built from the registry's shapes (`assistant.presets`: SigLIP-so400m 384/14 + Qwen2-0.5B,
vocabulary 151,936, Anomaly-OV's expert at its published sizes, Triad's ROI tokens on), so nothing is downloaded.
For each image side the image goes through the processor (AnyRes, the official 1024 px rule) and then:

    vision    SigLIP on every crop (the base crop and the AnyRes tiles)
    expert    the rest of the expert's analysis (LTFM maps, token selector, scores, heatmap)
    ROI       the ROI crops cut from the source image, encoded and pooled, plus AnyRes packing
    prefill   the LLM over the whole prompt (base + expert + ROI + text tokens)
    decode    greedy tokens with the KV cache
    stock     `LlavaOnevisionForConditionalGeneration` forward (vision + packing + LLM prefill over base + text
              tokens) with the same weights: the ratio is ours (vision + expert + ROI + prefill) / stock
    inspect   `assistant.engine.inspect` (P(Yes), the verdict, a reasoning answer of --new-tokens tokens) and one
              follow-up chat turn, wall time through the engine

Peak memory is the process's peak resident set after the side's runs (it only grows; sides run in increasing order).

    python benchmarks/bench_real_shape.py                       # 384, 768, 1024, 1152 px; 2 threads
    python benchmarks/bench_real_shape.py --sides 384 --repeats 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlavaOnevisionForConditionalGeneration  # noqa: E402

from assistant.config import Settings  # noqa: E402
from assistant.engine import Conversation, LocalEngine, inspect  # noqa: E402
from assistant.factory import create_assistant, tiny_tokenizer  # noqa: E402
from assistant.presets import get_preset  # noqa: E402
from assistant.processing import AssistantProcessor  # noqa: E402

PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."


def timed(function, repeats: int):
    """(median seconds, last result) over `repeats` calls after one warm-up call."""
    result = function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def photo(side: int, seed: int = 0) -> Image.Image:
    """A textured square part with a dark scratch (the weights are random: content only sets the crops)."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(150, 20, (side, side, 3)).clip(0, 255).astype(np.uint8)
    pixels[side // 3 : side // 3 + max(2, side // 100), side // 4 : side // 2] = 30
    return Image.fromarray(pixels)


def build(seed: int = 0):
    preset = get_preset("anomaly-ov-0.5b")
    model, processor = create_assistant(dict(preset.vision), dict(preset.text), tiny_tokenizer(), seed=seed)
    stock = LlavaOnevisionForConditionalGeneration(model.config)  # the same config: stock reads its LLaVA fields
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("model.anomaly_expert.") for key in unexpected), (missing, unexpected)
    return model.eval(), processor, stock.eval()


def measure(model, processor, stock, side: int, repeats: int, new_tokens: int) -> dict:
    image = photo(side)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=text, images=[image])
    core = model.model
    layout = processor.layout((image.height, image.width))
    images = {key: inputs[key] for key in ("pixel_values", "image_sizes", "image_is_query", "source_sizes")}
    levels = model.config.expert.feature_layers
    with torch.inference_mode():
        vision, _ = timed(lambda: core.vision_features(inputs["pixel_values"], levels), repeats)
        analysis, _ = timed(lambda: core.analyze_queries(**images), repeats)
        encode, encoding = timed(
            lambda: core.encode_images(**images, roi_pixel_values=inputs["roi_pixel_values"]), repeats
        )
        prefill, output = timed(
            lambda: model(input_ids=inputs["input_ids"], image_embeddings=encoding.embeddings, use_cache=True),
            repeats,
        )
        token = output.logits[:, -1:].argmax(-1)

        cache, step = output.past_key_values, token
        start = time.perf_counter()
        for _ in range(new_tokens):
            step = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        decode_seconds = time.perf_counter() - start
        base_config = model.config.__class__.from_dict(model.config.to_dict())
        base_config.apply_settings(Settings(expert={"tokens": False}, roi={"enabled": False}))
        stock_processor = AssistantProcessor(processor.image_processor, processor.tokenizer, config=base_config)
        stock_inputs = stock_processor(text=text, images=[image])  # stock's prompt: base tokens only
        stock_seconds, _ = timed(
            lambda: stock(
                input_ids=stock_inputs["input_ids"],
                pixel_values=stock_inputs["pixel_values"][None],
                image_sizes=stock_inputs["image_sizes"],
            ),
            repeats,
        )
    engine = LocalEngine(model, processor, cache_size=2)
    start = time.perf_counter()
    verdict = inspect(engine, image, max_new_tokens=new_tokens)
    inspect_seconds = time.perf_counter() - start
    start = time.perf_counter()
    conversation = Conversation.start(image, PROMPT).answer(verdict.reasoning).ask("Where is it?")
    engine.complete([conversation], new_tokens)
    chat_seconds = time.perf_counter() - start
    ours = encode + prefill
    return {
        "side": side,
        "grid": "x".join(map(str, layout.grid)),
        **layout.part_counts,
        "prompt": int(inputs["input_ids"].shape[1]),
        "vision": vision,
        "expert_s": analysis - vision,
        "roi_s": encode - analysis,
        "prefill": prefill,
        "decode": new_tokens / decode_seconds,
        "stock": stock_seconds,
        "ratio": ours / stock_seconds,
        "inspect": inspect_seconds,
        "chat": chat_seconds,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


HEADER = (
    "| image | AnyRes | LLM tokens: base / expert / ROI (prompt) | vision (s) | expert (s) | ROI (s) | prefill (s) "
    "| decode (tok/s) | stock forward (s) | ours / stock | inspect (s) | chat turn (s) | peak RSS (GB) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['side']} px | {r['grid']} | {r['base']:,} / {r['expert']} / {r['roi']} ({r['prompt']:,}) "
        f"| {r['vision']:.2f} | {r['expert_s']:.2f} | {r['roi_s']:.2f} | {r['prefill']:.2f} | {r['decode']:.1f} "
        f"| {r['stock']:.2f} | {r['ratio']:.2f} | {r['inspect']:.1f} | {r['chat']:.1f} | {r['peak_gb']:.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[384, 768, 1024, 1152])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per stage after one warm-up")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor, stock = build()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, random weights at anomaly-ov-0.5b shapes")
    print(HEADER, flush=True)
    for side in sorted(args.sides):
        print(row(measure(model, processor, stock, side, args.repeats, args.new_tokens)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
