"""One interface for every surface (CLI, app, evaluations) over interchangeable backends.

`LocalEngine` runs the model in-process with transformers (the embedded default, CPU or GPU); the
OpenAI-compatible endpoint backend lives in `assistant/client.py`. A `Conversation` is one image
(plus optional normal references) and its chat history; the image is encoded once and reused by every
later turn. Every backend's `analyze` returns the expert's `Verdict` (no reasoning yet); `inspect` adds the
language model's reasoning and defect name to it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .checkpoint import load_checkpoint
from .config import Settings
from .image_io import ImageInput, load_image, load_references
from .modeling import AssistantForConditionalGeneration
from .processing import AssistantProcessor
from .prompts import DEFECT_QUESTION, INSPECTION_QUESTION, REFERENCE_INTRO
from .verdict import Verdict
from .vision import ImageEncoderMixin, ImageEncoding


@dataclass
class Conversation:
    """A chat about one query image (optionally preceded by normal reference images)."""

    image: Image.Image | None = None
    references: list[Image.Image] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)  # {"role": "user"|"assistant", "content": str}

    @classmethod
    def start(
        cls, image: ImageInput | None, question: str, references: Sequence[ImageInput] = ()
    ) -> Conversation:
        return cls(
            image=None if image is None else load_image(image, "image"),
            references=load_references(references),
            messages=[{"role": "user", "content": question}],
        )

    def ask(self, question: str) -> Conversation:
        self.messages.append({"role": "user", "content": question})
        return self

    def answer(self, text: str) -> Conversation:
        self.messages.append({"role": "assistant", "content": text})
        return self

    @property
    def images(self) -> list[Image.Image]:
        return [*self.references, self.image] if self.image is not None else []

    def chat(self) -> list[dict]:
        """Messages in the processor's chat-template format; the images open the first user turn."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("the conversation must end with a user question")
        chat = []
        for index, message in enumerate(self.messages):
            content: list[dict] = [{"type": "text", "text": message["content"]}]
            if index == 0 and self.images:
                intro = (
                    [{"type": "text", "text": REFERENCE_INTRO.format(n=len(self.references)) + "\n"}]
                    if self.references
                    else []
                )
                content = intro + [{"type": "image"} for _ in self.images] + content
            chat.append({"role": message["role"], "content": content})
        return chat


class Scorer(Protocol):
    """Anything that scores an image: `score(image, references) -> (score, HxW map)`. An external anomaly-map
    source for the ROI tokens (e.g. `assistant.clip.expert.ClipAnomalyExpert`), and a row of the zero-shot report."""

    def score(self, image: Image.Image, references: Sequence[Image.Image] = ()) -> tuple[float, np.ndarray]: ...


class Engine(Protocol):
    def analyze(self, image: ImageInput, references: Sequence[ImageInput] = ()) -> Verdict:
        """The expert's verdict: score, decision, heatmap and boxes at the image's size; no text."""
        ...

    def stream(self, conversation: Conversation, max_new_tokens: int = 256) -> Iterator[str]: ...

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]: ...

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]: ...


def inspect(
    engine: Engine,
    image: ImageInput,
    references: Sequence[ImageInput] = (),
    question: str = INSPECTION_QUESTION,
    max_new_tokens: int = 256,
) -> Verdict:
    """Verdict for one image: expert score/heatmap/boxes, the LLM's reasoning, and the defect type."""
    conversation = Conversation.start(image, question, references)
    verdict = engine.analyze(conversation.image, conversation.references)
    reasoning = engine.complete([conversation], max_new_tokens)[0].strip()
    defect = None
    if verdict.anomalous:
        conversation.answer(reasoning).ask(DEFECT_QUESTION)
        defect = engine.complete([conversation], 32)[0].strip() or None
    return verdict.model_copy(update={"reasoning": reasoning, "defect": defect})


class _StopWhenSet(StoppingCriteria):
    """Ends a generation early once `event` is set (its reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _image_key(images: Sequence[Image.Image]) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


class ImageAnalyzer:
    """The image side and its processor: encodes images (an LRU cache by pixel content) and gives verdicts.

    `model` is anything that owns the image-side modules (`vision.ImageEncoderMixin`): the full model, or the
    server's image side alone (`serve/analysis.py`).
    """

    def __init__(
        self,
        model: ImageEncoderMixin,
        processor: AssistantProcessor,
        cache_size: int = 8,
        roi_expert: Scorer | None = None,
    ):
        if model.config.roi.map_source == "external" and roi_expert is None:
            raise ValueError(
                "the model takes its ROI map from an external expert (roi.map_source = 'external'): pass roi_expert "
                "(CLI: --roi-source clip --clip-model SPEC)"
            )
        self.model = model.eval()
        self.processor = processor
        self.roi_expert = roi_expert
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ImageEncoding] = OrderedDict()
        # One model call at a time; also guards the image cache. A plain Lock, not an RLock: a streaming generator
        # holds it across yields, and Gradio may resume the generator on another worker thread.
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, images: Sequence[Image.Image]) -> ImageEncoding:
        """Encode a query (last) with its references, cached by pixel content."""
        with self._lock:
            return self._encode(images)

    def _encode(self, images: Sequence[Image.Image]) -> ImageEncoding:
        """`encode` for a caller that holds the lock."""
        key = _image_key(images)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        inputs = self.processor.preprocess_images([list(images)], roi_maps=self._roi_maps(images))
        with torch.inference_mode():
            encoding = self.model.encode_images(**{k: v.to(self.device) for k, v in inputs.items()})
        self._cache[key] = encoding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return encoding

    def _roi_maps(self, images: Sequence[Image.Image]) -> list[np.ndarray] | None:
        """The external expert's map of the query (last image), the earlier images as its normal references."""
        if self.model.config.roi.map_source != "external":
            return None
        return [self.roi_expert.score(images[-1], images[:-1])[1]]

    def analyze(self, image: ImageInput, references: Sequence[ImageInput] = ()) -> Verdict:
        image = load_image(image, "image")
        analysis = self.encode([*load_references(references), image]).analysis
        return analysis.verdict(0, image.size, self.model.config.expert)


class LocalEngine(ImageAnalyzer):
    """In-process transformers backend: the full model's image side plus its language model."""

    model: AssistantForConditionalGeneration

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        roi_expert: Scorer | None = None,
        settings: Settings | None = None,
    ) -> LocalEngine:
        """Load any checkpoint folder (`checkpoint.load_checkpoint`); `settings` override the expert/ROI config
        for this run (`config.AssistantConfig.apply_settings`)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model, processor = load_checkpoint(path, dtype, settings)
        return cls(model.to(device), processor, roi_expert=roi_expert)

    # -- text -----------------------------------------------------------------------------------------
    def _prompt_embeddings(self, conversations: Sequence[Conversation]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input embeddings with every conversation's cached image embeddings merged in."""
        texts = [
            self.processor.apply_chat_template(c.chat(), add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]
        sizes = [[(im.height, im.width) for im in c.images] for c in conversations]
        batch = self.processor.tokenize(texts, sizes, padding_side="left")
        input_ids = batch["input_ids"].to(self.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        image_embeddings = [self._encode(c.images).embeddings for c in conversations if c.images]
        if image_embeddings:
            embeds = self.model.model.merge_image_embeddings(input_ids, embeds, torch.cat(image_embeddings))
        return embeds, batch["attention_mask"].to(self.device)

    def _generation_kwargs(self, max_new_tokens: int) -> dict:
        tokenizer = self.processor.tokenizer
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]:
        """Greedy answers for a batch of conversations (one padded generate call)."""
        with self._lock, torch.inference_mode():
            embeds, mask = self._prompt_embeddings(conversations)
            tokens = self.model.generate(
                inputs_embeds=embeds, attention_mask=mask, **self._generation_kwargs(max_new_tokens)
            )
        return self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)

    def stream(self, conversation: Conversation, max_new_tokens: int = 256) -> Iterator[str]:
        """Yield the answer's text as it is generated (greedy).

        A reader that stops early (a closed browser tab) stops the generation too, before the model is
        released to the next caller.
        """
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        stop = threading.Event()
        with self._lock:
            with torch.inference_mode():
                embeds, mask = self._prompt_embeddings([conversation])
            errors: list[BaseException] = []

            def generate() -> None:
                try:
                    with torch.inference_mode():
                        self.model.generate(
                            inputs_embeds=embeds,
                            attention_mask=mask,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                            **self._generation_kwargs(max_new_tokens),
                        )
                except BaseException as error:  # surfaced in the caller's thread below
                    errors.append(error)
                    streamer.end()

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            try:
                yield from (chunk for chunk in streamer if chunk)
            finally:
                stop.set()
                worker.join()
        if errors:
            raise errors[0]

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        """Probabilities of each choice's first token as the next token, renormalised over the choices.

        This is how a chat answer gets a ranking score (e.g. P(Yes) for image AUROC).
        """
        tokenizer = self.processor.tokenizer
        choice_ids = [tokenizer.encode(choice, add_special_tokens=False)[0] for choice in choices]
        if len(set(choice_ids)) != len(choice_ids):
            raise ValueError(f"choices {list(choices)} do not start with distinct tokens")
        with self._lock, torch.inference_mode():
            embeds, mask = self._prompt_embeddings(conversations)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1
            ).logits
        probs = logits[:, -1, choice_ids].float().softmax(-1).cpu()
        return [dict(zip(choices, row.tolist())) for row in probs]
