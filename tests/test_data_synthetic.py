"""Synthetic defects: deterministic, masks mark exactly the changed pixels, kept on the part; the dataset writer."""

import numpy as np
import pytest

from data.synth_dataset import SynthSpec, write_synthetic_dataset
from data.synthetic import DEFECT_GENERATORS, normal_part, perlin_noise, synthesize_defect


@pytest.mark.parametrize("kind", sorted(DEFECT_GENERATORS))
def test_each_generator_is_deterministic_and_its_mask_covers_the_change(kind):
    image, _ = normal_part("textile", 64, seed=1)
    first, mask, chosen = synthesize_defect(image, seed=7, kind=kind)
    again, mask_again, _ = synthesize_defect(image, seed=7, kind=kind)
    other, _, _ = synthesize_defect(image, seed=8, kind=kind)
    assert chosen == kind and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(np.asarray(first), np.asarray(again)) and np.array_equal(mask, mask_again)
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    changed = np.any(np.asarray(first) != np.asarray(image), axis=-1)
    assert not changed[mask == 0].any()  # nothing changes outside the mask
    assert changed[mask > 0].mean() > 0.5  # and most of the mask is visibly different
    assert 0 < (mask > 0).mean() < 0.5


def test_defects_stay_inside_the_part():
    image, part = normal_part("pill", 64, seed=2)
    assert 0.1 < part.mean() < 0.5
    for seed in range(6):
        defective, mask, _ = synthesize_defect(image, seed=seed, region=part)
        assert mask.any() and not mask[~part].any()
        assert np.array_equal(np.asarray(defective)[~part], np.asarray(image)[~part])


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert noise.shape == (64, 64) and np.abs(noise).max() <= 1.5
    assert np.abs(np.diff(noise, axis=1)).max() < 0.3  # neighbours differ little: smooth, not white noise
    assert noise.std() > 0.1


def test_synthetic_dataset_in_mvtec_layout(tmp_path):
    spec = SynthSpec(
        categories=["pill"], train_good=2, test_good=1, test_defective=1, kinds=["scratch", "stain"], size=32
    )
    images = write_synthetic_dataset(tmp_path, spec)
    assert [(i.split, i.defect) for i in images] == [
        ("train", None),
        ("train", None),
        ("test", None),
        ("test", "scratch"),
        ("test", "stain"),
    ]
    assert (tmp_path / "pill" / "ground_truth" / "stain" / "000_mask.png").is_file()
    assert all((i.mask is not None) == i.anomalous for i in images)
    again = write_synthetic_dataset(tmp_path / "again", spec)
    assert (tmp_path / "pill/test/stain/000.png").read_bytes() == (
        (tmp_path / "again/pill/test/stain/000.png").read_bytes()
    )
    assert len(again) == len(images)
