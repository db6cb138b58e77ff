"""A training-free anomaly expert: WinCLIP (zero-shot) and WinCLIP+ (few-shot) on any open_clip ViT.

It is the second anomaly-map source for the Triad ROI tokens (`roi.map_source = "external"`) and the
zero-shot baseline our trained LTFM expert is measured against. Per query image (formulas in
docs/clip_expert.md):

* text: mean unit embedding of each class's prompt ensemble (`clip/prompts.py`) -> t_normal, t_anomalous;
  P(anomalous | e) = softmax(temperature * cos(e, [t_normal, t_anomalous]))[1].
* image score s0 = P(anomalous | whole-image embedding).
* windows: for every k x k window of the patch grid (k in `window_sizes`, stride 1) the class token and
  only that window's patch tokens go through the transformer again: WinCLIP's masked-window encoding,
  done exactly (not approximated by pooling patch tokens). Window scores are harmonically aggregated
  onto patches; the zero-shot map is the harmonic mean over scales, the whole image being one scale.
* few-shot (normal references given): per scale, distance of each query patch/window embedding to its
  nearest reference embedding, (1 - max cos) / 2; windows aggregated onto patches as above, averaged
  over scales. Map = (zero-shot + few-shot) / 2, score = (s0 + max few-shot) / 2.
* the patch-grid map is upsampled to the tower's input size, Gaussian-smoothed there, and resized to
  the image (bilinear), so the map is at the image's own resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from ..heatmap import resize_map
from ..image_io import ImageInput, load_image
from .loading import load_clip
from .prompts import class_prompts
from .windows import harmonic_aggregate, harmonic_mean, window_indices


@dataclass
class ImageFeatures:
    """Joint-space embeddings of a batch of images: whole image, every patch, every window per scale."""

    image: torch.Tensor  # [B, E]
    patches: torch.Tensor  # [B, N, E]
    windows: list[torch.Tensor]  # per window size: [B, W_k, E]


def anomaly_probability(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(anomalous) of [..., E] embeddings against the [2, E] (normal, anomalous) text embeddings."""
    logits = temperature * F.normalize(embeddings, dim=-1) @ text.T
    return logits.softmax(-1)[..., 1]


def nearest_distance(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(1 - cosine similarity to the nearest memory row) / 2, in [0, 1], for [..., E] embeddings."""
    similarity = F.normalize(embeddings, dim=-1) @ F.normalize(memory, dim=-1).T
    return (1.0 - similarity.amax(-1)) / 2.0


class ClipAnomalyExpert:
    """WinCLIP / WinCLIP+ anomaly score and map from an open_clip ViT; no training."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable,
        preprocess: Callable,
        object_name: str = "object",
        window_sizes: Sequence[int] = (2, 3),
        temperature: float = 100.0,
        smoothing_sigma: float = 4.0,
    ):
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ValueError("the CLIP expert needs an open_clip ViT image tower without attentional pooling")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.object_name = object_name  # may be changed between calls; text embeddings are cached per name
        self.temperature = temperature
        self.smoothing_sigma = smoothing_sigma  # in pixels of the tower's input image
        self.windows = [window_indices(visual.grid_size, size).to(self.device) for size in window_sizes]
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(
        cls, spec: str, device: str | None = None, object_name: str = "object", **settings
    ) -> ClipAnomalyExpert:
        """Load from a spec (`ARCH`, `ARCH:TAG`, `ARCH@FILE`, `CONFIG.json`, see `clip/loading.py`)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, preprocess = load_clip(spec, device)
        return cls(model, tokenizer, preprocess, object_name=object_name, **settings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)

    # -- embeddings -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def text_features(self) -> torch.Tensor:
        """[2, E] unit (normal, anomalous) text embeddings of the current object name."""
        if self.object_name not in self._text:
            classes = []
            for prompts in class_prompts(self.object_name):
                embeddings = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
                classes.append(F.normalize(embeddings.mean(0), dim=-1))
            self._text[self.object_name] = torch.stack(classes).float()
        return self._text[self.object_name]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        proj = self.model.visual.proj
        return (features if proj is None else features @ proj).float()

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageInput]) -> ImageFeatures:
        """Whole-image, patch and window embeddings of images, all in one batch."""
        visual = self.model.visual
        pixels = torch.stack([self.preprocess(load_image(image)) for image in images])
        tokens = visual._embeds(pixels.to(self.device, visual.conv1.weight.dtype))  # [B, 1+N, D], class token first
        pooled, patches = visual._pool(visual.transformer(tokens))
        windows = [self._encode_windows(tokens, indices) for indices in self.windows]
        return ImageFeatures(self._project(pooled), self._project(patches), windows)

    def _encode_windows(self, tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """[B, W, E]: each window's patch tokens, with the class token, through the transformer alone."""
        visual = self.model.visual
        batch, count = tokens.shape[0], indices.shape[0]
        window_tokens = tokens[:, 1:][:, indices]  # [B, W, k*k, D]
        class_token = tokens[:, None, :1].expand(batch, count, 1, tokens.shape[-1])
        sequences = torch.cat([class_token, window_tokens], dim=2).flatten(0, 1)  # [B*W, 1+k*k, D]
        pooled, _ = visual._pool(visual.transformer(sequences))
        return self._project(pooled).view(batch, count, -1)

    # -- scores ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_grid(self, image: ImageInput, references: Sequence[ImageInput] = ()) -> tuple[float, torch.Tensor]:
        """Image score in [0, 1] and the [rows, cols] anomaly map on the patch grid."""
        features = self.encode([image, *references])
        text = self.text_features()
        image_score = anomaly_probability(features.image[0], text, self.temperature)
        zero_shot = self._zero_shot_map(features, text, image_score)
        if not references:
            return float(image_score), zero_shot.view(self.grid_size)
        few_shot = self._few_shot_map(features)
        return float((image_score + few_shot.max()) / 2), ((zero_shot + few_shot) / 2).view(self.grid_size)

    def _zero_shot_map(self, features: ImageFeatures, text: torch.Tensor, image_score: torch.Tensor) -> torch.Tensor:
        """[N]: harmonic mean over scales (whole image, then each window size) of the query's window scores."""
        num_patches = features.patches.shape[1]
        scales = [image_score.expand(num_patches)] + [
            harmonic_aggregate(anomaly_probability(windows[0], text, self.temperature), indices, num_patches)
            for windows, indices in zip(features.windows, self.windows)
        ]
        return harmonic_mean(torch.stack(scales))

    def _few_shot_map(self, features: ImageFeatures) -> torch.Tensor:
        """[N]: mean over scales (patches, then each window size) of the query's nearest-reference distances."""
        num_patches = features.patches.shape[1]
        scales = [nearest_distance(features.patches[0], features.patches[1:].flatten(0, 1))] + [
            harmonic_aggregate(nearest_distance(windows[0], windows[1:].flatten(0, 1)), indices, num_patches)
            for windows, indices in zip(features.windows, self.windows)
        ]
        return torch.stack(scales).mean(0)

    def score(self, image: ImageInput, references: Sequence[ImageInput] = ()) -> tuple[float, np.ndarray]:
        """Image anomaly score in [0, 1] and an HxW map in [0, 1] at the image's resolution.

        Zero-shot without references; WinCLIP+ few-shot with normal reference images.
        """
        image = load_image(image)
        image_score, grid = self.score_grid(image, references)
        return image_score, self.to_image(grid, (image.height, image.width))

    def to_image(self, grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Patch-grid map -> smoothed [H, W] map at `size`, within [0, 1]."""
        input_size = tuple(self.model.visual.image_size)
        grid = grid[None, None].float().cpu()
        upsampled = F.interpolate(grid, input_size, mode="bilinear", align_corners=False)[0, 0]
        if self.smoothing_sigma > 0:
            upsampled = torch.from_numpy(cv2.GaussianBlur(upsampled.numpy(), (0, 0), self.smoothing_sigma))
        return resize_map(upsampled, size).clamp(0.0, 1.0).numpy()
