"""vLLM serves a Llama-3-style model (Llama LLM, Llama 3's own chat template) token for token like transformers.

The checkpoint saves the processor's template: the tokenizer's own behind the image-part prelude
(`processing.IMAGE_PARTS_AS_TEXT`). Its loop over the content parts makes vLLM's chat server use the "openai"
content format, which keeps the image parts where they are. Llama 3's string-only template alone would get
the "string" format, which moves every image to the front of its message: the reference conversation
below (intro text, then the images) would no longer agree.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch

from assistant.engine import Conversation, LocalEngine
from assistant.factory import save_assistant
from assistant.serve.process import ServerProcess
from tests.helpers import defect_image, llama3_assistant, served_tokens, transformers_tokens

API_KEY = "sk-test-chat-template"
NAME = "llama3"
MAX_TOKENS = 12
QUESTION = "Are there any defects?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """LLM and projector weights ~N(0, 0.3): well-separated logits that react to every prompt token."""
    model, processor = llama3_assistant(seed=2)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and name.startswith(
                ("model.language_model", "lm_head", "model.multi_modal_projector")
            ):
                parameter.normal_(0, 0.3)
    return save_assistant(model, processor, tmp_path_factory.mktemp("served") / "llama3")


@pytest.fixture(scope="module")
def local(checkpoint) -> LocalEngine:
    return LocalEngine.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(checkpoint, serving_python, tmp_path_factory):
    """Started like every served checkpoint: no chat-template options, vLLM reads the checkpoint's."""
    options = ["--python", serving_python, "--api-key", API_KEY, "--name", NAME, "--dtype", "float32"]
    options += ["--max-model-len", "2048", "--kv-cache-gib", "1"]
    with ServerProcess(checkpoint, tmp_path_factory.mktemp("server-logs") / "llama3.log", options) as running:
        yield running


def assert_agreement(server: ServerProcess, engine: LocalEngine, conversation: Conversation) -> str:
    client = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)
    prompt, answer, response = served_tokens(client, NAME, conversation, MAX_TOKENS)
    expected_prompt, expected_answer = transformers_tokens(engine, conversation, MAX_TOKENS)
    assert prompt == expected_prompt, "vLLM rendered another prompt than the processor"
    assert answer == expected_answer
    return response.choices[0].message.content


@pytest.mark.vllm
def test_one_image_matches(server, local):
    conversation = Conversation.start(defect_image(), QUESTION)
    assert_agreement(server, local, conversation)
    prompt, _ = transformers_tokens(local, conversation, MAX_TOKENS)
    assert local.processor.tokenizer.convert_ids_to_tokens(prompt[:2]) == ["<|begin_of_text|>", "<|start_header_id|>"]


@pytest.mark.vllm
def test_references_after_the_intro_text_match(server, local):
    """Intro text, two image parts, the question: the images stay after the intro on both sides."""
    conversation = Conversation.start(defect_image(seed=1), QUESTION, [defect_image(80, 200, defect=False, seed=3)])
    assert_agreement(server, local, conversation)


@pytest.mark.vllm
def test_two_turn_chat_matches(server, local):
    conversation = Conversation.start(defect_image(seed=6), QUESTION)
    first = assert_agreement(server, local, conversation)
    conversation.answer(first).ask("Where is it?")
    assert_agreement(server, local, conversation)
