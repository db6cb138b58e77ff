"""Write a synthetic dataset in the MVTec AD folder layout, so every loader and trainer can run offline.

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png   with   <root>/<category>/ground_truth/<defect>/000_mask.png

Images and masks depend only on the seed, so a dataset can be regenerated instead of stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .folder import LabelledImage, load_folder
from .synthetic import DEFECT_GENERATORS, NORMAL_CATEGORIES, normal_part, synthesize_defect


@dataclass
class SynthSpec:
    """How many images of each kind to draw per category."""

    categories: list[str] = field(default_factory=lambda: list(NORMAL_CATEGORIES))
    train_good: int = 8
    test_good: int = 4
    test_defective: int = 2  # per defect kind
    kinds: list[str] = field(default_factory=lambda: sorted(DEFECT_GENERATORS))
    size: int = 128
    seed: int = 0


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_synthetic_dataset(root: str | Path, spec: SynthSpec) -> list[LabelledImage]:
    """Draw the images and masks under root and return them as read back by the MVTec loader."""
    root = Path(root)
    for c, category in enumerate(spec.categories):
        def seed(group: int, index: int) -> int:
            return spec.seed * 1_000_003 + c * 100_003 + group * 10_007 + index

        for index in range(spec.train_good):
            _save(
                normal_part(category, spec.size, seed(0, index))[0],
                root / category / "train" / "good" / f"{index:03d}.png",
            )
        for index in range(spec.test_good):
            _save(
                normal_part(category, spec.size, seed(1, index))[0],
                root / category / "test" / "good" / f"{index:03d}.png",
            )
        for k, kind in enumerate(spec.kinds):
            for index in range(spec.test_defective):
                base, part = normal_part(category, spec.size, seed(2 + k, index))
                defective, mask, _ = synthesize_defect(base, seed(2 + k, index), kind, region=part)
                _save(defective, root / category / "test" / kind / f"{index:03d}.png")
                _save(Image.fromarray(mask), root / category / "ground_truth" / kind / f"{index:03d}_mask.png")
    return load_folder(root, "mvtec", "all", spec.categories)


def ensure_synthetic_dataset(root: str | Path, spec: SynthSpec) -> Path:
    """Write the dataset unless root already holds one (so configs can name it and rerun cheaply)."""
    root = Path(root)
    if not any((root / category).is_dir() for category in spec.categories):
        write_synthetic_dataset(root, spec)
    return root
