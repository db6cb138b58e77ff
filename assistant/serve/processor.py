"""vLLM's multimodal processor for the assistant: per-image fields, placeholder expansion, cache identity.

Placeholder runs come from `layout.expand_image_ids`, the function the transformers processor uses, so
the two backends can never disagree on token counts. An image's role (reference or query) changes its
tokens, so it is part of the image's cache identity: vLLM reuses processed images and encoder outputs
across requests by that identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalHashes
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from ..config import AssistantConfig
from ..image_io import ImageError
from ..layout import expand_image_ids, image_layout
from ..processing import AssistantProcessor
from ..prompts import IMAGE_TOKEN
from .images import ItemImageProcessor, last_is_query
from .media import http_error

REFERENCE_SUFFIX = ":reference"


class AssistantProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> AssistantConfig:
        return self.ctx.get_hf_config(AssistantConfig)

    @cached_property
    def image_processor(self) -> ItemImageProcessor:
        """Built once from the served checkpoint folder (its image processor config and tokenizer)."""
        return ItemImageProcessor(
            AssistantProcessor.from_pretrained(self.ctx.model_config.model, config=self.get_hf_config())
        )

    def get_hf_processor(self, **kwargs: object) -> ItemImageProcessor:
        return self.image_processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_image_size_with_most_features(self) -> ImageSize:
        """The AnyRes resolution whose query layout has the most embeddings (vLLM profiles memory with it)."""
        config = self.get_hf_config()
        height, width = max(
            config.image_grid_pinpoints, key=lambda size: image_layout(tuple(size), config).num_embeddings
        )
        return ImageSize(width=width, height=height)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        size = self.get_image_size_with_most_features()
        return {"image": image_layout((size.height, size.width), self.get_hf_config()).num_embeddings}


class AssistantDummyInputsBuilder(BaseDummyInputsBuilder[AssistantProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width,
            height=size.height,
            num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class AssistantMultiModalProcessor(BaseMultiModalProcessor[AssistantProcessingInfo]):
    def _get_mm_hashes(self, inputs: ProcessorInputs) -> MultiModalHashes:
        """A reference image and the same image as a query expand differently: give them different identities."""
        hashes = super()._get_mm_hashes(inputs)
        if "image" in hashes:
            images = hashes["image"]
            roles = last_is_query(len(images))
            hashes = {**hashes, "image": [h if query else h + REFERENCE_SUFFIX for h, query in zip(images, roles)]}
        return hashes

    def _get_cache_missing_processor_kwargs(
        self, inputs: ProcessorInputs, mm_is_cached: Mapping[str, list[bool]]
    ) -> Mapping[str, object]:
        """Only uncached images reach the processor, so it cannot tell the query by position: pass the roles."""
        cached = mm_is_cached.get("image", [])
        roles = [query for query, hit in zip(last_is_query(len(cached)), cached) if not hit]
        return {**inputs.hf_processor_mm_kwargs, "image_is_query": roles}

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Every image is checked here, in the API server, before it can reach (and stop) the engine."""
        try:
            return super()._call_hf_processor(hf_data, hf_kwargs)
        except ValueError as error:
            if isinstance(error.__cause__, ImageError):  # say what is wrong with the image, not which call failed
                raise http_error(error.__cause__) from error
            raise

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "image_sizes": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_is_query": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }
        if self.info.get_hf_config().roi.enabled:
            fields["roi_pixel_values"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()

        def expansion(index: int) -> PromptUpdateDetails:
            # Read from the processed item, which carries the role the processor was told.
            item = out_mm_kwargs["image"][index]
            height, width = item["image_sizes"].data.tolist()
            layout = image_layout((height, width), config, bool(item["image_is_query"].data))
            return PromptUpdateDetails.select_token_id(expand_image_ids(layout, config), config.image_token_id)

        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=expansion)]
