"""Stage-1 losses: class-balanced BCE on the image score; focal + dice on the anomaly heatmap, or balanced BCE on
the crops' patch maps.

Class weights come from the dataset's class frequencies (synthetic defects included), not from each
batch: small batches are often all-normal, and batch weights would then rescale the loss at random.
The mask loss is a focal loss over pixels (the defect is a few percent of the image, so plain BCE is
dominated by easy background) plus a dice loss on images with a defect (it rewards covering the defect's
shape whatever its size). Normal images count with an all-zero mask; defects without a mask are skipped.
A defect much smaller than a patch barely moves either pixel-level loss once the map is upsampled; the patch
loss marks every patch it touches, weighs defective and clean patches equally and every defective image alike,
so such defects still teach the map (the demo's textile specks are ~6 x 14 px against 16 px patches).

Every term is a mean over the images of a whole optimizer step (all images; those with a known mask; those
with a defect), not of one micro-batch: the functions here return a batch's sums, and the caller divides them
by the step's counts (`mask_counts`, summed over micro-batches and processes by the training loop). So
gradient accumulation and data parallelism weigh every image alike, however the step's images are split.
For that, the patch loss's clean term is each image's mean over its clean patches (before, one mean over the
batch's clean patches, which weighed images by their crop count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from data.errors import DataError

EPS = 1e-6


def class_weights(positive_fraction: float) -> tuple[float, float]:
    """(normal, anomalous) weights so both classes contribute equally on average."""
    if not 0.0 < positive_fraction < 1.0:
        raise DataError(
            f"stage 1 needs normal and anomalous images, but {positive_fraction:.0%} of the data is anomalous; "
            "add defective images (e.g. a test split) or set data.synthetic_anomalies > 0"
        )
    return 0.5 / (1.0 - positive_fraction), 0.5 / positive_fraction


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor, weights: tuple[float, float]) -> torch.Tensor:
    """The class-weighted BCE of every image: [B]."""
    normal, anomalous = weights
    per_sample = torch.where(labels > 0.5, anomalous, normal).to(logits)
    return F.binary_cross_entropy_with_logits(
        logits.float(), labels.float(), weight=per_sample.float(), reduction="none"
    )


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    p = probabilities.float().clamp(EPS, 1 - EPS)
    p_true = torch.where(target > 0.5, p, 1 - p)
    return (-((1 - p_true) ** gamma) * torch.log(p_true)).mean()


def dice_loss(probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = probabilities.float()
    return 1 - (2 * (p * target).sum() + EPS) / (p.sum() + target.sum() + EPS)


def mask_counts(masks: Sequence[torch.Tensor | None]) -> tuple[int, int]:
    """(images with a known mask, images whose mask marks a defect): what the two mask terms average over."""
    known = [mask for mask in masks if mask is not None]
    return len(known), sum(bool(mask.any()) for mask in known)


def _total(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(values).sum() if values else like.new_zeros((), dtype=torch.float32)


def mask_loss(
    heatmaps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(focal summed over images with a known mask, dice summed over those with a defect)."""
    known = [(heatmap, mask.to(heatmap.device)) for heatmap, mask in zip(heatmaps, masks) if mask is not None]
    focal = [focal_loss(heatmap, mask, gamma) for heatmap, mask in known]
    dice = [dice_loss(heatmap, mask) for heatmap, mask in known if mask.any()]
    return _total(focal, heatmaps[0]), _total(dice, heatmaps[0])


def patch_mask_loss(
    maps: Sequence[torch.Tensor], targets: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean BCE of each known image's clean patches, summed; mean BCE of each defective image's defective
    patches, summed).

    Every image counts alike whatever its defect's size: a stain over thirty patches would otherwise drown the
    gradient of a speck on two.
    """
    clean, defects = [], []
    for crop_maps, target in zip(maps, targets):
        if target is None:
            continue
        target = target.to(crop_maps.device)
        per_patch = F.binary_cross_entropy(crop_maps.float().clamp(EPS, 1 - EPS), target.float(), reduction="none")
        defective = target > 0.5
        if (~defective).any():
            clean.append(per_patch[~defective].mean())
        if defective.any():
            defects.append(per_patch[defective].mean())
    return _total(clean, maps[0]), _total(defects, maps[0])
