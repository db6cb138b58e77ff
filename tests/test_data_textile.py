"""The textile split of the demo and the model-free speck locator used to check where heatmaps point."""

import numpy as np

from data.synthetic import normal_part, synthesize_defect
from data.textile import CLASSES, source_folder, speck_position, split_files, split_paths


def test_split_is_seeded_per_class_and_disjoint():
    source = source_folder()
    first, again = split_files(source, 0.2, seed=0), split_files(source, 0.2, seed=0)
    assert first == again and split_files(source, 0.2, seed=1) != first
    for folder in CLASSES.values():
        train, test = set(first["train"][folder]), set(first["test"][folder])
        assert not train & test and len(test) == round(0.2 * (len(train) + len(test)))
    paths = split_paths("test", 0.2, seed=0)
    assert {folder: [path.name for path in files] for folder, files in paths.items()} == first["test"]
    assert all(path.is_file() for files in paths.values() for path in files)


def test_speck_position_finds_a_pasted_speck():
    for seed in range(4):
        image, _ = normal_part("textile", 160, seed=seed)
        defective, mask, _ = synthesize_defect(image, seed=seed, kind="speckle")
        y, x = speck_position(defective)
        ys, xs = np.nonzero(mask)
        assert ys.min() - 4 <= y <= ys.max() + 4 and xs.min() - 4 <= x <= xs.max() + 4
