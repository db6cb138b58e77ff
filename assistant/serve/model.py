"""The assistant as a vLLM model: our image side (`vision.ImageEncoder`) in front of vLLM's language model.

The image side is the very code the transformers model runs (SigLIP from transformers, the expert, the
projector, AnyRes packing, ROI crops), so both backends agree by construction; only the LLM is vLLM's
(Qwen2, Llama, ... whatever `text_config` names). Imported lazily by vLLM in its engine, worker and
API-server processes; it must not import vLLM's llava modules, which need torchvision.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..config import AssistantConfig
from ..image_io import fit_long_side
from ..prompts import IMAGE_TOKEN
from ..vision import IMAGE_MODULES, ImageEncoder
from .processor import AssistantDummyInputsBuilder, AssistantMultiModalProcessor, AssistantProcessingInfo


def text_architecture(config: AssistantConfig) -> str:
    """The causal-LM class vLLM should build for the text config (saved text configs often omit it)."""
    text = config.text_config
    return (text.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text.model_type]])[0]


@MULTIMODAL_REGISTRY.register_processor(
    AssistantMultiModalProcessor, info=AssistantProcessingInfo, dummy_inputs=AssistantDummyInputsBuilder
)
class AssistantVllmModel(nn.Module, SupportsMultiModal):
    # Checkpoint names (transformers' save_pretrained) -> this module's names.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
            **{f"model.{name}": f"image_encoder.{name}" for name in IMAGE_MODULES},
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"the assistant reads images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: AssistantConfig = vllm_config.model_config.hf_config
        if config.roi.map_source != "expert":
            raise ValueError("serving needs roi.map_source='expert': requests cannot carry external anomaly maps")
        self.config = config
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.image_encoder = ImageEncoder(config, token_embeddings=self._embed_text_tokens)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=[text_architecture(config)],
            )

    def _embed_text_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The suspicion adverb is written with the LLM's own (possibly vocab-parallel) token embeddings."""
        return self.language_model.embed_input_ids(token_ids.flatten()).view(*token_ids.shape, -1)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One [positions, hidden] tensor per image item, in prompt order (items may come from many requests).

        vLLM stacks a field when all items share a shape and passes a list otherwise; `list()` takes both.
        """
        if kwargs.get("pixel_values") is None:
            return []
        image_sizes = torch.stack(list(kwargs["image_sizes"]))
        image_is_query = torch.stack(list(kwargs["image_is_query"]))
        max_side = self.config.roi.source_max_side
        sources = kwargs.get("roi_pixel_values")
        query_sources = None if sources is None else [s for s, query in zip(list(sources), image_is_query) if query]
        if query_sources is None:  # no ROI: the source size only sizes the expert's heatmap, never returned here
            query_sizes = [size for size, query in zip(image_sizes.tolist(), image_is_query) if query]
            source_sizes = [fit_long_side(tuple(size), max_side) for size in query_sizes]
        else:  # the ROI source is cut from the original image, whose size the model's `image_sizes` do not carry
            source_sizes = [tuple(source.shape[1:]) for source in query_sources]
        encoding = self.image_encoder.encode_images(
            pixel_values=torch.cat(list(kwargs["pixel_values"])),
            image_sizes=image_sizes,
            image_is_query=image_is_query,
            source_sizes=torch.tensor(source_sizes, dtype=torch.long).reshape(-1, 2),
            roi_pixel_values=query_sources,
        )
        return encoding.embeddings.split([layout.num_embeddings for layout in encoding.layouts])

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
