"""Stage 1: train the anomaly expert (LTFM + token selector) on labelled images, vision tower frozen.

As in Anomaly-OV: class-balanced BCE on the image score, AdamW, cosine with warm restarts. Beyond it: a
loss on the anomaly maps where masks are known (`objective.mask_level`: focal + dice on the heatmap, or
balanced BCE per patch; Anomaly-OV learns its map without masks; ours is shown to users, so it gets
supervision when there is some). The language model is never run: the forward
is the model's own `analyze_queries`, the vision pass and expert that `encode_images` builds its tokens on.

    anomaly-assistant train expert --config training/configs/tiny_expert.yaml
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from assistant.domain import MIN_IMAGES, DomainModel, fit_domain
from assistant.engine import ImageAnalyzer
from assistant.factory import save_assistant
from assistant.heatmap import crop_targets
from assistant.modeling import AssistantForConditionalGeneration
from assistant.processing import AssistantProcessor
from assistant.vision import ImageAnalysis
from data.folder import load_folder
from data.synth_dataset import ensure_synthetic_dataset

from .cards import stage_card
from .collate import ExpertCollator
from .config import ConfigError, ExpertData, ExpertObjectiveConfig, ExpertTrainConfig
from .datasets import ExpertDataset
from .loop import TrainingTask, TrainSummary, make_accelerator, run_training
from .losses import balanced_bce, class_weights, mask_counts, mask_loss, patch_mask_loss
from .models import compute_dtype, load_assistant, upcast_trainable

FINAL_DIR = "final"


class ExpertObjective(nn.Module):
    """Images -> the expert's analysis (logits, crop maps, source-size heatmaps), holding only the tower and expert.

    The language model is deliberately not a submodule: accelerate moves (and DDP wraps) only what stage 1
    needs, so a 7B LLM never occupies GPU memory here.
    """

    def __init__(self, model: AssistantForConditionalGeneration, train_vision: bool):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.anomaly_expert = model.model.anomaly_expert
        self.train_vision = train_vision
        self._analyze = model.model.analyze_queries  # a bound method: the LLM is not registered as a module

    def forward(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, source_sizes: torch.Tensor
    ) -> ImageAnalysis:
        every_image = torch.ones(len(image_sizes), dtype=torch.bool, device=image_sizes.device)
        _, analysis = self._analyze(pixel_values, image_sizes, every_image, source_sizes, vision_grad=self.train_vision)
        return analysis


def select_trainable(model: AssistantForConditionalGeneration, train_vision: bool) -> None:
    model.requires_grad_(False)
    model.model.anomaly_expert.requires_grad_(True)
    if train_vision:
        model.model.vision_tower.requires_grad_(True)


def param_groups(objective: ExpertObjective, config: ExpertTrainConfig) -> list[dict]:
    groups = [{"name": "expert", "params": list(objective.anomaly_expert.parameters()), "lr": config.optim.lr}]
    if config.objective.train_vision:
        groups.append(
            {"name": "vision", "params": list(objective.vision_tower.parameters()), "lr": config.objective.vision_lr}
        )
    return groups


def expert_dataset(data: ExpertData, seed: int) -> ExpertDataset:
    if not data.folders:
        raise ConfigError("data.folders: give at least one labelled image folder")
    if data.synthesize is not None:
        ensure_synthetic_dataset(data.folders[0].root, data.synthesize)
    images = [
        image
        for folder in data.folders
        for image in load_folder(folder.root, folder.layout, folder.split, folder.categories)
    ]
    return ExpertDataset(images, data.synthetic_anomalies, data.max_image_side, seed, data.synthetic_kinds)


def map_loss(
    analysis: ImageAnalysis, batch: dict, objective: ExpertObjectiveConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured mask loss (`objective.mask_level`) as its two sums: over images with a known mask, and over
    those with a defect (`losses.mask_counts` counts both)."""
    if objective.mask_level == "pixel":
        return mask_loss(analysis.heatmaps, batch["masks"], objective.focal_gamma)
    crop_maps = torch.split(analysis.expert.maps, [layout.num_crops for layout in analysis.layouts])
    side = analysis.expert.maps.shape[-1]
    targets = [
        None if mask is None else crop_targets(mask, tuple(size), layout.grid, side)
        for mask, size, layout in zip(batch["masks"], batch["image_sizes"].tolist(), analysis.layouts)
    ]
    return patch_mask_loss(crop_maps, targets)


def count_items(batch: dict) -> dict[str, int]:
    """What the loss terms average over: images, images with a known mask, images with a defect."""
    known, defective = mask_counts(batch["masks"])
    return {"images": len(batch["labels"]), "masked": known, "defective": defective}


def make_loss(config: ExpertTrainConfig, weights: tuple[float, float]):
    """Balanced BCE on the image logit, plus the weighted mask loss; each a mean over the optimizer step's images."""
    objective = config.objective

    def compute(model: nn.Module, batch: dict, totals: dict[str, int]) -> tuple[torch.Tensor, dict[str, float]]:
        analysis = model(batch["pixel_values"], batch["image_sizes"], batch["source_sizes"])
        bce = balanced_bce(analysis.expert.logits, batch["labels"], weights).sum() / totals["images"]
        if objective.mask_loss_weight <= 0:
            return bce, {"bce": bce.item()}
        known, defective = map_loss(analysis, batch, objective)
        masked = known / max(totals["masked"], 1) + defective / max(totals["defective"], 1)
        return bce + objective.mask_loss_weight * masked, {"bce": bce.item(), "mask": masked.item()}

    return compute


DOMAIN_IMAGES = 1000  # training images the domain statistics are fitted on (a seeded sample of larger sets)


def domain_sample(images: list, seed: int) -> list:
    """The training images the domain statistics are fitted on: all, or a seeded sample of `DOMAIN_IMAGES`."""
    return random.Random(seed).sample(images, min(len(images), DOMAIN_IMAGES))


def training_domain(
    model: AssistantForConditionalGeneration, processor: AssistantProcessor, config: ExpertTrainConfig, source: str
) -> DomainModel | None:
    """The domain statistics of the training folders' images as the trained tower sees them (on its device), or
    None where they cannot be fitted: synthetic data only, too few images, or ROI maps from an external expert."""
    images = [item.image for f in config.data.folders for item in load_folder(f.root, f.layout, f.split, f.categories)]
    if len(images) < MIN_IMAGES or model.config.roi.map_source == "external":
        return None
    return fit_domain(ImageAnalyzer(model, processor), domain_sample(images, config.run.seed), source=source)


def save_final(model: AssistantForConditionalGeneration, processor: AssistantProcessor, config: ExpertTrainConfig):
    """The whole assistant with the trained expert, loadable by `from_pretrained` (stage 2 starts from it), with
    its model card and the domain statistics of its training images (`assistant.domain`); the starting model's
    domain is not carried over, since this stage changed what the tower sees."""

    def save(objective: nn.Module, state: dict, output_dir: Path) -> None:
        # The expert is small and trains under DDP, so its weights are whole in `model` on every process.
        folders = ", ".join(f"{f.root} [{f.split}]" for f in config.data.folders) or "synthetic images"
        card = stage_card(config.model, "stage 1 (expert)", folders, f"{config.run.max_steps} steps")
        domain = training_domain(model, processor, config, folders)
        final = save_assistant(model.to("cpu"), processor, output_dir / FINAL_DIR, card=card)
        if domain is not None:
            domain.save(final)

    return save


def train_expert(config: ExpertTrainConfig, resume: Path | None = None) -> TrainSummary:
    accelerator = make_accelerator(config.run)
    set_seed(config.run.seed)
    dataset = expert_dataset(config.data, config.run.seed)
    weights = class_weights(dataset.positive_fraction)
    model, processor = load_assistant(config.model, dtype=compute_dtype(accelerator))
    select_trainable(model, config.objective.train_vision)
    upcast_trainable(model)
    objective = ExpertObjective(model, config.objective.train_vision)
    task = TrainingTask(
        name="expert",
        model=objective,
        param_groups=param_groups(objective, config),
        dataset=dataset,
        collate=ExpertCollator(processor),
        compute_loss=make_loss(config, weights),
        count_items=count_items,
        save_final=save_final(model, processor, config),
    )
    return run_training(task, config, accelerator, resume)
