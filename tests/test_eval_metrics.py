"""Anomaly-detection and text metrics against hand-computed values."""

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from eval.ad_metrics import aupro, auroc, evaluation_size, f1_max, resample
from eval.text_metrics import judge_score, rouge_l, sbert_cosine


def test_auroc_and_f1_max_by_hand():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # Positive/negative pairs ranked correctly: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4.
    assert auroc(labels, scores) == pytest.approx(0.75)
    # Thresholds: 0.8 -> P=1, R=.5, F1=2/3; 0.35 -> P=2/3, R=1, F1=0.8; 0.1 -> P=.5, R=1, F1=2/3.
    assert f1_max(labels, scores) == pytest.approx(0.8)


def test_single_class_metrics_are_undefined_not_errors():
    assert auroc(np.zeros(4), np.arange(4.0)) is None
    assert auroc(np.ones(4), np.arange(4.0)) is None
    assert f1_max(np.zeros(4), np.arange(4.0)) is None
    assert aupro([np.zeros((3, 3), bool)], [np.random.rand(3, 3)]) is None  # no anomalous region
    assert aupro([np.ones((3, 3), bool)], [np.random.rand(3, 3)]) is None  # no normal pixel


def test_pixel_auroc_matches_torchmetrics_exact_auroc():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 20, 20)) > 0.8
    maps = rng.random((3, 20, 20)) + 0.3 * masks
    expected = BinaryAUROC(thresholds=None)(torch.tensor(maps.ravel()), torch.tensor(masks.ravel()).long()).item()
    assert auroc(masks, maps) == pytest.approx(expected, abs=1e-6)


def test_aupro_single_region_by_hand():
    # One 2-pixel region, 3 normal pixels. Descending scores: 0.9 (region) 0.5 (normal) 0.4 (region) ...
    # PRO-FPR curve: (0, 0) -> (0, .5) -> (1/3, .5) -> (1/3, 1) -> ...; up to FPR 0.3 the PRO is 0.5,
    # area = 0.3 * 0.5 = 0.15, normalised by 0.3 -> 0.5.
    mask = np.array([[1, 1, 0, 0, 0]], dtype=bool)
    scores = np.array([[0.9, 0.4, 0.5, 0.2, 0.1]])
    assert aupro([mask], [scores]) == pytest.approx(0.5)
    assert aupro([mask], [np.array([[0.9, 0.8, 0.3, 0.2, 0.1]])]) == pytest.approx(1.0)  # perfect ranking


def test_aupro_averages_regions_not_pixels_and_interpolates_at_the_limit():
    # Image 1: a 1-pixel region found first; image 2: a 3-pixel region found only after 1 of 4 normal pixels.
    masks = [np.array([[1, 0, 0]], bool), np.array([[1, 1, 1, 0, 0]], bool)]
    maps = [np.array([[0.9, 0.1, 0.1]]), np.array([[0.5, 0.5, 0.5, 0.7, 0.2]])]
    # Normal pixels: 0.1, 0.1, 0.7, 0.2 (4). Curve: (0,0) -> 0.9: (0, .5) -> 0.7: (.25, .5) -> 0.5: (.25, 1) -> ...
    # Up to .25 the PRO is .5 (area .125); from .25 to .3 it is 1 (area .05): (0.125 + 0.05) / 0.3.
    assert aupro(masks, maps) == pytest.approx(0.175 / 0.3)
    # Pixel-averaged overlap would weigh the big region 3:1; region averaging gives each region half.


def test_evaluation_size_and_resampling():
    assert evaluation_size(1000, 1500, 256) == (171, 256)
    assert evaluation_size(100, 120, 256) == (100, 120)
    assert evaluation_size(1000, 1500, 0) == (1000, 1500)
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    anomaly_map = np.arange(16, dtype=np.float32).reshape(4, 4)
    resized_map, resized_mask = resample(anomaly_map, mask, (2, 2))
    assert resized_mask.tolist() == [[True, False], [False, False]]  # nearest keeps masks binary
    assert resized_map.dtype == np.float32 and resized_map[0, 0] == pytest.approx(2.5)  # bilinear at the 2x2 centre


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat on the mat" is 5 tokens: P = 5/5, R = 5/6, F = 10/11.
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == [pytest.approx(10 / 11)]


def test_sbert_cosine_runs_offline_and_ranks_paraphrases_higher():
    reference = "A long scratch runs across the top of the metal plate."
    scores = sbert_cosine(
        [reference, "There is a long scratch along the top of the plate.", "The weather is sunny today."],
        [reference] * 3,
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] > 0.6 > scores[2]


@pytest.mark.parametrize(
    ("reply", "score"),
    [("7\nClose to the reference.", 7.0), ("Score: 8.5/10", 8.5), ("10", 10.0), ("rating 11", None), ("no idea", None)],
)
def test_judge_score_takes_the_first_number_from_0_to_10(reply, score):
    assert judge_score(reply) == score
