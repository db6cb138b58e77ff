"""Runs vLLM's multimodal processor for a checkpoint and prints what it produced, as JSON.

Executed by tests/test_serve_processor.py with the serving interpreter (vLLM is not installed in the
main environment): `python tests/serve_processor_checks.py CHECKPOINT`. No engine is started.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

# (height, width) of the images of one prompt; the last one is the query.
CASES = [
    [(56, 56)],
    [(120, 160)],
    [(30, 300)],
    [(300, 30)],
    [(336, 336)],
    [(13, 17)],
    [(1, 1)],
    [(2, 900)],
    [(900, 2)],
    [(50, 2000)],
    [(80, 200), (120, 160)],
    [(90, 90), (40, 70), (200, 120)],
]


def image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def main(path: str) -> None:
    import vllm.plugins
    from vllm.config import ModelConfig
    from vllm.exceptions import VLLMError
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.cache.base import MultiModalProcessorOnlyCache

    from assistant import image_io
    from assistant.processing import AssistantProcessor

    vllm.plugins.load_general_plugins()
    config = ModelConfig(model=path, dtype="float32", max_model_len=4096)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    cache = MultiModalProcessorOnlyCache(config)
    ours = AssistantProcessor.from_pretrained(path)

    def run(sizes: list[tuple[int, int]], seeds: list[int]) -> dict:
        images = [image(size, seed) for size, seed in zip(sizes, seeds)]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Any defect?"}]
        text = ours.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        prompt = ours.tokenizer.encode(text, add_special_tokens=False)
        result = processor(prompt, processor.info.parse_mm_data({"image": images}), cache=cache)
        return {
            "sizes": sizes,
            "vllm_ids": result["prompt_token_ids"],
            "processor_ids": ours(text=text, images=images)["input_ids"][0].tolist(),
            "embeds": [placeholder.get_num_embeds() for placeholder in result["mm_placeholders"]["image"]],
            "hashes": result["mm_hashes"]["image"],
        }

    def refusal(images: list[Image.Image]) -> str:
        try:
            processor(
                ours.tokenizer.encode("<image>", add_special_tokens=False),
                processor.info.parse_mm_data({"image": images}),
            )
        except VLLMError as error:  # what the API server turns into the HTTP status
            return f"{error.http_status.value if hasattr(error, 'http_status') else 400} {error}"
        return ""

    image_io.MAX_PIXELS = 60 * 60  # so a small image stands for one over the real limit
    too_large = refusal([image((70, 70), 0)])
    image_io.MAX_PIXELS = 64_000_000

    report = {
        "too_large": too_large,
        "cases": [run(sizes, list(range(len(sizes)))) for sizes in CASES],
        # Image seed 7 first as the query, then (now cached) as a reference before a new query.
        "roles": [run([(64, 96)], [7]), run([(64, 96), (120, 160)], [7, 8])],
        "max_tokens_per_image": processor.info.get_mm_max_tokens_per_item(4096, {"image": 1})["image"],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
