"""Labelled images from the MVTec AD and VisA folder layouts (good/defect images, pixel masks).

MVTec AD: `<root>/<category>/{train,test}/<good|defect>/*.png`, masks
`<root>/<category>/ground_truth/<defect>/<name>_mask.png`.
VisA: `<root>/split_csv/1cls.csv` with columns object, split, label, image, mask (paths relative to the
root; label `normal` or `anomaly`); the defect names come from `<root>/<object>/image_anno.csv` when present.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
Split = Literal["train", "val", "test", "all"]  # "val": a validation split carved out of train
Layout = Literal["mvtec", "visa"]


@dataclass(frozen=True)
class LabelledImage:
    """One image with its label; `mask` is None for normal images and for defects without a mask."""

    image: Path
    anomalous: bool
    category: str
    defect: str | None  # defect type in words ("broken large"), None when normal
    split: str
    mask: Path | None = None


def _splits(split: Split) -> tuple[str, ...]:
    return ("train", "val", "test") if split == "all" else (split,)


def _defect_words(name: str) -> str:
    return name.replace("_", " ").strip()


def mvtec_images(root: Path, split: Split = "all", categories: Sequence[str] = ()) -> list[LabelledImage]:
    found = []
    category_dirs = sorted(d for d in root.iterdir() if any((d / s).is_dir() for s in ("train", "val", "test")))
    for category_dir in category_dirs:
        if categories and category_dir.name not in categories:
            continue
        for split_name in _splits(split):
            for defect_dir in sorted(p for p in (category_dir / split_name).glob("*") if p.is_dir()):
                anomalous = defect_dir.name != "good"
                for image in sorted(p for p in defect_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                    mask = category_dir / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
                    found.append(
                        LabelledImage(
                            image=image,
                            anomalous=anomalous,
                            category=category_dir.name,
                            defect=_defect_words(defect_dir.name) if anomalous else None,
                            split=split_name,
                            mask=mask if anomalous and mask.is_file() else None,
                        )
                    )
    return found


def _visa_defects(root: Path, category: str) -> dict[str, str]:
    """image path -> defect words from VisA's per-object image_anno.csv (empty when the file is absent)."""
    annotations = root / category / "image_anno.csv"
    if not annotations.is_file():
        return {}
    with annotations.open(newline="") as handle:
        return {row["image"]: _defect_words(row["label"]) for row in csv.DictReader(handle) if row.get("label")}


def visa_images(root: Path, split: Split = "all", categories: Sequence[str] = ()) -> list[LabelledImage]:
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        raise DataError(f"{root}: not a VisA folder (split_csv/1cls.csv is missing)")
    found, defects = [], {}
    with split_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing_columns = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
    if missing_columns:
        raise DataError(f"{split_csv}: missing column(s) {sorted(missing_columns)}")
    for row in rows:
        category = row["object"]
        if row["split"] not in _splits(split) or (categories and category not in categories):
            continue
        anomalous = row["label"] != "normal"
        if category not in defects:
            defects[category] = _visa_defects(root, category)
        mask = root / row["mask"] if anomalous and row["mask"] else None
        found.append(
            LabelledImage(
                image=root / row["image"],
                anomalous=anomalous,
                category=category,
                defect=defects[category].get(row["image"], "anomaly") if anomalous else None,
                split=row["split"],
                mask=mask if mask is not None and mask.is_file() else None,
            )
        )
    return found


def load_folder(
    root: str | Path, layout: Layout = "mvtec", split: Split = "all", categories: Sequence[str] = ()
) -> list[LabelledImage]:
    """Every labelled image of a dataset folder, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    readers = {"mvtec": mvtec_images, "visa": visa_images}
    if layout not in readers:
        raise DataError(f"unknown dataset layout {layout!r}: use one of {sorted(readers)}")
    images = readers[layout](root, split, categories)
    if not images:
        raise DataError(f"{root}: no {layout} images found (split {split}, categories {list(categories) or 'all'})")
    return images
