"""The chat template is the tokenizer's own; nothing assumes ChatML.

A Llama-3-style tiny model (Llama LLM, Llama 3's specials and chat template) renders, trains and chats with
its own template; ChatML models (the tiny default, the shipped demo) render exactly what they did before.
Serving the Llama-3-style model with vLLM: tests/test_serve_chat_template.py.
"""

from __future__ import annotations

import pytest
import torch

from assistant.defaults import default_model_path
from assistant.engine import Conversation, LocalEngine
from assistant.factory import prepare_tokenizer, save_assistant, tiny_tokenizer
from assistant.processing import DEFAULT_CHAT_TEMPLATE, IMAGE_PARTS_AS_TEXT, AssistantProcessor
from assistant.prompts import REFERENCE_INTRO
from tests.helpers import LLAMA3_CHAT_TEMPLATE, defect_image, llama3_assistant
from training.collate import IGNORE_INDEX, InstructCollator

QUESTION = "Are there any defects?"
INTRO = REFERENCE_INTRO.format(n=1)

# The template every model had before: ChatML, with image parts rendered by the template itself.
OLD_CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def two_turns() -> Conversation:
    """A reference and a query, an answer and a follow-up: intro text, two image parts, three text turns."""
    conversation = Conversation.start(defect_image(), QUESTION, [defect_image(80, 200, defect=False, seed=3)])
    return conversation.answer("Yes").ask("Where?")


def render(processor: AssistantProcessor, conversation: Conversation, **kwargs) -> str:
    return processor.apply_chat_template(conversation.chat(), add_generation_prompt=True, tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def llama3_path(tiny_llama3, tmp_path_factory):
    return save_assistant(*tiny_llama3, tmp_path_factory.mktemp("models") / "llama3")


# -- templates -----------------------------------------------------------------------------------------------


def test_chatml_prompts_are_byte_identical_to_before(tiny):
    _, processor = tiny
    rendered = render(processor, two_turns())
    assert rendered == render(processor, two_turns(), chat_template=OLD_CHATML_TEMPLATE)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{INTRO}\n<image>\n<image>\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\nYes<|im_end|>\n<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_shipped_demo_renders_with_its_llms_own_template():
    """The demo was trained (and saved) with SmolLM2's own chat template behind the image-part prelude: the file
    holds exactly that, and loading it renders what training rendered."""
    from training.demo import SMOLLM2

    path = default_model_path()
    assert path is not None, "the demo model is not bundled"
    own = SMOLLM2.tokenizer().chat_template
    assert own and own != DEFAULT_CHAT_TEMPLATE
    assert (path / "chat_template.jinja").read_text() == IMAGE_PARTS_AS_TEXT + own
    processor = AssistantProcessor.from_pretrained(path)
    assert render(processor, two_turns()) == render(processor, two_turns(), chat_template=IMAGE_PARTS_AS_TEXT + own)
    assert "You are a helpful AI assistant named SmolLM" in render(processor, two_turns())


def test_only_a_tokenizer_without_a_template_gets_chatml():
    assert prepare_tokenizer(tiny_tokenizer()).chat_template == DEFAULT_CHAT_TEMPLATE
    own = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    assert prepare_tokenizer(tiny_tokenizer(chat_template=own)).chat_template == own


def test_a_llama3_model_renders_with_its_own_template(tiny_llama3, llama3_path):
    _, processor = tiny_llama3
    assert processor.tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    assert processor.chat_template == IMAGE_PARTS_AS_TEXT + LLAMA3_CHAT_TEMPLATE
    expected = (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{INTRO}\n<image>\n<image>\n{QUESTION}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYes<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render(processor, two_turns()) == expected
    reloaded = AssistantProcessor.from_pretrained(llama3_path)  # the saved template gets no second prelude
    assert reloaded.chat_template == processor.chat_template and render(reloaded, two_turns()) == expected


# -- training: labels from the template --------------------------------------------------------------------

MESSAGES = [
    {"role": "user", "content": f"<image>\n{QUESTION}"},
    {"role": "assistant", "content": "Yes"},
    {"role": "user", "content": "Where?"},
    {"role": "assistant", "content": "top left"},
]


def test_llama3_labels_are_the_answers_and_their_eot_id(tiny_llama3):
    _, processor = tiny_llama3
    batch = InstructCollator(processor)([(MESSAGES, [defect_image(56, 56)])])

    def encode(text: str) -> list[int]:
        return processor.tokenizer.encode(text, add_special_tokens=False)

    image_ids, _ = processor.expand_images([processor.image_token_id], [(56, 56)])
    pieces = [  # (ids, labelled), each piece ending next to a special token
        (encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"), False),
        (image_ids, False),
        (encode(f"\n{QUESTION}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"), False),
        (encode("Yes<|eot_id|>"), True),
        (encode("<|start_header_id|>user<|end_header_id|>\n\nWhere?<|eot_id|>"), False),
        (encode("<|start_header_id|>assistant<|end_header_id|>\n\n"), False),
        (encode("top left<|eot_id|>"), True),
    ]
    assert batch["input_ids"][0].tolist() == [token for ids, _ in pieces for token in ids]
    labels = batch["labels"][0]
    assert labels.tolist() == [token if answer else IGNORE_INDEX for ids, answer in pieces for token in ids]
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Yes<|eot_id|>top left<|eot_id|>"


def test_a_llama3_training_step_learns_from_the_answers_only():
    model, processor = llama3_assistant(seed=1)  # its own copy: this test trains it
    short = [{"role": "user", "content": "<image>\nDefect?"}, {"role": "assistant", "content": "No"}]
    batch = InstructCollator(processor)([(MESSAGES, [defect_image(56, 56)]), (short, [defect_image(56, 56, seed=2)])])
    model.train()
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
    loss = model(**batch).loss
    torch.testing.assert_close(loss, expected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss < loss


# -- chat --------------------------------------------------------------------------------------------------


def test_the_local_engine_chats_with_the_llama3_template(llama3_path):
    engine = LocalEngine.from_pretrained(llama3_path, device="cpu")
    conversation = Conversation.start(defect_image(), QUESTION, [defect_image(80, 200, defect=False, seed=3)])
    first = engine.complete([conversation], 8)[0]
    conversation.answer(first).ask("Where?")
    follow_up = engine.complete([conversation], 8)[0]
    # The engine's answer is transformers' greedy continuation of the Llama 3 prompt.
    processor = engine.processor
    text = render(processor, conversation)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n") and "<|im_" not in text
    inputs = processor(text=text, images=conversation.images)
    with torch.inference_mode():
        output = engine.model.generate(
            **inputs, max_new_tokens=8, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id
        )
    prompt_length = inputs["input_ids"].shape[1]
    assert follow_up == processor.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    assert "".join(engine.stream(conversation, max_new_tokens=8)) == follow_up
