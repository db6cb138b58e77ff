"""Decode speed in-process: our generation against stock transformers `generate`, dynamic and static KV cache, CPU.

Our generation is what `LocalEngine.complete` runs (transformers `generate` over the prompt's embeddings, the
image encoded once); stock is `LlavaOnevisionForConditionalGeneration.generate` with pixel values, on the same
weights and image (its prompt has the base image tokens only). Decode tokens/s leave the prefill out:
(N - 1) / (time for N new tokens - time for 1), greedy, `min_new_tokens` = N so every run decodes as many tokens.

    python benchmarks/bench_decode.py                          # the demo model and the mid shapes
    python benchmarks/bench_decode.py --models demo --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlavaOnevisionForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant.config import Settings  # noqa: E402
from assistant.defaults import default_model_path  # noqa: E402
from assistant.engine import Conversation, LocalEngine  # noqa: E402
from assistant.image_io import load_image  # noqa: E402
from assistant.processing import AssistantProcessor  # noqa: E402
from benchmarks.bench_memory_bank import timed  # noqa: E402
from benchmarks.bench_real_shape import build, photo  # noqa: E402

QUESTION = "Describe the object in the image and any defect you see."


def load(name: str):
    """(our model, processor, stock model on the same weights, image)."""
    if name == "demo":
        engine = LocalEngine.from_pretrained(default_model_path(), device="cpu")
        model, processor = engine.model, engine.processor
        image = load_image(default_model_path() / "examples" / "global_defect.jpg")
        stock = LlavaOnevisionForConditionalGeneration(model.config)
        stock.load_state_dict(model.state_dict(), strict=False)
        return model, processor, stock.eval(), image
    model, processor, stock = build(name, {"tokens_from": "auto", "pool": 4})
    return model, processor, stock, photo(384)


def measure(name: str, new_tokens: int, repeats: int) -> None:
    model, processor, stock, image = load(name)
    options = {"do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id or 0}
    conversation = Conversation.start(image, QUESTION)
    text = processor.apply_chat_template(conversation.chat(), add_generation_prompt=True, tokenize=False)
    base_config = model.config.__class__.from_dict(model.config.to_dict())
    base_config.apply_settings(Settings(expert={"tokens": False}, roi={"enabled": False}))
    stock_inputs = AssistantProcessor(processor.image_processor, processor.tokenizer, config=base_config)(
        text=text, images=[image]
    )
    stock_kwargs = {
        "input_ids": stock_inputs["input_ids"],
        "attention_mask": stock_inputs["attention_mask"],
        "pixel_values": stock_inputs["pixel_values"][None],
        "image_sizes": stock_inputs["image_sizes"],
    }
    engine = LocalEngine(model, processor)
    for cache in ("dynamic", "static"):
        extra = {"cache_implementation": "static"} if cache == "static" else {}

        def ours(n: int) -> None:
            prompt = engine._prompt_embeddings([conversation])  # what `complete` generates from
            model.generate(
                inputs_embeds=prompt.embeds,
                attention_mask=prompt.mask,
                max_new_tokens=n,
                min_new_tokens=n,
                **options,
                **extra,
            )

        def theirs(n: int) -> None:
            stock.generate(**stock_kwargs, max_new_tokens=n, min_new_tokens=n, **options, **extra)

        with torch.inference_mode():
            for label, call in (("ours", ours), ("stock", theirs)):
                call(2)  # warm-up
                one, many = (timed(lambda n=n: call(n), repeats) / 1000 for n in (1, new_tokens))  # median s
                print(f"| {name} | {label} | {cache} | {one:.2f} | {(new_tokens - 1) / (many - one):.1f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "mid"], choices=["demo", "mid", "0.5b"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, greedy, {args.new_tokens} new tokens")
    print("| model | generation | KV cache | 1 token (s, prefill) | decode tok/s |\n|---|---|---|---|---|", flush=True)
    for name in args.models:
        measure(name, args.new_tokens, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
