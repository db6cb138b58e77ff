"""Zero-shot test sets from the MVTec AD / VisA folder layouts, grouped per category, masks required.

The folders are read by `data.folder` (MVTec AD: `<root>/<category>/test/<defect|good>/`, masks under
`ground_truth/`; VisA: `<root>/split_csv/1cls.csv`); here the layout is recognised, the test images are
grouped with their category's normal training images (the few-shot references), and an anomalous test image
without a mask is an error, since it would silently count as all-normal pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data.errors import DataError
from data.folder import LabelledImage, load_folder

VISA_CSV = Path("split_csv") / "1cls.csv"


def draw_references(category: str, normal_train: list[Path], shots: int, seed: int) -> tuple[Path, ...]:
    """`shots` normal training images of a category as its few-shot references: seeded, the same for every run
    (zero-shot evaluation and few-shot calibration draw them alike)."""
    from assistant.errors import UsageError

    if shots > len(normal_train):
        raise UsageError(f"--shots {shots}: category {category} has only {len(normal_train)} normal training images")
    return tuple(random.Random(f"{seed}|{category}").sample(normal_train, shots))


@dataclass
class Category:
    name: str
    test: list[LabelledImage]
    normal_train: list[Path]


def sample_id(sample: LabelledImage) -> str:
    """Unique within a dataset and stable across runs: category, the image's folder, file name."""
    return f"{sample.category}/{sample.image.parent.name}/{sample.image.name}"


def load_mask(sample: LabelledImage, size: tuple[int, int]) -> np.ndarray:
    """Binary HxW mask (any non-zero pixel is anomalous: MVTec uses 255, VisA 1); all False for a normal image."""
    if sample.mask is None:
        return np.zeros(size, dtype=bool)
    return np.asarray(Image.open(sample.mask).convert("L")) > 0


def load_categories(
    root: str | Path, names: list[str] | None = None, require_masks: bool = True
) -> tuple[str, list[Category]]:
    """('mvtec' | 'visa', categories in name order), optionally only the named ones."""
    root = Path(root)
    layout = "visa" if (root / VISA_CSV).is_file() else "mvtec"
    images = load_folder(root, layout)
    found = sorted({image.category for image in images})
    unknown = sorted(set(names or []) - set(found))
    if unknown:
        raise DataError(f"{root}: no categories {unknown}; found {found}")
    unmasked = [str(i.image) for i in images if i.split == "test" and i.anomalous and i.mask is None]
    if unmasked and require_masks:
        raise DataError(
            f"{root}: {len(unmasked)} anomalous test images have no mask file, e.g. {unmasked[0]} "
            "(--image-only measures image-level metrics without masks)"
        )
    return layout, [
        Category(
            name,
            [i for i in images if i.category == name and i.split == "test"],
            [i.image for i in images if i.category == name and i.split == "train" and not i.anomalous],
        )
        for name in names or found
    ]
