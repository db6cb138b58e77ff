"""Batches for both stages, and the loss mask of stage 2.

Stage 2 learns only what the assistant says: labels equal input_ids on every assistant answer token,
including whatever the chat template closes the answer's turn with (`<|im_end|>` and a newline in
ChatML, `<|eot_id|>` in Llama 3: the end-of-turn token the model must learn to stop with), and are -100
everywhere else: system prompt, user turns, role headers, every image-token position, the suspicion phrase
the processor inserts, and padding. (TRL's vision collator masks only padding; that would train the model
to predict its own prompts and image placeholders.)

Answer spans are found by rendering the template, whatever it is, never by matching its tokens: the
conversation rendered up to a turn with the generation prompt is exactly what the model sees before it
answers, so the answer starts where that prefix ends; rendered through the answer, it ends where the
template is done closing that turn. Tokens are labelled by their character offsets, expanded by the
processor's own `expand_images`, and checked against the processor's input_ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from assistant.processing import IGNORE_INDEX, AssistantProcessor


def answer_spans(processor: AssistantProcessor, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of every answer and the text closing its turn."""

    def render(turns: int, generation_prompt: bool = False) -> str:
        return processor.apply_chat_template(
            list(messages[:turns]), tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(len(messages))
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, answered = render(index, generation_prompt=True), render(index + 1)
        if not (answered.startswith(prompt) and text.startswith(answered)):
            raise ValueError("the chat template does not render conversations prefix by prefix; cannot find answers")
        spans.append((len(prompt), len(answered)))
    return text, spans


def label_tokens(
    processor: AssistantProcessor, text: str, spans: Sequence[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """(ids, labels) of the text before image expansion; a token is an answer token when it starts in a span."""
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
        for token, (offset, _) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]
    return encoding["input_ids"], labels


def conversation_labels(
    processor: AssistantProcessor, messages: Sequence[dict], image_sizes: Sequence[tuple[int, int]]
) -> tuple[str, list[int], list[int]]:
    """Rendered text, expanded input_ids and labels of one conversation."""
    text, spans = answer_spans(processor, messages)
    ids, labels = label_tokens(processor, text, spans)
    return (text, *processor.expand_images(ids, image_sizes, labels))


@dataclass
class InstructCollator:
    """(messages, images) samples -> model inputs with answer-only labels, right-padded."""

    processor: AssistantProcessor

    def __call__(self, samples: Sequence[tuple[Sequence[dict], Sequence[Image.Image]]]) -> dict[str, torch.Tensor]:
        texts, all_labels, all_ids = [], [], []
        for messages, images in samples:
            text, ids, labels = conversation_labels(self.processor, messages, [(im.height, im.width) for im in images])
            texts.append(text)
            all_ids.append(ids)
            all_labels.append(labels)
        batch = dict(self.processor(text=texts, images=[list(images) for _, images in samples], padding_side="right"))
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, (ids, sample_labels) in enumerate(zip(all_ids, all_labels)):
            if batch["input_ids"][row, : len(ids)].tolist() != ids:
                raise RuntimeError("labels and the processor's input_ids disagree; the tokenizer is not offset-stable")
            labels[row, : len(ids)] = torch.tensor(sample_labels)
        batch["labels"] = labels
        return batch


@dataclass
class ExpertCollator:
    """(image, label, mask or None) samples -> the expert's inputs, labels and masks at the heatmap's size."""

    processor: AssistantProcessor

    def __call__(self, samples: Sequence[tuple[Image.Image, int, np.ndarray | None]]) -> dict:
        images = self.processor.preprocess_images([[image] for image, _, _ in samples])
        masks = [
            None if mask is None else _resize_mask(mask, tuple(size))
            for (_, _, mask), size in zip(samples, images["source_sizes"].tolist())
        ]
        return {
            "pixel_values": images["pixel_values"],
            "image_sizes": images["image_sizes"],
            "source_sizes": images["source_sizes"],
            "labels": torch.tensor([float(label) for _, label, _ in samples]),
            "masks": masks,
        }


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 mask -> {0, 1} float mask at (height, width), nearest neighbour so it stays binary."""
    tensor = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))
    return F.interpolate(tensor[None, None], size, mode="nearest")[0, 0]
