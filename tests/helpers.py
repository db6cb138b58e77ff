"""Plain helpers several test modules share: images drawn in code and a stub OpenAI-compatible server.

Fixtures live in conftest.py; this module holds what tests call or construct directly, so that no test
module imports another.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import openai
import torch
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, ImageDraw, ImageFilter

from assistant.client import to_messages
from assistant.engine import Conversation, LocalEngine, agreeing_answer
from assistant.factory import prepare_tokenizer, tiny_assistant, tiny_text_config, tiny_tokenizer, tiny_vision_config
from assistant.verdict import Verdict

ROOT = Path(__file__).resolve().parents[1]
APP_MAX_NEW_TOKENS = 12  # answer length of the app the app tests serve

# First-token alternatives the stub reports: P(Yes) = 0.6 / 0.9, P(B) = 0.05 / 0.07 after renormalising.
TOP_LOGPROBS = {" Yes": 0.5, "Yes": 0.1, "No": 0.3, " B": 0.05, "A": 0.02}


def defect_image(height: int = 120, width: int = 160, seed: int = 0, defect: bool = True) -> Image.Image:
    """A textured grey part with an optional bright scratch, drawn deterministically."""
    rng = np.random.default_rng(seed)
    pixels = 110 + 20 * rng.standard_normal((height, width, 3))
    if defect:
        y, x = height // 3, width // 2
        pixels[y : y + max(2, height // 20), x - width // 6 : x + width // 6] = 245
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def texture(seed: int, size: int = 96) -> Image.Image:
    """One family: blurred grey noise of random brightness and contrast."""
    rng = np.random.default_rng(seed)
    noise = np.asarray(
        Image.fromarray(np.clip(128 + 40 * rng.standard_normal((size, size)), 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(1.5)
        ),
        dtype=np.float64,
    )
    pixels = (noise - noise.mean()) / (noise.std() + 1e-6) * rng.uniform(15, 25) + rng.uniform(110, 140)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


def scene(seed: int, size: int = 96) -> Image.Image:
    """A very different family: a colour gradient sky with bright ellipses and rectangles."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, size)[:, None, None]
    image = Image.fromarray((top * (1 - ramp) + bottom * ramp).repeat(size, 1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        (x0, y0), (width, height) = rng.integers(0, size - 20, 2), rng.integers(10, 50, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + width, y0 + height], fill=colour)
    return image


def model_inputs(processor, images: list[Image.Image], question: str = "Are there any defects?"):
    """The processor's model inputs for one user turn: the images, then the question."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return processor(text=text, images=images)


def transformers_tokens(
    engine: LocalEngine, conversation: Conversation, max_new_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy answer ids) from transformers' own `generate` with pixel inputs: what vLLM must match."""
    processor = engine.processor
    text = processor.apply_chat_template(conversation.chat(), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=conversation.images)
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        output = engine.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt = inputs["input_ids"][0].tolist()
    return prompt, output[0, len(prompt) :].tolist()


def served_tokens(client: openai.OpenAI, name: str, conversation: Conversation, max_new_tokens: int):
    """(prompt ids, answer ids, response) of a greedy chat completion on our vLLM server."""
    response = client.chat.completions.create(
        model=name, messages=to_messages(conversation), max_tokens=max_new_tokens, temperature=0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    return response.model_extra["prompt_token_ids"], response.choices[0].model_extra["token_ids"], response


def expected_answer(engine: LocalEngine, conversation: Conversation) -> str:
    """What the app should show for this conversation: the engine's own greedy answer, agreeing with the verdict."""
    decided = engine.analyze(conversation.image, conversation.references).anomalous
    return agreeing_answer(engine, conversation, decided, APP_MAX_NEW_TOKENS).strip()


# -- a Llama-3-style tiny model: Meta's Llama 3 chat template and special tokens, nothing like ChatML ---------

LLAMA3_SPECIALS = {  # in id order: bos 1 and eos 2 are LlamaConfig's defaults, as a real config names them
    "pad_token": "<|end_of_text|>",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
}
LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's, verbatim: string content only
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_assistant(seed: int = 0, roi: bool = True):
    """A tiny assistant around a Llama LLM whose tokenizer brings Llama 3's specials and chat template."""
    tokenizer = tiny_tokenizer(specials=LLAMA3_SPECIALS, chat_template=LLAMA3_CHAT_TEMPLATE)
    model, processor = tiny_assistant(seed=seed, roi=roi, text_model="llama", tokenizer=tokenizer)
    text = model.config.text_config
    assert (text.bos_token_id, text.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    return model, processor


# -- a stub OpenAI-compatible server (chat completions + our /inspect) --------------------------------------


def last_user_text(body: dict) -> str:
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def decode_image(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"), dtype=np.float32)


def stub_answer(body: dict) -> str:
    text = last_user_text(body)
    if "reply with 'Yes' or 'No'" in text:
        return "Yes, there is a defect."
    if "Following is new question list" in text:
        return "B"
    if "[Reference answer]" in text:
        return "7\nMostly consistent with the reference."
    return "The part shows a bright scratch near the top."


def stub_verdict(url: str) -> dict:
    """Bright pixels are the 'defect': score grows with their share, the heatmap is the brightness."""
    gray = decode_image(url)
    score = float(min(1.0, 20 * (gray > 200).mean()))
    verdict = Verdict(anomalous=score >= 0.2, score=score, heatmap=gray / 255.0, expert_score=score)
    return verdict.model_dump(mode="json")


class StubServer:
    """Answers depend only on the request: model "chat-only" has no logprobs and no /inspect, "slow" never
    answers in time, "flaky" fails once with 503. `requests` records every request body."""

    def __init__(self):
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.failed_once = False
        self._lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/inspect")(self.inspect)

    def reset(self) -> None:
        self.requests.clear()
        self.max_in_flight = 0
        self.failed_once = False

    def _completion(self, body: dict, answer: str) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        if body.get("logprobs") and body["model"] != "chat-only":
            top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in TOP_LOGPROBS.items()]
            choice["logprobs"] = {
                "content": [{"token": " Yes", "logprob": math.log(0.5), "bytes": None, "top_logprobs": top}]
            }
        return {"id": "stub", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice]}

    def _events(self, body: dict, answer: str):
        for piece in re.findall(r"\S+\s*", answer):
            delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            chunk = {
                "id": "stub",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": body["model"],
                "choices": [delta],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    def chat(self, body: Annotated[dict, Body()]):  # sync handlers run in FastAPI's thread pool: requests overlap
        with self._lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = body["model"] == "flaky" and not self.failed_once
            self.failed_once = self.failed_once or fail
        try:
            time.sleep(2 if body["model"] == "slow" else 0.05)
        finally:
            with self._lock:
                self.in_flight -= 1
        if fail:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        answer = stub_answer(body)
        if body.get("stream"):
            return StreamingResponse(self._events(body, answer), media_type="text/event-stream")
        return self._completion(body, answer)

    def inspect(self, body: Annotated[dict, Body()]):
        self.requests.append(body)
        if body["model"] == "chat-only":
            return JSONResponse({"error": {"message": "Not Found"}}, status_code=404)
        return stub_verdict(body["image_url"])


def official_expert_state(width=64, patches=16, levels=4, dim=32, seed=0):
    """A state dict with the official AnomalyOV key names and shapes (as built by its constructor)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    state = {
        "positive_embedding": t(1, dim),
        "negative_embedding": t(1, dim),
        "pooling_layer.0.weight": t(1, patches),
        "pooling_layer.0.bias": t(1),
        "class_predictor.0.weight": t(dim, width),
        "class_predictor.0.bias": t(dim),
        "class_predictor.2.weight": t(dim, dim),
        "class_predictor.2.bias": t(dim),
        "q_former.query_proj.weight": t(dim, width),
        "q_former.query_proj.bias": t(dim),
        "q_former.key_proj.weight": t(dim, width),
        "q_former.key_proj.bias": t(dim),
        "final_predictor.0.weight": t(dim, width),
        "final_predictor.0.bias": t(dim),
        "final_predictor.2.weight": t(1, dim),
        "final_predictor.2.bias": t(1),
    }
    for i in range(levels):
        state[f"siglip_adaptors.{i}.weight"] = t(dim, width)
        state[f"siglip_adaptors.{i}.bias"] = t(dim)
        state[f"prompt_adaptors.{i}.weight"] = t(dim, 2 * dim)
        state[f"prompt_adaptors.{i}.bias"] = t(dim)
    return state


def tiny_llava_config(tokenizer, **config_kwargs):
    """A stock transformers LlavaOnevisionConfig at the tiny test shapes, for `tokenizer` (`prepare_tokenizer`'d)."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        **config_kwargs,
    )


def save_tiny_llava(path: Path, seed: int = 1):
    """A tiny llava-hf style LLaVA-OneVision checkpoint with tokenizer saved at `path`; returns the model."""
    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer = prepare_tokenizer(tiny_tokenizer())
    config = tiny_llava_config(tokenizer, image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def wait_for_app(process: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    """Until the Gradio app that `process` runs answers on `port`; fails with its log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/gradio_api/info", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the app did not start:\n{log.read_text()}"
        time.sleep(0.3)
