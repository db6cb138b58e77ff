"""The anomaly expert of Anomaly-OV: Look-Twice Feature Matching (LTFM) and the Visual Token Selector.

LTFM turns multi-level vision features into a per-crop anomaly map without any text encoder: a class
embedding pooled from the whole-image crop ("look back") conditions learnable normal/abnormal
embeddings into per-level descriptions, and every patch is matched against them. The selector then
uses the map to pick a few suspicious tokens per crop, a global anomaly token and the image score.

Shapes: C crops in total, N = side * side patches per crop, D vision width, I images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExpertConfig


@dataclass
class ExpertOutput:
    maps: torch.Tensor  # [C, side, side] probability that each patch is anomalous
    crop_tokens: torch.Tensor  # [C, pooled_side**2, D] selected tokens of every crop
    global_tokens: torch.Tensor  # [I, D] significance-weighted mean of each image's selected tokens
    logits: torch.Tensor  # [I] image anomaly logit

    @property
    def scores(self) -> torch.Tensor:
        return torch.sigmoid(self.logits.float())


def _first_crop_index(crops_per_image: list[int], device: torch.device) -> torch.Tensor:
    """For every crop, the index of its image's whole-image crop (crop 0)."""
    counts = torch.tensor(crops_per_image, device=device)
    starts = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts, counts)


def _image_index(crops_per_image: list[int], device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(
        torch.arange(len(crops_per_image), device=device), torch.tensor(crops_per_image, device=device)
    )


class LookTwiceFeatureMatching(nn.Module):
    """Per-crop anomaly maps from multi-level features matched against class-aware descriptions."""

    def __init__(self, config: ExpertConfig, vision_width: int, num_patches: int):
        super().__init__()
        self.temperature = config.temperature
        num_levels = len(config.feature_layers)
        self.token_pooling = nn.Linear(num_patches, 1)
        self.class_head = nn.Sequential(
            nn.Linear(vision_width, config.class_dim), nn.GELU(), nn.Linear(config.class_dim, config.class_dim)
        )
        self.abnormal_embedding = nn.Parameter(torch.randn(config.embedding_dim) * 0.02)
        self.normal_embedding = nn.Parameter(torch.randn(config.embedding_dim) * 0.02)
        self.description_heads = nn.ModuleList(
            nn.Linear(config.embedding_dim + config.class_dim, config.embedding_dim) for _ in range(num_levels)
        )
        self.feature_adapters = nn.ModuleList(nn.Linear(vision_width, config.embedding_dim) for _ in range(num_levels))

    def class_embedding(self, final_features: torch.Tensor, crops_per_image: list[int]) -> torch.Tensor:
        """Look back at the whole image: pool crop 0's tokens into one embedding, shared by all its crops."""
        whole = final_features[_first_crop_index(crops_per_image, final_features.device)]  # [C, N, D]
        pooled = self.token_pooling(whole.transpose(1, 2)).squeeze(-1)  # [C, D]
        return self.class_head(pooled)

    def forward(
        self, final_features: torch.Tensor, level_features: list[torch.Tensor], crops_per_image: list[int]
    ) -> torch.Tensor:
        crops, num_patches, _ = final_features.shape
        side = int(num_patches**0.5)
        class_embedding = self.class_embedding(final_features, crops_per_image)
        signs = torch.stack([self.abnormal_embedding, self.normal_embedding])  # [2, E]
        level_maps = []
        for features, adapter, describe in zip(level_features, self.feature_adapters, self.description_heads):
            conditioned = torch.cat(
                [signs[None].expand(crops, -1, -1), class_embedding[:, None].expand(-1, 2, -1)], dim=-1
            )
            descriptions = F.normalize(describe(conditioned), dim=-1)  # [C, 2, E]
            patches = F.normalize(adapter(features), dim=-1)  # [C, N, E]
            logits = self.temperature * patches @ descriptions.transpose(1, 2)  # [C, N, 2]
            level_maps.append(logits.softmax(dim=-1)[..., 0])
        return torch.stack(level_maps).mean(0).view(crops, side, side)


class VisualTokenSelector(nn.Module):
    """Map-guided token selection: pooled suspicious queries attend over each crop's tokens."""

    def __init__(self, config: ExpertConfig, vision_width: int):
        super().__init__()
        self.pooled_side = config.pooled_side
        self.query_proj = nn.Linear(vision_width, config.attention_dim)
        self.key_proj = nn.Linear(vision_width, config.attention_dim)
        self.score_head = nn.Sequential(
            nn.Linear(vision_width, config.predictor_dim), nn.GELU(), nn.Linear(config.predictor_dim, 1)
        )

    def forward(
        self, final_features: torch.Tensor, maps: torch.Tensor, crops_per_image: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        crops, num_patches, width = final_features.shape
        side = maps.shape[-1]
        grid = final_features.transpose(1, 2).reshape(crops, width, side, side)
        weights = maps[:, None].to(grid.dtype)
        pooled_weights = F.adaptive_avg_pool2d(weights, self.pooled_side)  # [C, 1, p, p]
        queries = F.adaptive_avg_pool2d(grid * weights, self.pooled_side) / (pooled_weights + 1e-6)
        queries = queries.flatten(2).transpose(1, 2)  # [C, p*p, D]

        attention = self.query_proj(queries) @ self.key_proj(final_features).transpose(1, 2)
        attention = (attention / self.query_proj.out_features**0.5).softmax(dim=-1)
        crop_tokens = attention @ final_features  # [C, p*p, D]

        # Global token: tokens weighted by their pooled significance times their crop's significance.
        token_weights = pooled_weights.flatten(1) * maps.flatten(1).mean(1, keepdim=True)  # [C, p*p]
        image_index = _image_index(crops_per_image, final_features.device)
        numerator = torch.zeros(len(crops_per_image), width, dtype=crop_tokens.dtype, device=crop_tokens.device)
        numerator.index_add_(0, image_index, (crop_tokens * token_weights[..., None]).sum(1))
        denominator = torch.zeros(len(crops_per_image), dtype=token_weights.dtype, device=token_weights.device)
        denominator.index_add_(0, image_index, token_weights.sum(1))
        global_tokens = numerator / (denominator[:, None] + 1e-6)
        logits = self.score_head(global_tokens).squeeze(-1)
        return crop_tokens, global_tokens, logits


class AnomalyExpert(nn.Module):
    """LTFM + selector: vision features of every crop -> maps, selected tokens, global token, score."""

    def __init__(self, config: ExpertConfig, vision_width: int, num_patches: int):
        super().__init__()
        self.ltfm = LookTwiceFeatureMatching(config, vision_width, num_patches)
        self.selector = VisualTokenSelector(config, vision_width)

    def forward(
        self, final_features: torch.Tensor, level_features: list[torch.Tensor], crops_per_image: list[int]
    ) -> ExpertOutput:
        maps = self.ltfm(final_features, level_features, crops_per_image)
        crop_tokens, global_tokens, logits = self.selector(final_features, maps, crops_per_image)
        return ExpertOutput(maps=maps, crop_tokens=crop_tokens, global_tokens=global_tokens, logits=logits)
