"""The simulated textile images of the `conformal-clip-data` package as an MVTec-layout dataset.

2,000 grayscale 250x250 fabric images: 1,000 nominal, 500 with a small local defect, 500 with a global one
(image labels, no masks). They are split once, per class and seeded, into train and a held-out test split
that no training step reads, and linked (or copied) into

    <root>/textile/{train,test}/{good,local_defect,global_defect}/<name>.jpg

`split.json` records the exact file lists, so every later step and every evaluation uses the same split.
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


def split_files(source: Path, test_fraction: float, seed: int) -> dict[str, dict[str, list[str]]]:
    """{split: {class folder: [file names]}}: a seeded per-class shuffle, the first share held out."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name, folder in CLASSES.items():
        files = sorted(p.name for p in (source / name).glob("*.jpg"))
        random.Random(f"{seed}:{name}").shuffle(files)
        held_out = round(len(files) * test_fraction)
        splits["test"][folder], splits["train"][folder] = sorted(files[:held_out]), sorted(files[held_out:])
    return splits


def _in_package(source: Path, classes: dict[str, list[str]]) -> dict[str, list[Path]]:
    """{class folder: file names} -> {class folder: the files' paths inside the package}."""
    package_folder = {folder: name for name, folder in CLASSES.items()}
    return {folder: [source / package_folder[folder] / name for name in names] for folder, names in classes.items()}


def split_paths(split: str, test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[Path]]:
    """{class folder: image paths inside the package} of one split, as `anomaly-assistant train demo` draws it."""
    source = source_folder()
    return _in_package(source, split_files(source, test_fraction, seed)[split])


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_textile_dataset(root: str | Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Lay the split out under root (idempotent; a different split of an existing root is refused)."""
    root = Path(root)
    source = source_folder()
    splits = split_files(source, test_fraction, seed)
    record = {"source": PACKAGE, "test_fraction": test_fraction, "seed": seed, "splits": splits}
    split_file = root / SPLIT_FILE
    if split_file.is_file():
        if json.loads(split_file.read_text(encoding="utf-8")) != record:
            raise DataError(f"{root} already holds a different textile split; use another folder")
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


def speck_position(image: Image.Image) -> tuple[int, int]:
    """(y, x) of a local defect's speck, found without any model, to check where a heatmap points.

    The local defects are salt-and-pepper specks: by far the strongest high-frequency energy in the image
    (a box-blurred absolute Laplacian), while the fabric's texture is smooth at that scale.
    """
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    energy = cv2.blur(np.abs(cv2.Laplacian(gray, cv2.CV_32F)), (9, 9))
    y, x = np.unravel_index(int(energy.argmax()), energy.shape)
    return int(y), int(x)
