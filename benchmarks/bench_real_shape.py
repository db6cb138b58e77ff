"""What the expert and ROI tokens cost against stock LLaVA-OneVision, at mid and at LLaVA-OneVision-0.5B shapes, CPU.

One set of random weights is built at the chosen shapes and loaded into both our model and stock transformers
`LlavaOnevisionForConditionalGeneration`, so nothing is downloaded:

    mid    SigLIP 12 layers x 768 (384 px, patch 14) + a 6-layer Qwen2 at 0.5B's width and vocabulary
    0.5b   SigLIP-so400m 384/14 (26 layers) + Qwen2-0.5B, vocabulary 151,936 (the `anomaly-ov-0.5b` preset)

with Anomaly-OV's expert at its published sizes and Triad's ROI tokens on (the real presets' ROI settings unless
`--tokens-from` / `--pool` say otherwise). Each image goes through the processor
(AnyRes, the official 1024 px rule) and three forwards are timed in turn, A/B/C per repeat (image encode + LLM
prefill over the whole prompt, no decoding; one warm-up round at the first side):

    stock        stock's image encode, AnyRes packing and prefill over its base + text tokens
    ours         our image side (vision, expert, ROI tokens) and prefill over base + expert + ROI + text tokens
    without ROI  ours with `roi.enabled=false` (Anomaly-OV's layout)

"ROI share" is (ours - without ROI) / ours. `--tokens-from` and `--pool` set the ROI tokens' source and count
(`RoiConfig`); `--stages` adds the seconds of the image side's stages for ours. Peak memory is the process's peak
resident set so far (it only grows; sides run in increasing order).

    python benchmarks/bench_real_shape.py --shapes mid --sides 384 768 1024 1152
    python benchmarks/bench_real_shape.py --shapes 0.5b --tokens-from crops --pool 2      # Triad's re-encoding
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

from assistant.config import RoiConfig, Settings  # noqa: E402
from assistant.factory import create_assistant, tiny_tokenizer  # noqa: E402
from assistant.presets import QWEN2_05B, REAL_ROI, SIGLIP_SO400M  # noqa: E402
from assistant.processing import AssistantProcessor  # noqa: E402
from assistant.vision import spread_feature_layers  # noqa: E402

PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."
SHAPES = {
    "mid": (
        {
            **SIGLIP_SO400M,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        {**QWEN2_05B, "num_hidden_layers": 6},
    ),
    "0.5b": (dict(SIGLIP_SO400M), dict(QWEN2_05B)),
}


def photo(side: int, seed: int = 0) -> Image.Image:
    """A textured square part with a dark scratch (the weights are random: content only sets the crops)."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(150, 20, (side, side, 3)).clip(0, 255).astype(np.uint8)
    pixels[side // 3 : side // 3 + max(2, side // 100), side // 4 : side // 2] = 30
    return Image.fromarray(pixels)


def build(shapes: str, roi: dict, seed: int = 0):
    vision, text = SHAPES[shapes]
    expert = {"feature_layers": spread_feature_layers(vision["num_hidden_layers"])}
    model, processor = create_assistant(vision, text, tiny_tokenizer(), seed=seed, expert=expert, roi=roi)
    stock = LlavaOnevisionForConditionalGeneration(model.config)  # the same config: stock reads its LLaVA fields
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("model.anomaly_expert.") for key in unexpected), (missing, unexpected)
    return model.eval(), processor, stock.eval()


def variant(processor: AssistantProcessor, settings: Settings) -> AssistantProcessor:
    config = processor.config.__class__.from_dict(processor.config.to_dict())
    config.apply_settings(settings)
    return AssistantProcessor(processor.image_processor, processor.tokenizer, config=config)


IMAGE_KEYS = ("pixel_values", "image_sizes", "image_is_query", "source_sizes", "roi_pixel_values")


def measure(model, processor, stock, side: int, repeats: int, stages: bool, warmup: bool) -> dict:
    image = photo(side)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True,
    )
    ours_processor = processor
    plain = variant(processor, Settings(roi={"enabled": False}))
    base = variant(processor, Settings(expert={"tokens": False}, roi={"enabled": False}))
    inputs = {
        name: p(text=text, images=[image]) for name, p in (("ours", ours_processor), ("plain", plain), ("stock", base))
    }
    config, core = model.config, model.model
    roi = config.roi

    def ours(name: str, roi_config: RoiConfig):
        config.roi = roi_config
        batch = inputs[name]
        encoding = core.encode_images(**{key: batch[key] for key in IMAGE_KEYS if key in batch})
        return model(input_ids=batch["input_ids"], image_embeddings=encoding.embeddings, use_cache=True)

    calls = {
        "stock": lambda: stock(
            input_ids=inputs["stock"]["input_ids"],
            pixel_values=inputs["stock"]["pixel_values"][None],
            image_sizes=inputs["stock"]["image_sizes"],
        ),
        "ours": lambda: ours("ours", roi),
        "plain": lambda: ours("plain", roi.model_copy(update={"enabled": False})),
    }
    seconds = {name: [] for name in calls}
    with torch.inference_mode():
        if warmup:  # first-call allocations out of the timings (once per process: the smallest side)
            for call in calls.values():
                call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - start)
        config.roi = roi
        stage = {}
        if stages:
            batch = {key: inputs["ours"][key] for key in IMAGE_KEYS}
            levels = config.expert.feature_layers
            for name, call in (
                ("vision", lambda: core.vision_features(batch["pixel_values"], levels)),
                ("analysis", lambda: core.analyze_queries(**{k: batch[k] for k in IMAGE_KEYS[:4]})),
                ("encode", lambda: core.encode_images(**batch)),
            ):
                start = time.perf_counter()
                call()
                stage[name] = time.perf_counter() - start
    ratio = [o / s for o, s in zip(seconds["ours"], seconds["stock"])]
    plain_ratio = [p / s for p, s in zip(seconds["plain"], seconds["stock"])]
    share = [(o - p) / o for o, p in zip(seconds["ours"], seconds["plain"])]
    layout = ours_processor.layout((image.height, image.width))
    return {
        "side": side,
        "grid": "x".join(map(str, layout.grid)),
        **layout.part_counts,
        "tokens": {name: int(batch["input_ids"].shape[1]) for name, batch in inputs.items()},
        "seconds": {name: statistics.median(values) for name, values in seconds.items()},
        "ratio": statistics.median(ratio),
        "plain_ratio": statistics.median(plain_ratio),
        "share": statistics.median(share),
        "stage": stage,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def row(r: dict) -> str:
    tokens, seconds, stage = r["tokens"], r["seconds"], r["stage"]
    stages = ""
    if stage:
        stages = (
            f" | {stage['vision']:.2f} / {stage['analysis'] - stage['vision']:.2f} / "
            f"{stage['encode'] - stage['analysis']:.2f}"
        )
    return (
        f"| {r['side']} px | {r['grid']} | {r['base']:,} / {r['expert']} / {r['roi']} "
        f"| {tokens['stock']:,} / {tokens['ours']:,} / {tokens['plain']:,} "
        f"| {seconds['stock']:.2f} / {seconds['ours']:.2f} / {seconds['plain']:.2f} "
        f"| {r['ratio']:.2f} | {r['plain_ratio']:.2f} | {100 * r['share']:.0f}%{stages} | {r['peak_gb']:.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--sides", type=int, nargs="+", default=[384, 768, 1024, 1152])
    parser.add_argument("--repeats", type=int, default=3, help="timed A/B/C rounds (one warm-up round first)")
    parser.add_argument("--tokens-from", choices=["auto", "tiles", "crops"], default=REAL_ROI["tokens_from"])
    parser.add_argument("--pool", type=int, default=REAL_ROI["pool"], help="ROI tokens per box: (27 // pool)^2")
    parser.add_argument("--stages", action="store_true", help="also time vision / expert / ROI of ours once")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor, stock = build(args.shapes, {"tokens_from": args.tokens_from, "pool": args.pool})
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{args.shapes} shapes ({parameters:.0f}M parameters), ROI tokens from {args.tokens_from}, pool {args.pool}; "
        f"torch {torch.__version__}, {args.threads} thread(s), fp32, random weights; median of {args.repeats}"
    )
    print(
        "| image | AnyRes | our LLM tokens: base / expert / ROI | prompt tokens: stock / ours / without ROI "
        "| seconds: stock / ours / without ROI | ours / stock | without ROI / stock | ROI share"
        + (" | ours: vision / expert / ROI (s)" if args.stages else "")
        + " | peak RSS (GB) |\n|---|---|---|---|---|---|---|---|"
        + ("---|" if args.stages else "")
        + "---|",
        flush=True,
    )
    for index, side in enumerate(sorted(args.sides)):
        print(row(measure(model, processor, stock, side, args.repeats, args.stages, index == 0)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
