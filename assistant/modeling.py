"""AssistantForConditionalGeneration: LLaVA-OneVision + Anomaly-OV expert tokens + Triad ROI tokens.

The image path (`vision.py`, shared with the vLLM model) runs once per image set and returns both what
the LLM reads (one embedding per image-token position, in the order of `layout.py`) and what the user
sees (the expert's score, map and boxes). Everything else (projector, AnyRes packing, language model,
generation) is transformers' LLaVA-OneVision, reused through subclassing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForImageTextToText
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)

from .config import AssistantConfig
from .expert import AnomalyExpert
from .references import PatchBank
from .vision import ImageAnalysis, ImageEncoderMixin, ImageEncoding, build_expert

IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "image_is_query", "source_sizes", "roi_pixel_values", "roi_maps")


@dataclass
class AssistantOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    analysis: ImageAnalysis | None = None


class AssistantModel(ImageEncoderMixin, LlavaOnevisionModel):
    """LLaVA-OneVision's modules plus the expert; the image path is `ImageEncoderMixin.encode_images`."""

    config_class = AssistantConfig

    def __init__(self, config: AssistantConfig):
        super().__init__(config)
        self.anomaly_expert = build_expert(config)
        self.post_init()

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.get_input_embeddings()(token_ids)

    # -- language ---------------------------------------------------------------------------------------
    def merge_image_embeddings(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_embeddings: torch.Tensor
    ) -> torch.Tensor:
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != image_embeddings.shape[0]:
            raise ValueError(
                f"the prompt has {int(mask.sum())} image-token positions but the images produced "
                f"{image_embeddings.shape[0]} embeddings; build inputs with AssistantProcessor"
            )
        return inputs_embeds.masked_scatter(mask[..., None], image_embeddings.to(inputs_embeds))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_is_query: torch.Tensor | None = None,
        source_sizes: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
        roi_maps: torch.Tensor | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        analysis = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                encoding = self.encode_images(
                    pixel_values, image_sizes, image_is_query, source_sizes, roi_pixel_values, roi_maps
                )
                image_embeddings, analysis = encoding.embeddings, encoding.analysis
            if image_embeddings is not None:
                inputs_embeds = self.merge_image_embeddings(input_ids, inputs_embeds, image_embeddings)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return outputs, analysis


class AssistantForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """The full model: generation, training loss (only where labels exist) and the expert's analysis."""

    config_class = AssistantConfig

    def __init__(self, config: AssistantConfig):
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = AssistantModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def anomaly_expert(self) -> AnomalyExpert:
        return self.model.anomaly_expert

    def encode_images(self, **image_inputs) -> ImageEncoding:
        return self.model.encode_images(**image_inputs)

    def normal_patches(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> PatchBank:
        return self.model.normal_patches(pixel_values, image_sizes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_embeddings: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_is_query: torch.Tensor | None = None,
        source_sizes: torch.Tensor | None = None,
        roi_pixel_values: torch.Tensor | None = None,
        roi_maps: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> AssistantOutput:
        outputs, analysis = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_embeddings=image_embeddings,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            image_is_query=image_is_query,
            source_sizes=source_sizes,
            roi_pixel_values=roi_pixel_values,
            roi_maps=roi_maps,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss, logits = None, None
        if labels is not None:
            # Logits only where a next-token label exists: answer tokens are a small share of a VLM sequence.
            # `num_items_in_batch` (transformers' meaning): the labelled tokens of the whole optimizer step, so
            # accumulated micro-batches and processes sum to the step's token mean.
            targets = labels[:, 1:]
            keep = targets != -100
            selected = self.lm_head(hidden_states[:, :-1][keep])
            count = keep.sum() if num_items_in_batch is None else num_items_in_batch
            loss = F.cross_entropy(selected.float(), targets[keep], reduction="sum") / max(count, 1)
        else:
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, kept, :])
        return AssistantOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            analysis=analysis,
        )

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, is_first_iteration: bool | None = False, **kwargs
    ):
        """Images are encoded once, in the prefill step; later steps only read the KV cache."""
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in IMAGE_INPUT_KEYS + ("image_embeddings",):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )


AutoModel.register(AssistantConfig, AssistantModel)
AutoModelForImageTextToText.register(AssistantConfig, AssistantForConditionalGeneration)

__all__ = ["AssistantForConditionalGeneration", "AssistantModel", "ImageAnalysis", "ImageEncoding"]
