"""The image side of the assistant: vision tower -> expert analysis + one LLM embedding per image-token position.

It lives apart from the language model so three hosts run the very same code: the transformers model
(`modeling.py`), the vLLM model (`serve/model.py`, whose language model is vLLM's) and the server's
inspect endpoint (`serve/analysis.py`, which loads only these modules). A host owns `config`,
`vision_tower`, `multi_modal_projector`, `image_newline` and `anomaly_expert` under their checkpoint
names and says how to embed text tokens (the suspicion adverb is written with the LLM's own token
embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
)

from .config import AssistantConfig, DecisionConfig, RoiConfig
from .errors import AssistantError
from .expert import AnomalyExpert, ExpertOutput
from .heatmap import assemble_heatmap, tile_regions
from .layout import ImageLayout, image_layout
from .references import PatchBank, ReferenceEvidence, fuse, image_distances
from .roi import detect_boxes, roi_boxes
from .verdict import Box, Verdict

if TYPE_CHECKING:
    from .domain import DomainModel

# The image side's checkpoint names, below the transformers model's `model.` prefix.
IMAGE_MODULES = ("vision_tower", "multi_modal_projector", "image_newline", "anomaly_expert")


@dataclass
class CropFeatures:
    """One vision pass over a batch's crops: what the LLM's image tokens and the expert are made of."""

    layouts: list[ImageLayout]  # of every image, in order
    final: torch.Tensor  # [C, N, D] the features the LLM reads
    levels: list[torch.Tensor]  # [C, N, D] per expert feature level

    def of(self, images: torch.Tensor) -> tuple[list[ImageLayout], torch.Tensor, list[torch.Tensor]]:
        """Layouts, final features and levels of the chosen images' crops (`images`: [I] bool)."""
        chosen = [layout for layout, keep in zip(self.layouts, images.tolist()) if keep]
        if len(chosen) == len(self.layouts):  # a batch of queries only (stage 1) needs no copy
            return chosen, self.final, self.levels
        device = self.final.device
        crops = torch.repeat_interleave(
            images.to(device), torch.tensor([layout.num_crops for layout in self.layouts], device=device)
        )
        return chosen, self.final[crops], [level[crops] for level in self.levels]


@dataclass
class ImageAnalysis:
    """What the expert says about each query image of a batch (in order): the image side's one result.

    Stage-1 training reads its logits and maps; `encode_images` adds the boxes; `verdict` turns one query's
    reading into the user-facing `Verdict`. With normal references (`config.ReferenceConfig`) the verdict's
    logits, heatmaps and boxes carry their evidence; the expert's own reading stays in `expert` and
    `expert_heatmaps`, and only it reaches the language model's prompt (adverb, ROI crops): the served model
    encodes every image on its own, so the prompt of a query cannot depend on other images.
    """

    layouts: list[ImageLayout]  # of the query images
    expert: ExpertOutput  # over the query images' crops: the expert's own reading
    heatmaps: list[torch.Tensor]  # [h, w] per query, on the ROI source image (see `RoiConfig.source_max_side`)
    pooled_features: torch.Tensor  # [Q, D]: mean final-layer feature of each query's whole-image crop (domain check)
    boxes: list[list[Box]] = field(default_factory=list)  # detected regions per query, source pixels
    roi_boxes: list[list[Box]] = field(default_factory=list)  # the crops encoded as ROI tokens, source pixels
    reference: ReferenceEvidence | None = None  # what the normal references say (None: zero-shot)
    reference_logits: torch.Tensor | None = None  # [Q] the expert's logits with the references' evidence
    expert_heatmaps: list[torch.Tensor] | None = None  # the expert's own heatmaps when `heatmaps` are fused

    @property
    def logits(self) -> torch.Tensor:
        """[Q] the verdict's expert logits: with the references' evidence when there are references."""
        return self.expert.logits if self.reference_logits is None else self.reference_logits

    @property
    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits.float())

    @property
    def prompt_heatmaps(self) -> list[torch.Tensor]:
        """The expert's own heatmaps: what chooses the ROI crops of the prompt."""
        return self.heatmaps if self.expert_heatmaps is None else self.expert_heatmaps

    def domain_check(self, index: int, domain: DomainModel | None) -> tuple[float | None, bool | None]:
        """(domain score, in domain) of query `index`; (None, None) without domain statistics (domain unknown)."""
        if domain is None:
            return None, None
        return domain.check(self.pooled_features[index].cpu().numpy())

    def verdict(
        self,
        index: int,
        size: tuple[int, int],
        decision: DecisionConfig,
        yes_probability: float | None = None,
        domain: DomainModel | None = None,
    ) -> Verdict:
        """Query `index`'s verdict on its image of (width, height): the decision fused from the expert's logit
        and the language model's P(Yes), both sources, the domain check, the map and the boxes."""
        domain_score, in_domain = self.domain_check(index, domain)
        return Verdict.decided(
            decision.score(float(self.logits[index]), yes_probability),
            decision.threshold,
            self.heatmaps[index],
            self.boxes[index],
            size,
            expert_score=float(self.scores[index]),
            reference_distance=None if self.reference is None else float(self.reference.image_distances[index]),
            llm_yes_probability=yes_probability,
            in_domain=in_domain,
            domain_score=domain_score,
        )


@dataclass
class ImageEncoding:
    embeddings: torch.Tensor  # [positions, hidden]: one row per image-token position, all images in order
    layouts: list[ImageLayout]
    analysis: ImageAnalysis | None  # None when the batch has no query image


def suspicion_level(scores: torch.Tensor, thresholds: list[float]) -> list[int]:
    """0/1/2 = slightly/moderately/highly, with Anomaly-OV's strict `<` comparisons."""
    low, high = thresholds
    return [0 if s < low else 1 if s < high else 2 for s in scores.tolist()]


def crop_regions(
    source: torch.Tensor, corners: Sequence[tuple[int, int, int, int]], size: int, mean: list[float], std: list[float]
) -> torch.Tensor:
    """Cut boxes (x0, y0, x1, y1) out of a uint8 [3, h, w] image, resize to size x size, normalise like the image
    processor."""
    crops = [
        F.interpolate(
            source[None, :, y0:y1, x0:x1].float(), (size, size), mode="bicubic", align_corners=False, antialias=True
        )
        for x0, y0, x1, y1 in corners
    ]
    pixels = torch.cat(crops).clamp(0, 255) / 255.0
    mean_t = torch.tensor(mean, device=pixels.device)[None, :, None, None]
    std_t = torch.tensor(std, device=pixels.device)[None, :, None, None]
    return (pixels - mean_t) / std_t


def region_spans(regions: torch.Tensor) -> torch.Tensor:
    """[K] the longer side of each region [K, 4] (x0, y0, x1, y1)."""
    return torch.maximum(regions[:, 2] - regions[:, 0], regions[:, 3] - regions[:, 1])


def reencode_boxes(regions: torch.Tensor, side: int, roi: RoiConfig) -> torch.Tensor:
    """[K] which boxes to re-encode: a box's crop has `side` patches across; its region on the tiles has as many
    patches as `regions` [K, 4] spans. Re-encoding pays only where the crop is finer (`RoiConfig.tokens_from`)."""
    if roi.tokens_from != "auto":
        return torch.full((regions.shape[0],), roi.tokens_from == "crops", dtype=torch.bool)
    return (side / region_spans(regions).clamp(min=1e-6) >= roi.reencode_gain).cpu()


def pool_regions(feature_map: torch.Tensor, regions: torch.Tensor, out: int) -> torch.Tensor:
    """RoIAlign: the mean of bilinear samples over each of out x out bins of every region [K, 4] (continuous
    x0, y0, x1, y1 on the [H, h, w] map) -> [K, out, out, H]. Written with grid_sample (no torchvision, which the
    vLLM environment lacks); `ratio` samples per bin side follow the largest region, as RoIAlign's adaptive rule."""
    hidden, height, width = feature_map.shape
    ratio = max(1, math.ceil(float(region_spans(regions).max()) / out))
    steps = (torch.arange(out * ratio, device=regions.device, dtype=regions.dtype) + 0.5) / (out * ratio)
    xs = regions[:, 0:1] + steps * (regions[:, 2:3] - regions[:, 0:1])  # [K, S] in map units
    ys = regions[:, 1:2] + steps * (regions[:, 3:4] - regions[:, 1:2])
    normalised = torch.stack(
        torch.broadcast_tensors((xs[:, None, :] * 2 / width - 1), (ys[:, :, None] * 2 / height - 1)),
        dim=-1,
    )  # [K, S, S, 2] as (x, y)
    source = feature_map[None].expand(regions.shape[0], -1, -1, -1)
    samples = F.grid_sample(
        source, normalised.to(feature_map), mode="bilinear", padding_mode="border", align_corners=False
    )
    return F.avg_pool2d(samples, ratio).permute(0, 2, 3, 1)


class VisionFeatureError(AssistantError, ValueError):
    """A vision_feature_layer / vision_feature_select_strategy whose features the image side cannot read."""


def check_vision_features(config: AssistantConfig) -> None:
    """Refuse, when a model is built, LLM features that `select_vision_features` cannot make into our tokens.

    Stock LLaVA-OneVision's rule is applied as is; what it cannot give here is refused in one line:
    - strategy "default" drops the first token, CLIP's CLS token. SigLIP (the towers the image side reads) has
      none, so a patch would go and the patches_per_side**2 grid with it: stock's `pack_image_features` raises
      for every AnyRes image ("The number of patches is not consistent with the image size"). AnyRes packing,
      the expert's maps and ROI pooling all need that grid, so only "full" is accepted.
    - a list of layers concatenates their features, widening the projector's input to len(list) x width: the
      expert reads one layer's width and its tokens go through that same projector, so only one layer fits.
    """
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    vision = config.vision_config
    if not isinstance(layer, int):
        raise VisionFeatureError(
            f"vision_feature_layer={layer!r} is not supported: features of several layers are concatenated for "
            f"the projector, but the anomaly expert reads one layer's {vision.hidden_size}-wide features and "
            "projects its tokens with that same projector; give one layer index"
        )
    hidden_states = vision.num_hidden_layers + 1  # the embeddings and every layer's output
    if not -hidden_states <= layer < hidden_states:
        raise VisionFeatureError(
            f"vision_feature_layer={layer} is out of range for a {vision.num_hidden_layers}-layer vision tower "
            f"(hidden states {-hidden_states}..{hidden_states - 1})"
        )
    levels = config.expert.feature_layers
    if not all(-hidden_states <= level < hidden_states for level in levels):
        raise VisionFeatureError(
            f"expert feature_layers={levels} are out of range for a {vision.num_hidden_layers}-layer vision tower "
            f"(hidden states {-hidden_states}..{hidden_states - 1}); give the expert's layers for this tower"
        )
    if strategy != "full":
        side = config.patches_per_side
        raise VisionFeatureError(
            f"vision_feature_select_strategy={strategy!r} is not supported: 'default' drops the first token (CLIP's "
            f"CLS token), but the {vision.model_type} tower has no CLS token, so its {side}x{side} patch grid would "
            "lose a patch (stock LLaVA-OneVision fails on such images too); use 'full'"
        )


def spread_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """Anomaly-OV's expert levels scaled to a tower of `num_layers`: on the 26-layer SigLIP-so400m it reads hidden
    states 7/13/19/25 (every sixth layer, ending one before the last); other depths keep that spacing."""
    step = max(1, num_layers // count)
    return [max(0, num_layers - 1 - step * (count - 1 - k)) for k in range(count)]


def build_expert(config: AssistantConfig) -> AnomalyExpert:
    check_vision_features(config)  # every host builds its expert when it is built: refused before any image
    return AnomalyExpert(config.expert, config.vision_config.hidden_size, config.patches_per_side**2)


def select_vision_features(
    hidden_states: Sequence[torch.Tensor], layer: int | Sequence[int], strategy: str
) -> torch.Tensor:
    """Stock `LlavaOnevisionModel.get_image_features`' rule: the hidden states of `layer` (of several layers,
    concatenated on the feature axis), without the first token when `strategy` is "default", all with "full".
    `check_vision_features` refuses, when a model is built, what our image side cannot read of it."""
    if isinstance(layer, int):
        features = hidden_states[layer]
    else:
        features = torch.cat([hidden_states[index] for index in layer], dim=-1)
    return features[:, 1:] if strategy == "default" else features


class ImageEncoderMixin:
    """`encode_images` for any module that owns the image-side modules (see the module docstring)."""

    config: AssistantConfig
    vision_tower: nn.Module
    multi_modal_projector: nn.Module
    image_newline: nn.Parameter
    anomaly_expert: AnomalyExpert

    # LLaVA-OneVision's AnyRes packing (unpad, anyres_max downsampling, row newlines) needs only `config`.
    pack_image_features = LlavaOnevisionModel.pack_image_features

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The language model's input embeddings of these token ids."""
        raise NotImplementedError

    def vision_features(self, pixel_values: torch.Tensor, levels: list[int] | None = None):
        """The features the LLM reads [C, N, D] (`select_vision_features`: stock LLaVA-OneVision's
        vision_feature_layer and vision_feature_select_strategy), plus the requested hidden-state levels."""
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        final = select_vision_features(
            outputs.hidden_states, self.config.vision_feature_layer, self.config.vision_feature_select_strategy
        )
        return final, [outputs.hidden_states[i] for i in (levels or [])]

    def image_layouts(self, image_sizes: torch.Tensor, image_is_query: torch.Tensor) -> list[ImageLayout]:
        return [
            image_layout((int(h), int(w)), self.config, bool(q))
            for (h, w), q in zip(image_sizes.tolist(), image_is_query)
        ]

    def crop_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        image_is_query: torch.Tensor,
        vision_grad: bool = True,
    ) -> CropFeatures:
        """One vision pass over every crop of a batch. `vision_grad=False` runs the tower without autograd."""
        layouts = self.image_layouts(image_sizes, image_is_query)
        crops_per_image = [layout.num_crops for layout in layouts]
        if sum(crops_per_image) != pixel_values.shape[0]:
            raise ValueError(
                f"expected {sum(crops_per_image)} crops for these image sizes, got {pixel_values.shape[0]}"
            )
        with torch.set_grad_enabled(vision_grad and torch.is_grad_enabled()):
            final, levels = self.vision_features(pixel_values, self.config.expert.feature_layers)
        return CropFeatures(layouts, final, levels)

    def analyze_queries(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        image_is_query: torch.Tensor,
        source_sizes: torch.Tensor,
        vision_grad: bool = True,
        bank: PatchBank | None = None,
    ) -> tuple[torch.Tensor, ImageAnalysis | None]:
        """Final features [C, N, D] of every crop, and the expert's maps, tokens, scores and heatmaps of the
        query images (None when the batch has none).

        Stage-1 training calls this alone; `encode_images` runs its two steps (`crop_features`, `analyze`) itself.
        `vision_grad=False` runs the tower without autograd (a frozen tower while the expert trains).
        `bank`: normal patches (`normal_patches`) every query is compared with (`config.ReferenceConfig`).
        """
        features = self.crop_features(pixel_values, image_sizes, image_is_query, vision_grad)
        return features.final, self.analyze(features, image_sizes, image_is_query, source_sizes, bank)

    def analyze(
        self,
        features: CropFeatures,
        image_sizes: torch.Tensor,
        image_is_query: torch.Tensor,
        source_sizes: torch.Tensor,
        bank: PatchBank | None = None,
    ) -> ImageAnalysis | None:
        """The expert's reading of the query images of one vision pass (`analyze_queries`)."""
        query_layouts, query_final, query_levels = features.of(image_is_query)
        if not query_layouts:
            return None
        query_crops = [layout.num_crops for layout in query_layouts]
        expert = self.anomaly_expert(query_final, query_levels, query_crops)

        def heatmaps(crop_maps: torch.Tensor) -> list[torch.Tensor]:
            return [
                assemble_heatmap(maps, (height, width), layout.grid, (source_h, source_w))
                for maps, layout, (height, width), (source_h, source_w) in zip(
                    torch.split(crop_maps, query_crops),
                    query_layouts,
                    image_sizes[image_is_query].tolist(),
                    source_sizes.tolist(),
                )
            ]

        first_crops = torch.tensor([0, *query_crops[:-1]], device=query_final.device).cumsum(0)
        pooled = query_final[first_crops].float().mean(1)
        analysis = ImageAnalysis(query_layouts, expert, heatmaps(expert.maps), pooled)
        if bank is None:
            return analysis
        reference = self.config.reference
        if bank.shift is not None:  # a profile's own knee, measured on its held-out normal images
            reference = reference.model_copy(update={"shift": bank.shift})
        distances = bank.distances(query_levels, query_crops, reference.neighbourhood)
        evidence = ReferenceEvidence(distances, image_distances(distances, query_crops))
        maps, logits = fuse(expert.maps, expert.logits, evidence, query_crops, reference)
        fused = replace(analysis, heatmaps=heatmaps(maps), expert_heatmaps=analysis.heatmaps)
        return replace(fused, reference=evidence, reference_logits=logits)

    def normal_patches(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> PatchBank:
        """The memory bank of normal images, each given as a query (whole-image crop and AnyRes tiles)."""
        layouts = self.image_layouts(image_sizes, torch.ones(len(image_sizes), dtype=torch.bool))
        _, levels = self.vision_features(pixel_values, self.config.expert.feature_layers)
        crops = [layout.num_crops for layout in layouts]
        return PatchBank.from_features(levels, crops, self.config.reference.neighbourhood)

    def _expert_parts(self, expert: ExpertOutput, layouts: list[ImageLayout]) -> list[torch.Tensor]:
        """The adverb's embeddings, then the projected [global, crop-0 tokens, tile grid with row newlines], for
        each image the expert read (a reference's grid is empty)."""
        levels = suspicion_level(expert.scores, self.config.expert.suspicion_thresholds)
        adverb_ids = torch.tensor(self.config.adverb_token_ids, device=expert.logits.device)
        adverbs = self.token_embeddings(adverb_ids[levels])  # [I, n_adv, H]
        return [
            torch.cat([adverb.to(tokens), tokens])
            for adverb, tokens in zip(adverbs, self._expert_tokens(expert, layouts))
        ]

    def _expert_tokens(self, expert: ExpertOutput, layouts: list[ImageLayout]) -> list[torch.Tensor]:
        """Projected [global, crop-0 tokens, tile grid with row newlines] for each image the expert read."""
        pooled = self.config.expert.pooled_side
        crop_tokens = self.multi_modal_projector(expert.crop_tokens)  # [Cq, p*p, H]
        global_tokens = self.multi_modal_projector(expert.global_tokens)  # [Q, H]
        hidden = crop_tokens.shape[-1]
        sequences, start = [], 0
        for index, layout in enumerate(layouts):
            rows, cols = layout.grid
            tokens = crop_tokens[start : start + layout.num_crops]
            start += layout.num_crops
            grid = tokens[1:].view(rows, cols, pooled, pooled, hidden).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(rows * pooled, cols * pooled, hidden)
            newline = self.image_newline.to(grid)[None, None].expand(rows * pooled, 1, hidden)
            grid = torch.cat([grid, newline], dim=1).flatten(0, 1)
            sequences.append(torch.cat([global_tokens[index : index + 1], tokens[0], grid]))
        return sequences

    def _roi_tokens(
        self,
        projected: Sequence[torch.Tensor],
        layouts: list[ImageLayout],
        sources: Sequence[torch.Tensor] | None,
        image_sizes: list[tuple[int, int]],
        sizes: list[tuple[int, int]],
        boxes: list[list[Box]],
    ) -> list[torch.Tensor]:
        """Each query's ROI tokens [K * q * q (+ newlines), H], K boxes of q x q (`roi.pool`) tokens.

        A box's tokens are pooled from the query's projected tile features (`projected`, [crops, N, H]) unless
        `roi.tokens_from` asks for its crop to be re-encoded (`reencode_boxes`); the crops that are, of every
        query, go through the vision tower in one pass.
        """
        roi, side = self.config.roi, self.config.patches_per_side
        out = side // roi.pool
        hidden = projected[0].shape[-1]
        regions = [
            tile_regions(
                torch.tensor([box.corners for box in image_boxes], dtype=torch.float32, device=features.device),
                image_size,
                layout.grid,
                side,
                size,
            )
            for features, layout, image_size, size, image_boxes in zip(projected, layouts, image_sizes, sizes, boxes)
        ]
        encode = [reencode_boxes(region, side, roi) for region in regions]
        encoded = iter(self._encode_regions(sources, sizes, boxes, encode, projected[0].device))  # in box order
        tokens = []
        for features, layout, region, chosen in zip(projected, layouts, regions, encode):
            rows, cols = layout.grid
            tiles = features[1:].view(rows, cols, side, side, hidden).permute(4, 0, 2, 1, 3)
            pooled = pool_regions(tiles.reshape(hidden, rows * side, cols * side), region, out)
            tokens.append(torch.stack([next(encoded).to(box) if again else box for box, again in zip(pooled, chosen)]))
        if roi.newline:
            tokens = [
                torch.cat([grid, self.image_newline.to(grid)[None, None, None].expand(*grid.shape[:2], 1, hidden)], 2)
                for grid in tokens
            ]
        return [grid.reshape(-1, hidden) for grid in tokens]

    def _encode_regions(
        self,
        sources: Sequence[torch.Tensor] | None,
        sizes: list[tuple[int, int]],
        boxes: list[list[Box]],
        encode: list[torch.Tensor],
        device: torch.device,
    ) -> list[torch.Tensor]:
        """The boxes marked in `encode`, of every query in order, cut from their sources and encoded in one vision
        pass, each distinct box of an image once (small images repeat the whole-image box): one [q, q, H] per
        marked box (Triad's ROI tokens: projected, `roi.pool`-averaged)."""
        marked = [[box.corners for box, again in zip(b, e.tolist()) if again] for b, e in zip(boxes, encode)]
        if not any(marked):
            return []
        if sources is None:
            raise ValueError("ROI crops are re-encoded but roi_pixel_values were not given")
        config, side = self.config, self.config.patches_per_side
        distinct = [list(dict.fromkeys(corners)) for corners in marked]
        crops = torch.cat(
            [
                crop_regions(
                    source.to(device)[:, :h, :w], unique, config.crop_size, config.image_mean, config.image_std
                )
                for source, (h, w), unique in zip(sources, sizes, distinct)
                if unique
            ]
        )
        features, _ = self.vision_features(crops)
        features = self.multi_modal_projector(features)  # [crops, N, H]
        grid = features.transpose(1, 2).reshape(len(crops), -1, side, side)
        pooled = F.avg_pool2d(grid, config.roi.pool).permute(0, 2, 3, 1)
        tokens, start = [], 0
        for corners, unique in zip(marked, distinct):
            tokens += [pooled[start + unique.index(box)] for box in corners]
            start += len(unique)
        return tokens

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        image_is_query: torch.Tensor,
        source_sizes: torch.Tensor,
        roi_pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        roi_maps: torch.Tensor | None = None,
        bank: PatchBank | None = None,
    ) -> ImageEncoding:
        """All image-token embeddings of a batch plus the expert's analysis of its query images.

        `roi_pixel_values`: one uint8 [3, h, w] source per query image, as a padded [Q, 3, S, S] canvas or a
        sequence of unpadded tensors. `bank`: normal patches for the analysis (`analyze`); the
        embeddings never depend on it.
        """
        config, roi = self.config, self.config.roi
        if roi.enabled and roi_pixel_values is None and bool(image_is_query.any()):
            raise ValueError("ROI tokens are enabled but roi_pixel_values were not given")
        if roi.map_source == "external" and roi_maps is None and bool(image_is_query.any()):
            raise ValueError("roi.map_source is 'external' but no roi_maps were given")
        features = self.crop_features(pixel_values, image_sizes, image_is_query)
        analysis = self.analyze(features, image_sizes, image_is_query, source_sizes, bank)
        final, layouts = features.final, features.layouts
        projected = self.multi_modal_projector(final)
        per_image = list(torch.split(projected, [layout.num_crops for layout in layouts]))
        base_tokens, _ = self.pack_image_features(
            per_image,
            image_sizes,
            self.image_newline,
            config.vision_aspect_ratio,
        )
        parts = [[base] for base in base_tokens]  # each image's embeddings, in prompt order
        prompted = torch.tensor([not layout.is_query and layout.num_adverb > 0 for layout in layouts])
        if bool(prompted.any()):  # references read with their own phrase and expert tokens
            for index, tokens in zip(prompted.nonzero().flatten().tolist(), self._reference_parts(features, prompted)):
                parts[index].append(tokens)
        if analysis is not None:
            queries = [index for index, layout in enumerate(layouts) if layout.is_query]
            analysis = self._add_query_parts(
                [parts[i] for i in queries],
                analysis,
                [per_image[i] for i in queries],
                [tuple(size) for size in image_sizes[image_is_query].tolist()],
                source_sizes,
                roi_pixel_values,
                roi_maps,
            )
        sequences = [torch.cat(image_parts) for image_parts in parts]
        for layout, sequence in zip(layouts, sequences):
            if sequence.shape[0] != layout.num_embeddings:
                raise RuntimeError(
                    f"image produced {sequence.shape[0]} embeddings, layout expects {layout.num_embeddings}"
                )
        return ImageEncoding(torch.cat(sequences), layouts, analysis)

    def _reference_parts(self, features: CropFeatures, references: torch.Tensor) -> list[torch.Tensor]:
        """Adverb and expert tokens of the chosen reference images (`reference.prompt` "expert"): the expert reads
        each one's single crop as its own image, so a reference's tokens never depend on the other images."""
        layouts, final, levels = features.of(references)
        expert = self.anomaly_expert(final, levels, [layout.num_crops for layout in layouts])
        return self._expert_parts(expert, layouts)

    def _add_query_parts(
        self,
        parts: list[list[torch.Tensor]],
        analysis: ImageAnalysis,
        projected: list[torch.Tensor],
        model_sizes: list[tuple[int, int]],
        source_sizes: torch.Tensor,
        roi_pixel_values: torch.Tensor | Sequence[torch.Tensor] | None,
        roi_maps: torch.Tensor | None,
    ) -> ImageAnalysis:
        """Append each query's adverb, expert and ROI tokens to its `parts` (`projected`: its crops' projected
        features, `model_sizes`: the sizes its layout is of); the analysis with its boxes."""
        config, roi = self.config, self.config.roi
        sizes = [tuple(s) for s in source_sizes.tolist()]
        external = roi.map_source == "external"
        external_maps = [m[:h, :w] for m, (h, w) in zip(roi_maps, sizes)] if external else None
        detected, crops = [], []
        for index, (heatmap, layout) in enumerate(zip(analysis.heatmaps, analysis.layouts)):
            prompt_map = external_maps[index] if external else analysis.prompt_heatmaps[index]
            prompt_map = prompt_map.detach().float().cpu().numpy()
            found, chosen = roi_boxes(prompt_map, config.crop_size, roi, layout.num_boxes)
            if analysis.reference is not None and not external:  # the verdict's boxes follow the references
                found = detect_boxes(heatmap.detach().float().cpu().numpy(), config.crop_size, roi)
            detected.append(found)
            crops.append(chosen)
        if config.expert.tokens:
            for image_parts, tokens in zip(parts, self._expert_parts(analysis.expert, analysis.layouts)):
                image_parts.append(tokens)
        if roi.enabled:
            roi_tokens = self._roi_tokens(projected, analysis.layouts, roi_pixel_values, model_sizes, sizes, crops)
            for image_parts, tokens in zip(parts, roi_tokens):
                image_parts.append(tokens)
        return replace(analysis, boxes=detected, roi_boxes=crops)


class ImageEncoder(ImageEncoderMixin, nn.Module):
    """The image-side modules on their own: the vLLM model (its LLM is vLLM's) and the inspect route (no LLM)."""

    def __init__(self, config: AssistantConfig, token_embeddings: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.config = config
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.anomaly_expert = build_expert(config)
        self._token_embeddings = token_embeddings

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._token_embeddings(token_ids)
