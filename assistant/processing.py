"""Images + chat text -> model inputs, with exactly as many placeholder positions as the model fills.

Built on transformers' pieces: the LLaVA-OneVision PIL image processor (AnyRes crops; the PIL backend
needs no torchvision, so the vLLM environment preprocesses identically), the LLM's tokenizer with its
own chat template, and `ProcessorMixin` for saving and chat templating. The expansion of every `<image>`
happens on token ids (see `layout.py`) so the text around the visual tokens never re-tokenizes
differently between backends.

Chat messages may carry image parts; most LLM templates read string content only, so the processor's template
is the LLM's own behind `IMAGE_PARTS_AS_TEXT`, which turns every image part into `<image>` in place.

In a sample with several images, the last one is the query and the earlier ones are normal references.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from .config import SUSPICION_ADVERBS, AssistantConfig
from .image_io import ImageInput, fit_long_side, load_image, shrink_long_side
from .layout import ImageLayout, expand_image_ids, image_layout
from .prompts import IMAGE_TOKEN

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

IGNORE_INDEX = -100  # the label of a position that is no target (PyTorch's cross-entropy default)

# For a tokenizer without a chat template: ChatML with Qwen2's default system prompt (LLaVA-OneVision's format).
DEFAULT_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Runs before the LLM's template and hands it string contents: the parts of a message joined in order, an image
# part as `<image>\n`. Both backends render this same text: vLLM's chat server sees the loop over the parts and
# passes them in order ("openai" content format); for a string-only template it would move every image to the
# front of the message ("string" format) and join the texts with newlines.
IMAGE_PARTS_AS_TEXT = (
    "{%- set flat = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- set content = namespace(text='') -%}"
    "{%- if message['content'] is string -%}{%- set content.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set content.text = content.text + part['text'] -%}"
    "{%- elif part['type'] == 'image' -%}{%- set content.text = content.text + '" + IMAGE_TOKEN + "\n' -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- set flat.messages = flat.messages + [dict(message, content=content.text)] -%}"
    "{%- endfor -%}"
    "{%- set messages = flat.messages -%}"
)


def with_image_parts(chat_template: str) -> str:
    """The LLM's template behind IMAGE_PARTS_AS_TEXT (once: a saved processor's template has it already)."""
    return chat_template if chat_template.startswith(IMAGE_PARTS_AS_TEXT) else IMAGE_PARTS_AS_TEXT + chat_template


def suspicion_phrase_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """Token ids of "with {adverb} suspicious features: "; adverbs left-padded with spaces to one length."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    adverbs = [encode(f" {adverb}") for adverb in SUSPICION_ADVERBS]
    space = encode(" ")
    if len(space) != 1:
        raise ValueError("the tokenizer must encode a single space as one token to pad the adverbs")
    longest = max(len(ids) for ids in adverbs)
    return {
        "phrase_prefix_ids": encode("with"),
        "adverb_token_ids": [space * (longest - len(ids)) + ids for ids in adverbs],
        "phrase_suffix_ids": encode(" suspicious features: "),
    }


def _group_images(texts: list[str], images: object) -> list[list[ImageInput]]:
    counts = [text.count(IMAGE_TOKEN) for text in texts]
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and isinstance(images[0], (list, tuple)):
        groups = [list(group) for group in images]
    else:
        groups, start = [], 0
        for count in counts:
            groups.append(list(images[start : start + count]))
            start += count
        if start != len(images):
            raise ValueError(
                f"the text has {sum(counts)} {IMAGE_TOKEN} placeholders but {len(images)} images were given"
            )
    if len(groups) != len(texts) or [len(g) for g in groups] != counts:
        raise ValueError(
            f"{IMAGE_TOKEN} placeholders per text {counts} do not match images per text {[len(g) for g in groups]}"
        )
    return groups


class AssistantProcessor(ProcessorMixin):
    """Turns (images, chat text) into `input_ids`, AnyRes crops, ROI source images and layout metadata."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs):
        """`chat_template`: the LLM's own; by default the tokenizer's, or ChatML if it has none."""
        chat_template = chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=with_image_parts(chat_template))
        self.config: AssistantConfig | None = kwargs.get("config")

    @classmethod
    def from_pretrained(cls, path: str | Path, config: AssistantConfig | None = None, **kwargs) -> AssistantProcessor:
        """Load tokenizer, image processor and model config from one checkpoint folder (local files only)."""
        path = Path(path)
        config = config or AssistantConfig.from_pretrained(path)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(image_processor, tokenizer, config=config)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def model_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) the vision side sees for an image of this size: the long side shrunk to
        `config.max_image_side` by Anomaly-OV's rule. Layouts, crops and `image_sizes` all use it; the ROI
        source and the verdict keep the image's own resolution."""
        return shrink_long_side(image_size, self.config.max_image_side)

    def model_image(self, image: Image.Image) -> Image.Image:
        height, width = self.model_size((image.height, image.width))
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), Image.Resampling.BICUBIC)  # PIL's default filter, as the official

    def layout(self, image_size: tuple[int, int], is_query: bool = True) -> ImageLayout:
        """The token layout of an image of this (original) size."""
        return image_layout(self.model_size(image_size), self.config, is_query)

    def image_crops(self, image: Image.Image, is_query: bool) -> np.ndarray:
        """Normalised crops [n, 3, s, s]: the AnyRes base + tiles for a query, the padded square for a reference."""
        image = self.model_image(image)
        if not is_query:
            side = max(image.size)
            fill = tuple(int(255 * m) for m in self.image_processor.image_mean)
            square = Image.new("RGB", (side, side), fill)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        crops = self.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        return crops if is_query else crops[:1]

    def source_pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 [3, h, w] image the ROI crops are cut from (long side at most roi.source_max_side)."""
        height, width = fit_long_side((image.height, image.width), self.config.roi.source_max_side)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return np.array(image, dtype=np.uint8).transpose(2, 0, 1)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: object = None,
        roi_maps: Sequence[np.ndarray] | None = None,
        padding_side: str | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tokenize and expand. `images`: flat in order of appearance, or one list per text.

        `roi_maps`: one anomaly map per query image from an external expert (used when
        `roi.map_source == "external"`); any size, resized to the ROI source size.
        """
        if text is None:
            raise ValueError("text is required (apply the chat template first)")
        texts = [text] if isinstance(text, str) else list(text)
        groups = [
            [load_image(image, name=f"image {i + 1}") for i, image in enumerate(group)]
            for group in _group_images(texts, images)
        ]
        data = self.tokenize(texts, [[(im.height, im.width) for im in group] for group in groups], padding_side)
        if any(groups):
            data.update(self.preprocess_images(groups, roi_maps))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def tokenize(
        self, texts: Sequence[str], image_sizes: Sequence[Sequence[tuple[int, int]]], padding_side: str | None = None
    ) -> dict[str, torch.Tensor]:
        """input_ids with every `<image>` expanded for images of these (height, width); last image = query."""
        all_ids = [
            self.expand_images(self.tokenizer.encode(text, add_special_tokens=False), sizes)[0]
            for text, sizes in zip(texts, image_sizes)
        ]
        batch = self.tokenizer.pad({"input_ids": all_ids}, padding=True, padding_side=padding_side, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def preprocess_images(
        self, groups: Sequence[Sequence[Image.Image]], roi_maps: Sequence[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        """Crops, sizes, query flags, ROI source images (and external ROI maps) for RGB images per sample."""
        roi = self.config.roi
        max_side = roi.source_max_side
        crops, image_sizes, is_query, sources, source_sizes = [], [], [], [], []
        for group in groups:
            for index, image in enumerate(group):
                query = index == len(group) - 1
                crops.append(self.image_crops(image, query))
                image_sizes.append(self.model_size((image.height, image.width)))
                is_query.append(query)
                if query:
                    source_sizes.append(fit_long_side((image.height, image.width), max_side))
                    if roi.enabled:
                        sources.append(self.source_pixels(image))
        data = {
            "pixel_values": torch.from_numpy(np.concatenate(crops)),
            "image_sizes": torch.tensor(image_sizes, dtype=torch.long),
            "image_is_query": torch.tensor(is_query, dtype=torch.bool),
            "source_sizes": torch.tensor(source_sizes, dtype=torch.long),
        }
        if sources:
            canvas = torch.zeros(len(sources), 3, max_side, max_side, dtype=torch.uint8)
            for i, pixels in enumerate(sources):
                canvas[i, :, : pixels.shape[1], : pixels.shape[2]] = torch.from_numpy(pixels)
            data["roi_pixel_values"] = canvas
        if roi_maps is not None:
            data["roi_maps"] = self._external_maps(roi_maps, source_sizes, max_side)
        return data

    def expand_images(
        self, ids: Sequence[int], image_sizes: Sequence[tuple[int, int]], labels: Sequence[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, labels) with every `<image>` replaced by the positions of its image (last image = query).

        `labels`, one per id (default: no targets), follow their tokens; an image's positions are never targets.
        """
        count = list(ids).count(self.image_token_id)
        if count != len(image_sizes):
            raise ValueError(f"text has {count} image tokens for {len(image_sizes)} images")
        layouts = iter(self.layout(size, index == len(image_sizes) - 1) for index, size in enumerate(image_sizes))
        expanded_ids, expanded_labels = [], []
        for token, label in zip(ids, [IGNORE_INDEX] * len(ids) if labels is None else labels, strict=True):
            if token == self.image_token_id:
                image_ids = expand_image_ids(next(layouts), self.config)
                expanded_ids += image_ids
                expanded_labels += [IGNORE_INDEX] * len(image_ids)
            else:
                expanded_ids.append(token)
                expanded_labels.append(label)
        return expanded_ids, expanded_labels

    @staticmethod
    def _external_maps(maps: Sequence[np.ndarray], sizes: list[tuple[int, int]], max_side: int) -> torch.Tensor:
        if len(maps) != len(sizes):
            raise ValueError(f"got {len(maps)} ROI maps for {len(sizes)} query images")
        canvas = torch.zeros(len(maps), max_side, max_side, dtype=torch.float32)
        for i, (anomaly_map, (height, width)) in enumerate(zip(maps, sizes)):
            tensor = torch.as_tensor(np.asarray(anomaly_map, dtype=np.float32))
            if tensor.ndim != 2:
                raise ValueError(f"ROI map {i} must be 2-D, got shape {tuple(tensor.shape)}")
            resized = torch.nn.functional.interpolate(tensor[None, None], (height, width), mode="bilinear")
            canvas[i, :height, :width] = resized[0, 0]
        return canvas
