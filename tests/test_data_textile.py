"""The textile split of the demo and the model-free speck locator (training pseudo masks, heatmap checks)."""

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError
from data.synthetic import normal_part, synthesize_defect
from data.textile import CLASSES, source_folder, speck_mask, speck_position, split_files, split_paths, write_speck_masks


def test_split_is_seeded_per_class_and_disjoint():
    source = source_folder()
    first, again = split_files(source, 0.2, seed=0, validation_fraction=0.1), split_files(source, 0.2, 0, 0.1)
    assert first == again and split_files(source, 0.2, seed=1, validation_fraction=0.1) != first
    for folder in CLASSES.values():
        train, val, test = (set(first[split][folder]) for split in ("train", "val", "test"))
        total = len(train) + len(val) + len(test)
        assert not train & test and not train & val and not val & test
        assert len(test) == round(0.2 * total) and len(val) == round(0.1 * total)
    # the held-out test split does not move when a validation split is carved out of train
    without_validation = split_files(source, 0.2, seed=0)
    assert without_validation["test"] == first["test"] and "val" not in without_validation
    paths = split_paths("test")
    assert {folder: [path.name for path in files] for folder, files in paths.items()} == first["test"]
    assert all(path.is_file() for files in paths.values() for path in files)
    with pytest.raises(DataError, match="validation_fraction"):
        split_files(source, 0.2, seed=0, validation_fraction=0.8)


def test_speck_position_finds_a_pasted_speck():
    for seed in range(4):
        image, _ = normal_part("textile", 160, seed=seed)
        defective, mask, _ = synthesize_defect(image, seed=seed, kind="speckle")
        y, x = speck_position(defective)
        ys, xs = np.nonzero(mask)
        assert ys.min() - 4 <= y <= ys.max() + 4 and xs.min() - 4 <= x <= xs.max() + 4


def test_speck_mask_covers_a_pasted_speck_and_little_else():
    for seed in range(4):
        image, _ = normal_part("textile", 160, seed=seed)
        defective, mask, _ = synthesize_defect(image, seed=seed, kind="speckle")
        located = speck_mask(defective) > 0
        assert (located & (mask > 0)).sum() >= 0.5 * located.sum()  # mostly on the speck
        assert located.sum() <= 4 * (mask > 0).sum()


def test_speck_masks_land_where_the_mvtec_loader_reads_them(tmp_path):
    """Only the chosen split's local defects get a mask, written once; the white image border is never the speck."""
    from data.folder import load_folder

    folder = tmp_path / "textile" / "train" / "local_defect"
    folder.mkdir(parents=True)
    for path in split_paths("train")["local_defect"][:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (tmp_path / "textile" / "test" / "local_defect").mkdir(parents=True)
    assert write_speck_masks(tmp_path, "train") == 3
    images = load_folder(tmp_path, "mvtec", "train", ["textile"])
    assert len(images) == 3 and all(image.mask is not None for image in images)
    for image in images:
        mask = np.asarray(Image.open(image.mask))
        ys, xs = np.nonzero(mask)
        assert mask.shape == (250, 250) and 0 < len(ys) < 600
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < 249 and xs.max() < 249
    first = images[0].mask.stat().st_mtime_ns
    write_speck_masks(tmp_path, "train")
    assert images[0].mask.stat().st_mtime_ns == first
    with pytest.raises(DataError, match="no local defects in the test split"):
        write_speck_masks(tmp_path, "test")
