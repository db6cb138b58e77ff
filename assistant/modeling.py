"""AssistantForConditionalGeneration: LLaVA-OneVision + Anomaly-OV expert tokens + Triad ROI tokens.

The vision path runs once per image set and returns both what the LLM reads (one embedding per
image-token position, in the order of `layout.py`) and what the user sees (the expert's score, map
and boxes). Everything else (projector, AnyRes packing, language model, generation) is transformers'
LLaVA-OneVision, reused through subclassing.
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

from .config import AssistantConfig, ExpertConfig
from .expert import AnomalyExpert, ExpertOutput
from .heatmap import assemble_heatmap
from .layout import ImageLayout, image_layout
from .roi import Box, ScoredBox, roi_boxes

IMAGE_INPUT_KEYS = ("pixel_values", "image_sizes", "image_is_query", "source_sizes", "roi_pixel_values", "roi_maps")


@dataclass
class ImageAnalysis:
    """What the expert says about each query image of a batch (in order)."""

    logits: torch.Tensor  # [Q]
    heatmaps: list[torch.Tensor]  # [h, w] per query, on the source-size image
    boxes: list[list[ScoredBox]]  # detected regions per query, source pixels
    roi_boxes: list[list[Box]]  # the crops encoded as ROI tokens, source pixels
    expert: ExpertOutput

    @property
    def scores(self) -> torch.Tensor:
        """The expert's raw sigmoid scores (they choose the suspicion adverb)."""
        return torch.sigmoid(self.logits.float())

    def calibrated_scores(self, config: ExpertConfig) -> torch.Tensor:
        """Platt-scaled scores shown to the user."""
        return torch.sigmoid(config.score_scale * self.logits.float() + config.score_shift)


@dataclass
class ImageEncoding:
    embeddings: torch.Tensor  # [positions, hidden]: one row per image-token position, all images in order
    layouts: list[ImageLayout]
    analysis: ImageAnalysis | None  # None when the batch has no query image


@dataclass
class AssistantOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    analysis: ImageAnalysis | None = None


def suspicion_level(scores: torch.Tensor, thresholds: list[float]) -> list[int]:
    """0/1/2 = slightly/moderately/highly, with Anomaly-OV's strict `<` comparisons."""
    low, high = thresholds
    return [0 if s < low else 1 if s < high else 2 for s in scores.tolist()]


def crop_regions(
    source: torch.Tensor, boxes: list[Box], size: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """Cut boxes out of a uint8 [3, h, w] image, resize to size x size, normalise like the image processor."""
    crops = [
        F.interpolate(
            source[None, :, y0:y1, x0:x1].float(), (size, size), mode="bicubic", align_corners=False, antialias=True
        )
        for x0, y0, x1, y1 in boxes
    ]
    pixels = torch.cat(crops).clamp(0, 255) / 255.0
    mean_t = torch.tensor(mean, device=pixels.device)[None, :, None, None]
    std_t = torch.tensor(std, device=pixels.device)[None, :, None, None]
    return (pixels - mean_t) / std_t


class AssistantModel(LlavaOnevisionModel):
    config_class = AssistantConfig

    def __init__(self, config: AssistantConfig):
        super().__init__(config)
        vision = config.vision_config
        self.anomaly_expert = AnomalyExpert(config.expert_config, vision.hidden_size, config.patches_per_side**2)
        self.post_init()

    # -- vision ---------------------------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor, levels: list[int] | None = None):
        """Final features [C, N, D] of the configured layer, plus the requested hidden-state levels."""
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        final = outputs.hidden_states[self.config.vision_feature_layer]
        return final, [outputs.hidden_states[i] for i in (levels or [])]

    def _layouts(self, image_sizes: torch.Tensor, image_is_query: torch.Tensor) -> list[ImageLayout]:
        return [
            image_layout((int(h), int(w)), self.config, bool(q)) for (h, w), q in zip(image_sizes.tolist(), image_is_query)
        ]

    def _expert_tokens(self, expert: ExpertOutput, layouts: list[ImageLayout]) -> list[torch.Tensor]:
        """Projected [global, crop-0 tokens, tile grid with row newlines] for each query image."""
        pooled = self.config.expert_config.pooled_side
        crop_tokens = self.multi_modal_projector(expert.crop_tokens)  # [Cq, p*p, H]
        global_tokens = self.multi_modal_projector(expert.global_tokens)  # [Q, H]
        hidden = crop_tokens.shape[-1]
        sequences, start = [], 0
        for index, layout in enumerate(layouts):
            rows, cols = layout.grid
            tokens = crop_tokens[start : start + 1 + rows * cols]
            start += 1 + rows * cols
            grid = tokens[1:].view(rows, cols, pooled, pooled, hidden).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(rows * pooled, cols * pooled, hidden)
            newline = self.image_newline.to(grid)[None, None].expand(rows * pooled, 1, hidden)
            grid = torch.cat([grid, newline], dim=1).flatten(0, 1)
            sequences.append(torch.cat([global_tokens[index : index + 1], tokens[0], grid]))
        return sequences

    def _roi_tokens(self, sources: torch.Tensor, sizes: list[tuple[int, int]], boxes: list[list[Box]]) -> list[torch.Tensor]:
        """Encode every query's ROI crops in one vision pass, pool them and add optional row newlines."""
        roi = self.config.roi_config
        crops = torch.cat(
            [
                crop_regions(source[:, :h, :w], image_boxes, self.config.crop_size, self.config.image_mean, self.config.image_std)
                for source, (h, w), image_boxes in zip(sources, sizes, boxes)
            ]
        )
        features, _ = self.vision_features(crops)
        features = self.multi_modal_projector(features)  # [Q*K, N, H]
        side, hidden = self.config.patches_per_side, features.shape[-1]
        grid = features.transpose(1, 2).reshape(-1, hidden, side, side)
        grid = F.avg_pool2d(grid, roi.pool).permute(0, 2, 3, 1)  # [Q*K, q, q, H]
        if roi.newline:
            newline = self.image_newline.to(grid)[None, None, None].expand(*grid.shape[:2], 1, hidden)
            grid = torch.cat([grid, newline], dim=2)
        return list(grid.reshape(len(sizes), -1, hidden))

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        image_is_query: torch.Tensor,
        source_sizes: torch.Tensor,
        roi_pixel_values: torch.Tensor | None = None,
        roi_maps: torch.Tensor | None = None,
    ) -> ImageEncoding:
        """All image-token embeddings of a batch plus the expert's analysis of its query images."""
        config, expert_config, roi = self.config, self.config.expert_config, self.config.roi_config
        if roi.enabled and roi_pixel_values is None and bool(image_is_query.any()):
            raise ValueError("ROI tokens are enabled but roi_pixel_values were not given")
        if roi.map_source == "external" and roi_maps is None and bool(image_is_query.any()):
            raise ValueError("roi.map_source is 'external' but no roi_maps were given")
        layouts = self._layouts(image_sizes, image_is_query)
        crops_per_image = [1 + l.grid[0] * l.grid[1] if l.is_query else 1 for l in layouts]
        if sum(crops_per_image) != pixel_values.shape[0]:
            raise ValueError(f"expected {sum(crops_per_image)} crops for these image sizes, got {pixel_values.shape[0]}")

        final, levels = self.vision_features(pixel_values, expert_config.feature_layers)
        projected = self.multi_modal_projector(final)
        base_tokens, _ = self.pack_image_features(
            list(torch.split(projected, crops_per_image)), image_sizes, self.image_newline, config.vision_aspect_ratio
        )
        query_layouts = [l for l in layouts if l.is_query]
        if not query_layouts:
            return ImageEncoding(torch.cat(base_tokens), layouts, None)

        crop_is_query = torch.repeat_interleave(image_is_query.to(final.device), torch.tensor(crops_per_image, device=final.device))
        query_crops = [c for c, l in zip(crops_per_image, layouts) if l.is_query]
        expert = self.anomaly_expert(final[crop_is_query], [f[crop_is_query] for f in levels], query_crops)
        expert_tokens = self._expert_tokens(expert, query_layouts)
        levels_of_suspicion = suspicion_level(expert.scores, expert_config.suspicion_thresholds)
        adverb_ids = torch.tensor(config.adverb_token_ids, device=final.device)
        adverbs = self.get_input_embeddings()(adverb_ids[levels_of_suspicion])  # [Q, n_adv, H]

        sizes = [tuple(s) for s in source_sizes.tolist()]
        crop_maps = torch.split(expert.maps, query_crops)
        heatmaps = [
            assemble_heatmap(maps, (l_size[0], l_size[1]), layout.grid, size)
            for maps, layout, l_size, size in zip(
                crop_maps, query_layouts, image_sizes[image_is_query].tolist(), sizes
            )
        ]
        box_maps = heatmaps if roi.map_source == "expert" else [m[:h, :w] for m, (h, w) in zip(roi_maps, sizes)]
        detected, crops = [], []
        for box_map in box_maps:
            found, chosen = roi_boxes(box_map.detach().float().cpu().numpy(), config.crop_size, roi)
            detected.append(found)
            crops.append(chosen)
        if roi.enabled:
            roi_tokens = self._roi_tokens(roi_pixel_values.to(final.device), sizes, crops)

        sequences, query_index = [], 0
        for layout, base in zip(layouts, base_tokens):
            parts = [base]
            if layout.is_query:
                parts += [adverbs[query_index].to(base), expert_tokens[query_index]]
                if roi.enabled:
                    parts.append(roi_tokens[query_index])
                query_index += 1
            sequences.append(torch.cat(parts))
        for layout, sequence in zip(layouts, sequences):
            if sequence.shape[0] != layout.num_embeddings:
                raise RuntimeError(f"image produced {sequence.shape[0]} embeddings, layout expects {layout.num_embeddings}")
        analysis = ImageAnalysis(expert.logits, heatmaps, detected, crops, expert)
        return ImageEncoding(torch.cat(sequences), layouts, analysis)

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
            targets = labels[:, 1:]
            keep = targets != -100
            selected = self.lm_head(hidden_states[:, :-1][keep])
            loss = F.cross_entropy(selected.float(), targets[keep], reduction="sum") / keep.sum().clamp(min=1)
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
