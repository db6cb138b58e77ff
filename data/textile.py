"""The simulated textile images of the `conformal-clip-data` package as an MVTec-layout dataset.

2,000 grayscale 250x250 fabric images: 1,000 nominal, 500 with a small local defect, 500 with a global one
(image labels, no masks). They are split once, per class and seeded, into train, a validation split carved out
of train (calibration and the domain threshold are fitted there; no training step reads it) and a held-out test
split that nothing but evaluation reads, and linked (or copied) into

    <root>/textile/{train,val,test}/{good,local_defect,global_defect}/<name>.jpg

The test split is the first share of each class's shuffle, the validation split the next one, so the test split
does not depend on `validation_fraction` (numbers stay comparable with the earlier 80/20 train/test recipe).

`split.json` records the exact file lists, so every later step and every evaluation uses the same split.
`write_speck_masks` adds pseudo masks for one split's local defects under `<root>/textile/ground_truth/`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import DataError

PACKAGE = "conformal_clip_data"
CATEGORY = "textile"
CLASSES = {"nominal": "good", "local": "local_defect", "global": "global_defect"}  # package folder -> ours
SPLIT_FILE = "split.json"


def source_folder() -> Path:
    """`.../conformal_clip_data/data/textile_images/simulated` of the installed package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the textile images need the `conformal-clip-data` package (pip install conformal-clip-data)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "textile_images" / "simulated"
    missing = [name for name in CLASSES if not (folder / name).is_dir()]
    if missing:
        raise DataError(f"{folder}: class folder(s) {missing} missing from {PACKAGE}")
    return folder


def split_files(
    source: Path, test_fraction: float, seed: int, validation_fraction: float = 0.0
) -> dict[str, dict[str, list[str]]]:
    """{split: {class folder: [file names]}}: a seeded per-class shuffle; the first share is the test split, the
    next the validation split (only when `validation_fraction` > 0), the rest train. Fractions are of each class."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= validation_fraction < 1.0 - test_fraction:
        raise DataError(f"validation_fraction must be in [0, {1.0 - test_fraction:g}), got {validation_fraction}")
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    if validation_fraction:
        splits["val"] = {}
    for name, folder in CLASSES.items():
        files = sorted(p.name for p in (source / name).glob("*.jpg"))
        random.Random(f"{seed}:{name}").shuffle(files)
        held_out = round(len(files) * test_fraction)
        validation = held_out + round(len(files) * validation_fraction)
        splits["test"][folder], splits["train"][folder] = sorted(files[:held_out]), sorted(files[validation:])
        if validation_fraction:
            splits["val"][folder] = sorted(files[held_out:validation])
    return splits


def _in_package(source: Path, classes: dict[str, list[str]]) -> dict[str, list[Path]]:
    """{class folder: file names} -> {class folder: the files' paths inside the package}."""
    package_folder = {folder: name for name, folder in CLASSES.items()}
    return {folder: [source / package_folder[folder] / name for name in names] for folder, names in classes.items()}


DEMO_SPLIT = {"test_fraction": 0.2, "validation_fraction": 0.1, "seed": 0}  # `anomaly-assistant train demo`


def split_paths(split: str, **fractions_and_seed) -> dict[str, list[Path]]:
    """{class folder: image paths inside the package} of one split, drawn as `anomaly-assistant train demo` does
    unless `test_fraction`, `validation_fraction` or `seed` say otherwise."""
    source = source_folder()
    options = {**DEMO_SPLIT, **fractions_and_seed}
    splits = split_files(source, options["test_fraction"], options["seed"], options["validation_fraction"])
    if split not in splits:
        raise DataError(f"no {split!r} split; the splits are {sorted(splits)}")
    return _in_package(source, splits[split])


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_textile_dataset(
    root: str | Path, test_fraction: float = 0.2, seed: int = 0, validation_fraction: float = 0.0
) -> Path:
    """Lay the split out under root (idempotent; a different split of an existing root is refused)."""
    root = Path(root)
    source = source_folder()
    splits = split_files(source, test_fraction, seed, validation_fraction)
    record = {
        "source": PACKAGE,
        "test_fraction": test_fraction,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "splits": splits,
    }
    split_file = root / SPLIT_FILE
    if split_file.is_file():
        existing = {"validation_fraction": 0.0, **json.loads(split_file.read_text(encoding="utf-8"))}  # older roots
        if existing != record:
            raise DataError(
                f"{root} already holds a different textile split; use another folder (or delete this one to rebuild)"
            )
        return root
    for split, classes in splits.items():
        for folder, paths in _in_package(source, classes).items():
            for path in paths:
                _link(path, root / CATEGORY / split / folder / path.name)
    root.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return root


def detection_items(root: str | Path, prefix: str) -> list[dict]:
    """The test split as VisA-D&R detection items (`{"image": prefix/textile/test/..., "anomaly": bool}`)."""
    splits = json.loads((Path(root) / SPLIT_FILE).read_text(encoding="utf-8"))["splits"]
    return [
        {"image": f"{prefix}/{CATEGORY}/test/{folder}/{file}", "anomaly": folder != "good"}
        for folder, files in sorted(splits["test"].items())
        for file in files
    ]


BORDER = 4  # every image carries a white last row and column; the locator looks inside it


def _speck_energy(image: Image.Image) -> np.ndarray:
    """Box-blurred absolute Laplacian, zero on the image border."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    energy = cv2.blur(np.abs(cv2.Laplacian(gray, cv2.CV_32F)), (5, 5))
    inner = np.zeros_like(energy)
    inner[BORDER:-BORDER, BORDER:-BORDER] = energy[BORDER:-BORDER, BORDER:-BORDER]
    return inner


def _peak(energy: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(energy.argmax()), energy.shape)
    return int(y), int(x)


def speck_position(image: Image.Image) -> tuple[int, int]:
    """(y, x) of a local defect's speck, found without any model.

    The local defects are salt-and-pepper specks: by far the strongest high-frequency energy in the image
    (a box-blurred absolute Laplacian), while the fabric's texture is smooth at that scale. The peak alone
    separates the 500 local defects from the 1,000 normal images perfectly (AUROC 1.0).
    """
    return _peak(_speck_energy(image))


def speck_mask(image: Image.Image) -> np.ndarray:
    """uint8 mask (255 = defect) of the speck: the region around the energy peak above half its height.

    About 10 x 19 px on the 250 px images (the ~6 x 14 px speck plus the blur's reach).
    """
    energy = _speck_energy(image)
    y, x = _peak(energy)
    _, labels = cv2.connectedComponents((energy >= 0.5 * energy[y, x]).astype(np.uint8))
    return np.where(labels == labels[y, x], 255, 0).astype(np.uint8)


def write_speck_masks(root: str | Path, split: str = "train") -> int:
    """Pseudo masks for one split's local defects, where the MVTec layout keeps masks (idempotent).

    The package has image labels only. These masks come from `speck_mask`, not from a person; stage 1 uses
    them so the heatmap learns where a speck is. Returns how many masks the folder holds.
    """
    root = Path(root)
    images = sorted((root / CATEGORY / split / CLASSES["local"]).glob("*.jpg"))
    if not images:
        raise DataError(f"{root}: no local defects in the {split} split; write the dataset first")
    masks = root / CATEGORY / "ground_truth" / CLASSES["local"]
    masks.mkdir(parents=True, exist_ok=True)
    for path in images:
        target = masks / f"{path.stem}_mask.png"
        if not target.is_file():
            with Image.open(path) as image:
                Image.fromarray(speck_mask(image)).save(target)
    return len(images)
