"""Torch datasets for both stages and the sampler that makes resuming exact.

Every random choice made while reading data (shuffling, synthetic defects) is a pure function of
(seed, epoch, index), never of a global random state, so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from assistant.image_io import fit_long_side, load_image
from data.folder import LabelledImage
from data.instruct import InstructSample
from data.synthetic import synthesize_defect


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch (the same on every process, as accelerate's sharding requires)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(image.size) <= max_side:
        return image
    height, width = fit_long_side((image.height, image.width), max_side)
    return image.resize((width, height), Image.Resampling.BICUBIC)


class ExpertDataset(Dataset):
    """(image, label, mask) for stage 1; normal images may receive a synthetic defect on the fly.

    Masks: a normal image's mask is known to be empty; an anomalous image without a mask file has
    mask None and is left out of the mask loss.
    """

    def __init__(
        self,
        images: Sequence[LabelledImage],
        synthetic_anomalies: float = 0.0,
        max_side: int | None = None,
        seed: int = 0,
        synthetic_kinds: Sequence[str] = (),
    ):
        self.images, self.synthetic_anomalies, self.max_side, self.seed = (
            list(images), synthetic_anomalies, max_side, seed
        )
        self.synthetic_kinds = sorted(synthetic_kinds)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    @property
    def positive_fraction(self) -> float:
        """Expected share of anomalous samples, synthetic ones included (sets the BCE class weights)."""
        anomalous = sum(image.anomalous for image in self.images)
        normal = len(self.images) - anomalous
        return (anomalous + self.synthetic_anomalies * normal) / len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int, np.ndarray | None]:
        item = self.images[index]
        image = _downscale(load_image(item.image, name=str(item.image)), self.max_side)
        if item.anomalous:
            mask = None
            if item.mask is not None:
                mask = np.asarray(Image.open(item.mask).convert("L").resize(image.size, Image.Resampling.NEAREST))
            return image, 1, mask
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if rng.random() < self.synthetic_anomalies:
            kind = str(rng.choice(self.synthetic_kinds)) if self.synthetic_kinds else None
            defective, mask, _ = synthesize_defect(image, int(rng.integers(2**31)), kind)
            return defective, 1, mask
        return image, 0, np.zeros((image.height, image.width), np.uint8)


class InstructDataset(Dataset):
    """(messages, images) for stage 2; image errors name the record."""

    def __init__(self, samples: Sequence[InstructSample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[list[dict], list[Image.Image]]:
        sample = self.samples[index]
        images = [load_image(path, name=f"{sample.key} image {path}") for path in sample.images]
        return [dict(message) for message in sample.messages], images
